// The check TU of the depthwise stage: its extern "C" entry points run the stage's launch entries
// (kernels/dw_launch.cuh, the code the torch launcher csrc/cuda/dw_stage.cu runs) from plain
// pointers, for the CPU emulation tests (python_tests/cuda_emulation) through ctypes; the
// protocol is entry.cuh's. The kernels the entries can pick (4 storage types x k in {generic, 3,
// 5, 7, 9} x every activation of csrc/activation.h) are compiled in csrc/cuda/inst/dw_*.cu,
// which the cuda_kernels_check target builds with this file, so `nvcc -Xptxas -v` reports
// registers and spills for each, without torch or a GPU. The call structs are filled in their
// members' order, which is the entry points' argument order. Nothing here may include torch.
#include "entry.cuh"
#include "../kernels/dw_launch.cuh"

// nvcc builds the kernels in the instantiation units (csrc/cuda/inst/dw_*.cu, in the
// cuda_kernels_check target beside this file); the CPU emulation compiles one translation unit, so
// it takes them in here.
#ifdef CONVMIXER_CUDA_EMULATION
#include "../inst/dw_f32_forward.cu"
#include "../inst/dw_f32_backward.cu"
#include "../inst/dw_f32_backward_fused.cu"
#include "../inst/dw_f16_forward.cu"
#include "../inst/dw_f16_backward.cu"
#include "../inst/dw_f16_backward_fused.cu"
#include "../inst/dw_bf16_forward.cu"
#include "../inst/dw_bf16_backward.cu"
#include "../inst/dw_bf16_backward_fused.cu"
#include "../inst/dw_f64.cu"
#endif

namespace cuda = convmixer_kernels::cuda;
namespace dw = convmixer_kernels::cuda::dw;
using convmixer_kernels::Act;

// The CTA-count target the entry points plan with; tests lower it (convmixer_dw_set_target_ctas)
// so that small shapes still give CTAs several tiles to walk.
static long long g_target_ctas = dw::kTargetCtas;

extern "C" void convmixer_dw_set_target_ctas(long long n) {
  g_target_ctas = n > 0 ? n : dw::kTargetCtas;
}

static dw::Problem problem(int dtype, long long N, long long C, long long H, long long W, int K) {
  return {static_cast<cuda::DType>(dtype), N, C, H, W, K, g_target_ctas};
}

extern "C" int convmixer_dw_forward(int dtype, int act, const void* x, long long N, long long C,
                                    long long H, long long W, int K, const void* norm_mean,
                                    const void* norm_scale, const void* norm_shift,
                                    const void* weight, const void* bias, void* out,
                                    void* mean_out, void* var_out, void* pre_act,
                                    const void* bn_weight, const void* bn_bias, int bn_type,
                                    double bn_eps, void* bn_scale, void* bn_shift,
                                    void* workspace, size_t workspace_bytes,
                                    size_t* workspace_bytes_out, cudaStream_t stream) {
  const dw::Forward c{problem(dtype, N, C, H, W, K), static_cast<Act>(act), x,
                      {norm_mean, norm_scale, norm_shift}, weight, bias, out, mean_out, var_out,
                      pre_act,
                      cuda::bn_norm_of(bn_weight, bn_bias, bn_type, bn_eps, bn_scale, bn_shift)};
  // A launch, not a size query, when it writes out or, without out, pre_act.
  return cuda::run_entry(c, out != nullptr ? out : pre_act, workspace, workspace_bytes,
                         workspace_bytes_out, stream);
}

extern "C" int convmixer_dw_backward(int dtype, int act, const void* grad_out,
                                     const void* grad_mean, const void* grad_var, const void* mean,
                                     const void* out, const void* x, long long N, long long C,
                                     long long H, long long W, int K, const void* norm_mean,
                                     const void* norm_scale, const void* norm_shift,
                                     const void* weight, const void* bias, void* grad_pre,
                                     void* grad_x, void* grad_weight, void* grad_bias,
                                     void* sum_dx, void* sum_dx_xc, const void* grad_res,
                                     void* grad_norm_mean, const void* pre_act,
                                     const void* bn_grad_scale, const void* bn_grad_shift,
                                     const void* bn_var, const void* bn_weight, int bn_type,
                                     double bn_eps, void* bn_grad_weight, void* bn_grad_bias,
                                     const void* grad_out_scale, void* workspace,
                                     size_t workspace_bytes,
                                     size_t* workspace_bytes_out, cudaStream_t stream) {
  const dw::Backward c{problem(dtype, N, C, H, W, K), static_cast<Act>(act), grad_out,
                       grad_mean, grad_var, mean, out, x, {norm_mean, norm_scale, norm_shift},
                       weight, bias, grad_pre, grad_x, grad_weight, grad_bias, sum_dx, sum_dx_xc,
                       grad_res, grad_norm_mean, pre_act,
                       cuda::bn_grad_of(bn_grad_scale, bn_grad_shift, bn_var, bn_weight, bn_type,
                                        bn_eps, bn_grad_weight, bn_grad_bias),
                       grad_out_scale};
  // grad_weight marks a real call (null: a size query): grad_x has no element without pixels,
  // while the finalize still writes zero sums then.
  return cuda::run_entry(c, grad_weight, workspace, workspace_bytes, workspace_bytes_out, stream);
}
