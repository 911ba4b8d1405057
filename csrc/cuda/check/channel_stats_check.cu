// Compile check for csrc/cuda/kernels/channel_stats.cuh: explicitly instantiates every kernel the
// launchers can pick, for every storage dtype, so that `nvcc -Xptxas -v` (the CMake target
// cuda_kernels_check) reports registers and spills for each one without torch or a GPU.
// Nothing here may include torch or ATen (docs/DESIGN.md §8).
#include "../kernels/channel_stats.cuh"
#include "dtype_codes.cuh"

namespace convmixer_kernels {
namespace cuda {
namespace channel_stats {

// Partials kernels: the three CTA shapes make_plan chooses from (kThreadsC = 8, 16, 32 with
// 256 threads per CTA), vectorised and scalar.
#define CONVMIXER_INSTANTIATE_PARTIALS(T, TC, VEC)                                              \
  template __global__ void                                                                      \
  channel_stats_partials_kernel<T, TC, kPartialsThreads / TC, kPartialsUnroll, VEC>(            \
      const T* __restrict__, int64_t, int, int, acc_t<T>* __restrict__, acc_t<T>* __restrict__,   \
      acc_t<T>* __restrict__);

#define CONVMIXER_INSTANTIATE_DTYPE(T)                                                          \
  CONVMIXER_INSTANTIATE_PARTIALS(T, 8, true)                                                    \
  CONVMIXER_INSTANTIATE_PARTIALS(T, 8, false)                                                   \
  CONVMIXER_INSTANTIATE_PARTIALS(T, 16, true)                                                   \
  CONVMIXER_INSTANTIATE_PARTIALS(T, 16, false)                                                  \
  CONVMIXER_INSTANTIATE_PARTIALS(T, 32, true)                                                   \
  CONVMIXER_INSTANTIATE_PARTIALS(T, 32, false)                                                  \
  template Plan make_plan<T>(int64_t, int64_t);                                                 \
  template cudaError_t launch_channel_stats<T>(const Plan&, const T*, void*, acc_t<T>*,        \
                                               acc_t<T>*, acc_t<T>*, acc_t<T>*, double,         \
                                               cudaStream_t);

CONVMIXER_INSTANTIATE_DTYPE(float)
CONVMIXER_INSTANTIATE_DTYPE(double)
CONVMIXER_INSTANTIATE_DTYPE(__half)
CONVMIXER_INSTANTIATE_DTYPE(__nv_bfloat16)

// Finalize kernels: one per accumulation type.
#define CONVMIXER_INSTANTIATE_FINALIZE(AccT)                                                    \
  template __global__ void                                                                      \
  channel_stats_finalize_kernel<AccT, kFinalizeThreadsC, kFinalizeThreadsT>(                    \
      const AccT* __restrict__, const AccT* __restrict__, const AccT* __restrict__, TileCounts,  \
      int64_t, int,                                                                             \
      AccT* __restrict__, AccT* __restrict__, AccT* __restrict__, AccT* __restrict__, AccT);    \
  template cudaError_t launch_finalize<AccT>(const AccT*, const AccT*, const AccT*, TileCounts,  \
                                             int64_t, int, AccT*, AccT*, AccT*, AccT*, double,   \
                                             cudaStream_t);

CONVMIXER_INSTANTIATE_FINALIZE(float)
CONVMIXER_INSTANTIATE_FINALIZE(double)

#undef CONVMIXER_INSTANTIATE_FINALIZE
#undef CONVMIXER_INSTANTIATE_DTYPE
#undef CONVMIXER_INSTANTIATE_PARTIALS

}  // namespace channel_stats
}  // namespace cuda
}  // namespace convmixer_kernels

// A host entry point with C linkage, so a GPU smoke test can drive the kernels through ctypes
// from a shared library built out of this file alone (no torch build needed). dtype: 0 float,
// 1 double, 2 half, 3 bfloat16. Stats are float (double for dtype 1). workspace_bytes_out, when
// non-null, receives the workspace size the call needs; pass mean_out = null to only query it.
// Returns a cudaError_t value.
extern "C" int convmixer_channel_stats(int dtype, const void* x, long long rows, long long channels,
                                       void* workspace, size_t workspace_bytes, void* mean_out,
                                       void* var_out, void* running_mean, void* running_var,
                                       double momentum, size_t* workspace_bytes_out,
                                       cudaStream_t stream) {
  namespace cs = convmixer_kernels::cuda::channel_stats;
  auto run = [&](auto tag) -> int {
    using T = decltype(tag);
    using AccT = cs::acc_t<T>;
    const cs::Plan plan = cs::make_plan<T>(rows, channels);
    if (!plan.valid) return int(cudaErrorInvalidValue);
    if (workspace_bytes_out != nullptr) *workspace_bytes_out = plan.workspace_bytes;
    if (mean_out == nullptr) return int(cudaSuccess);
    if (workspace_bytes < plan.workspace_bytes) return int(cudaErrorInvalidValue);
    return int(cs::launch_channel_stats<T>(
        plan, static_cast<const T*>(x), workspace, static_cast<AccT*>(mean_out),
        static_cast<AccT*>(var_out), static_cast<AccT*>(running_mean),
        static_cast<AccT*>(running_var), momentum, stream));
  };
  return convmixer_kernels::cuda::dispatch_dtype_code(dtype, run);
}
