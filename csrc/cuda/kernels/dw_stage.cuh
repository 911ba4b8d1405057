// The depthwise stage of a ConvMixer block on NHWC activations (docs/OPS.md, docs/DESIGN.md §4):
//
//   forward   out = act(dwconv_k(norm(x)) + b) (and a = dwconv_k(norm(x)) + b when asked: the
//             pre-activation, stored for the backward), and per-channel partial statistics of out
//   backward  where the forward kept a (ReLU: its out), one kernel (dw_backward_fused.cuh): dA
//             formed on load over each tile and its halo, dW, db, dX and the norm's sums from it.
//             Else, recomputing a:
//             1. dA = (grad_out + grad_mean/M + grad_var 2(o - mean)/M) * act'(a), with a
//                recomputed; dW, db summed per channel (kernel "backward_data")
//             2. dX = transposed dwconv(dA); grad_x = dX * scale; the norm's sums (kernel
//                "backward_input")
//             Either way, fixed-order sums of the per-part partials and the norm's gradients by
//             the last CTA of each channel block of the last kernel (finalize_backward,
//             last_cta.cuh); the forward's statistics likewise by the forward kernel's last CTAs
//             (channel_stats.cuh)
//
// The kernels and what they share with the host (Shape, SmemLayout); the plan and the launch entry
// are in dw_launch.cuh. Torch-free (docs/DESIGN.md §8).
//
// Tiling. A CTA owns kCB = 32 consecutive channels (one per lane, so every shared-memory access
// of a warp reads 32 consecutive words: no bank conflicts) and walks a run of spatial tiles of
// kTH x kTW output pixels (its "part"). Its 8 warps split a tile into 2 x 4 strips of kRY x kRX
// pixels; a thread computes its strip for its channel. Per tile the input, with the norm applied
// and a (k-1)/2 halo of zeros outside the image (zero padding *after* the norm, as docs/OPS.md
// requires), is staged in shared memory in the accumulation type with 16-byte global loads across
// channels; the forward and backward-input kernels double-buffer it through cp.async (TilePipe).
//
// Why these shapes: a k x k tap loop over shared memory would issue one load per FMA and run at a
// quarter of the FMA rate. With the k*k weights in registers (k <= 9) and each loaded input row
// reused by every output row and column of the strip that needs it, a strip of 8 x 2 outputs
// costs (8 + k - 1)(2 + k - 1) loads for 16 k^2 FMAs: 8 FMAs per load at k = 9. Larger kernels
// (k = 11..15, and k = 1) take a generic path with runtime k and weights in shared memory, which is
// correct for every odd k <= 15 but about load-bound.
//
// Determinism. No float atomics. The partition (parts, tiles per part) depends only on the shape
// (never on the SM count); every sum runs in a fixed order: per thread over its tiles, then over
// the 8 warps in warp order, then over parts in part order (the channel block's last CTA).
#pragma once

#include "bn_math.cuh"
#include "channel_stats.cuh"
#include "elementwise.cuh"
#include "last_cta.cuh"

// cp.async. Not <cuda_pipeline.h>: it declares a namespace `cuda` at global scope.
#include <cuda_pipeline_primitives.h>

namespace convmixer_kernels {
namespace cuda {
namespace dw {

constexpr int kCB = 32;                  // channels per CTA: one per lane
constexpr int kRY = 8, kRX = 2;          // a thread's output strip
constexpr int kGroupsY = 2, kGroupsX = 4;
constexpr int kGroups = kGroupsY * kGroupsX;  // warps per CTA
constexpr int kTH = kRY * kGroupsY;      // 16 output rows per tile
constexpr int kTW = kRX * kGroupsX;      // 8 output columns per tile
constexpr int kThreads = kCB * kGroups;  // 256
constexpr int kMaxK = 15;
constexpr int kMaxRegK = 9;              // largest k whose k*k taps live in registers
// The CTA count is planned for whole waves of kWaveCtas = 2 CTAs/SM on 132 SMs (an H100/H200): a
// constant, never the SM count of the device, so the partition, and with it every rounding of every
// sum, depends on the shape alone and results are bitwise the same on every GPU. kTargetCtas is
// about 8 such waves: enough CTAs per SM to hide the stagger of the last wave, few enough that the
// per-part partials (dW: parts x C x k*k) stay small.
constexpr int64_t kWaveCtas = 2 * 132;
constexpr int64_t kTargetCtas = 8 * kWaveCtas;
constexpr size_t kMaxDynamicSmem = 227 * 1024;  // sm_90's opt-in limit per block
constexpr size_t kTwoCtaSmem = 113 * 1024;      // per block for 2 per SM: 228 KiB less 1 KiB each

// The shape and its partition, computed on the host (make_plan, dw_launch.cuh) and passed to every
// kernel.
struct Shape {
  int64_t N = 0;
  int H = 0, W = 0, C = 0, K = 0;
  int tiles_h = 0, tiles_w = 0;
  int64_t tiles = 0;           // N * tiles_h * tiles_w
  int64_t parts = 0;       // gridDim.y
  // Part p walks tiles_base + (p < tiles_extra) consecutive tiles: tiles = parts * tiles_base +
  // tiles_extra, so parts differ by at most one tile.
  int64_t tiles_base = 0;
  int tiles_extra = 0;
  int channel_blocks = 0;  // gridDim.x
};

// Shared-memory layout, in units of AccT, for one kernel. Every region is a multiple of kCB / 2
// elements (64 bytes), so all region starts stay 16-byte aligned.
struct SmemLayout {
  int in_h = 0, in_w = 0;  // staged tile + halo
  size_t in = 0, raw = 0, weights = 0, grad_w = 0, grad_w_split = 0, norm = 0;  // offsets
  // The backward's kTH x kTW tile: dA's (backward-data) or the normed input's (fused, whose `in`
  // holds dA's window); the fused kernel's dA coefficients.
  size_t tile = 0, coef = 0;
  bool async = false;  // raw holds the next tile's window in the storage dtype (TilePipe)
  size_t total = 0;                                         // elements in all
};

// BackwardFused: the one-kernel backward where the forward kept a (or ReLU's out), so dA is
// elementwise in saved tensors and formed on load, halo included (dw_backward_fused.cuh).
enum class Kernel { Forward, BackwardData, BackwardInput, BackwardFused };

// Whether the kernels for k and this accumulation type take the register-tap path (the
// instantiations kRegisterTaps below; the host's kernel_for_k picks them).
__host__ __device__ constexpr bool register_taps(int K, size_t acc_size) {
  return (K == 3 || K == 5 || K == 7 || K == 9) && acc_size == 4;
}

// The balanced dW split of the register-tap path (add_tap_sums): the K * kTH
// (tap row i, tile row y) units, i-major, in runs of dw_units(K) = 2K per warp. A warp whose run
// starts inside a tap row (y != 0) adds that row's share into its own slot of the grad_w_split
// region; the warp whose run holds (i, 0) owns row i's slots in grad_w.
static_assert(kTH % kGroups == 0, "every warp gets the same number of dW units");
__host__ __device__ constexpr int dw_units(int K) { return K * kTH / kGroups; }
// The tap row of warp g's split slot, or -1 when its run starts at a row's beginning.
__host__ __device__ constexpr int dw_split_row(int K, int g) {
  return (g * dw_units(K)) % kTH != 0 ? g * dw_units(K) / kTH : -1;
}

__host__ __device__ inline SmemLayout smem_layout(int K, Kernel kernel, size_t acc_size,
                                                  size_t storage_size) {
  SmemLayout l;
  l.in_h = kTH + K - 1;
  l.in_w = kTW + K - 1;
  size_t at = 0;
  l.in = at;
  at += size_t(l.in_h) * l.in_w * kCB;
  // The end-of-kernel reductions reuse the input region: it must hold 3 * kGroups * kCB values.
  if (at < size_t(3) * kGroups * kCB) at = size_t(3) * kGroups * kCB;
  // The forward and backward-input kernels with 32-bit accumulation stage through a second window
  // in the storage dtype, filled by cp.async under the previous tile's compute, where that keeps
  // two CTAs per SM (k <= 9, and k = 11 in 16-bit storage). Not the backward-data and fused
  // kernels (their dW regions leave no room for it at k = 9, and the fused one's window comes from
  // two tensors), nor float64 (for gradient checks).
  l.raw = at;
  const size_t raw = size_t(l.in_h) * l.in_w * kCB * storage_size / acc_size;
  const size_t taps_and_norm = size_t(K) * K * kCB + 3 * kCB;
  l.async = (kernel == Kernel::Forward || kernel == Kernel::BackwardInput) && acc_size == 4 &&
            (at + raw + taps_and_norm) * acc_size <= kTwoCtaSmem;
  if (l.async) at += raw;
  l.weights = at;  // the taps, [k*k][kCB], staged once per CTA
  at += size_t(K) * K * kCB;
  if (kernel == Kernel::BackwardData || kernel == Kernel::BackwardFused) {
    l.tile = at;
    at += size_t(kTH) * kTW * kCB;
    l.grad_w = at;
    at += size_t(K) * K * kCB;
    l.grad_w_split = at;
    if (register_taps(K, acc_size)) at += size_t(kGroups) * K * kCB;
  }
  l.norm = at;
  at += 3 * kCB;
  if (kernel == Kernel::BackwardFused) {
    l.coef = at;
    at += 3 * kCB;
  }
  l.total = at;
  return l;
}

// Compile-time k of a kernel instantiation; 0 is the generic path that reads shape.K. float64
// (for gradient checks, not speed) always takes the generic path: its taps would need twice the
// registers.
template <int kK, typename AccT>
constexpr bool kRegisterTaps = kK > 0 && kK <= kMaxRegK && sizeof(AccT) == 4;
static_assert(register_taps(9, 4) && !register_taps(9, 8) && kMaxRegK == 9,
              "register_taps must name the kRegisterTaps instantiations kernel_for_k picks");

// ---------------------------------------------------------------------------------------------
// Device building blocks
// ---------------------------------------------------------------------------------------------

// Which tile the loop is on: its image and the image coordinates of its first output pixel.
struct TileCoord {
  int64_t n;
  int y0, x0;
};

__device__ __forceinline__ TileCoord tile_coord(const Shape& s, int64_t tile) {
  const int64_t per_image = int64_t(s.tiles_h) * s.tiles_w;
  const int64_t n = tile / per_image;
  const int rem = int(tile - n * per_image);
  return {n, (rem / s.tiles_w) * kTH, (rem % s.tiles_w) * kTW};
}

// The staging loops below give every thread the same channels on every item (kThreads is a
// multiple of kCB, and of the kCB / V items of a pixel): its first one, relative to c0.
template <typename T>
__device__ __forceinline__ int staging_lane(bool vectorized) {
  constexpr int V = kVecWidth<T>;
  return vectorized ? int(threadIdx.x % (kCB / V)) * V : int(threadIdx.x % kCB);
}
static_assert(kThreads % kCB == 0, "a thread's staging channels must not change between items");

// The input norm of a thread's staging channels (V of them on the 16-byte path, one on the scalar
// path), read into registers from the CTA's copy in shared memory (stage_norm, s_norm: mean,
// scale, shift, kCB each) once per tile, ahead of the staging loop, which then reads no norm
// vectors. Not once per kernel: live across the tile loop, the 3V values (24 registers in 16-bit
// storage) sit on top of the k*k taps of the conv and spilled at k = 9 under the 128-register
// budget of 2 CTAs/SM (ptxas: 12 bytes); so not from global memory either, whose loads the compiler
// hoists out of the tile loop (shared-memory loads cannot cross the loop's __syncthreads).
template <typename T>
struct StagingNorm {
  using AccT = acc_t<T>;
  static constexpr int V = kVecWidth<T>;
  bool on = false;
  AccT mean[V], scale[V], shift[V];
  __device__ __forceinline__ StagingNorm(const AccT* s_norm, bool vectorized)
      : on(s_norm != nullptr) {
    const int first = staging_lane<T>(vectorized);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      // Channels past C hold zeros (stage_norm); on the scalar path only j = 0 is used.
      const bool have = on && (vectorized || j == 0);
      mean[j] = have ? s_norm[first + j] : AccT(0);
      scale[j] = have ? s_norm[kCB + first + j] : AccT(0);
      shift[j] = have ? s_norm[2 * kCB + first + j] : AccT(0);
    }
  }
  // The normalised value of the thread's j-th channel.
  __device__ __forceinline__ AccT apply(AccT v, int j) const {
    return on ? (v - mean[j]) * scale[j] + shift[j] : v;
  }
};

// The three vectors of an input norm ([C] each, accumulation type); all null: no norm.
template <typename AccT>
struct NormArgs {
  const AccT* mean = nullptr;
  const AccT* scale = nullptr;
  const AccT* shift = nullptr;
};

// Copies the CTA's slice of a norm into shared memory (zeros past the last channel); returns null
// when there is none. Read by the threads only after the next __syncthreads.
template <typename AccT>
__device__ __forceinline__ const AccT* stage_norm(AccT* s_norm, const NormArgs<AccT>& norm, int c0,
                                                  int C) {
  if (norm.mean == nullptr) return nullptr;
  for (int i = threadIdx.x; i < 3 * kCB; i += kThreads) {
    const int which = i / kCB, c = c0 + i % kCB;
    const AccT* src = which == 0 ? norm.mean : (which == 1 ? norm.scale : norm.shift);
    s_norm[i] = c < C ? src[c] : AccT(0);
  }
  return s_norm;
}

// A staging item's V values into shared memory ([pixel][kCB], at its first channel).
template <typename AccT, int V>
__device__ __forceinline__ void store_staged(AccT* dst, const AccT (&v)[V]) {
  if constexpr (sizeof(AccT) == 4 && V % 4 == 0) {
    // 16-byte stores: with scalar ones the 32 threads of a warp, 8 floats apart, would hit
    // 4 banks (an 8-way conflict per store); float4 stores leave a 2-way conflict.
#pragma unroll
    for (int j = 0; j < V; j += 4)
      *reinterpret_cast<float4*>(dst + j) = make_float4(v[j], v[j + 1], v[j + 2], v[j + 3]);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) dst[j] = v[j];
  }
}

// Stages src's tile + halo for channels [c0, c0 + kCB) into s_in as AccT, applying the norm (when
// s_norm is not null) and writing zeros outside the image and past the last channel.
// `vectorized`: C % V == 0 and src is 16-byte aligned, so each thread moves V channels with one
// 16-byte load. kFromRaw: the 16-byte vectors come from s_raw (the window as copy_tile_async
// left it, [pixel][kCB] in the storage dtype) instead of src; each thread reads the vectors its
// own copies wrote (same items).
template <typename T, bool kFromRaw = false>
__device__ __forceinline__ void stage_tile(acc_t<T>* __restrict__ s_in, const SmemLayout& l,
                                           const T* __restrict__ src, const Shape& s,
                                           const TileCoord& t, int c0, int pad,
                                           const acc_t<T>* s_norm, bool vectorized,
                                           const T* s_raw = nullptr) {
  using AccT = acc_t<T>;
  const int pixels = l.in_h * l.in_w;
  const StagingNorm<T> norm(s_norm, vectorized);
  const int lane0 = staging_lane<T>(vectorized);
  if (vectorized) {
    constexpr int V = kVecWidth<T>;
    constexpr int kPerPixel = kCB / V;
    for (int item = threadIdx.x; item < pixels * kPerPixel; item += kThreads) {
      const int pix = item / kPerPixel;
      const int iy = t.y0 - pad + pix / l.in_w;
      const int ix = t.x0 - pad + pix % l.in_w;
      AccT v[V];
      if (iy >= 0 && iy < s.H && ix >= 0 && ix < s.W && c0 + lane0 < s.C) {
        const int64_t off = ((t.n * s.H + iy) * s.W + ix) * int64_t(s.C) + c0 + lane0;
        const T* from = kFromRaw ? s_raw + pix * kCB + lane0 : src + off;
        Unpack<T>::run(*reinterpret_cast<const uint4*>(from), v);
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] = norm.apply(v[j], j);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] = AccT(0);
      }
      store_staged<AccT, V>(s_in + pix * kCB + lane0, v);
    }
  } else {
    for (int item = threadIdx.x; item < pixels * kCB; item += kThreads) {
      const int pix = item / kCB;
      const int iy = t.y0 - pad + pix / l.in_w;
      const int ix = t.x0 - pad + pix % l.in_w;
      AccT v = AccT(0);
      if (iy >= 0 && iy < s.H && ix >= 0 && ix < s.W && c0 + lane0 < s.C)
        v = norm.apply(to_acc(src[((t.n * s.H + iy) * s.W + ix) * int64_t(s.C) + c0 + lane0]), 0);
      s_in[item] = v;
    }
  }
}

// Issues the cp.async copies of src's tile + halo (16-byte path) into s_raw, [pixel][kCB] in the
// storage dtype, one 16-byte vector per item as stage_tile's items; positions stage_tile zeroes
// are not copied (it does not read them).
template <typename T>
__device__ __forceinline__ void copy_tile_async(T* s_raw, const SmemLayout& l, const T* src,
                                                const Shape& s, const TileCoord& t, int c0,
                                                int pad) {
  constexpr int kPerPixel = kCB / kVecWidth<T>;
  const int lane0 = staging_lane<T>(true);
  for (int item = threadIdx.x; item < l.in_h * l.in_w * kPerPixel; item += kThreads) {
    const int pix = item / kPerPixel;
    const int iy = t.y0 - pad + pix / l.in_w;
    const int ix = t.x0 - pad + pix % l.in_w;
    if (iy >= 0 && iy < s.H && ix >= 0 && ix < s.W && c0 + lane0 < s.C)
      __pipeline_memcpy_async(s_raw + pix * kCB + lane0,
                              src + ((t.n * s.H + iy) * s.W + ix) * int64_t(s.C) + c0 + lane0, 16);
  }
  __pipeline_commit();
}

// Stages the tiles of a CTA's part, one per stage() call, into the fp32 window s_in. Where the
// layout has the raw window (l.async) and the 16-byte path applies, double-buffered: the next
// tile's window is copied with cp.async (sm_80+) into raw while the CTA computes on this one, and
// stage() converts it (norm, zeros) once it has landed; else stage_tile loads it synchronously.
// stage() begins with the barrier that ends the previous tile's reads of s_in and ends with the
// one after which s_in holds the tile.
template <typename T>
struct TilePipe {
  using AccT = acc_t<T>;
  AccT* s_in;
  T* s_raw;
  const SmemLayout& l;
  const T* src;
  const Shape& s;
  const AccT* s_norm;
  int c0, pad;
  bool vectorized, async;
  __device__ __forceinline__ TilePipe(AccT* smem, const SmemLayout& l_, const T* src_,
                                      const Shape& s_, const AccT* s_norm_, int c0_, int pad_,
                                      bool vectorized_, int64_t t_begin, int64_t t_end)
      : s_in(smem + l_.in),
        s_raw(reinterpret_cast<T*>(smem + l_.raw)),
        l(l_),
        src(src_),
        s(s_),
        s_norm(s_norm_),
        c0(c0_),
        pad(pad_),
        vectorized(vectorized_),
        async(l_.async && vectorized_) {
    if (async && t_begin < t_end)
      copy_tile_async<T>(s_raw, l, src, s, tile_coord(s, t_begin), c0, pad);
  }
  __device__ __forceinline__ void stage(int64_t tile, const TileCoord& t, int64_t t_end) {
    if (async) __pipeline_wait_prior(0);  // this thread's copies of the tile have landed
    __syncthreads();
    if (async)
      stage_tile<T, true>(s_in, l, src, s, t, c0, pad, s_norm, true, s_raw);
    else
      stage_tile<T>(s_in, l, src, s, t, c0, pad, s_norm, vectorized);
    __syncthreads();  // s_in holds the tile; raw is free again
    if (async && tile + 1 < t_end)
      copy_tile_async<T>(s_raw, l, src, s, tile_coord(s, tile + 1), c0, pad);
  }
};

// acc[r][x] += sum_ij w[i][j] * in[r + i][x + j] over this thread's strip, with the taps in
// registers. `in` points at the strip's top-left input (row-major [in_w][kCB] rows, this lane).
// Walks input rows once: each row is loaded into registers and used by every output row it
// touches (the r = ir - i test is resolved at compile time).
template <int K, typename AccT>
__device__ __forceinline__ void correlate_registers(const AccT* __restrict__ in,
                                                    const AccT (&w)[K * K],
                                                    AccT (&acc)[kRY][kRX]) {
  constexpr int kInW = kTW + K - 1;
#pragma unroll
  for (int ir = 0; ir < kRY + K - 1; ++ir) {
    AccT row[kRX + K - 1];
#pragma unroll
    for (int q = 0; q < kRX + K - 1; ++q) row[q] = in[(ir * kInW + q) * kCB];
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const int r = ir - i;
      if (r < 0 || r >= kRY) continue;
#pragma unroll
      for (int x = 0; x < kRX; ++x)
#pragma unroll
        for (int j = 0; j < K; ++j) acc[r][x] = fma_acc(w[i * K + j], row[x + j], acc[r][x]);
    }
  }
}

// The same sum with runtime k and taps in shared memory ([k*k][kCB], this lane's column).
template <typename AccT>
__device__ __forceinline__ void correlate_shared(const AccT* __restrict__ in, int in_w, int K,
                                                 const AccT* __restrict__ w,
                                                 AccT (&acc)[kRY][kRX]) {
  for (int i = 0; i < K; ++i) {
    for (int j = 0; j < K; ++j) {
      const AccT tap = w[(i * K + j) * kCB];
#pragma unroll
      for (int r = 0; r < kRY; ++r)
#pragma unroll
        for (int x = 0; x < kRX; ++x)
          acc[r][x] = fma_acc(tap, in[((r + i) * in_w + x + j) * kCB], acc[r][x]);
    }
  }
}

// Stages the CTA's k*k taps ([k*k][kCB]; rotated by 180 degrees when `flip`, for the transposed
// conv) in shared memory, zeros past the last channel.
template <typename T>
__device__ __forceinline__ void stage_taps(acc_t<T>* __restrict__ s_w, const T* __restrict__ weight,
                                           int c0, int C, int K, bool flip) {
  const int kk = K * K;
  for (int item = threadIdx.x; item < kk * kCB; item += kThreads) {
    const int t = item / kCB, lane = item % kCB;
    const int src = flip ? kk - 1 - t : t;
    s_w[item] = c0 + lane < C ? to_acc(weight[int64_t(c0 + lane) * kk + src]) : acc_t<T>(0);
  }
}

// This thread's strip convolved. The specialised k copy the taps from shared memory into
// registers for the call: keeping them live across the tile loop instead would hold k*k registers
// through the epilogue (GELU's erf, the statistics), which spilled at k = 9 under the 128-register
// budget of 2 CTAs/SM; reloading costs k*k loads per 16 k*k FMAs.
template <int kK, typename AccT>
__device__ __forceinline__ void correlate(const AccT* s_in, const SmemLayout& l, int K,
                                          const AccT* s_w, int strip_y, int strip_x,
                                          AccT (&acc)[kRY][kRX]) {
  const int lane = threadIdx.x % kCB;
  const AccT* in = s_in + (strip_y * l.in_w + strip_x) * kCB + lane;
  if constexpr (kRegisterTaps<kK, AccT>) {
    AccT w[kK * kK];
#pragma unroll
    for (int t = 0; t < kK * kK; ++t) w[t] = s_w[t * kCB + lane];
    correlate_registers<kK, AccT>(in, w, acc);
  } else {
    correlate_shared<AccT>(in, l.in_w, K, s_w + lane, acc);
  }
}

// Where a thread works: its lane's channel, its warp's kRY x kRX strip of every tile, and the CTA's
// part: the run of tiles [t_begin, t_end). Channel blocks run along grid x, parts along grid y, so
// the CTAs the scheduler starts together are the channel blocks of the same tiles.
struct Place {
  int lane, group, strip_y, strip_x, c0, c;
  int64_t t_begin, t_end;
  __device__ __forceinline__ explicit Place(const Shape& s)
      : lane(int(threadIdx.x) % kCB),
        group(int(threadIdx.x) / kCB),
        strip_y((group / kGroupsX) * kRY),
        strip_x((group % kGroupsX) * kRX),
        c0(int(blockIdx.x) * kCB),
        c(c0 + lane),
        t_begin(int64_t(blockIdx.y) * s.tiles_base +
                (int(blockIdx.y) < s.tiles_extra ? int(blockIdx.y) : s.tiles_extra)),
        t_end(t_begin + s.tiles_base + (int(blockIdx.y) < s.tiles_extra ? 1 : 0)) {}
  // The part's row of the per-part partials. Read from blockIdx where used, not kept live in a
  // register across the tile loop.
  __device__ __forceinline__ int64_t part() const { return blockIdx.y; }
};

// Calls f(r, x, off) for each pixel (r, x) of the thread's strip of tile t that lies in the image,
// in its channel (none past C); off is that element's offset in an NHWC tensor of the shape.
// Unrolled, so acc[r][x] in f stays in registers.
template <typename F>
__device__ __forceinline__ void for_strip_pixels(const Shape& s, const TileCoord& t,
                                                 const Place& me, F&& f) {
#pragma unroll
  for (int r = 0; r < kRY; ++r) {
    const int y = t.y0 + me.strip_y + r;
#pragma unroll
    for (int x = 0; x < kRX; ++x) {
      const int xx = t.x0 + me.strip_x + x;
      if (y >= s.H || xx >= s.W || me.c >= s.C) continue;
      f(r, x, ((t.n * s.H + y) * s.W + xx) * int64_t(s.C) + me.c);
    }
  }
}

template <typename AccT>
__device__ __forceinline__ void fill_strip(AccT (&acc)[kRY][kRX], AccT v) {
#pragma unroll
  for (int r = 0; r < kRY; ++r)
#pragma unroll
    for (int x = 0; x < kRX; ++x) acc[r][x] = v;
}

// Fixed-order sum over the CTA's warps of one value per thread: returns the total to the threads
// of warp 0 (others get garbage). s_red: kGroups * kCB values; the caller syncs before reuse.
template <typename AccT>
__device__ __forceinline__ AccT sum_over_warps(AccT v, AccT* s_red) {
  const int lane = threadIdx.x % kCB, group = threadIdx.x / kCB;
  s_red[group * kCB + lane] = v;
  __syncthreads();
  AccT total = AccT(0);
  if (group == 0) {
    for (int g = 0; g < kGroups; ++g) total += s_red[g * kCB + lane];
  }
  return total;
}

// ---------------------------------------------------------------------------------------------
// Kernel arguments
// ---------------------------------------------------------------------------------------------

template <typename T>
struct ForwardArgs {
  const T* x;
  NormArgs<acc_t<T>> norm;  // applied to x on load
  const T* weight;  // [C][k*k]
  const T* bias;    // [C] or null
  T* out;           // NHWC, like x
  T* pre_act;       // NHWC, like x, or null: a = dwconv(norm(x)) + b, for the backward
  // Statistics partials ([parts][C], and the parts' counts [channel_blocks][parts]) and the
  // statistics ([C]); null when the call wants no statistics.
  acc_t<T>* part_mean;
  acc_t<T>* part_m2;
  int* part_count;
  acc_t<T>* mean;
  acc_t<T>* var;
  BnNorm bn;        // the output's BatchNorm folded in, with statistics (bn_math.cuh)
  int* counters;    // [channel_blocks], zero (last_cta.cuh); with statistics
  bool vectorized;  // x is 16-byte aligned and C % (16 / sizeof(T)) == 0
};

// The backward's second level: the parts' rows of dW, db and, with a norm, the two norm sums, each
// added in part order, and the norm's mean gradient formed from them, -Σ dX · scale (the other two
// are the sums themselves: grad_scale = Σ dX (x - mean), grad_shift = Σ dX). Run by the last CTA
// of each channel block of the backward's last kernel (fused, or backward-input) for its channels
// (last_cta.cuh), or, with no parts (no pixels: every sum empty, zeros), by
// dw_backward_finalize_kernel.
template <typename T>
struct BackwardFinalizeArgs {
  // The parts' rows, written by the backward kernels (fused: all; else data: dW, db; input: the
  // norm sums).
  acc_t<T>* part_grad_w;           // [parts][C * kk]
  acc_t<T>* part_grad_b;           // [parts][C]
  acc_t<T>* part_sum_dx;           // [parts][C], only with a norm
  acc_t<T>* part_sum_dx_xc;        // [parts][C], only with a norm
  const acc_t<T>* norm_scale;      // [C], with a norm
  T* grad_weight;                  // [C * kk]
  T* grad_bias;                    // [C]
  acc_t<T>* sum_dx;                // [C], with a norm
  acc_t<T>* sum_dx_xc;             // [C], with a norm
  acc_t<T>* grad_norm_mean;        // [C] or null
};

template <typename T>
struct BackwardArgs {
  const T* grad_out;
  const acc_t<T>* grad_mean;  // [C] or null
  const acc_t<T>* grad_var;   // [C] or null (then `mean` may be null too)
  const acc_t<T>* mean;       // the forward's batch mean of out, [C]
  BnGrad bn;                  // the output's BatchNorm folded in: its var gradient joins grad_var
  // [C] or null: grad_out is the gradient of the next stage's normed input (its dU) and this
  // stage's own is grad_out · grad_out_scale, that norm's scale, formed on load.
  const acc_t<T>* grad_out_scale;
  // The saved a (dw_launch.cuh saved_a): the forward's pre_act, or with ReLU its out, or null.
  // relu'(a) = relu'(out) (out <= 0 exactly where a <= 0, NaN passing, as threshold_backward on
  // the result) and o = out. Read by the fused kernel; the launcher gives the two-kernel path
  // neither (it recomputes a).
  const T* out;               // the forward's out (NHWC like x) or null; read with ReLU only
  const T* pre_act;           // the forward's pre_act (NHWC like x) or null; read when given
  const T* x;
  NormArgs<acc_t<T>> norm;    // applied to x on load
  const T* weight;
  const T* bias;              // [C] or null
  T* grad_pre;                // dA scratch, NHWC like x (two-kernel path only)
  T* grad_x;                  // NHWC like x
  const T* grad_res;          // NHWC like x, or null: the residual's gradient of norm(x), added to dX
  BackwardFinalizeArgs<T> fin;  // the parts' rows, and the second level's outputs (last CTAs)
  int* counters;              // [channel_blocks], zero (last_cta.cuh)
  bool vectorized_x;          // x (and grad_pre, two-kernel path) 16-byte aligned, C % V == 0
  bool vectorized_grad;       // the fused kernel's grad_out and saved a (or out) likewise
};

// The second level for channels [c_begin, c_end), spread over `nthreads` threads (this one `tid`):
// element i of dW ([C][k*k]) and channel c's vectors each summed by one thread, parts in order.
// __ldcg: the partials of the kernel it ends come from CTAs of the running kernel.
template <typename T>
__device__ __forceinline__ void finalize_backward(const BackwardFinalizeArgs<T>& a, int64_t parts,
                                                  int C, int64_t kk, int c_begin, int c_end,
                                                  int64_t tid, int64_t nthreads) {
  using AccT = acc_t<T>;
  const int64_t n = int64_t(C) * kk;
  for (int64_t i = c_begin * kk + tid; i < c_end * kk; i += nthreads) {
    AccT w = AccT(0);
#pragma unroll 4
    for (int64_t p = 0; p < parts; ++p) w += __ldcg(a.part_grad_w + p * n + i);
    a.grad_weight[i] = from_acc<T>(w);
  }
  for (int64_t c = c_begin + tid; c < c_end; c += nthreads) {
    AccT b = AccT(0), s0 = AccT(0), s1 = AccT(0);
    const bool sums = a.sum_dx != nullptr;
#pragma unroll 4
    for (int64_t p = 0; p < parts; ++p) {
      b += __ldcg(a.part_grad_b + p * C + c);
      if (sums) {
        s0 += __ldcg(a.part_sum_dx + p * C + c);
        s1 += __ldcg(a.part_sum_dx_xc + p * C + c);
      }
    }
    a.grad_bias[c] = from_acc<T>(b);
    if (!sums) continue;
    a.sum_dx[c] = s0;
    a.sum_dx_xc[c] = s1;
    if (a.grad_norm_mean != nullptr) a.grad_norm_mean[c] = -s0 * a.norm_scale[c];
  }
}

template <typename T>
__global__ void dw_backward_finalize_kernel(const BackwardFinalizeArgs<T> a, int64_t parts, int C,
                                            int64_t kk) {
  finalize_backward(a, parts, C, kk, 0, C, int64_t(blockIdx.x) * blockDim.x + threadIdx.x,
                    int64_t(gridDim.x) * blockDim.x);
}

// How the backward forms dA (docs/OPS.md): dO = grad_out * go_scale + konst + lin * o, with o =
// act(a) as stored, and dA = dO * act'(a). Per channel: go_scale is grad_out_scale (1 without:
// the product is then grad_out exactly), konst and lin fold the statistics' gradients in, the
// folded BatchNorm's var gradient among them.
template <typename AccT>
struct GradCoef {
  AccT go_scale = AccT(1), konst = AccT(0), lin = AccT(0);
};

// Channel c's coefficients (c < C). With `write_bn` this thread also writes the folded
// BatchNorm's weight and bias gradients of channel c (one CTA per channel block does).
template <typename T>
__device__ __forceinline__ GradCoef<acc_t<T>> grad_coef(const BackwardArgs<T>& args,
                                                        const Shape& s, int c, bool write_bn) {
  using AccT = acc_t<T>;
  GradCoef<AccT> k;
  const AccT inv_count = AccT(1) / static_cast<AccT>(s.N * s.H * s.W);
  const bool bn = args.bn.var != nullptr;
  if (args.grad_mean != nullptr) k.konst += args.grad_mean[c] * inv_count;
  if (args.grad_var != nullptr || bn) {
    const AccT gv_bn = bn ? bn_math::fold_backward<AccT>(args.bn, c, write_bn) : AccT(0);
    const AccT gv = args.grad_var == nullptr ? gv_bn
                    : bn                     ? args.grad_var[c] + gv_bn
                                             : args.grad_var[c];
    k.lin = AccT(2) * gv * inv_count;
    k.konst -= k.lin * args.mean[c];
  }
  if (args.grad_out_scale != nullptr) k.go_scale = args.grad_out_scale[c];
  return k;
}

// Whether dO needs o: with a var gradient, the statistics' own or the folded BatchNorm's.
template <typename T>
__device__ __forceinline__ bool grad_needs_out(const BackwardArgs<T>& args) {
  return args.grad_var != nullptr || args.bn.var != nullptr;
}

// dA at one position, from a (saved or recomputed, in `at`) and grad_out there.
template <typename T, Act A>
__device__ __forceinline__ acc_t<T> form_dA(const ActAt<A, acc_t<T>>& at, acc_t<T> grad_out,
                                            acc_t<T> go_scale, acc_t<T> konst, acc_t<T> lin,
                                            bool need_o) {
  acc_t<T> dO = channel_stats::acc_mul(grad_out, go_scale) + konst;
  if (need_o) dO += lin * round_to_storage<T>(at.value());
  return at.backward(dO);
}

// One tile's share of dW's sums: for every tap (i, j), the sum over the tile's pixels p of
// tile[p] * window[p + (i, j)] (window: [in_h][in_w][kCB], tile: [kTH][kTW][kCB], this lane's
// column), added into the CTA's slots. The backward-data kernel passes the normed input's window
// and dA's tile; the fused kernel dA's window and the normed input's tile, which gives the taps
// rotated by 180 degrees (store_tap_sums flips them back).
//
// Register-tap path: the K * kTH (tap row, tile row) units are split into equal runs of 2K, one
// per warp (dw_units), so every warp does the same work at every k (owning whole tap rows, warp 0
// had 2 of 9 rows at k = 9 and the dW phase took 2 / (9 / 8) = 1.78x its balanced time; at k = 3
// five warps idled). Each row's sums go to one writer's slot: the warp that holds the row's first
// unit (s_gw, [k*k][kCB]), or, for the part of a row that a run starts inside of, that warp's
// split slot (s_gw_split, [kGroups][k][kCB]); store_tap_sums adds the slots in warp order. No
// atomics, a fixed order. The generic path keeps whole rows per warp.
template <int kK, typename AccT>
__device__ __forceinline__ void add_tap_sums(const AccT* __restrict__ window,
                                             const AccT* __restrict__ tile, int in_w, int K,
                                             AccT* s_gw, AccT* s_gw_split, int group, int lane) {
  if constexpr (kRegisterTaps<kK, AccT>) {
    // The warp's run of (tap row, tile row) units; row_sum holds the current row's K sums and
    // goes to the row's slots when the row ends or the run does.
    constexpr int kUnits = dw_units(kK);
    const int u_begin = group * kUnits;
    AccT row_sum[kK];
#pragma unroll
    for (int j = 0; j < kK; ++j) row_sum[j] = AccT(0);
    for (int u = u_begin; u < u_begin + kUnits; ++u) {
      const int i = u / kTH, y = u % kTH;
      AccT in[kTW + kK - 1], d[kTW];
#pragma unroll
      for (int q = 0; q < kTW + kK - 1; ++q) in[q] = window[((y + i) * in_w + q) * kCB + lane];
#pragma unroll
      for (int x = 0; x < kTW; ++x) d[x] = tile[(y * kTW + x) * kCB + lane];
#pragma unroll
      for (int x = 0; x < kTW; ++x)
#pragma unroll
        for (int j = 0; j < kK; ++j) row_sum[j] = fma_acc(d[x], in[x + j], row_sum[j]);
      if (y == kTH - 1 || u == u_begin + kUnits - 1) {
        // A row begun inside this run (at y = 0) is this warp's, in s_gw; the run's first row
        // when another warp began it goes to this warp's split slot.
        AccT* dst = i == dw_split_row(kK, group) ? s_gw_split + group * kK * kCB
                                                 : s_gw + i * kK * kCB;
#pragma unroll
        for (int j = 0; j < kK; ++j) {
          dst[j * kCB + lane] += row_sum[j];
          row_sum[j] = AccT(0);
        }
      }
    }
  } else {
    // The generic path (runtime k, float64): warp g owns tap rows g, g + 8, ... whole.
    for (int i = group; i < K; i += kGroups) {
      for (int j = 0; j < K; ++j) {
        AccT sum = AccT(0);
        for (int y = 0; y < kTH; ++y)
#pragma unroll
          for (int x = 0; x < kTW; ++x)
            sum = fma_acc(tile[(y * kTW + x) * kCB + lane],
                          window[((y + i) * in_w + x + j) * kCB + lane], sum);
        s_gw[(i * K + j) * kCB + lane] += sum;
      }
    }
  }
}

// The CTA's tap sums (add_tap_sums' slots, the split ones added in warp order) into its part's row
// of dW; `flipped`: the slots hold the taps rotated by 180 degrees. After a barrier.
template <int kK, typename AccT>
__device__ __forceinline__ void store_tap_sums(const AccT* s_gw, const AccT* s_gw_split, int K,
                                               bool flipped, AccT* part_grad_w, int64_t part,
                                               int C, int c0) {
  const int kk = K * K;
  for (int item = threadIdx.x; item < kk * kCB; item += kThreads) {
    const int tap = item / kCB, cl = c0 + item % kCB;
    AccT total = s_gw[item];
    if constexpr (kRegisterTaps<kK, AccT>) {
      const int i = tap / kK, j = tap % kK;
#pragma unroll
      for (int g = 0; g < kGroups; ++g)
        if (dw_split_row(kK, g) == i) total += s_gw_split[(g * kK + j) * kCB + item % kCB];
    }
    if (cl < C) part_grad_w[(part * C + cl) * kk + (flipped ? kk - 1 - tap : tap)] = total;
  }
}

// The input's gradient over this thread's strip, from dX (the transposed conv, in acc): the
// residual's gradient (with respect to norm(x) too) joins dX before the norm's backward, so the
// norm's sums cover both branches; grad_x = dX * scale is stored.
template <typename T>
__device__ __forceinline__ void store_grad_x(const BackwardArgs<T>& args, const Shape& s,
                                             const TileCoord& t, const Place& me, bool norm,
                                             acc_t<T> mean, acc_t<T> scale,
                                             const acc_t<T> (&acc)[kRY][kRX], acc_t<T>& sum_dx,
                                             acc_t<T>& sum_dx_xc) {
  using AccT = acc_t<T>;
  for_strip_pixels(s, t, me, [&](int r, int x, int64_t off) {
    const AccT dx = args.grad_res ? acc[r][x] + to_acc(args.grad_res[off]) : acc[r][x];
    const AccT gx = norm ? dx * scale : dx;
    args.grad_x[off] = from_acc<T>(gx);
    if (norm) {
      sum_dx += dx;
      sum_dx_xc = fma_acc(dx, to_acc(args.x[off]) - mean, sum_dx_xc);
    }
  });
}

// The end of the backward's last kernel (backward-input, or fused): the CTA's norm sums into its
// part's rows, then the channel block's last CTA sums every part row (last_cta.cuh): dW and db of
// this kernel or of the backward-data kernel before it (done: stream order), the norm's sums of
// this one. s_red: 2 * kGroups * kCB + 1 values of shared memory, free after a barrier.
template <typename T>
__device__ __forceinline__ void finish_backward(const BackwardArgs<T>& args, const Shape& s, int K,
                                                const Place& me, bool norm, acc_t<T> sum_dx,
                                                acc_t<T> sum_dx_xc, acc_t<T>* s_red) {
  using AccT = acc_t<T>;
  __syncthreads();
  if (norm) {
    const AccT total = sum_over_warps<AccT>(sum_dx, s_red);
    __syncthreads();
    const AccT total_c = sum_over_warps<AccT>(sum_dx_xc, s_red + kGroups * kCB);
    if (me.group == 0 && me.c < s.C) {
      args.fin.part_sum_dx[me.part() * s.C + me.c] = total;
      args.fin.part_sum_dx_xc[me.part() * s.C + me.c] = total_c;
    }
  }
  int* s_flag = reinterpret_cast<int*>(s_red + 2 * kGroups * kCB);
  if (!arrive_last(args.counters + blockIdx.x, int(gridDim.y), s_flag)) return;
  const int c_end = me.c0 + kCB < s.C ? me.c0 + kCB : s.C;
  finalize_backward(args.fin, int64_t(gridDim.y), s.C, int64_t(K) * K, me.c0, c_end, threadIdx.x,
                    kThreads);
}

// What every dw kernel sets up alike: k and the padding, the shared-memory layout, the thread's
// place, and the CTA's taps in shared memory (rotated by 180 degrees for the transposed conv of
// the backward-input and fused kernels).
template <typename T, int kK>
struct Setup {
  using AccT = acc_t<T>;
  AccT* smem;
  int K, pad;
  SmemLayout l;
  Place me;
  __device__ __forceinline__ Setup(unsigned char* smem_raw, const Shape& s, Kernel kernel,
                                   const T* weight)
      : smem(reinterpret_cast<AccT*>(smem_raw)),
        K(kK > 0 ? kK : s.K),
        pad(K / 2),
        l(smem_layout(K, kernel, sizeof(AccT), sizeof(T))),
        me(s) {
    stage_taps<T>(smem + l.weights, weight, me.c0, s.C, K,
                  kernel == Kernel::BackwardInput || kernel == Kernel::BackwardFused);
  }
  // The input norm, into shared memory (null: none).
  __device__ __forceinline__ const AccT* stage_input_norm(const NormArgs<AccT>& norm,
                                                          const Shape& s) const {
    return stage_norm<AccT>(smem + l.norm, norm, me.c0, s.C);
  }
  // The bias of the thread's channel (0 without one).
  __device__ __forceinline__ AccT bias_of(const T* bias, const Shape& s) const {
    return bias != nullptr && me.c < s.C ? to_acc(bias[me.c]) : AccT(0);
  }
};

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// The forward's statistics once a CTA's tiles are done: the 8 warps' (count, mean, M2) of each
// channel merged in warp order into the part's partial, and in the channel block's last CTA
// (last_cta.cuh) the parts' partials into the statistics: warp g folds parts g, g + 8, ..., then
// the warps merge in order. A warp's lanes see the same pixels, so lane 0's count is the warp's.
// Not inlined: the tile loop before it keeps every one of its 128 registers, and inlined this
// tail made ptxas spill there (k = 7); called once, after the loop, the call costs nothing.
// s_red: 3 * kGroups * kCB values of shared memory.
template <typename AccT>
__device__ __noinline__ void forward_statistics(AccT* part_mean, AccT* part_m2, int* part_count,
                                                AccT* mean_out, AccT* var_out, BnNorm bn,
                                                int* counters,
                                                int C, int n_run, AccT mean_run, AccT m2_run,
                                                AccT* s_red) {
  const int lane = int(threadIdx.x) % kCB, group = int(threadIdx.x) / kCB;
  const int c0 = int(blockIdx.x) * kCB, c = c0 + lane;
  const int64_t parts = gridDim.y, part = blockIdx.y;
  int* const counts = part_count + int64_t(blockIdx.x) * parts;
  __syncthreads();  // the tile loop's last reads of the shared input region are done
  int64_t* s_n = reinterpret_cast<int64_t*>(s_red);
  int* s_flag = reinterpret_cast<int*>(s_n + kGroups);
  AccT* s_mean = s_red + kCB;
  AccT* s_m2 = s_mean + kGroups * kCB;
  const auto publish = [&](int64_t n, AccT mean, AccT m2) {
    if (lane == 0) s_n[group] = n;
    s_mean[group * kCB + lane] = mean;
    s_m2[group * kCB + lane] = m2;
  };
  publish(n_run, mean_run, m2_run);
  channel_stats::merge_groups<AccT, kGroups, kCB>(
      s_n, s_mean, s_m2, threadIdx.x, kThreads, [&](int slot, int64_t n, AccT mean, AccT m2) {
        if (c0 + slot < C) {
          part_mean[part * C + c0 + slot] = mean;
          part_m2[part * C + c0 + slot] = m2;
        }
        if (slot == 0) counts[part] = int(n);
      });

  if (!arrive_last(counters + blockIdx.x, int(parts), s_flag)) return;
  const int cs[1] = {c};
  int64_t n = 0;
  AccT mean[1] = {AccT(0)}, m2[1] = {AccT(0)};
  channel_stats::merge_tiles(part_mean, part_m2, channel_stats::TileCounts{0, 0, counts}, parts, C,
                             cs, group, kGroups, n, mean, m2);
  __syncthreads();  // the shared states of the part's merge are read
  publish(n, mean[0], m2[0]);
  channel_stats::merge_groups<AccT, kGroups, kCB>(
      s_n, s_mean, s_m2, threadIdx.x, kThreads, [&](int slot, int64_t nn, AccT mm, AccT qq) {
        if (c0 + slot >= C) return;
        channel_stats::store_mean_var(nn, mm, qq, mean_out + c0 + slot, var_out + c0 + slot);
        bn_math::fold_forward<AccT>(bn, c0 + slot, var_out[c0 + slot]);
      });
}

template <typename T, int kK, Act A>
__global__ void __launch_bounds__(kThreads, 2)
    dw_forward_kernel(const ForwardArgs<T> args, const Shape s) {
  using AccT = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Setup<T, kK> su(smem_raw, s, Kernel::Forward, args.weight);
  const auto& [smem, K, pad, l, me] = su;
  const int lane = me.lane, group = me.group, c0 = me.c0, c = me.c;
  const bool stats = args.part_mean != nullptr;
  const AccT* s_norm = su.stage_input_norm(args.norm, s);
  const AccT bias = su.bias_of(args.bias, s);
  // This thread's running (count, mean, M2) of its channel over its strips of the part's tiles.
  int n_run = 0;
  AccT mean_run = AccT(0), m2_run = AccT(0);

  TilePipe<T> pipe(smem, l, args.x, s, s_norm, c0, pad, args.vectorized, me.t_begin, me.t_end);
  for (int64_t tile = me.t_begin; tile < me.t_end; ++tile) {
    const TileCoord t = tile_coord(s, tile);
    pipe.stage(tile, t, me.t_end);  // (its first barrier also publishes the norm and the taps)
    AccT acc[kRY][kRX];
    fill_strip(acc, bias);
    correlate<kK, AccT>(smem + l.in, l, K, smem + l.weights, me.strip_y, me.strip_x, acc);
    for_strip_pixels(s, t, me, [&](int r, int x, int64_t off) {
      if (args.pre_act != nullptr) args.pre_act[off] = from_acc<T>(acc[r][x]);
      const T o = from_acc<T>(act_forward<A, AccT>(acc[r][x]));
      if (args.out != nullptr) args.out[off] = o;  // null: its consumer takes act on its load
      acc[r][x] = to_acc(o);  // the stored value, for the statistics
    });
    if (stats) {
      // The strip's own mean and M2 by two passes over registers (one division per tile, not
      // one reciprocal per value as a Welford update would cost), then Chan's merge.
      int n_strip = 0;
      AccT sum = AccT(0);
#pragma unroll
      for (int r = 0; r < kRY; ++r)
#pragma unroll
        for (int x = 0; x < kRX; ++x)
          if (t.y0 + me.strip_y + r < s.H && t.x0 + me.strip_x + x < s.W) {
            ++n_strip;
            sum += acc[r][x];
          }
      if (n_strip > 0 && c < s.C) {
        const AccT mean_strip = channel_stats::acc_div(sum, static_cast<AccT>(n_strip));
        AccT m2_strip = AccT(0);
#pragma unroll
        for (int r = 0; r < kRY; ++r)
#pragma unroll
          for (int x = 0; x < kRX; ++x)
            if (t.y0 + me.strip_y + r < s.H && t.x0 + me.strip_x + x < s.W) {
              const AccT d = acc[r][x] - mean_strip;
              m2_strip = fma_acc(d, d, m2_strip);
            }
        channel_stats::chan_merge(n_run, mean_run, m2_run, n_strip, mean_strip, m2_strip);
      }
    }
  }
  if (!stats) return;
  forward_statistics<AccT>(args.part_mean, args.part_m2, args.part_count, args.mean, args.var,
                           args.bn, args.counters, s.C, n_run, mean_run, m2_run, smem + l.in);
}

// Backward, step 1, where a is not saved (else the launcher runs dw_backward_fused_kernel,
// dw_backward_fused.cuh, whose shared memory fits wherever this kernel's does): a recomputed on
// each tile as the forward forms it (register taps for the specialised k), dA formed and written,
// dW and db accumulated. dW[i][j] = sum over the tile of dA[y][x] * in[y + i][x + j], from dA
// staged in shared memory (add_tap_sums). A saved a given all the same is read instead of the
// recompute: the launcher never does that today, but without the branch ptxas spilled 8-12 bytes
// at k = 7 with ReLU in 16-bit storage.
template <typename T, int kK, Act A>
__global__ void __launch_bounds__(kThreads, 2)
    dw_backward_data_kernel(const BackwardArgs<T> args, const Shape s) {
  using AccT = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Setup<T, kK> su(smem_raw, s, Kernel::BackwardData, args.weight);
  const auto& [smem, K, pad, l, me] = su;
  const int lane = me.lane, group = me.group, c0 = me.c0, c = me.c;
  AccT* s_in = smem + l.in;
  AccT* s_dA = smem + l.tile;
  AccT* s_gw = smem + l.grad_w;
  AccT* s_gw_split = smem + l.grad_w_split;  // empty unless kRegisterTaps
  for (int i = threadIdx.x; i < int(l.norm - l.grad_w); i += kThreads) s_gw[i] = AccT(0);
  const AccT* s_norm = su.stage_input_norm(args.norm, s);
  const AccT bias = su.bias_of(args.bias, s);
  // The BatchNorm's weight's and bias's gradients by the first part's CTA.
  const GradCoef<AccT> k =
      c < s.C ? grad_coef<T>(args, s, c, blockIdx.y == 0 && group == 0) : GradCoef<AccT>{};
  const bool need_o = grad_needs_out(args);
  const T* const saved =
      args.pre_act != nullptr ? args.pre_act : (A == Act::ReLU ? args.out : nullptr);
  AccT grad_b = AccT(0);

  TilePipe<T> pipe(smem, l, args.x, s, s_norm, c0, pad, args.vectorized_x, me.t_begin, me.t_end);
  for (int64_t tile = me.t_begin; tile < me.t_end; ++tile) {
    const TileCoord t = tile_coord(s, tile);
    pipe.stage(tile, t, me.t_end);
    AccT acc[kRY][kRX];
    fill_strip(acc, bias);
    if (saved == nullptr)
      correlate<kK, AccT>(s_in, l, K, smem + l.weights, me.strip_y, me.strip_x, acc);
#pragma unroll
    for (int r = 0; r < kRY; ++r) {
      const int y = t.y0 + me.strip_y + r;
#pragma unroll
      for (int x = 0; x < kRX; ++x) {
        const int xx = t.x0 + me.strip_x + x;
        AccT dA = AccT(0);
        if (y < s.H && xx < s.W && c < s.C) {
          const int64_t off = ((t.n * s.H + y) * s.W + xx) * int64_t(s.C) + c;
          const ActAt<A, AccT> at(saved != nullptr ? to_acc(saved[off]) : acc[r][x]);
          dA = form_dA<T, A>(at, to_acc(args.grad_out[off]), k.go_scale, k.konst, k.lin, need_o);
          args.grad_pre[off] = from_acc<T>(dA);
        }
        grad_b += dA;
        s_dA[((me.strip_y + r) * kTW + me.strip_x + x) * kCB + lane] = dA;
      }
    }
    __syncthreads();  // s_dA complete
    add_tap_sums<kK, AccT>(s_in, s_dA, l.in_w, K, s_gw, s_gw_split, group, lane);
  }

  __syncthreads();  // s_gw final, s_in free for the reduction
  store_tap_sums<kK, AccT>(s_gw, s_gw_split, K, false, args.fin.part_grad_w, me.part(), s.C, c0);
  const AccT total_b = sum_over_warps<AccT>(grad_b, s_in);
  if (group == 0 && c < s.C) args.fin.part_grad_b[me.part() * s.C + c] = total_b;
}

// Backward, step 2: dX = dA correlated with the rotated taps (the transposed depthwise conv) plus
// grad_res (a residual branch's gradient of the same norm(x)), grad_x = dX * scale, and the norm's
// sums  sum dX  and  sum dX (x - mean).
template <typename T, int kK>
__global__ void __launch_bounds__(kThreads, 2)
    dw_backward_input_kernel(const BackwardArgs<T> args, const Shape s) {
  using AccT = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Setup<T, kK> su(smem_raw, s, Kernel::BackwardInput, args.weight);
  const auto& [smem, K, pad, l, me] = su;
  const int c = me.c;
  const bool norm = args.norm.mean != nullptr;
  const AccT mean = norm && c < s.C ? args.norm.mean[c] : AccT(0);
  const AccT scale = norm && c < s.C ? args.norm.scale[c] : AccT(1);
  AccT sum_dx = AccT(0), sum_dx_xc = AccT(0);

  // grad_pre is ours (fresh allocation): aligned whenever x is, and C is the same.
  TilePipe<T> pipe(smem, l, args.grad_pre, s, nullptr, me.c0, pad, args.vectorized_x, me.t_begin,
                   me.t_end);
  for (int64_t tile = me.t_begin; tile < me.t_end; ++tile) {
    const TileCoord t = tile_coord(s, tile);
    pipe.stage(tile, t, me.t_end);
    AccT acc[kRY][kRX];
    fill_strip(acc, AccT(0));
    correlate<kK, AccT>(smem + l.in, l, K, smem + l.weights, me.strip_y, me.strip_x, acc);
    store_grad_x<T>(args, s, t, me, norm, mean, scale, acc, sum_dx, sum_dx_xc);
  }
  finish_backward<T>(args, s, K, me, norm, sum_dx, sum_dx_xc, smem + l.in);
}

}  // namespace dw
}  // namespace cuda
}  // namespace convmixer_kernels
