// Building blocks shared by the CPU stage kernels: activations on Vectorized lanes, NHWC views,
// and the deterministic per-channel reductions that give BatchNorm statistics and gradients.
#pragma once

#include "../ops.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <vector>

namespace convmixer_kernels {
namespace cpu {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// The lane policy of the activation maths (csrc/activation.h) on Vectorized lanes.
template <typename T>
struct VecMath {
  using V = Vec<T>;
  static V c(double v) { return V(T(v)); }
  static V erf(const V& v) { return v.erf(); }
  static V exp(const V& v) { return v.exp(); }
  static V where(const V& mask, const V& x, const V& y) { return V::blendv(y, x, mask); }
};

// act(a) on the lanes of `a`.
template <Act A, typename T>
inline Vec<T> act_forward(const Vec<T>& a) {
  return ActMath<A>::template forward<VecMath<T>>(a);
}

// act(a) and dy * act'(a) at the same lanes, for the backward passes (activation.h).
template <Act A, typename T>
using ActAt = typename ActMath<A>::template At<VecMath<T>>;

// Rounds `n` opmath values to the storage dtype in place, so that what follows (statistics,
// derivatives) sees exactly the values stored. A no-op for float and double storage.
template <typename scalar_t, typename opmath_t>
inline void round_to_storage(opmath_t* v, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, opmath_t>) {
    for (int64_t i = 0; i < n; ++i) v[i] = static_cast<opmath_t>(static_cast<scalar_t>(v[i]));
  }
}

// An NHWC view [N*H*W, C] of a 4-d tensor, copying only when it is not channels_last already.
inline at::Tensor rows_view(const at::Tensor& t) {
  auto nhwc = t.contiguous(at::MemoryFormat::ChannelsLast);
  return nhwc.permute({0, 2, 3, 1}).reshape({-1, t.size(1)});
}

// The [N, C, H, W] channels_last tensor whose memory is the [N*H*W, C] row-major `rows`.
inline at::Tensor from_rows(const at::Tensor& rows, at::IntArrayRef nchw) {
  return rows.view({nchw[0], nchw[2], nchw[3], nchw[1]}).permute({0, 3, 1, 2});
}

// Per-channel sums over the rows of a [rows, C] problem, deterministic whatever the thread
// count: rows are cut into fixed chunks, each chunk accumulates `nacc` rows of C opmath sums in
// its own slice, and the slices are added in chunk order in double.
// body(r0, r1, acc) accumulates rows [r0, r1) into acc[k * C + c] for k < nacc.
template <typename opmath_t, typename Body>
std::vector<double> reduce_rows(int64_t rows, int64_t C, int nacc, const Body& body) {
  constexpr int64_t kChunk = 128;
  const int64_t chunks = (rows + kChunk - 1) / kChunk;
  std::vector<opmath_t> partial(static_cast<size_t>(chunks * nacc * C), opmath_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) {
      body(ch * kChunk, std::min(rows, (ch + 1) * kChunk), partial.data() + ch * nacc * C);
    }
  });
  std::vector<double> total(static_cast<size_t>(nacc * C), 0.0);
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const opmath_t* p = partial.data() + ch * nacc * C;
    for (int64_t i = 0; i < nacc * C; ++i) total[i] += static_cast<double>(p[i]);
  }
  return total;
}

// Mean and biased variance from shifted sums: s1 = Σ(v - K), s2 = Σ(v - K)^2 over `count`
// values per channel. The shift K is a sample of the data, so the subtraction below loses
// little even when |mean| >> std (docs/DESIGN.md §6).
inline std::tuple<at::Tensor, at::Tensor> stats_from_shifted_sums(
    const std::vector<double>& shift, const double* s1, const double* s2, int64_t C, int64_t count,
    const at::TensorOptions& options) {
  auto mean = at::empty({C}, options.dtype(at::kDouble));
  auto var = at::empty({C}, options.dtype(at::kDouble));
  auto* m = mean.data_ptr<double>();
  auto* v = var.data_ptr<double>();
  const double n = static_cast<double>(count);
  for (int64_t c = 0; c < C; ++c) {
    const double d = s1[c] / n;
    m[c] = shift[c] + d;
    v[c] = std::max(s2[c] / n - d * d, 0.0);  // std::max keeps a NaN first argument
  }
  return {mean, var};
}

}  // namespace cpu
}  // namespace convmixer_kernels
