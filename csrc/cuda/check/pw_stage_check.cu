// Compile check for csrc/cuda/kernels/pw_stage.cuh: instantiates every kernel the launchers use for
// every storage type and activation, so `nvcc -Xptxas -v` reports registers and spills without
// torch or a GPU. Nothing here may include torch.
//
// The extern "C" entry points run each fused kernel from plain pointers (the GEMMs between them
// belong to the torch launcher), for the GPU smoke tests and the CPU emulation tests
// (python_tests/cuda_emulation). dtype: 0 float, 1 double, 2 half, 3 bfloat16; act: an activation
// code of csrc/activation.h (convmixer_kernels.activations' `code`), cudaErrorInvalidValue for any
// other; per-channel vectors are float (double for dtype 1). A null output pointer only reports
// the workspace size. Returns a cudaError_t value.
#include "dtype_codes.cuh"
#include "../kernels/pw_stage.cuh"

namespace pw = convmixer_kernels::cuda::pw;
using convmixer_kernels::cuda::acc_t;
using convmixer_kernels::Act;

namespace {

bool aligned(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

}  // namespace

extern "C" int convmixer_pw_prologue(int dtype, long long rows, long long C, const void* x,
                                     const void* x_mean, const void* x_scale, const void* x_shift,
                                     const void* res, const void* res_mean, const void* res_scale,
                                     const void* res_shift, void* u, cudaStream_t stream) {
  return convmixer_kernels::cuda::dispatch_dtype_code(dtype, [&](auto tag) -> int {
    using T = decltype(tag);
    using AccT = acc_t<T>;
    const pw::Plan plan = pw::make_plan<T>(rows, C, aligned({x, res, u}));
    if (!plan.valid) return int(cudaErrorInvalidValue);
    const pw::PrologueArgs<T> a{static_cast<const T*>(x),         static_cast<const AccT*>(x_mean),
                                static_cast<const AccT*>(x_scale), static_cast<const AccT*>(x_shift),
                                static_cast<const T*>(res),       static_cast<const AccT*>(res_mean),
                                static_cast<const AccT*>(res_scale),
                                static_cast<const AccT*>(res_shift), static_cast<T*>(u)};
    return int(pw::launch_prologue<T>(plan, a, stream));
  });
}

extern "C" int convmixer_pw_epilogue_forward(int dtype, int act, long long rows, long long C,
                                             const void* pre, void* out, void* mean_out,
                                             void* var_out, void* workspace,
                                             size_t workspace_bytes, size_t* workspace_bytes_out,
                                             cudaStream_t stream) {
  return convmixer_kernels::cuda::dispatch_dtype_code(dtype, [&](auto tag) -> int {
    using T = decltype(tag);
    using AccT = acc_t<T>;
    const pw::Plan plan = pw::make_plan<T>(rows, C, aligned({pre, out}));
    if (!plan.valid) return int(cudaErrorInvalidValue);
    const size_t need = pw::forward_workspace_bytes<T>(plan);
    if (workspace_bytes_out != nullptr) *workspace_bytes_out = need;
    if (out == nullptr) return int(cudaSuccess);
    if (mean_out != nullptr && workspace_bytes < need) return int(cudaErrorInvalidValue);
    return int(pw::launch_epilogue_forward<T>(plan, static_cast<const T*>(pre), static_cast<T*>(out),
                                              static_cast<Act>(act), static_cast<AccT*>(mean_out),
                                              static_cast<AccT*>(var_out), workspace, stream));
  });
}

extern "C" int convmixer_pw_epilogue_backward(int dtype, int act, long long rows, long long C,
                                              const void* grad_out, const void* pre,
                                              const void* grad_mean, const void* grad_var,
                                              const void* mean, void* grad_pre, void* grad_bias,
                                              void* workspace, size_t workspace_bytes,
                                              size_t* workspace_bytes_out, cudaStream_t stream) {
  return convmixer_kernels::cuda::dispatch_dtype_code(dtype, [&](auto tag) -> int {
    using T = decltype(tag);
    using AccT = acc_t<T>;
    const pw::Plan plan = pw::make_plan<T>(rows, C, aligned({grad_out, pre, grad_pre}));
    if (!plan.valid) return int(cudaErrorInvalidValue);
    const size_t need = pw::backward_epilogue_workspace_bytes<T>(plan);
    if (workspace_bytes_out != nullptr) *workspace_bytes_out = need;
    if (grad_pre == nullptr) return int(cudaSuccess);
    if (workspace_bytes < need) return int(cudaErrorInvalidValue);
    pw::EpilogueBackwardArgs<T> a{static_cast<const T*>(grad_out), static_cast<const T*>(pre),
                                  static_cast<const AccT*>(grad_mean),
                                  static_cast<const AccT*>(grad_var), static_cast<const AccT*>(mean),
                                  static_cast<T*>(grad_pre), nullptr};
    return int(pw::launch_epilogue_backward<T>(plan, a, static_cast<Act>(act),
                                               static_cast<T*>(grad_bias), workspace, stream));
  });
}

extern "C" int convmixer_pw_through_norms(int dtype, long long rows, long long C, const void* grad_u,
                                          const void* x, const void* x_mean, const void* x_scale,
                                          const void* res, const void* res_mean,
                                          const void* res_scale, void* grad_x, void* grad_res,
                                          void* sum_du, void* sum_du_xc, void* sum_du_rc,
                                          void* workspace, size_t workspace_bytes,
                                          size_t* workspace_bytes_out, cudaStream_t stream) {
  return convmixer_kernels::cuda::dispatch_dtype_code(dtype, [&](auto tag) -> int {
    using T = decltype(tag);
    using AccT = acc_t<T>;
    const pw::Plan plan = pw::make_plan<T>(rows, C, aligned({grad_u, x, res, grad_x, grad_res}));
    if (!plan.valid) return int(cudaErrorInvalidValue);
    const size_t need = pw::through_norms_workspace_bytes<T>(plan);
    if (workspace_bytes_out != nullptr) *workspace_bytes_out = need;
    if (sum_du == nullptr) return int(cudaSuccess);
    if (workspace_bytes < need) return int(cudaErrorInvalidValue);
    pw::ThroughNormsArgs<T> a{};
    a.grad_u = static_cast<const T*>(grad_u);
    a.x = static_cast<const T*>(x);
    a.x_mean = static_cast<const AccT*>(x_mean);
    a.x_scale = static_cast<const AccT*>(x_scale);
    a.res = static_cast<const T*>(res);
    a.res_mean = static_cast<const AccT*>(res_mean);
    a.res_scale = static_cast<const AccT*>(res_scale);
    a.grad_x = static_cast<T*>(grad_x);
    a.grad_res = static_cast<T*>(grad_res);
    return int(pw::launch_through_norms<T>(plan, a, static_cast<AccT*>(sum_du),
                                           static_cast<AccT*>(sum_du_xc),
                                           static_cast<AccT*>(sum_du_rc), workspace, stream));
  });
}
