// The depthwise stage of a ConvMixer block on NHWC activations (docs/OPS.md, docs/DESIGN.md §4):
//
//   forward   out = act(dwconv_k(norm(x)) + b), and per-channel partial statistics of out
//   backward  1. dA = (grad_out + grad_mean/M + grad_var 2(o - mean)/M) * act'(a), recomputing a;
//                dW, db summed per channel (kernel "backward_data")
//             2. dX = transposed dwconv(dA); grad_x = dX * scale; the norm's sums (kernel
//                "backward_input")
//             3. fixed-order sums of the per-part partials (sum_parts_kernel), and the shared
//                statistics finalize (channel_stats.cuh)
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
// channels.
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
// the 8 warps in warp order, then over parts in part order (sum_parts_kernel / finalize).
#pragma once

#include "channel_stats.cuh"
#include "elementwise.cuh"
#include "partials.cuh"

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
// CTA-count target for choosing the parts: a constant (not the SM count) so results are bitwise
// the same on every GPU. ~8 waves of 2 CTAs/SM on 132 SMs.
constexpr int64_t kTargetCtas = 2048;
constexpr size_t kMaxDynamicSmem = 227 * 1024;  // sm_90's opt-in limit per block

// The shape and its partition, computed on the host (make_plan, dw_launch.cuh) and passed to every
// kernel.
struct Shape {
  int64_t N = 0;
  int H = 0, W = 0, C = 0, K = 0;
  int tiles_h = 0, tiles_w = 0;
  int64_t tiles = 0;           // N * tiles_h * tiles_w
  int64_t parts = 0;           // gridDim.x
  int64_t tiles_per_part = 0;  // consecutive tiles a CTA walks
  int channel_blocks = 0;      // gridDim.y
};

// Shared-memory layout, in units of AccT, for one kernel. Every region is a multiple of kCB
// elements, so all region starts stay 16-byte aligned.
struct SmemLayout {
  int in_h = 0, in_w = 0;  // staged tile + halo
  size_t in = 0, weights = 0, dA = 0, grad_w = 0, norm = 0;  // region offsets
  size_t total = 0;                                         // elements in all
};

enum class Kernel { Forward, BackwardData, BackwardInput };

__host__ __device__ inline SmemLayout smem_layout(int K, Kernel kernel) {
  SmemLayout l;
  l.in_h = kTH + K - 1;
  l.in_w = kTW + K - 1;
  size_t at = 0;
  l.in = at;
  at += size_t(l.in_h) * l.in_w * kCB;
  // The end-of-kernel reductions reuse the input region: it must hold 3 * kGroups * kCB values.
  if (at < size_t(3) * kGroups * kCB) at = size_t(3) * kGroups * kCB;
  l.weights = at;  // the taps, [k*k][kCB], staged once per CTA
  at += size_t(K) * K * kCB;
  if (kernel == Kernel::BackwardData) {
    l.dA = at;
    at += size_t(kTH) * kTW * kCB;
    l.grad_w = at;
    at += size_t(K) * K * kCB;
  }
  l.norm = at;
  at += 3 * kCB;
  l.total = at;
  return l;
}

// Compile-time k of a kernel instantiation; 0 is the generic path that reads shape.K. float64
// (for gradient checks, not speed) always takes the generic path: its taps would need twice the
// registers.
template <int kK, typename AccT>
constexpr bool kRegisterTaps = kK > 0 && kK <= kMaxRegK && sizeof(AccT) == 4;

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

// Stages src's tile + halo for channels [c0, c0 + kCB) into s_in as AccT, applying
// (v - mean) * scale + shift when a norm is given (s_norm: mean, scale, shift, kCB each) and
// writing zeros outside the image and past the last channel. `vectorized`: C % V == 0 and src is
// 16-byte aligned, so each thread moves V channels with one 16-byte load.
template <typename T>
__device__ __forceinline__ void stage_tile(acc_t<T>* __restrict__ s_in, const SmemLayout& l,
                                           const T* __restrict__ src, const Shape& s,
                                           const TileCoord& t, int c0, int pad,
                                           const acc_t<T>* s_norm, bool vectorized) {
  using AccT = acc_t<T>;
  const int pixels = l.in_h * l.in_w;
  if (vectorized) {
    constexpr int V = kVecWidth<T>;
    constexpr int kPerPixel = kCB / V;
    for (int item = threadIdx.x; item < pixels * kPerPixel; item += kThreads) {
      const int pix = item / kPerPixel;
      const int lane0 = (item % kPerPixel) * V;
      const int iy = t.y0 - pad + pix / l.in_w;
      const int ix = t.x0 - pad + pix % l.in_w;
      AccT v[V];
      if (iy >= 0 && iy < s.H && ix >= 0 && ix < s.W && c0 + lane0 < s.C) {
        const int64_t off = ((t.n * s.H + iy) * s.W + ix) * int64_t(s.C) + c0 + lane0;
        Unpack<T>::run(*reinterpret_cast<const uint4*>(src + off), v);
        if (s_norm != nullptr) {
#pragma unroll
          for (int j = 0; j < V; ++j)
            v[j] = (v[j] - s_norm[lane0 + j]) * s_norm[kCB + lane0 + j] + s_norm[2 * kCB + lane0 + j];
        }
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] = AccT(0);
      }
      AccT* dst = s_in + pix * kCB + lane0;
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
  } else {
    for (int item = threadIdx.x; item < pixels * kCB; item += kThreads) {
      const int pix = item / kCB;
      const int lane = item % kCB;
      const int iy = t.y0 - pad + pix / l.in_w;
      const int ix = t.x0 - pad + pix % l.in_w;
      AccT v = AccT(0);
      if (iy >= 0 && iy < s.H && ix >= 0 && ix < s.W && c0 + lane < s.C) {
        v = to_acc(src[((t.n * s.H + iy) * s.W + ix) * int64_t(s.C) + c0 + lane]);
        if (s_norm != nullptr) v = (v - s_norm[lane]) * s_norm[kCB + lane] + s_norm[2 * kCB + lane];
      }
      s_in[item] = v;
    }
  }
}

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
// run of tiles [t_begin, t_end).
struct Place {
  int lane, group, strip_y, strip_x, c0, c;
  int64_t t_begin, t_end;
  __device__ __forceinline__ explicit Place(const Shape& s)
      : lane(int(threadIdx.x) % kCB),
        group(int(threadIdx.x) / kCB),
        strip_y((group / kGroupsX) * kRY),
        strip_x((group % kGroupsX) * kRX),
        c0(int(blockIdx.y) * kCB),
        c(c0 + lane),
        t_begin(int64_t(blockIdx.x) * s.tiles_per_part),
        t_end(t_begin + s.tiles_per_part < s.tiles ? t_begin + s.tiles_per_part : s.tiles) {}
};

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
  const acc_t<T>* norm_mean;  // all three null: no input norm
  const acc_t<T>* norm_scale;
  const acc_t<T>* norm_shift;
  const T* weight;  // [C][k*k]
  const T* bias;    // [C] or null
  T* out;           // NHWC, like x
  // Statistics partials ([parts][C] and [parts]); null when the call wants no statistics.
  acc_t<T>* part_mean;
  acc_t<T>* part_m2;
  int* part_count;
  bool vectorized;  // x is 16-byte aligned and C % (16 / sizeof(T)) == 0
};

template <typename T>
struct BackwardArgs {
  const T* grad_out;
  const acc_t<T>* grad_mean;  // [C] or null
  const acc_t<T>* grad_var;   // [C] or null (then `mean` may be null too)
  const acc_t<T>* mean;       // the forward's batch mean of out, [C]
  const T* x;
  const acc_t<T>* norm_mean;  // all three null: no input norm
  const acc_t<T>* norm_scale;
  const acc_t<T>* norm_shift;
  const T* weight;
  const T* bias;              // [C] or null
  T* grad_pre;                // dA scratch, NHWC like x
  T* grad_x;                  // NHWC like x
  acc_t<T>* part_grad_w;      // [parts][C][k*k]
  acc_t<T>* part_grad_b;      // [parts][C]
  acc_t<T>* part_sum_dx;      // [parts][C], only with a norm
  acc_t<T>* part_sum_dx_xc;   // [parts][C], only with a norm
  const T* grad_res;          // NHWC like x, or null: added into grad_x (the residual's gradient)
  bool vectorized_x;          // x (and grad_pre, which the launcher allocates) 16-byte aligned, C % V == 0
};

// Loads the CTA's slice of a norm into shared memory; returns null when there is none.
template <typename AccT>
__device__ __forceinline__ const AccT* stage_norm(AccT* s_norm, const AccT* mean, const AccT* scale,
                                                  const AccT* shift, int c0, int C) {
  if (mean == nullptr) return nullptr;
  for (int i = threadIdx.x; i < 3 * kCB; i += kThreads) {
    const int which = i / kCB, c = c0 + i % kCB;
    const AccT* src = which == 0 ? mean : (which == 1 ? scale : shift);
    s_norm[i] = c < C ? src[c] : AccT(0);
  }
  return s_norm;
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

template <typename T, int kK, Act A>
__global__ void __launch_bounds__(kThreads, 2)
    dw_forward_kernel(const ForwardArgs<T> args, const Shape s) {
  using AccT = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  AccT* smem = reinterpret_cast<AccT*>(smem_raw);
  const int K = kK > 0 ? kK : s.K;
  const int pad = K / 2;
  const SmemLayout l = smem_layout(K, Kernel::Forward);
  const Place me(s);
  const int lane = me.lane, group = me.group, c0 = me.c0, c = me.c;
  const bool stats = args.part_mean != nullptr;

  stage_taps<T>(smem + l.weights, args.weight, c0, s.C, K, false);
  const AccT bias = args.bias != nullptr && c < s.C ? to_acc(args.bias[c]) : AccT(0);
  const AccT* s_norm = stage_norm<AccT>(smem + l.norm, args.norm_mean, args.norm_scale,
                                        args.norm_shift, c0, s.C);
  // This thread's running (count, mean, M2) of its channel over its strips of the part's tiles.
  int n_run = 0;
  AccT mean_run = AccT(0), m2_run = AccT(0);

  for (int64_t tile = me.t_begin; tile < me.t_end; ++tile) {
    const TileCoord t = tile_coord(s, tile);
    __syncthreads();  // the previous tile's readers are done (and norm/taps are staged)
    stage_tile<T>(smem + l.in, l, args.x, s, t, c0, pad, s_norm, args.vectorized);
    __syncthreads();
    AccT acc[kRY][kRX];
    fill_strip(acc, bias);
    correlate<kK, AccT>(smem + l.in, l, K, smem + l.weights, me.strip_y, me.strip_x, acc);
#pragma unroll
    for (int r = 0; r < kRY; ++r) {
      const int y = t.y0 + me.strip_y + r;
#pragma unroll
      for (int x = 0; x < kRX; ++x) {
        const int xx = t.x0 + me.strip_x + x;
        if (y >= s.H || xx >= s.W || c >= s.C) continue;
        const T o = from_acc<T>(act_forward<A, AccT>(acc[r][x]));
        args.out[((t.n * s.H + y) * s.W + xx) * int64_t(s.C) + c] = o;
        acc[r][x] = to_acc(o);  // the stored value, for the statistics
      }
    }
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

  // Merge the 8 warps' states of each channel, in warp order, into the part's partial.
  __syncthreads();
  int* s_n = reinterpret_cast<int*>(smem + l.in);
  AccT* s_mean = smem + l.in + kGroups * kCB;
  AccT* s_m2 = s_mean + kGroups * kCB;
  s_n[group * kCB + lane] = n_run;
  s_mean[group * kCB + lane] = mean_run;
  s_m2[group * kCB + lane] = m2_run;
  __syncthreads();
  if (group != 0) return;
  int64_t n = 0;
  AccT mean = AccT(0), m2 = AccT(0);
  for (int g = 0; g < kGroups; ++g)
    channel_stats::chan_merge(n, mean, m2, int64_t(s_n[g * kCB + lane]), s_mean[g * kCB + lane],
                              s_m2[g * kCB + lane]);
  if (c < s.C) {
    args.part_mean[int64_t(blockIdx.x) * s.C + c] = mean;
    args.part_m2[int64_t(blockIdx.x) * s.C + c] = m2;
  }
  if (blockIdx.y == 0 && lane == 0) args.part_count[blockIdx.x] = int(n);
}

// Backward, step 1: recompute a on each tile, form dA, write it, and accumulate dW and db.
//
// The recompute is the forward's (register taps for the specialised k). dW[i][j] = sum over the
// tile of dA[y][x] * in[y + i][x + j]: warp g owns the tap rows i = g, g + 8 of every channel,
// sums them over the whole tile from dA staged in shared memory, and adds them into its own slots
// of s_grad_w: each slot has one writer, so no atomics and a fixed order. (At k = 9 warp 0 owns
// two rows and the others one: a known imbalance to tune.)
template <typename T, int kK, Act A>
__global__ void __launch_bounds__(kThreads, 2)
    dw_backward_data_kernel(const BackwardArgs<T> args, const Shape s) {
  using AccT = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  AccT* smem = reinterpret_cast<AccT*>(smem_raw);
  const int K = kK > 0 ? kK : s.K;
  const int pad = K / 2;
  const SmemLayout l = smem_layout(K, Kernel::BackwardData);
  const Place me(s);
  const int lane = me.lane, group = me.group, c0 = me.c0, c = me.c;
  AccT* s_in = smem + l.in;
  AccT* s_dA = smem + l.dA;
  AccT* s_gw = smem + l.grad_w;

  stage_taps<T>(smem + l.weights, args.weight, c0, s.C, K, false);
  for (int i = threadIdx.x; i < K * K * kCB; i += kThreads) s_gw[i] = AccT(0);
  const AccT bias = args.bias != nullptr && c < s.C ? to_acc(args.bias[c]) : AccT(0);
  const AccT* s_norm = stage_norm<AccT>(smem + l.norm, args.norm_mean, args.norm_scale,
                                        args.norm_shift, c0, s.C);
  // dO = grad_out + const_term + lin_term * o  (the statistics' gradient folded in).
  const AccT inv_count = AccT(1) / static_cast<AccT>(s.N * s.H * s.W);
  AccT const_term = AccT(0), lin_term = AccT(0);
  if (c < s.C) {
    if (args.grad_mean != nullptr) const_term += args.grad_mean[c] * inv_count;
    if (args.grad_var != nullptr) {
      lin_term = AccT(2) * args.grad_var[c] * inv_count;
      const_term -= lin_term * args.mean[c];
    }
  }
  const bool need_o = args.grad_var != nullptr;
  AccT grad_b = AccT(0);

  for (int64_t tile = me.t_begin; tile < me.t_end; ++tile) {
    const TileCoord t = tile_coord(s, tile);
    __syncthreads();
    stage_tile<T>(s_in, l, args.x, s, t, c0, pad, s_norm, args.vectorized_x);
    __syncthreads();
    AccT acc[kRY][kRX];
    fill_strip(acc, bias);
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
          const ActAt<A, AccT> at(acc[r][x]);
          AccT dO = to_acc(args.grad_out[off]) + const_term;
          if (need_o) dO += lin_term * round_to_storage<T>(at.value());
          dA = at.backward(dO);
          args.grad_pre[off] = from_acc<T>(dA);
        }
        grad_b += dA;
        s_dA[((me.strip_y + r) * kTW + me.strip_x + x) * kCB + lane] = dA;
      }
    }
    __syncthreads();  // s_dA complete
    for (int i = group; i < K; i += kGroups) {
      if constexpr (kRegisterTaps<kK, AccT>) {
        AccT row_sum[kK];
#pragma unroll
        for (int j = 0; j < kK; ++j) row_sum[j] = AccT(0);
        for (int y = 0; y < kTH; ++y) {
          AccT in[kTW + kK - 1], d[kTW];
#pragma unroll
          for (int q = 0; q < kTW + kK - 1; ++q) in[q] = s_in[((y + i) * l.in_w + q) * kCB + lane];
#pragma unroll
          for (int x = 0; x < kTW; ++x) d[x] = s_dA[(y * kTW + x) * kCB + lane];
#pragma unroll
          for (int x = 0; x < kTW; ++x)
#pragma unroll
            for (int j = 0; j < kK; ++j) row_sum[j] = fma_acc(d[x], in[x + j], row_sum[j]);
        }
#pragma unroll
        for (int j = 0; j < kK; ++j) s_gw[(i * kK + j) * kCB + lane] += row_sum[j];
      } else {
        for (int j = 0; j < K; ++j) {
          AccT sum = AccT(0);
          for (int y = 0; y < kTH; ++y)
#pragma unroll
            for (int x = 0; x < kTW; ++x)
              sum = fma_acc(s_dA[(y * kTW + x) * kCB + lane],
                            s_in[((y + i) * l.in_w + x + j) * kCB + lane], sum);
          s_gw[(i * K + j) * kCB + lane] += sum;
        }
      }
    }
  }

  __syncthreads();  // s_gw final, s_in free for the reduction
  const int kk = K * K;
  for (int item = threadIdx.x; item < kk * kCB; item += kThreads) {
    const int tap = item / kCB, cl = c0 + item % kCB;
    if (cl < s.C) args.part_grad_w[(int64_t(blockIdx.x) * s.C + cl) * kk + tap] = s_gw[item];
  }
  const AccT total_b = sum_over_warps<AccT>(grad_b, s_in);
  if (group == 0 && c < s.C) args.part_grad_b[int64_t(blockIdx.x) * s.C + c] = total_b;
}

// Backward, step 2: dX = dA correlated with the rotated taps (the transposed depthwise conv),
// grad_x = dX * scale, and the norm's sums  sum dX  and  sum dX (x - mean).
template <typename T, int kK>
__global__ void __launch_bounds__(kThreads, 2)
    dw_backward_input_kernel(const BackwardArgs<T> args, const Shape s) {
  using AccT = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  AccT* smem = reinterpret_cast<AccT*>(smem_raw);
  const int K = kK > 0 ? kK : s.K;
  const int pad = K / 2;
  const SmemLayout l = smem_layout(K, Kernel::BackwardInput);
  const Place me(s);
  const int group = me.group, c0 = me.c0, c = me.c;

  stage_taps<T>(smem + l.weights, args.weight, c0, s.C, K, true);
  const bool norm = args.norm_mean != nullptr;
  const AccT mean = norm && c < s.C ? args.norm_mean[c] : AccT(0);
  const AccT scale = norm && c < s.C ? args.norm_scale[c] : AccT(1);
  AccT sum_dx = AccT(0), sum_dx_xc = AccT(0);

  for (int64_t tile = me.t_begin; tile < me.t_end; ++tile) {
    const TileCoord t = tile_coord(s, tile);
    __syncthreads();
    // grad_pre is ours (fresh allocation): aligned whenever x is, and C is the same.
    stage_tile<T>(smem + l.in, l, args.grad_pre, s, t, c0, pad, nullptr, args.vectorized_x);
    __syncthreads();
    AccT acc[kRY][kRX];
    fill_strip(acc, AccT(0));
    correlate<kK, AccT>(smem + l.in, l, K, smem + l.weights, me.strip_y, me.strip_x, acc);
#pragma unroll
    for (int r = 0; r < kRY; ++r) {
      const int y = t.y0 + me.strip_y + r;
#pragma unroll
      for (int x = 0; x < kRX; ++x) {
        const int xx = t.x0 + me.strip_x + x;
        if (y >= s.H || xx >= s.W || c >= s.C) continue;
        const int64_t off = ((t.n * s.H + y) * s.W + xx) * int64_t(s.C) + c;
        const AccT dx = acc[r][x];
        const AccT gx = norm ? dx * scale : dx;
        args.grad_x[off] = from_acc<T>(args.grad_res ? gx + to_acc(args.grad_res[off]) : gx);
        if (norm) {
          sum_dx += dx;
          sum_dx_xc = fma_acc(dx, to_acc(args.x[off]) - mean, sum_dx_xc);
        }
      }
    }
  }
  if (!norm) return;
  __syncthreads();
  const AccT total = sum_over_warps<AccT>(sum_dx, smem + l.in);
  __syncthreads();
  const AccT total_c = sum_over_warps<AccT>(sum_dx_xc, smem + l.in + kGroups * kCB);
  if (group == 0 && c < s.C) {
    args.part_sum_dx[int64_t(blockIdx.x) * s.C + c] = total;
    args.part_sum_dx_xc[int64_t(blockIdx.x) * s.C + c] = total_c;
  }
}

}  // namespace dw
}  // namespace cuda
}  // namespace convmixer_kernels
