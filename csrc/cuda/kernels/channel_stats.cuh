// Per-channel batch statistics (mean, biased variance) of the fused stages' outputs, in two levels:
// each CTA of a dw or pw stage kernel reduces its tile to a (mean, M2) partial per channel in its
// epilogue (with WelfordVec and chan_merge below), and the last CTA of each channel block
// (last_cta.cuh) merges the [num_tiles, channels] partials, in tile order, into mean and biased
// variance (merge_tiles, merge_groups).
//
// Numerics (docs/DESIGN.md §6): never Σx² − (Σx)²/n. Welford per thread, Chan's formula for every
// merge, in an order fixed by the shape alone, so the result is bitwise reproducible run to run and
// from one GPU model to another (no partition depends on the SM count), and no float atomics.
// Torch-free (docs/DESIGN.md §8).
#pragma once

#include "types.cuh"

namespace convmixer_kernels {
namespace cuda {
namespace channel_stats {

// Explicitly rounded intrinsics: the statistics must not change with -use_fast_math or with the
// compiler's FMA-contraction choices, or bitwise reproducibility across builds is lost.
__device__ __forceinline__ float acc_fma(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double acc_fma(double a, double b, double c) { return __fma_rn(a, b, c); }
__device__ __forceinline__ float acc_rcp(float a) { return __frcp_rn(a); }
__device__ __forceinline__ double acc_rcp(double a) { return __drcp_rn(a); }
__device__ __forceinline__ float acc_div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double acc_div(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float acc_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double acc_mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float acc_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double acc_add(double a, double b) { return __dadd_rn(a, b); }

template <typename AccT>
__device__ __forceinline__ AccT quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() {
  return __int_as_float(0x7fc00000);
}
template <>
__device__ __forceinline__ double quiet_nan<double>() {
  return __longlong_as_double(0x7ff8000000000000LL);
}

// ---------------------------------------------------------------------------------------------
// Device building blocks
// ---------------------------------------------------------------------------------------------

// Welford state for N channels that see the same rows (one thread's vector of channels). The count
// is shared, so the reciprocal 1/n is computed once per row and amortised over the N channels; the
// division-free update keeps the per-element cost at two FMAs and two subtractions.
template <typename AccT, int N>
struct WelfordVec {
  int count;
  AccT mean[N];
  AccT m2[N];

  __device__ __forceinline__ void init() {
    count = 0;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      mean[j] = AccT(0);
      m2[j] = AccT(0);
    }
  }

  __device__ __forceinline__ void push(const AccT (&v)[N]) {
    ++count;
    const AccT inv = acc_rcp(static_cast<AccT>(count));
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const AccT d = v[j] - mean[j];
      mean[j] = acc_fma(d, inv, mean[j]);
      m2[j] = acc_fma(d, v[j] - mean[j], m2[j]);
    }
  }
};

// Chan et al.'s pairwise merge of (n, mean, M2) states: stable for any split sizes, which is what
// makes merging thousands of tiles safe where combining raw power sums would cancel.
// CountT is int inside a tile and int64_t across tiles (rows can exceed 2^31).
template <typename AccT, typename CountT>
__device__ __forceinline__ void chan_merge(CountT& n_a, AccT& mean_a, AccT& m2_a, CountT n_b,
                                           AccT mean_b, AccT m2_b) {
  if (n_b == 0) return;
  if (n_a == 0) {
    // Copying (rather than running the formula with n_a = 0) keeps Inf means from turning into
    // NaN through 0 * Inf, and is exact.
    n_a = n_b;
    mean_a = mean_b;
    m2_a = m2_b;
    return;
  }
  const CountT n = n_a + n_b;
  const AccT w_b = acc_div(static_cast<AccT>(n_b), static_cast<AccT>(n));
  const AccT d = mean_b - mean_a;
  mean_a = acc_fma(d, w_b, mean_a);
  const AccT cross = acc_mul(acc_mul(d, d), acc_mul(static_cast<AccT>(n_a), w_b));
  m2_a = acc_add(acc_add(m2_a, m2_b), cross);
  n_a = n;
}

// How many rows each partial summarises: a uniform tiling (every tile has rows_per_tile rows
// except a shorter last one, the pw stage's row tiles) or an explicit per-tile count array (the dw
// stage's spatial tiles, clipped at image borders).
struct TileCounts {
  int64_t rows;           // total rows, used when per_tile is null
  int64_t rows_per_tile;  // uniform tile height, used when per_tile is null
  const int* per_tile;    // [num_tiles] device array, or nullptr for the uniform rule

  __device__ __forceinline__ int64_t of(int64_t tile) const {
    if (per_tile != nullptr) return __ldcg(per_tile + tile);  // written by CTAs of this kernel
    const int64_t left = rows - tile * rows_per_tile;
    return left < rows_per_tile ? left : rows_per_tile;
  }
};

// ---------------------------------------------------------------------------------------------
// Merging partials: the finalize, in the last CTA of each channel block of a producer
// ---------------------------------------------------------------------------------------------

// One merge step of N channels that share their counts (every channel of a thread sees the same
// rows): the state (n, mean, m2) absorbs a partial (nb, pm, pq).
template <typename AccT, int N>
__device__ __forceinline__ void merge_shared_count(int64_t& n, AccT (&mean)[N], AccT (&m2)[N],
                                                   int64_t nb, const AccT (&pm)[N],
                                                   const AccT (&pq)[N]) {
#pragma unroll
  for (int j = 0; j < N; ++j) {
    int64_t nj = n;
    chan_merge(nj, mean[j], m2[j], nb, pm[j], pq[j]);
  }
  n += nb;
}

// Chan-merges into (n, mean, m2) the [num_tiles][channels] partials of the channels c[0..N) (one
// at c >= channels reads nothing) for tiles first, first + stride, ... in increasing order. Loads
// first, merges after: the merges form a dependent chain, the loads need not. __ldcg: the partials
// may be written by other CTAs of the running kernel (last_cta.cuh), so not through the read-only
// cache.
template <typename AccT, int N>
__device__ __forceinline__ void merge_tiles(const AccT* part_mean, const AccT* part_m2,
                                            TileCounts counts, int64_t num_tiles, int channels,
                                            const int (&c)[N], int64_t first, int stride,
                                            int64_t& n, AccT (&mean)[N], AccT (&m2)[N]) {
  constexpr int kUnroll = N >= 4 ? 2 : 4;
  const auto load = [&](int64_t t, AccT (&pm)[N], AccT (&pq)[N]) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const bool in = c[j] < channels;
      pm[j] = in ? __ldcg(part_mean + t * channels + c[j]) : AccT(0);
      pq[j] = in ? __ldcg(part_m2 + t * channels + c[j]) : AccT(0);
    }
  };
  int64_t t = first;
  for (; t + int64_t(kUnroll - 1) * stride < num_tiles; t += int64_t(kUnroll) * stride) {
    AccT pm[kUnroll][N], pq[kUnroll][N];
    int64_t pn[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      pn[u] = counts.of(t + u * stride);
      load(t + u * stride, pm[u], pq[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) merge_shared_count(n, mean, m2, pn[u], pm[u], pq[u]);
  }
  for (; t < num_tiles; t += stride) {
    AccT pm[N], pq[N];
    load(t, pm, pq);
    merge_shared_count(n, mean, m2, counts.of(t), pm, pq);
  }
}

// Merges in group order the (n, mean, M2) states that kGroups groups of threads hold for the same
// kWidth channel slots, each group's count shared by all its slots: s_mean and s_m2
// [kGroups][kWidth] and s_n [kGroups], filled by the caller. Then sink(slot, n, mean, m2) for every
// slot, the slots spread over the CTA's threads (this one `tid` of `nthreads`). Syncs first: every
// thread of the CTA calls.
template <typename AccT, int kGroups, int kWidth, typename Sink>
__device__ __forceinline__ void merge_groups(const int64_t* s_n, const AccT* s_mean,
                                             const AccT* s_m2, int tid, int nthreads, Sink&& sink) {
  __syncthreads();
  for (int slot = tid; slot < kWidth; slot += nthreads) {
    int64_t n = 0;
    AccT mean = AccT(0), m2 = AccT(0);
    for (int g = 0; g < kGroups; ++g)
      chan_merge(n, mean, m2, s_n[g], s_mean[g * kWidth + slot], s_m2[g * kWidth + slot]);
    sink(slot, n, mean, m2);
  }
}

// The statistics of a merged state: mean and biased variance; NaN for a channel with no rows.
template <typename AccT>
__device__ __forceinline__ void store_mean_var(int64_t n, AccT mean, AccT m2, AccT* mean_out,
                                               AccT* var_out) {
  *mean_out = n == 0 ? quiet_nan<AccT>() : mean;
  *var_out = n == 0 ? quiet_nan<AccT>() : acc_div(m2, static_cast<AccT>(n));
}

// The statistics of no rows (a producer that ran no CTA, so no last CTA): NaN, as torch.var_mean
// of nothing.
template <typename AccT>
__global__ void channel_stats_of_no_rows_kernel(int channels, AccT* __restrict__ mean_out,
                                                AccT* __restrict__ var_out) {
  const int c = int(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < channels) store_mean_var(int64_t(0), AccT(0), AccT(0), mean_out + c, var_out + c);
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

template <typename AccT>
inline cudaError_t launch_no_rows(int channels, AccT* mean_out, AccT* var_out,
                                  cudaStream_t stream) {
  if (channels <= 0) return cudaSuccess;
  if (mean_out == nullptr || var_out == nullptr) return cudaErrorInvalidValue;
  constexpr int kBlock = 256;
  channel_stats_of_no_rows_kernel<AccT>
      <<<unsigned((channels + kBlock - 1) / kBlock), kBlock, 0, stream>>>(channels, mean_out,
                                                                          var_out);
  return cudaGetLastError();
}

}  // namespace channel_stats
}  // namespace cuda
}  // namespace convmixer_kernels
