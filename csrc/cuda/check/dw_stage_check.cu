// Compile check for csrc/cuda/kernels/dw_stage.cuh: instantiates every kernel the launchers can pick
// (4 storage types x k in {generic, 3, 5, 7, 9} x every activation of csrc/activation.h) so that
// `nvcc -Xptxas -v` reports registers and spills for each, without torch or a GPU. Nothing here
// may include torch.
//
// The extern "C" entry points drive the same launchers from plain pointers: the GPU smoke tests and
// the CPU emulation tests (python_tests/cuda_emulation) call them through ctypes.
// dtype: 0 float, 1 double, 2 half, 3 bfloat16; act: an activation code of csrc/activation.h
// (convmixer_kernels.activations' `code`), cudaErrorInvalidValue for any other. Norm and
// statistics vectors are float (double for dtype 1). Returns a cudaError_t value.
#include "dtype_codes.cuh"
#include "../kernels/dw_stage.cuh"

namespace dw = convmixer_kernels::cuda::dw;
using convmixer_kernels::cuda::acc_t;
using convmixer_kernels::Act;

// The CTA-count target the entry points plan with; tests lower it (convmixer_dw_set_target_ctas)
// so that small shapes still give CTAs several tiles to walk.
static long long g_target_ctas = dw::kTargetCtas;

extern "C" void convmixer_dw_set_target_ctas(long long n) {
  g_target_ctas = n > 0 ? n : dw::kTargetCtas;
}

extern "C" int convmixer_dw_forward(int dtype, int act, const void* x, long long N, long long C,
                                    long long H, long long W, int K, const void* norm_mean,
                                    const void* norm_scale, const void* norm_shift,
                                    const void* weight, const void* bias, void* out,
                                    void* mean_out, void* var_out, void* workspace,
                                    size_t workspace_bytes, size_t* workspace_bytes_out,
                                    cudaStream_t stream) {
  return convmixer_kernels::cuda::dispatch_dtype_code(dtype, [&](auto tag) -> int {
    using T = decltype(tag);
    using AccT = acc_t<T>;
    const dw::Plan plan = dw::make_plan<T>(N, C, H, W, K, g_target_ctas);
    if (!plan.valid) return int(cudaErrorInvalidValue);
    if (workspace_bytes_out != nullptr) *workspace_bytes_out = plan.ws_forward;
    if (out == nullptr) return int(cudaSuccess);
    if (mean_out != nullptr && workspace_bytes < plan.ws_forward) return int(cudaErrorInvalidValue);
    dw::ForwardArgs<T> args{};
    args.x = static_cast<const T*>(x);
    args.norm_mean = static_cast<const AccT*>(norm_mean);
    args.norm_scale = static_cast<const AccT*>(norm_scale);
    args.norm_shift = static_cast<const AccT*>(norm_shift);
    args.weight = static_cast<const T*>(weight);
    args.bias = static_cast<const T*>(bias);
    args.out = static_cast<T*>(out);
    args.vectorized = dw::can_vectorize<T>(x, C);
    return int(dw::launch_forward<T>(plan, args, static_cast<Act>(act),
                                     static_cast<AccT*>(mean_out), static_cast<AccT*>(var_out),
                                     workspace, stream));
  });
}

extern "C" int convmixer_dw_backward(int dtype, int act, const void* grad_out,
                                     const void* grad_mean, const void* grad_var, const void* mean,
                                     const void* x, long long N, long long C, long long H,
                                     long long W, int K, const void* norm_mean,
                                     const void* norm_scale, const void* norm_shift,
                                     const void* weight, const void* bias, void* grad_pre,
                                     void* grad_x, void* grad_weight, void* grad_bias,
                                     void* sum_dx, void* sum_dx_xc, void* workspace,
                                     size_t workspace_bytes, size_t* workspace_bytes_out,
                                     cudaStream_t stream) {
  return convmixer_kernels::cuda::dispatch_dtype_code(dtype, [&](auto tag) -> int {
    using T = decltype(tag);
    using AccT = acc_t<T>;
    const dw::Plan plan = dw::make_plan<T>(N, C, H, W, K, g_target_ctas);
    if (!plan.valid) return int(cudaErrorInvalidValue);
    if (workspace_bytes_out != nullptr) *workspace_bytes_out = plan.ws_backward;
    if (grad_x == nullptr) return int(cudaSuccess);
    if (workspace_bytes < plan.ws_backward) return int(cudaErrorInvalidValue);
    dw::BackwardArgs<T> args{};
    args.grad_out = static_cast<const T*>(grad_out);
    args.grad_mean = static_cast<const AccT*>(grad_mean);
    args.grad_var = static_cast<const AccT*>(grad_var);
    args.mean = static_cast<const AccT*>(mean);
    args.x = static_cast<const T*>(x);
    args.norm_mean = static_cast<const AccT*>(norm_mean);
    args.norm_scale = static_cast<const AccT*>(norm_scale);
    args.norm_shift = static_cast<const AccT*>(norm_shift);
    args.weight = static_cast<const T*>(weight);
    args.bias = static_cast<const T*>(bias);
    args.grad_pre = static_cast<T*>(grad_pre);
    args.grad_x = static_cast<T*>(grad_x);
    args.vectorized_x = dw::can_vectorize<T>(x, C) && dw::can_vectorize<T>(grad_pre, C);
    return int(dw::launch_backward<T>(plan, args, static_cast<Act>(act),
                                      static_cast<T*>(grad_weight), static_cast<T*>(grad_bias),
                                      static_cast<AccT*>(sum_dx), static_cast<AccT*>(sum_dx_xc),
                                      workspace, stream));
  });
}
