// Per-channel batch statistics (mean, biased variance) of the fused stages' outputs, in two levels:
// each CTA of a dw or pw stage kernel reduces its tile to a (mean, M2) partial per channel in its
// epilogue (with WelfordVec and chan_merge below), and channel_stats_finalize_kernel merges the
// [num_tiles, channels] partials in tile order into mean and biased variance.
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
    if (per_tile != nullptr) return per_tile[tile];
    const int64_t left = rows - tile * rows_per_tile;
    return left < rows_per_tile ? left : rows_per_tile;
  }
};

// ---------------------------------------------------------------------------------------------
// The finalize: merge the partials, write mean / biased var
// ---------------------------------------------------------------------------------------------
//
// CTA = kThreadsC channels x kThreadsT tile-threads. Each tile-thread folds tiles ty, ty + kThreadsT,
// ... in increasing order, then a fixed-shape tree in shared memory merges the tile-threads. Many
// tile-threads per channel (rather than one thread walking all tiles) keep this tiny kernel from
// being a serial chain of thousands of dependent divisions. A channel with no rows gets NaN mean
// and var.
template <typename AccT, int kThreadsC, int kThreadsT>
__global__ void __launch_bounds__(kThreadsC * kThreadsT)
    channel_stats_finalize_kernel(const AccT* __restrict__ part_mean,
                                  const AccT* __restrict__ part_m2, TileCounts counts,
                                  int64_t num_tiles, int channels, AccT* __restrict__ mean_out,
                                  AccT* __restrict__ var_out) {
  static_assert((kThreadsT & (kThreadsT - 1)) == 0, "kThreadsT must be a power of two");
  constexpr int kUnroll = 4;

  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int c = int(blockIdx.x) * kThreadsC + tx;

  int64_t n = 0;
  AccT mean = AccT(0);
  AccT m2 = AccT(0);
  if (c < channels) {
    int64_t t = ty;
    // Loads first, merges after: the merges form a dependent chain, the loads need not.
    for (; t + (kUnroll - 1) * kThreadsT < num_tiles; t += kUnroll * kThreadsT) {
      AccT pm[kUnroll], pq[kUnroll];
      int64_t pn[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t tu = t + u * kThreadsT;
        pm[u] = part_mean[tu * channels + c];
        pq[u] = part_m2[tu * channels + c];
        pn[u] = counts.of(tu);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) chan_merge(n, mean, m2, pn[u], pm[u], pq[u]);
    }
    for (; t < num_tiles; t += kThreadsT)
      chan_merge(n, mean, m2, counts.of(t), part_mean[t * channels + c], part_m2[t * channels + c]);
  }

  __shared__ int64_t s_n[kThreadsT][kThreadsC];
  __shared__ AccT s_mean[kThreadsT][kThreadsC];
  __shared__ AccT s_m2[kThreadsT][kThreadsC];
  s_n[ty][tx] = n;
  s_mean[ty][tx] = mean;
  s_m2[ty][tx] = m2;
  __syncthreads();
#pragma unroll
  for (int s = kThreadsT / 2; s > 0; s >>= 1) {
    if (ty < s) {
      chan_merge(n, mean, m2, s_n[ty + s][tx], s_mean[ty + s][tx], s_m2[ty + s][tx]);
      s_n[ty][tx] = n;
      s_mean[ty][tx] = mean;
      s_m2[ty][tx] = m2;
    }
    __syncthreads();
  }

  if (ty != 0 || c >= channels) return;
  if (n == 0) {
    mean_out[c] = quiet_nan<AccT>();
    var_out[c] = quiet_nan<AccT>();
    return;
  }
  mean_out[c] = mean;
  var_out[c] = acc_div(m2, static_cast<AccT>(n));
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

constexpr int kFinalizeThreadsC = 8;   // 8 floats = one 32-byte sector per partials row
constexpr int kFinalizeThreadsT = 64;

// The finalize on `stream`, for producers that wrote [num_tiles, channels] partials.
template <typename AccT>
inline cudaError_t launch_finalize(const AccT* part_mean, const AccT* part_m2, TileCounts counts,
                                   int64_t num_tiles, int channels, AccT* mean_out, AccT* var_out,
                                   cudaStream_t stream) {
  if (channels <= 0) return cudaSuccess;
  if (mean_out == nullptr || var_out == nullptr || num_tiles < 0) return cudaErrorInvalidValue;
  if (num_tiles > 0 && (part_mean == nullptr || part_m2 == nullptr)) return cudaErrorInvalidValue;
  const dim3 grid(unsigned((channels + kFinalizeThreadsC - 1) / kFinalizeThreadsC));
  const dim3 block(kFinalizeThreadsC, kFinalizeThreadsT);
  auto* kernel = &channel_stats_finalize_kernel<AccT, kFinalizeThreadsC, kFinalizeThreadsT>;
  kernel<<<grid, block, 0, stream>>>(part_mean, part_m2, counts, num_tiles, channels, mean_out,
                                     var_out);
  return cudaGetLastError();
}

}  // namespace channel_stats
}  // namespace cuda
}  // namespace convmixer_kernels
