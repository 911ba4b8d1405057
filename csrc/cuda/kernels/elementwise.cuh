// Per-element maths shared by the CUDA stage kernels: storage <-> accumulation conversions, the
// activations and their derivatives. Torch-free (docs/DESIGN.md §8).
//
// The activations follow docs/OPS.md exactly as PyTorch's CUDA kernels compute them in opmath:
// GELU is the erf form 0.5 v (1 + erf(v / sqrt 2)) and its derivative cdf + v pdf; ReLU keeps NaN
// (only v < 0 becomes 0) and its derivative is 0 where v <= 0 (threshold_backward).
#pragma once

#include "channel_stats.cuh"

namespace convmixer_kernels {
namespace cuda {

using channel_stats::acc_t;
using channel_stats::kVecWidth;
using channel_stats::to_acc;
using channel_stats::Unpack;

// Which activation a kernel applies. A template parameter of the kernels: the choice is per
// model, and a compile-time branch keeps erf out of the ReLU kernels entirely.
enum class ActKind : int { GELU = 0, ReLU = 1 };

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

constexpr double kSqrtHalf = 0.70710678118654752440;     // 1 / sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // 1 / sqrt(2 pi)

// act(a) and, on demand, dy * act'(a) at the same point: the backward kernels need both (the
// statistics' gradient involves the output), and GELU's erf is then evaluated once.
template <ActKind A, typename AccT>
struct ActAt {
  AccT a, cdf;
  __device__ __forceinline__ explicit ActAt(AccT a_) : a(a_), cdf(AccT(0)) {
    if constexpr (A == ActKind::GELU) cdf = AccT(0.5) * (AccT(1) + erf_acc(a * AccT(kSqrtHalf)));
  }
  __device__ __forceinline__ AccT value() const {
    if constexpr (A == ActKind::GELU) return a * cdf;
    return a < AccT(0) ? AccT(0) : a;  // NaN compares false and passes through, as torch.relu
  }
  __device__ __forceinline__ AccT backward(AccT dy) const {
    if constexpr (A == ActKind::GELU) {
      const AccT pdf = AccT(kInvSqrt2Pi) * exp_acc(AccT(-0.5) * a * a);
      return dy * (cdf + a * pdf);
    }
    return a <= AccT(0) ? AccT(0) : dy;
  }
};

template <ActKind A, typename AccT>
__device__ __forceinline__ AccT act_forward(AccT a) {
  if constexpr (A == ActKind::GELU) return AccT(0.5) * a * (AccT(1) + erf_acc(a * AccT(kSqrtHalf)));
  return a < AccT(0) ? AccT(0) : a;
}

// Fused multiply-add in the accumulation type (explicit, so the convolution sums do not depend on
// the compiler's contraction choices).
__device__ __forceinline__ float fma_acc(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return __fma_rn(a, b, c); }

}  // namespace cuda
}  // namespace convmixer_kernels
