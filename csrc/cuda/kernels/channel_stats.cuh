// Per-channel BatchNorm batch statistics (mean, biased variance) of a channels_last activation
// viewed as a row-major matrix [rows = N*H*W, channels].
//
// This header is deliberately torch-free (CUDA runtime + cuda_fp16/cuda_bf16 only): a CPU build of
// torch ships incomplete CUDA headers, and keeping kernels here lets nvcc compile-check them and
// report registers/spills on a machine without a GPU (docs/DESIGN.md §8). The torch launchers in
// csrc/cuda/*.cu wrap these with tensors and the current stream.
//
// Numerics (docs/DESIGN.md §6): never Σx² − (Σx)²/n. Each thread runs Welford over its rows, the
// per-thread states are merged with Chan's formula inside the CTA, and the per-tile partials are
// merged again with Chan's formula by a second kernel. Every merge happens in an order fixed by
// (rows, channels, dtype) alone, so the result is bitwise reproducible run to run and from one GPU
// model to another (the partition never depends on the SM count), and no float atomics are used.
//
// The device building blocks (WelfordVec, chan_merge) and the finalize kernel are public because the
// fused dw/pw stages produce the same [num_tiles, channels] partials in their epilogues and reuse the
// finalize step (TileCounts describes their tiling; they should accumulate relative to a per-channel
// shift known before the pass, e.g. the running mean or the bias, for the reason given at kernel 1).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>

namespace convmixer_kernels {
namespace cuda {
namespace channel_stats {

// ---------------------------------------------------------------------------------------------
// Types and element access
// ---------------------------------------------------------------------------------------------

// Statistics accumulate in float for every storage dtype except double (matches PyTorch's
// acc_type for BatchNorm and the op contract in docs/OPS.md).
template <typename T>
struct AccTypeOf {
  using type = float;
};
template <>
struct AccTypeOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccTypeOf<T>::type;

// Elements per 16-byte load: one LDG.128 per thread is what saturates HBM with the fewest
// instructions in flight.
// (A variable template, not a constexpr function: usable from device code without
// --expt-relaxed-constexpr.)
template <typename T>
constexpr int kVecWidth = int(16 / sizeof(T));

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// Splits a 16-byte load into accumulation-type values. Working on the raw 32-bit words (rather than
// reinterpreting the register as T[]) keeps the value in registers and avoids type punning.
template <typename T>
struct Unpack;

template <>
struct Unpack<float> {
  __device__ __forceinline__ static void run(const uint4& r, float (&o)[4]) {
    o[0] = __uint_as_float(r.x);
    o[1] = __uint_as_float(r.y);
    o[2] = __uint_as_float(r.z);
    o[3] = __uint_as_float(r.w);
  }
};

template <>
struct Unpack<double> {
  __device__ __forceinline__ static void run(const uint4& r, double (&o)[2]) {
    // Little-endian: the lower-addressed word is the low half of each double.
    o[0] = __hiloint2double(int(r.y), int(r.x));
    o[1] = __hiloint2double(int(r.w), int(r.z));
  }
};

template <>
struct Unpack<__nv_bfloat16> {
  __device__ __forceinline__ static void run(const uint4& r, float (&o)[8]) {
    // bf16 is the upper half of a float, so widening is a shift or a mask (exact, NaN-preserving),
    // cheaper than eight cvt instructions.
    const unsigned w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      o[2 * i] = __uint_as_float(w[i] << 16);
      o[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
};

template <>
struct Unpack<__half> {
  __device__ __forceinline__ static void run(const uint4& r, float (&o)[8]) {
    const unsigned w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      o[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
      o[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
    }
  }
};

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

// How many rows each partial summarises. The partials kernel below tiles rows uniformly (every tile
// has rows_per_tile rows except a shorter last one); producers with irregular tiles (the dw stage's
// spatial tiles clipped at image borders) pass an explicit per-tile count array instead.
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
// Kernel 1: per-tile partials
// ---------------------------------------------------------------------------------------------
//
// CTA = kThreadsC x kThreadsR threads covering one row tile x one block of kThreadsC * V channels
// (V = 16 / sizeof(T)). Thread (tx, ty) owns V channels and the rows ty, ty + kThreadsR, ... of
// the tile, so a warp reads whole 16-byte vectors of consecutive channels of one row (coalesced
// 512-byte segments when kThreadsC = 32).
//
// kVectorized picks how a thread's V channels are laid out: adjacent (one 16-byte load, needs
// channels % V == 0 and a 16-byte-aligned base) or strided by kThreadsC (scalar loads that still
// coalesce across the warp, for any channel count). Both give each channel the same rows in the
// same order, so the two paths produce bitwise-identical statistics.
//
// Shift: every statistic is accumulated for y = x - x[0, c] and the shift is added back once, in
// the finalize kernel. Without it a float mean of, say, 1e4 has a resolution of ~1e-3, and those
// rounding errors enter every Welford and Chan update (measured: 3e-5 relative error in the
// variance of mean-1e4/std-1 data; with the shift it stays at the 1e-7 level like centred data).
// Row 0 is used because every CTA can read it and it is a sample of the channel's distribution.
//
// Output: part_mean / part_m2 [gridDim.x, channels] (of y); the count of tile t is
// TileCounts::of(t) and is not stored; the CTAs of tile 0 also write shift[channels]. Nothing is
// written for channels >= channels.
//
// __launch_bounds__ asks for 4 resident CTAs per SM (<= 64 registers) on the vector path: 1024
// threads x 64 bytes in flight per SM is well above the ~25 KB per SM that HBM3e needs to stay busy
// (4.8 TB/s x ~700 ns over 132 SMs). The scalar fallback holds each element in its own register and
// would spill at 64, so it settles for 3 CTAs per SM (<= 80 registers).
template <typename T, int kThreadsC, int kThreadsR, int kUnroll, bool kVectorized>
__global__ void __launch_bounds__(kThreadsC * kThreadsR, kVectorized ? 4 : 3)
    channel_stats_partials_kernel(const T* __restrict__ x, int64_t rows, int channels,
                                  int rows_per_tile, acc_t<T>* __restrict__ part_mean,
                                  acc_t<T>* __restrict__ part_m2, acc_t<T>* __restrict__ shift_out) {
  using AccT = acc_t<T>;
  constexpr int V = kVecWidth<T>;
  constexpr int kBlockC = kThreadsC * V;
  static_assert(kThreadsC * kThreadsR <= 1024, "CTA too large");
  static_assert(kUnroll >= 1, "kUnroll must be positive");

  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t tile = blockIdx.x;
  const int64_t row0 = tile * rows_per_tile;
  const int64_t rows_left = rows - row0;
  const int tile_rows = rows_left < rows_per_tile ? int(rows_left) : rows_per_tile;
  const int c_block = int(blockIdx.y) * kBlockC;
  const int c_thread = c_block + (kVectorized ? tx * V : tx);  // channel of value 0

  // The channel (relative to c_block) of this thread's j-th value.
  auto local_channel = [&](int j) { return kVectorized ? tx * V + j : j * kThreadsC + tx; };

  WelfordVec<AccT, V> w;
  w.init();
  AccT shift[V];
  auto push_shifted = [&](AccT (&v)[V]) {
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] -= shift[j];
    w.push(v);
  };

  // 64-bit from here on: row * channels overflows int for large activations.
  const int64_t row_stride = int64_t(kThreadsR) * channels;
  const T* p = x + (row0 + ty) * int64_t(channels) + c_thread;
  int r = ty;

  if constexpr (kVectorized) {
    // channels % V == 0 here, so a vector is entirely inside or entirely outside the matrix.
    if (c_thread < channels) {
      Unpack<T>::run(*reinterpret_cast<const uint4*>(x + c_thread), shift);
      // Issue kUnroll independent 16-byte loads before consuming any: the Welford chain is serial
      // per channel, and without this the loop would have one load in flight per thread.
      for (; r + (kUnroll - 1) * kThreadsR < tile_rows;
           r += kUnroll * kThreadsR, p += kUnroll * row_stride) {
        uint4 raw[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) raw[u] = *reinterpret_cast<const uint4*>(p + u * row_stride);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          AccT v[V];
          Unpack<T>::run(raw[u], v);
          push_shifted(v);
        }
      }
      for (; r < tile_rows; r += kThreadsR, p += row_stride) {
        AccT v[V];
        Unpack<T>::run(*reinterpret_cast<const uint4*>(p), v);
        push_shifted(v);
      }
    }
  } else {
    bool valid[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      valid[j] = c_thread + j * kThreadsC < channels;
      shift[j] = valid[j] ? to_acc(x[c_thread + j * kThreadsC]) : AccT(0);
    }
    // Each 2-byte scalar still occupies a 32-bit register: halving the unroll keeps the fallback at
    // the vector path's register budget (4 CTAs/SM) while leaving 16 loads in flight per thread.
    constexpr int kScalarUnroll = sizeof(T) >= 4 ? kUnroll : (kUnroll + 1) / 2;
    for (; r + (kScalarUnroll - 1) * kThreadsR < tile_rows;
         r += kScalarUnroll * kThreadsR, p += kScalarUnroll * row_stride) {
      T raw[kScalarUnroll][V];
#pragma unroll
      for (int u = 0; u < kScalarUnroll; ++u)
#pragma unroll
        for (int j = 0; j < V; ++j)
          if (valid[j]) raw[u][j] = p[u * row_stride + j * kThreadsC];
#pragma unroll
      for (int u = 0; u < kScalarUnroll; ++u) {
        AccT v[V];
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] = valid[j] ? to_acc(raw[u][j]) : AccT(0);
        push_shifted(v);
      }
    }
    for (; r < tile_rows; r += kThreadsR, p += row_stride) {
      AccT v[V];
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = valid[j] ? to_acc(p[j * kThreadsC]) : AccT(0);
      push_shifted(v);
    }
  }

  // Merge the kThreadsR row-threads of each channel. Layout [ty][channel] makes the merge loop read
  // consecutive channels across a warp (conflict-free); the writes below are V-way conflicted but
  // happen once per tile.
  __shared__ __align__(16) AccT s_mean[kThreadsR][kBlockC];
  __shared__ __align__(16) AccT s_m2[kThreadsR][kBlockC];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    s_mean[ty][local_channel(j)] = w.mean[j];
    s_m2[ty][local_channel(j)] = w.m2[j];
  }
  __syncthreads();

  // Thread (tx, ty) of the merge handles whole channels, so every thread (not only ty == 0) helps.
  // Counts are recomputed from the tiling instead of being stored: row-thread k saw
  // ceil((tile_rows - k) / kThreadsR) rows.
  for (int cl = ty * kThreadsC + tx; cl < kBlockC; cl += kThreadsC * kThreadsR) {
    const int c = c_block + cl;
    if (c >= channels) break;
    int n = 0;
    AccT mean = AccT(0);
    AccT m2 = AccT(0);
    // Not unrolled: it runs once per tile, and unrolling 32 merges (each with a division and its
    // slow path) bloats the code and pushed the 8x32 configurations onto the stack.
#pragma unroll 1
    for (int k = 0; k < kThreadsR; ++k) {
      const int n_k = tile_rows > k ? (tile_rows - k + kThreadsR - 1) / kThreadsR : 0;
      chan_merge(n, mean, m2, n_k, s_mean[k][cl], s_m2[k][cl]);
    }
    part_mean[tile * channels + c] = mean;
    part_m2[tile * channels + c] = m2;
    if (tile == 0) shift_out[c] = to_acc(x[c]);
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel 2: merge partials, write mean / biased var, update running statistics
// ---------------------------------------------------------------------------------------------
//
// CTA = kThreadsC channels x kThreadsT tile-threads. Each tile-thread folds tiles ty, ty + kThreadsT,
// ... in increasing order, then a fixed-shape tree in shared memory merges the tile-threads. Many
// tile-threads per channel (rather than one thread walking all tiles) keep this tiny kernel from
// being a serial chain of thousands of dependent divisions.
//
// shift: null, or the per-channel value the partial means are relative to (see kernel 1); it is
// added back once, after all merges.
//
// running_mean / running_var may be null (eval-style call or a functional op that leaves the buffers
// to the module). When given they are updated exactly as torch.nn.BatchNorm does in training:
//   running = (1 - momentum) * running + momentum * batch, using the unbiased M2 / (n - 1) for var.
// A channel with no rows gets NaN mean/var and leaves the running statistics untouched.
template <typename AccT, int kThreadsC, int kThreadsT>
__global__ void __launch_bounds__(kThreadsC * kThreadsT)
    channel_stats_finalize_kernel(const AccT* __restrict__ part_mean,
                                  const AccT* __restrict__ part_m2,
                                  const AccT* __restrict__ shift, TileCounts counts,
                                  int64_t num_tiles, int channels, AccT* __restrict__ mean_out,
                                  AccT* __restrict__ var_out, AccT* __restrict__ running_mean,
                                  AccT* __restrict__ running_var, AccT momentum) {
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
  if (shift != nullptr) mean = acc_add(shift[c], mean);
  mean_out[c] = mean;
  var_out[c] = acc_div(m2, static_cast<AccT>(n));
  const AccT keep = AccT(1) - momentum;
  if (running_mean != nullptr) running_mean[c] = keep * running_mean[c] + momentum * mean;
  if (running_var != nullptr) {
    // n == 1 gives 0 / 0 = NaN, as PyTorch's kernels do (its Python front end rejects that case).
    const AccT unbiased = acc_div(m2, static_cast<AccT>(n - 1));
    running_var[c] = keep * running_var[c] + momentum * unbiased;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

constexpr int kPartialsThreads = 256;  // threads per partials CTA
constexpr int kPartialsUnroll = 4;     // 16-byte loads in flight per thread
// Fixed CTA-count target for choosing the tile height. It is a constant, not derived from the SM
// count, so that the reduction tree (and therefore every bit of the result) depends only on the
// problem shape. On an H200 (132 SMs x 4 resident CTAs) that is ~4 waves: enough CTAs to balance
// the SMs, few enough that the partials stay small.
constexpr int64_t kTargetCtas = 2048;
// Floor on rows per tile: the partials round trip (mean and M2, written then read back) costs
// 4 * sizeof(acc) = 16 bytes per tile and channel, ~3% of 256 rows of a 2-byte dtype (512 bytes).
constexpr int64_t kMinRowsPerTile = 256;
constexpr int kFinalizeThreadsC = 8;   // 8 floats = one 32-byte sector per partials row
constexpr int kFinalizeThreadsT = 64;

// Everything the launcher and the caller (who allocates the workspace) need to agree on.
struct Plan {
  int64_t rows = 0;
  int channels = 0;
  int threads_c = 32;       // kThreadsC of the partials kernel; kThreadsR = 256 / threads_c
  int rows_per_tile = 0;    // multiple of kThreadsR * kPartialsUnroll
  int64_t num_tiles = 0;    // gridDim.x of the partials kernel
  int channel_blocks = 0;   // gridDim.y of the partials kernel
  size_t acc_size = 0;      // sizeof(acc_t<T>)
  // Partial means [num_tiles, channels], partial M2s [num_tiles, channels], shift [channels].
  size_t workspace_bytes = 0;
  bool valid = false;       // false when the shape cannot be launched (see make_plan)
};

// Computes the tiling for a [rows, channels] matrix of T. Pure host arithmetic (no CUDA calls), so a
// caller can size the workspace before allocating it. Returns valid = false for negative sizes or
// shapes beyond the grid limits.
template <typename T>
inline Plan make_plan(int64_t rows, int64_t channels) {
  Plan plan;
  plan.acc_size = sizeof(acc_t<T>);
  if (rows < 0 || channels < 0 || channels > INT_MAX) return plan;
  plan.rows = rows;
  plan.channels = int(channels);
  constexpr int V = kVecWidth<T>;
  // Narrow channel counts would leave most lanes of a 32-wide CTA row idle; give the spare threads
  // to rows instead. Depends on channels only, keeping the partition shape-determined.
  const int64_t vectors = (channels + V - 1) / V;
  plan.threads_c = vectors <= 8 ? 8 : (vectors <= 16 ? 16 : 32);
  const int threads_r = kPartialsThreads / plan.threads_c;
  const int64_t block_c = int64_t(plan.threads_c) * V;
  plan.channel_blocks = int((channels + block_c - 1) / block_c);
  if (plan.channel_blocks > 65535) return plan;  // gridDim.y limit
  if (rows == 0 || channels == 0) {
    plan.valid = true;
    return plan;
  }
  const int64_t quantum = int64_t(threads_r) * kPartialsUnroll;
  int64_t target_tiles = kTargetCtas / plan.channel_blocks;
  if (target_tiles < 1) target_tiles = 1;
  int64_t rpt = (rows + target_tiles - 1) / target_tiles;
  if (rpt < kMinRowsPerTile) rpt = kMinRowsPerTile;
  rpt = (rpt + quantum - 1) / quantum * quantum;
  const int64_t max_rpt = int64_t(INT_MAX) / 2 / quantum * quantum;
  if (rpt > max_rpt) rpt = max_rpt;
  plan.rows_per_tile = int(rpt);
  plan.num_tiles = (rows + rpt - 1) / rpt;
  if (plan.num_tiles > INT_MAX) return plan;  // gridDim.x limit
  plan.workspace_bytes = (2 * size_t(plan.num_tiles) + 1) * size_t(channels) * plan.acc_size;
  plan.valid = true;
  return plan;
}

// Kernel 2 alone, for producers that wrote their own partials (fused dw/pw epilogues).
template <typename AccT>
inline cudaError_t launch_finalize(const AccT* part_mean, const AccT* part_m2, const AccT* shift,
                                   TileCounts counts,
                                   int64_t num_tiles, int channels, AccT* mean_out, AccT* var_out,
                                   AccT* running_mean, AccT* running_var, double momentum,
                                   cudaStream_t stream) {
  if (channels <= 0) return cudaSuccess;
  if (mean_out == nullptr || var_out == nullptr || num_tiles < 0) return cudaErrorInvalidValue;
  if (num_tiles > 0 && (part_mean == nullptr || part_m2 == nullptr)) return cudaErrorInvalidValue;
  const dim3 grid(unsigned((channels + kFinalizeThreadsC - 1) / kFinalizeThreadsC));
  const dim3 block(kFinalizeThreadsC, kFinalizeThreadsT);
  auto* kernel = &channel_stats_finalize_kernel<AccT, kFinalizeThreadsC, kFinalizeThreadsT>;
  kernel<<<grid, block, 0, stream>>>(part_mean, part_m2, shift, counts, num_tiles, channels, mean_out,
                                     var_out, running_mean, running_var, static_cast<AccT>(momentum));
  return cudaGetLastError();
}

template <typename T, int kThreadsC>
inline cudaError_t launch_partials(const Plan& plan, const T* x, acc_t<T>* part_mean,
                                   acc_t<T>* part_m2, acc_t<T>* shift, cudaStream_t stream) {
  constexpr int kThreadsR = kPartialsThreads / kThreadsC;
  constexpr int V = kVecWidth<T>;
  const bool vectorized =
      plan.channels % V == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  auto* kernel = vectorized
                     ? &channel_stats_partials_kernel<T, kThreadsC, kThreadsR, kPartialsUnroll, true>
                     : &channel_stats_partials_kernel<T, kThreadsC, kThreadsR, kPartialsUnroll, false>;
  const dim3 grid(unsigned(plan.num_tiles), unsigned(plan.channel_blocks));
  const dim3 block(kThreadsC, kThreadsR);
  kernel<<<grid, block, 0, stream>>>(x, plan.rows, plan.channels, plan.rows_per_tile, part_mean,
                                     part_m2, shift);
  return cudaGetLastError();
}

// Both kernels on `stream`. x: [plan.rows, plan.channels] row-major on the device; workspace: at
// least plan.workspace_bytes of device memory aligned to sizeof(acc_t<T>) (may be null when that is
// 0); mean_out / var_out: [channels]; running_mean / running_var: [channels] or null. Returns the
// launch error, if any (execution errors surface at the next synchronisation as usual).
template <typename T>
inline cudaError_t launch_channel_stats(const Plan& plan, const T* x, void* workspace,
                                        acc_t<T>* mean_out, acc_t<T>* var_out,
                                        acc_t<T>* running_mean, acc_t<T>* running_var,
                                        double momentum, cudaStream_t stream) {
  using AccT = acc_t<T>;
  if (!plan.valid || plan.acc_size != sizeof(AccT)) return cudaErrorInvalidValue;
  if (plan.channels == 0) return cudaSuccess;
  AccT* part_mean = nullptr;
  AccT* part_m2 = nullptr;
  AccT* shift = nullptr;
  if (plan.num_tiles > 0) {
    if (x == nullptr || workspace == nullptr) return cudaErrorInvalidValue;
    part_mean = static_cast<AccT*>(workspace);
    part_m2 = part_mean + plan.num_tiles * plan.channels;
    shift = part_m2 + plan.num_tiles * plan.channels;
    cudaError_t err = cudaSuccess;
    switch (plan.threads_c) {
      case 8: err = launch_partials<T, 8>(plan, x, part_mean, part_m2, shift, stream); break;
      case 16: err = launch_partials<T, 16>(plan, x, part_mean, part_m2, shift, stream); break;
      case 32: err = launch_partials<T, 32>(plan, x, part_mean, part_m2, shift, stream); break;
      default: return cudaErrorInvalidValue;
    }
    if (err != cudaSuccess) return err;
  }
  const TileCounts counts{plan.rows, plan.rows_per_tile, nullptr};
  return launch_finalize<AccT>(part_mean, part_m2, shift, counts, plan.num_tiles, plan.channels,
                               mean_out, var_out, running_mean, running_var, momentum, stream);
}

}  // namespace channel_stats
}  // namespace cuda
}  // namespace convmixer_kernels
