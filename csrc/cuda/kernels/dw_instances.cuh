// The definitions of the dw kernels' launch classes (declared in dw_launch.cuh), for the
// instantiation units csrc/cuda/inst/dw_*.cu only: each of them instantiates the classes of
// one storage type and kernel family, so that no translation unit compiles every kernel.
// Torch-free (docs/DESIGN.md §8).
#pragma once

#include "dw_backward_fused.cuh"
#include "dw_launch.cuh"

#include <atomic>
#include <mutex>
#include <type_traits>

namespace convmixer_kernels {
namespace cuda {
namespace dw {

// The instantiation of a kernel for kernel size K: a register-tap specialisation (k = 3, 5, 7, 9
// with 32-bit accumulation) or the generic runtime-k one. kernel_of(std::integral_constant<int,
// kK>) names the instantiation for kK.
template <typename AccT, typename KernelOf>
inline auto kernel_for_k(int K, KernelOf kernel_of) {
  if constexpr (kRegisterTaps<3, AccT>) {
    switch (K) {
      case 3: return kernel_of(std::integral_constant<int, 3>{});
      case 5: return kernel_of(std::integral_constant<int, 5>{});
      case 7: return kernel_of(std::integral_constant<int, 7>{});
      case 9: return kernel_of(std::integral_constant<int, 9>{});
      default: break;
    }
  }
  return kernel_of(std::integral_constant<int, 0>{});
}

// The kernel may use `smem` bytes of dynamic shared memory on the current device. The opt-in
// above the 48 KiB default (cudaFuncSetAttribute, a driver call) is made when a launch needs more
// than the kernel was allowed so far on that device, not before every launch: a training step
// launches the same few kernels at the same sizes. The allowance only grows: the raise and its
// record happen under one lock, so two threads asking for different sizes (the generic-k kernel
// serves several) cannot leave the attribute below what the record says.
template <auto Kernel>
inline cudaError_t allow_dynamic_smem(size_t smem) {
  constexpr int kDevices = 64;
  static std::atomic<int> allowed[kDevices] = {};
  static std::mutex raising;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < 0 || device >= kDevices)
    return cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (int(smem) <= allowed[device].load(std::memory_order_acquire)) return cudaSuccess;
  const std::lock_guard<std::mutex> lock(raising);
  if (int(smem) <= allowed[device].load(std::memory_order_relaxed)) return cudaSuccess;
  err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err == cudaSuccess) allowed[device].store(int(smem), std::memory_order_release);
  return err;
}

// Every dw kernel launches the same way: the plan's dynamic shared memory, the plan's grid,
// kThreads threads.
template <auto Kernel, typename Args>
cudaError_t launch_on_grid(const Args& args, const Shape& s, size_t smem, cudaStream_t stream) {
  const cudaError_t err = allow_dynamic_smem<Kernel>(smem);
  if (err != cudaSuccess) return err;
  Kernel<<<grid_of(s), kThreads, smem, stream>>>(args, s);
  return cudaGetLastError();
}

template <typename T, Act A>
cudaError_t ForwardKernels<T, A>::launch(const ForwardArgs<T>& args, const Shape& s, size_t smem,
                                         cudaStream_t stream) {
  const auto run = kernel_for_k<acc_t<T>>(s.K, [](auto k) {
    return &launch_on_grid<&dw_forward_kernel<T, decltype(k)::value, A>, ForwardArgs<T>>;
  });
  return run(args, s, smem, stream);
}

template <typename T, Act A>
cudaError_t BackwardDataKernels<T, A>::launch(const BackwardArgs<T>& args, const Shape& s,
                                              size_t smem, cudaStream_t stream) {
  const auto run = kernel_for_k<acc_t<T>>(s.K, [](auto k) {
    return &launch_on_grid<&dw_backward_data_kernel<T, decltype(k)::value, A>, BackwardArgs<T>>;
  });
  return run(args, s, smem, stream);
}

template <typename T, Act A>
cudaError_t BackwardFusedKernels<T, A>::launch(const BackwardArgs<T>& args, const Shape& s,
                                               size_t smem, cudaStream_t stream) {
  const auto run = kernel_for_k<acc_t<T>>(s.K, [](auto k) {
    return &launch_on_grid<&dw_backward_fused_kernel<T, decltype(k)::value, A>, BackwardArgs<T>>;
  });
  return run(args, s, smem, stream);
}

template <typename T>
cudaError_t BackwardInputKernels<T>::launch(const BackwardArgs<T>& args, const Shape& s,
                                            size_t smem, cudaStream_t stream) {
  const auto run = kernel_for_k<acc_t<T>>(s.K, [](auto k) {
    return &launch_on_grid<&dw_backward_input_kernel<T, decltype(k)::value>, BackwardArgs<T>>;
  });
  return run(args, s, smem, stream);
}

template <typename T>
cudaError_t BackwardFinalizeKernel<T>::launch(const BackwardFinalizeArgs<T>& a, int64_t parts,
                                              int C, int64_t kk, cudaStream_t stream) {
  constexpr int kBlock = 256;
  const int64_t n = int64_t(C) * kk;  // >= C: every channel's thread is in the grid
  dw_backward_finalize_kernel<T><<<unsigned((n + kBlock - 1) / kBlock), kBlock, 0, stream>>>(
      a, parts, C, kk);
  return cudaGetLastError();
}

}  // namespace dw
}  // namespace cuda
}  // namespace convmixer_kernels

// The explicit instantiations of one unit: every activation's forward, or backward (data and
// input), or fused backward kernels for the storage type the unit #defines as CONVMIXER_DW_T (a
// macro, not an alias: the CPU emulation compiles all units into one translation unit, each
// defining and undefining it).
#define CONVMIXER_DW_FORWARD_ACT(E, name, code) \
  template struct ForwardKernels<CONVMIXER_DW_T, Act::E>;
#define CONVMIXER_DW_BACKWARD_ACT(E, name, code) \
  template struct BackwardDataKernels<CONVMIXER_DW_T, Act::E>;
#define CONVMIXER_DW_BACKWARD_FUSED_ACT(E, name, code) \
  template struct BackwardFusedKernels<CONVMIXER_DW_T, Act::E>;
#define CONVMIXER_DW_INSTANTIATE_FORWARD                 \
  namespace convmixer_kernels::cuda::dw {                \
  CONVMIXER_ACTIVATIONS(CONVMIXER_DW_FORWARD_ACT)        \
  }
#define CONVMIXER_DW_INSTANTIATE_BACKWARD                \
  namespace convmixer_kernels::cuda::dw {                \
  CONVMIXER_ACTIVATIONS(CONVMIXER_DW_BACKWARD_ACT)       \
  template struct BackwardInputKernels<CONVMIXER_DW_T>;  \
  template struct BackwardFinalizeKernel<CONVMIXER_DW_T>; \
  }
#define CONVMIXER_DW_INSTANTIATE_BACKWARD_FUSED          \
  namespace convmixer_kernels::cuda::dw {                \
  CONVMIXER_ACTIVATIONS(CONVMIXER_DW_BACKWARD_FUSED_ACT) \
  }
