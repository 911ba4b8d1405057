// Per-element maths shared by the CUDA stage kernels: accumulation -> storage rounding, FMA, and
// the activations of csrc/activation.h on accumulation-type scalars. Torch-free
// (docs/DESIGN.md §8).
#pragma once

#include "../../activation.h"
#include "types.cuh"

namespace convmixer_kernels {
namespace cuda {

// Storage value of an accumulation value, rounded to nearest even as PyTorch's casts are.
template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// v as it will read back after being stored in T: statistics and the statistics' gradient are of
// the stored output (docs/OPS.md), so they must see the same rounding.
template <typename T>
__device__ __forceinline__ acc_t<T> round_to_storage(acc_t<T> v) {
  return to_acc(from_acc<T>(v));
}

__device__ __forceinline__ float erf_acc(float v) { return erff(v); }
__device__ __forceinline__ double erf_acc(double v) { return erf(v); }
__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }

// The lane policy of the activation maths (csrc/activation.h): one accumulation-type value per
// thread. The activation is a template parameter of the kernels (Act A): the choice is per model,
// and instantiating per activation keeps erf out of the ReLU kernels entirely.
template <typename AccT>
struct ScalarMath {
  using V = AccT;
  static __device__ __forceinline__ V c(double v) { return V(v); }
  static __device__ __forceinline__ V erf(V v) { return erf_acc(v); }
  static __device__ __forceinline__ V exp(V v) { return exp_acc(v); }
  static __device__ __forceinline__ V where(bool mask, V x, V y) { return mask ? x : y; }
};

template <Act A, typename AccT>
__device__ __forceinline__ AccT act_forward(AccT a) {
  return ActMath<A>::template forward<ScalarMath<AccT>>(a);
}

// act(a) and dy * act'(a) at one point, for the backward kernels (activation.h).
template <Act A, typename AccT>
using ActAt = typename ActMath<A>::template At<ScalarMath<AccT>>;

// Fused multiply-add in the accumulation type (explicit, so the convolution sums do not depend on
// the compiler's contraction choices).
__device__ __forceinline__ float fma_acc(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return __fma_rn(a, b, c); }

}  // namespace cuda
}  // namespace convmixer_kernels
