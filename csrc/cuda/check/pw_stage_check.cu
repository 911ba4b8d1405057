// The check TU of the pointwise stage: its extern "C" entry points run each fused kernel's launch
// entry (kernels/pw_launch.cuh, the code the torch launcher csrc/cuda/pw_stage.cu runs between its
// GEMMs) from plain pointers, for the CPU emulation tests (python_tests/cuda_emulation) through
// ctypes; the protocol is entry.cuh's. Compiling them instantiates every kernel for every storage
// type and activation, so `nvcc -Xptxas -v` reports registers and spills without torch or a GPU.
// The call structs are filled in their members' order, which is the entry points' argument order.
// Nothing here may include torch.
#include "entry.cuh"
#include "../kernels/pw_launch.cuh"

namespace cuda = convmixer_kernels::cuda;
namespace pw = convmixer_kernels::cuda::pw;
using convmixer_kernels::Act;

static pw::Problem problem(int dtype, long long rows, long long C) {
  return {static_cast<cuda::DType>(dtype), rows, C};
}

extern "C" int convmixer_pw_prologue(int dtype, long long rows, long long C, const void* x,
                                     const void* x_mean, const void* x_scale, const void* x_shift,
                                     const void* res, const void* res_mean, const void* res_scale,
                                     const void* res_shift, void* u, int x_act,
                                     cudaStream_t stream) {
  const pw::Prologue c{problem(dtype, rows, C), x, {x_mean, x_scale, x_shift}, res,
                       {res_mean, res_scale, res_shift}, u, x_act};
  return cuda::run_entry(c, u, nullptr, 0, nullptr, stream);
}

extern "C" int convmixer_pw_epilogue_forward(int dtype, int act, long long rows, long long C,
                                             const void* pre, void* out, void* mean_out,
                                             void* var_out, const void* bn_weight,
                                             const void* bn_bias, int bn_type, double bn_eps,
                                             void* bn_scale, void* bn_shift, void* workspace,
                                             size_t workspace_bytes, size_t* workspace_bytes_out,
                                             cudaStream_t stream) {
  const pw::EpilogueForward c{
      problem(dtype, rows, C), static_cast<Act>(act), pre, out, mean_out, var_out,
      cuda::bn_norm_of(bn_weight, bn_bias, bn_type, bn_eps, bn_scale, bn_shift)};
  return cuda::run_entry(c, out, workspace, workspace_bytes, workspace_bytes_out, stream);
}

extern "C" int convmixer_pw_epilogue_backward(int dtype, int act, long long rows, long long C,
                                              const void* grad_out, const void* pre,
                                              const void* grad_mean, const void* grad_var,
                                              const void* mean, void* grad_pre, void* grad_bias,
                                              const void* bn_grad_scale, const void* bn_grad_shift,
                                              const void* bn_var, const void* bn_weight,
                                              int bn_type, double bn_eps, void* bn_grad_weight,
                                              void* bn_grad_bias, void* workspace,
                                              size_t workspace_bytes, size_t* workspace_bytes_out,
                                              cudaStream_t stream) {
  const pw::EpilogueBackward c{problem(dtype, rows, C), static_cast<Act>(act), grad_out, pre,
                               grad_mean, grad_var, mean, grad_pre, grad_bias,
                               cuda::bn_grad_of(bn_grad_scale, bn_grad_shift, bn_var, bn_weight,
                                                bn_type, bn_eps, bn_grad_weight, bn_grad_bias)};
  // grad_bias marks a real call (null: a size query): grad_pre has no element without rows, while
  // the bias gradient is still written (zeros) then.
  return cuda::run_entry(c, grad_bias, workspace, workspace_bytes, workspace_bytes_out, stream);
}

extern "C" int convmixer_pw_through_norms(int dtype, long long rows, long long C, const void* grad_u,
                                          const void* x, const void* x_mean, const void* x_scale,
                                          const void* res, const void* res_mean,
                                          const void* res_scale, void* grad_x, void* grad_res,
                                          void* x_grad_mean, void* x_grad_scale,
                                          void* x_grad_shift, void* res_grad_mean,
                                          void* res_grad_scale, void* res_grad_shift,
                                          int x_act, void* workspace, size_t workspace_bytes,
                                          size_t* workspace_bytes_out, cudaStream_t stream) {
  const pw::ThroughNorms c{problem(dtype, rows, C), grad_u, x, {x_mean, x_scale, nullptr}, res,
                           {res_mean, res_scale, nullptr}, grad_x, grad_res,
                           {x_grad_mean, x_grad_scale, x_grad_shift},
                           {res_grad_mean, res_grad_scale, res_grad_shift}, x_act};
  // A launch, not a size query, when the call writes anything.
  const void* output = grad_x;
  for (const void* o : {grad_res, x_grad_mean, res_grad_mean})
    if (output == nullptr) output = o;
  return cuda::run_entry(c, output, workspace, workspace_bytes, workspace_bytes_out, stream);
}
