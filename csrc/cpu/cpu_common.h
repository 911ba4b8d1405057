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

// act(a). ReLU keeps NaN (as torch.relu): only lanes with a < 0 become zero.
template <typename T>
inline Vec<T> act_forward(Act act, const Vec<T>& a) {
  if (act == Act::ReLU) return Vec<T>::blendv(a, Vec<T>(T(0)), a < Vec<T>(T(0)));
  const Vec<T> half(T(0.5)), one(T(1)), inv_sqrt2(T(M_SQRT1_2));
  return half * a * (one + (a * inv_sqrt2).erf());
}

// act and its derivative at one point, for the backward passes, which need both act(a) (the
// statistics' gradient involves the stored output) and act'(a): GELU's erf, the costly part,
// is evaluated once for the two.
template <typename T>
struct ActAt {
  Act act;
  Vec<T> a, cdf;
  ActAt(Act act_, const Vec<T>& a_) : act(act_), a(a_) {
    if (act == Act::GELU) cdf = Vec<T>(T(0.5)) * (Vec<T>(T(1)) + (a * Vec<T>(T(M_SQRT1_2))).erf());
  }
  Vec<T> value() const { return act == Act::ReLU ? act_forward(act, a) : a * cdf; }
  // dy * act'(a). ReLU follows threshold_backward: zero where a <= 0, dy elsewhere (NaN passes).
  Vec<T> backward(const Vec<T>& dy) const {
    if (act == Act::ReLU) return Vec<T>::blendv(dy, Vec<T>(T(0)), a <= Vec<T>(T(0)));
    const Vec<T> pdf = Vec<T>(T(0.3989422804014327)) * (Vec<T>(T(-0.5)) * a * a).exp();
    return dy * (cdf + a * pdf);
  }
};

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
