// The depthwise stage's backward in one kernel, where the forward kept a (any activation) or, with
// ReLU, its out: dA is then elementwise in tensors that exist, so each tile forms it on load over
// the tile and its halo instead of reading it back from a kernel before. Per tile:
//
//   window  dA over the tile + (k-1)/2 halo, from a (or out) and grad_out (form_dA), zeros outside
//           the image (the transposed conv's zero padding);
//   tile    norm(x) over the tile, zeros outside the image;
//   dW      dW[i][j] = sum over the tile's pixels q of norm(x)[q] * dA[q + (pad - i, pad - j)]:
//           the tap sums of the window and the tile (add_tap_sums), rotated by 180 degrees;
//   db      dA summed over the tile;
//   dX      the window correlated with the rotated taps, as the backward-input kernel does, then
//           the residual's gradient, grad_x and the norm's sums (store_grad_x).
//
// Against the two kernels it replaces (backward-data writing dA, backward-input reading it back
// with its halo): dA never reaches memory (2 passes), x and the residual's gradient (in a block the
// same dU as grad_out) are read by one kernel instead of both (their second reads here hit the
// tile just staged), and one launch less.
// The cost: act' over the halo too (k = 9: 24 x 16 window pixels for 16 x 8 outputs; 24 x 8 new
// ones for a tile that slides its left neighbour's window over), from L2, and no cp.async (the window comes from two tensors: their raw copies would not leave room for
// two CTAs per SM at k = 9). dA stays in the accumulation type throughout; the two-kernel path
// rounds it to the storage type between its kernels.
//
// Its shared memory is the backward-data kernel's (the input's tile where that kernel keeps dA's)
// and 3 x kCB coefficients: it fits wherever the plan is valid; the launcher checks anyway
// (dw_launch.cuh, fused_backward). Torch-free (docs/DESIGN.md §8).
#pragma once

#include "dw_stage.cuh"

namespace convmixer_kernels {
namespace cuda {
namespace dw {

// Stages dA over the tile + halo (l.in_h x l.in_w pixels, [pixel][kCB]), window columns
// [kSlid ? K - 1 : 0, in_w) (slide_window kept the others), for channels [c0, c0 + kCB): from
// `saved` (a, or ReLU's out) and grad_out, with the per-channel coefficients s_coef ([3][kCB]:
// go_scale, konst, lin; see GradCoef); zeros outside the image and past the last channel. `vectorized`: both tensors 16-byte aligned and C % V == 0 (one 16-byte load each per
// V channels), ignored in float64 (gradient checks): its code for two GELU's at once spilled.
template <typename T, Act A, bool kSlid>
__device__ __forceinline__ void stage_dA_window(acc_t<T>* __restrict__ s_dA, const SmemLayout& l,
                                                int K, const T* __restrict__ saved,
                                                const T* __restrict__ grad_out, const Shape& s,
                                                const TileCoord& t, int c0, int pad,
                                                const acc_t<T>* s_coef, bool need_o,
                                                bool vectorized_in) {
  using AccT = acc_t<T>;
  constexpr int V = kVecWidth<T>;
  const bool vectorized = sizeof(AccT) == 4 && vectorized_in;  // float64: no such code at all
  // A compile-time column count where k is (the divisions below then cost no division).
  const int col0 = kSlid ? K - 1 : 0, cols = l.in_w - col0;
  const int lane0 = staging_lane<T>(vectorized);
  const int nv = vectorized ? V : 1;  // channels per item
  const int per_pixel = kCB / nv;
  // A thread's items are pixels step apart, at its own channels (kThreads % per_pixel == 0).
  const int step = kThreads / per_pixel;
  for (int p = int(threadIdx.x) / per_pixel; p < l.in_h * cols; p += step) {
    const int wy = p / cols, wx = col0 + p % cols;
    const int pix = wy * l.in_w + wx;
    const int iy = t.y0 - pad + wy;
    const int ix = t.x0 - pad + wx;
    // dA replaces a in place: a third array of V values beside a and g spilled (k = 5, bf16).
    AccT a[V], g[V];
#pragma unroll
    for (int j = 0; j < V; ++j) a[j] = AccT(0);
    if (iy >= 0 && iy < s.H && ix >= 0 && ix < s.W && c0 + lane0 < s.C) {
      const int64_t off = ((t.n * s.H + iy) * s.W + ix) * int64_t(s.C) + c0 + lane0;
      if (vectorized) {
        Unpack<T>::run(*reinterpret_cast<const uint4*>(saved + off), a);
        Unpack<T>::run(*reinterpret_cast<const uint4*>(grad_out + off), g);
      } else {
        a[0] = to_acc(saved[off]);
        g[0] = to_acc(grad_out[off]);
      }
      // The coefficients from shared memory per item: V act' dominate the item's work.
#pragma unroll
      for (int j = 0; j < V; ++j)
        if (j < nv)
          a[j] = form_dA<T, A>(ActAt<A, AccT>(a[j]), g[j], s_coef[lane0 + j],
                               s_coef[kCB + lane0 + j], s_coef[2 * kCB + lane0 + j], need_o);
    }
    if (vectorized)
      store_staged<AccT, V>(s_dA + pix * kCB + lane0, a);
    else
      s_dA[pix * kCB + lane0] = a[0];
  }
}

// The window of the tile to the right of the last one (same image and tile row): its first K - 1
// columns are the last K - 1 of the window in s_dA, moved there so that only the kTW new columns
// are formed (stage_dA_window from col0 = K - 1). Source and destination are disjoint while
// K - 1 <= kTW (k <= 9); callers slide only then. Between barriers.
template <typename AccT>
__device__ __forceinline__ void slide_window(AccT* s_dA, const SmemLayout& l, int K) {
  const int keep = (K - 1) * kCB;  // values of a row that stay
  for (int i = threadIdx.x; i < l.in_h * keep; i += kThreads) {
    const int at = (i / keep) * l.in_w * kCB + i % keep;
    s_dA[at] = s_dA[at + kTW * kCB];
  }
}

// Which instantiations slide the window: all but k = 5, where ptxas spilled 4 bytes under the
// 128 registers of two CTAs per SM with the sliding staging variant in the kernel (there sliding
// would form 8 of 12 columns; at k = 9, 8 of 16).
template <int kK>
constexpr bool kSlides = kK != 5;

template <typename T, int kK, Act A>
__global__ void __launch_bounds__(kThreads, 2)
    dw_backward_fused_kernel(const BackwardArgs<T> args, const Shape s) {
  using AccT = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Setup<T, kK> su(smem_raw, s, Kernel::BackwardFused, args.weight);  // taps rotated
  const auto& [smem, K, pad, l, me] = su;
  const int lane = me.lane, group = me.group, c = me.c;
  AccT* s_dA = smem + l.in;
  AccT* s_xn = smem + l.tile;
  AccT* s_gw = smem + l.grad_w;
  AccT* s_gw_split = smem + l.grad_w_split;  // empty unless kRegisterTaps
  AccT* s_coef = smem + l.coef;
  for (int i = threadIdx.x; i < int(l.norm - l.grad_w); i += kThreads) s_gw[i] = AccT(0);
  const AccT* s_norm = su.stage_input_norm(args.norm, s);
  if (group == 0) {
    // The BatchNorm's weight's and bias's gradients by the first part's CTA.
    const GradCoef<AccT> k =
        c < s.C ? grad_coef<T>(args, s, c, blockIdx.y == 0) : GradCoef<AccT>{};
    s_coef[lane] = k.go_scale;
    s_coef[kCB + lane] = k.konst;
    s_coef[2 * kCB + lane] = k.lin;
  }
  const bool need_o = grad_needs_out(args);
  const T* const saved = args.pre_act != nullptr ? args.pre_act : args.out;
  const bool norm = args.norm.mean != nullptr;
  const AccT mean = norm && c < s.C ? args.norm.mean[c] : AccT(0);
  const AccT scale = norm && c < s.C ? args.norm.scale[c] : AccT(1);
  // The tile's staging: stage_tile over kTH x kTW pixels with no halo.
  SmemLayout tile_l = l;
  tile_l.in_h = kTH;
  tile_l.in_w = kTW;
  AccT grad_b = AccT(0), sum_dx = AccT(0), sum_dx_xc = AccT(0);

  for (int64_t tile = me.t_begin; tile < me.t_end; ++tile) {
    const TileCoord t = tile_coord(s, tile);
    // The previous tile's reads are done (the first time: the taps, norm and coefficients are
    // published, the dW slots zero).
    __syncthreads();
    // Tiles run along the tile row (tile_coord): a tile that is not its row's first follows its
    // left neighbour, whose window holds K - 1 of its columns. Sliding them forms act' on kTW
    // columns instead of kTW + K - 1 (k = 9: 8 of 16).
    const bool slide = kSlides<kK> && tile > me.t_begin && t.x0 != 0 && K - 1 <= kTW;
    if (slide) {
      slide_window<AccT>(s_dA, l, K);
      __syncthreads();
    }
    if (slide)
      stage_dA_window<T, A, true>(s_dA, l, K, saved, args.grad_out, s, t, me.c0, pad, s_coef,
                                  need_o, args.vectorized_grad);
    else
      stage_dA_window<T, A, false>(s_dA, l, K, saved, args.grad_out, s, t, me.c0, pad, s_coef,
                                   need_o, args.vectorized_grad);
    stage_tile<T>(s_xn, tile_l, args.x, s, t, me.c0, 0, s_norm, args.vectorized_x);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRY; ++r)
#pragma unroll
      for (int x = 0; x < kRX; ++x)  // zeros outside the image
        grad_b += s_dA[((pad + me.strip_y + r) * l.in_w + pad + me.strip_x + x) * kCB + lane];
    add_tap_sums<kK, AccT>(s_dA, s_xn, l.in_w, K, s_gw, s_gw_split, group, lane);
    AccT acc[kRY][kRX];
    fill_strip(acc, AccT(0));
    correlate<kK, AccT>(s_dA, l, K, smem + l.weights, me.strip_y, me.strip_x, acc);
    store_grad_x<T>(args, s, t, me, norm, mean, scale, acc, sum_dx, sum_dx_xc);
  }

  __syncthreads();  // s_gw final, the window free for the reductions
  store_tap_sums<kK, AccT>(s_gw, s_gw_split, K, true, args.fin.part_grad_w, me.part(), s.C,
                           me.c0);
  const AccT total_b = sum_over_warps<AccT>(grad_b, s_dA);
  if (group == 0 && c < s.C) args.fin.part_grad_b[me.part() * s.C + c] = total_b;
  finish_backward<T>(args, s, K, me, norm, sum_dx, sum_dx_xc, s_dA);
}

}  // namespace dw
}  // namespace cuda
}  // namespace convmixer_kernels
