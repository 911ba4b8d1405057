// The fused kernels around the pointwise stage's GEMMs (docs/OPS.md, docs/DESIGN.md §4), on NHWC
// activations viewed as row-major [rows = N*H*W, channels] matrices:
//
//   prologue          u  = norm_x(x) + norm_res(res), rounded to storage   (the GEMM's A operand);
//                     with an x act (kXAct), x is a pre-activation read as act(x) rounded to
//                     storage, as a stored output is (the dw stage then writes only a)
//   [GEMM]            p  = u W^T + b                                       (cuBLAS, in the launcher)
//   epilogue_forward  out = act(p); per-channel partial (mean, M2) of out as stored, merged into
//                     the statistics by each channel block's last CTA (last_cta.cuh)
//   epilogue_backward dP = (grad_out + grad_mean/M + grad_var 2(o - mean)/M) act'(p); partial sums
//                     of dP, and in the last CTAs the bias gradient
//   [GEMMs]           grad_W = dP^T u, dU = dP W                           (cuBLAS)
//   through_norms     grad_x = dU scale_x, grad_res = dU scale_res, partial sums of dU,
//                     dU (x - mean_x), dU (res - mean_res), and in the last CTAs the gradients of
//                     both norms' (mean, scale, shift); with an x act, x read as the prologue
//                     reads it, and grad_x the gradient of act(x) (act' is the caller's)
//
// Why the GEMMs are not ours: the issue leaves the core to measurement, and without a GPU to
// measure on, cuBLAS (the same GEMM eager PyTorch runs) is the core whose speed is known. cuBLASLt's
// own GELU epilogue is the tanh approximation, not the erf GELU the model uses, so the activation
// and the statistics stay in these kernels. See README "CUDA backend".
//
// Tiling: a CTA is 32 lanes x 8 row groups. A lane owns V = 16 / sizeof(T) channels (one 16-byte
// load per row when the matrix allows it; otherwise V scalars strided by 32, so a warp still
// reads 32 consecutive values), a row group every 8th row of the CTA's row tile. Both paths cover
// the same channels with the same rows in the same order, so they give bitwise-identical results.
// Per-channel sums are merged over the 8 row groups in order into a tile's partial; the channel
// block's last CTA folds the tiles' partials (row group g: tiles g, g + 8, ... in order), then the
// row groups in order: an order fixed by the shape, deterministic, no float atomics.
// The plan and the launch entries are in pw_launch.cuh. Torch-free (docs/DESIGN.md §8).
#pragma once

#include "bn_math.cuh"
#include "channel_stats.cuh"
#include "elementwise.cuh"
#include "last_cta.cuh"

namespace convmixer_kernels {
namespace cuda {
namespace pw {

constexpr int kLanes = 32;
constexpr int kRowGroups = 8;
constexpr int kThreads = kLanes * kRowGroups;
// CTA-count target of the partition: a constant, not the SM count, so that the partition (and
// every rounding of every sum) depends on the shape alone.
constexpr int64_t kTargetCtas = 2048;
constexpr int64_t kMinRowsPerTile = 64;
// The elementwise kernels are built for two CTAs (16 warps) per SM at least: at most 128 registers
// a thread, which the row unrolling below must fit in without spilling (ptxas -v, docs/CUDA.md).
constexpr int kMinCtasPerSm = 2;

// The partition of a [rows, C] problem, shared by every kernel of a call (make_plan, pw_launch.cuh).
struct Plan {
  int64_t rows = 0;
  int C = 0;
  int channel_blocks = 0;  // gridDim.y; a block is 32 * V channels
  int rows_per_tile = 0;
  int64_t tiles = 0;       // gridDim.x
  bool vectorized = false;
  bool valid = false;
};

// ---------------------------------------------------------------------------------------------
// Per-thread access to V channels of a row
// ---------------------------------------------------------------------------------------------

// The channel of this lane's j-th value in channel block `cb`.
template <typename T>
__device__ __forceinline__ int lane_channel(int cb, int lane, int j, bool vectorized) {
  constexpr int V = kVecWidth<T>;
  return cb * kLanes * V + (vectorized ? lane * V + j : j * kLanes + lane);
}

template <typename T>
__device__ __forceinline__ void load_row(const T* __restrict__ row, int cb, int lane, int C,
                                         bool vectorized, acc_t<T> (&v)[kVecWidth<T>]) {
  constexpr int V = kVecWidth<T>;
  if (vectorized) {
    const int c = lane_channel<T>(cb, lane, 0, true);
    if (c < C) {
      Unpack<T>::run(*reinterpret_cast<const uint4*>(row + c), v);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = acc_t<T>(0);
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int c = lane_channel<T>(cb, lane, j, false);
    v[j] = c < C ? to_acc(row[c]) : acc_t<T>(0);
  }
}

// Rounds v to T, stores it, and leaves the stored values in v (what statistics must see).
template <typename T>
__device__ __forceinline__ void store_row(T* __restrict__ row, int cb, int lane, int C,
                                          bool vectorized, acc_t<T> (&v)[kVecWidth<T>]) {
  constexpr int V = kVecWidth<T>;
  __align__(16) T packed[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    packed[j] = from_acc<T>(v[j]);
    v[j] = to_acc(packed[j]);
  }
  if (vectorized) {
    const int c = lane_channel<T>(cb, lane, 0, true);
    if (c < C) *reinterpret_cast<uint4*>(row + c) = *reinterpret_cast<const uint4*>(packed);
    return;
  }
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int c = lane_channel<T>(cb, lane, j, false);
    if (c < C) row[c] = packed[j];
  }
}

// This lane's V entries of a per-channel vector (zeros past C, or `fill` when vec is null).
template <typename T>
__device__ __forceinline__ void load_channels(const acc_t<T>* __restrict__ vec, int cb, int lane,
                                              int C, bool vectorized, acc_t<T> fill,
                                              acc_t<T> (&v)[kVecWidth<T>]) {
#pragma unroll
  for (int j = 0; j < kVecWidth<T>; ++j) {
    const int c = lane_channel<T>(cb, lane, j, vectorized);
    v[j] = vec != nullptr && c < C ? vec[c] : fill;
  }
}

// x read as act(x) rounded to storage where the stage takes x as a pre-activation (kXAct), as a
// stored output is. In float and double the bits of the dw stage's out; in 16-bit types act of
// the stored a, where the dw stage's out is act of its unrounded sum (docs/OPS.md "Act on load").
template <typename T, bool kXAct, Act XA>
__device__ __forceinline__ void act_on_load(acc_t<T> (&v)[kVecWidth<T>]) {
  if constexpr (kXAct) {
#pragma unroll
    for (int j = 0; j < kVecWidth<T>; ++j)
      v[j] = round_to_storage<T>(act_forward<XA, acc_t<T>>(v[j]));
  }
}

// Row range of this CTA's tile.
struct RowRange {
  int64_t begin, end;
};

__device__ __forceinline__ RowRange tile_rows(const Plan& p) {
  const int64_t begin = int64_t(blockIdx.x) * p.rows_per_tile;
  const int64_t end = begin + p.rows_per_tile < p.rows ? begin + p.rows_per_tile : p.rows;
  return {begin, end};
}

// Rows a row group handles per step of its loop: every load of a step is issued before any of
// its arithmetic, so a thread has U 16-byte vectors per input matrix in flight instead of one
// (latency hiding at the two CTAs per SM that the register budget allows). kRowUnroll<T> = 2 for
// 16-bit types (V = 8 floats a row), 4 for float and double (V = 4 floats or 2 doubles, the same
// registers); a kernel with more live values per row takes fewer where ptxas would spill
// (through_norms in 16-bit types, the double GELU backward: docs/CUDA.md lists the registers).
template <typename T>
constexpr int kRowUnroll = kVecWidth<T> >= 8 ? 2 : 4;

template <int N>
struct RowCount {
  static constexpr int value = N;
};

// body(r, RowCount<U>{}) for this row group's rows of the CTA's tile, r, r + 8, ... r + 8 (U - 1)
// per call: U while that many rows are left, then one at a time. The rows come in
// increasing order, so a body that accumulates sees them in the order a plain loop would: the
// unrolling changes no rounding.
template <int U, typename Body>
__device__ __forceinline__ void for_each_row(const Plan& p, Body&& body) {
  const RowRange rr = tile_rows(p);
  int64_t r = rr.begin + threadIdx.y;
  for (; r + (U - 1) * kRowGroups < rr.end; r += U * kRowGroups) body(r, RowCount<U>{});
  for (; r < rr.end; r += kRowGroups) body(r, RowCount<1>{});
}

// Sums one value per channel over the 8 row groups, in order, and hands each channel's total to
// sink(c, total). s_red: kRowGroups * kLanes * V AccT of shared memory; all threads must call.
template <typename T, typename Sink>
__device__ __forceinline__ void sum_groups(const acc_t<T> (&v)[kVecWidth<T>], acc_t<T>* s_red,
                                           const Plan& p, int cb, Sink&& sink) {
  constexpr int V = kVecWidth<T>;
  constexpr int kBlockC = kLanes * V;
  const int lane = threadIdx.x, group = threadIdx.y;
  __syncthreads();  // s_red may still be read by a previous call
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int local = lane_channel<T>(0, lane, j, p.vectorized);
    s_red[group * kBlockC + local] = v[j];
  }
  __syncthreads();
  for (int local = group * kLanes + lane; local < kBlockC; local += kThreads) {
    const int c = cb * kBlockC + local;
    if (c >= p.C) continue;
    acc_t<T> total = acc_t<T>(0);
    for (int g = 0; g < kRowGroups; ++g) total += s_red[g * kBlockC + local];
    sink(c, total);
  }
}

// The tile's partial row part[tile][c] of sum_groups' totals.
template <typename T>
__device__ __forceinline__ void write_partial_sums(const acc_t<T> (&v)[kVecWidth<T>],
                                                   acc_t<T>* s_red, const Plan& p, int cb,
                                                   acc_t<T>* __restrict__ part) {
  sum_groups<T>(v, s_red, p, cb,
                [&](int c, acc_t<T> total) { part[int64_t(blockIdx.x) * p.C + c] = total; });
}

// The channel block's last CTA (last_cta.cuh), first step: this thread's V channels of a
// [tiles][C] partials region summed over tiles group, group + 8, ... in order (sum_groups then
// adds the row groups in order: a fixed order). __ldcg: written by other CTAs of this kernel.
template <typename T>
__device__ __forceinline__ void fold_tiles(const acc_t<T>* part, const Plan& p, int cb,
                                           acc_t<T> (&v)[kVecWidth<T>]) {
  constexpr int V = kVecWidth<T>;
  constexpr int kUnroll = 4;  // tiles in flight: the sum is a chain, its loads need not be
  using AccT = acc_t<T>;
  const int lane = threadIdx.x;
  int c[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    c[j] = lane_channel<T>(cb, lane, j, p.vectorized);
    v[j] = AccT(0);
  }
  const auto load = [&](int64_t t, AccT (&row)[V]) {
#pragma unroll
    for (int j = 0; j < V; ++j) row[j] = c[j] < p.C ? __ldcg(part + t * p.C + c[j]) : AccT(0);
  };
  int64_t t = threadIdx.y;
  for (; t + (kUnroll - 1) * kRowGroups < p.tiles; t += kUnroll * kRowGroups) {
    AccT rows[kUnroll][V];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) load(t + u * kRowGroups, rows[u]);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] += rows[u][j];
  }
  for (; t < p.tiles; t += kRowGroups) {
    AccT row[V];
    load(t, row);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] += row[j];
  }
}

// ---------------------------------------------------------------------------------------------
// Kernels. Grid (plan.tiles, plan.channel_blocks), block (32, 8).
// ---------------------------------------------------------------------------------------------

template <typename T>
struct PrologueArgs {
  const T* x;
  const acc_t<T>* x_mean;  // all three null: no norm on x
  const acc_t<T>* x_scale;
  const acc_t<T>* x_shift;
  const T* res;            // null: no residual
  const acc_t<T>* res_mean;
  const acc_t<T>* res_scale;
  const acc_t<T>* res_shift;
  T* u;
};

template <typename T, bool kXAct, Act XA>
__global__ void __launch_bounds__(kThreads, kMinCtasPerSm) pw_prologue_kernel(const PrologueArgs<T> a, const Plan p) {
  using AccT = acc_t<T>;
  constexpr int V = kVecWidth<T>;
  const int lane = threadIdx.x, cb = blockIdx.y;
  AccT xm[V], xs[V], xt[V], rm[V], rs[V], rt[V];
  load_channels<T>(a.x_mean, cb, lane, p.C, p.vectorized, AccT(0), xm);
  load_channels<T>(a.x_scale, cb, lane, p.C, p.vectorized, AccT(1), xs);
  load_channels<T>(a.x_shift, cb, lane, p.C, p.vectorized, AccT(0), xt);
  load_channels<T>(a.res_mean, cb, lane, p.C, p.vectorized, AccT(0), rm);
  load_channels<T>(a.res_scale, cb, lane, p.C, p.vectorized, AccT(1), rs);
  load_channels<T>(a.res_shift, cb, lane, p.C, p.vectorized, AccT(0), rt);
  const bool nx = a.x_mean != nullptr, nr = a.res_mean != nullptr, res = a.res != nullptr;
  // GELU's erf in double on four rows at once spilled 112 bytes (ptxas -v): one row a step there.
  constexpr int kUnroll = sizeof(T) == 8 && kXAct && XA == Act::GELU ? 1 : kRowUnroll<T>;
  for_each_row<kUnroll>(p, [&](int64_t r0, auto rows) {
    constexpr int U = decltype(rows)::value;
    AccT v[U][V], w[U][V];
#pragma unroll
    for (int k = 0; k < U; ++k) {
      const int64_t off = (r0 + k * kRowGroups) * p.C;
      load_row<T>(a.x + off, cb, lane, p.C, p.vectorized, v[k]);
      if (res) load_row<T>(a.res + off, cb, lane, p.C, p.vectorized, w[k]);
    }
#pragma unroll
    for (int k = 0; k < U; ++k) {
      act_on_load<T, kXAct, XA>(v[k]);
      if (nx) {
#pragma unroll
        for (int j = 0; j < V; ++j) v[k][j] = (v[k][j] - xm[j]) * xs[j] + xt[j];
      }
      if (res) {
#pragma unroll
        for (int j = 0; j < V; ++j) v[k][j] += nr ? (w[k][j] - rm[j]) * rs[j] + rt[j] : w[k][j];
      }
      store_row<T>(a.u + (r0 + k * kRowGroups) * p.C, cb, lane, p.C, p.vectorized, v[k]);
    }
  });
}

template <typename T>
struct EpilogueForwardArgs {
  const T* pre;           // p = u W^T + b, [rows, C]
  T* out;
  acc_t<T>* part_mean;    // [tiles][C], null without statistics
  acc_t<T>* part_m2;
  acc_t<T>* mean;         // [C], the statistics, by each channel block's last CTA
  acc_t<T>* var;
  BnNorm bn;              // out's BatchNorm folded in, by the same last CTAs (bn_math.cuh)
  int* counters;          // [channel_blocks], zero (last_cta.cuh)
};

template <typename T, Act A>
__global__ void __launch_bounds__(kThreads, kMinCtasPerSm)
    pw_epilogue_forward_kernel(const EpilogueForwardArgs<T> a, const Plan p) {
  using AccT = acc_t<T>;
  constexpr int V = kVecWidth<T>;
  constexpr int kBlockC = kLanes * V;
  const int lane = threadIdx.x, group = threadIdx.y, cb = blockIdx.y;
  const bool stats = a.part_mean != nullptr;
  channel_stats::WelfordVec<AccT, V> w;  // one count and reciprocal per row for all V channels
  w.init();
  for_each_row<kRowUnroll<T>>(p, [&](int64_t r0, auto rows) {
    constexpr int U = decltype(rows)::value;
    AccT v[U][V];
#pragma unroll
    for (int k = 0; k < U; ++k)
      load_row<T>(a.pre + (r0 + k * kRowGroups) * p.C, cb, lane, p.C, p.vectorized, v[k]);
#pragma unroll
    for (int k = 0; k < U; ++k) {
#pragma unroll
      for (int j = 0; j < V; ++j) v[k][j] = act_forward<A, AccT>(v[k][j]);
      store_row<T>(a.out + (r0 + k * kRowGroups) * p.C, cb, lane, p.C, p.vectorized, v[k]);
      if (stats) w.push(v[k]);
    }
  });
  if (!stats) return;
  // Merge the row groups' states in group order. Every row group of a tile saw a number of rows
  // fixed by the tile, the same for all its channels.
  __shared__ __align__(16) AccT s_mean[kRowGroups * kBlockC];
  __shared__ __align__(16) AccT s_m2[kRowGroups * kBlockC];
  __shared__ int64_t s_n[kRowGroups];
  __shared__ int s_flag;
  const auto publish = [&](int64_t n, const AccT (&mean)[V], const AccT (&m2)[V]) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int local = lane_channel<T>(0, lane, j, p.vectorized);
      s_mean[group * kBlockC + local] = mean[j];
      s_m2[group * kBlockC + local] = m2[j];
    }
    if (lane == 0) s_n[group] = n;
  };
  const int tid = group * kLanes + lane;
  publish(w.count, w.mean, w.m2);
  channel_stats::merge_groups<AccT, kRowGroups, kBlockC>(
      s_n, s_mean, s_m2, tid, kThreads, [&](int slot, int64_t n, AccT mean, AccT m2) {
        const int c = cb * kBlockC + slot;
        if (c >= p.C) return;
        a.part_mean[int64_t(blockIdx.x) * p.C + c] = mean;
        a.part_m2[int64_t(blockIdx.x) * p.C + c] = m2;
      });

  // The channel block's last CTA merges the tiles' partials: row group g folds tiles g, g + 8, ...,
  // then the row groups merge in order.
  if (!arrive_last(a.counters + cb, int(gridDim.x), &s_flag)) return;
  int cs[V];
#pragma unroll
  for (int j = 0; j < V; ++j) cs[j] = lane_channel<T>(cb, lane, j, p.vectorized);
  int64_t n = 0;
  AccT mean[V], m2[V];
#pragma unroll
  for (int j = 0; j < V; ++j) mean[j] = m2[j] = AccT(0);
  channel_stats::merge_tiles(a.part_mean, a.part_m2,
                             channel_stats::TileCounts{p.rows, p.rows_per_tile, nullptr}, p.tiles,
                             p.C, cs, group, kRowGroups, n, mean, m2);
  __syncthreads();  // the shared states of the tile's merge are read
  publish(n, mean, m2);
  channel_stats::merge_groups<AccT, kRowGroups, kBlockC>(
      s_n, s_mean, s_m2, tid, kThreads, [&](int slot, int64_t nn, AccT mm, AccT qq) {
        const int c = cb * kBlockC + slot;
        if (c >= p.C) return;
        channel_stats::store_mean_var(nn, mm, qq, a.mean + c, a.var + c);
        bn_math::fold_forward<AccT>(a.bn, c, a.var[c]);
      });
}

template <typename T>
struct EpilogueBackwardArgs {
  const T* grad_out;
  const T* pre;
  const acc_t<T>* grad_mean;  // [C] or null
  const acc_t<T>* grad_var;   // [C] or null
  const acc_t<T>* mean;       // [C], needed with grad_var
  BnGrad bn;                  // out's BatchNorm folded in: its var gradient joins grad_var
  T* grad_pre;                // dP
  acc_t<T>* part_grad_b;      // [tiles][C]
  T* grad_bias;               // [C]: sum dP, by each channel block's last CTA
  int* counters;              // [channel_blocks], zero (last_cta.cuh)
};

// The double GELU backward (erf in double: 104 registers at one row a step) is held to one CTA
// per SM's budget rather than spill; double is the reference dtype, not a fast one.
template <typename T, Act A>
__global__ void __launch_bounds__(kThreads, sizeof(T) == 8 && A == Act::GELU ? 1 : kMinCtasPerSm)
    pw_epilogue_backward_kernel(const EpilogueBackwardArgs<T> a, const Plan p) {
  using AccT = acc_t<T>;
  constexpr int V = kVecWidth<T>;
  __shared__ __align__(16) AccT s_red[kRowGroups * kLanes * V];
  const int lane = threadIdx.x, cb = blockIdx.y;
  const AccT inv_count = AccT(1) / static_cast<AccT>(p.rows > 0 ? p.rows : 1);
  AccT gm[V], gv[V], mu[V], const_term[V], lin_term[V];
  load_channels<T>(a.grad_mean, cb, lane, p.C, p.vectorized, AccT(0), gm);
  load_channels<T>(a.grad_var, cb, lane, p.C, p.vectorized, AccT(0), gv);
  load_channels<T>(a.mean, cb, lane, p.C, p.vectorized, AccT(0), mu);
  const bool bn = a.bn.var != nullptr;
  if (bn) {
    // The BatchNorm's var gradient, and its weight's and bias's by the first tile's row group 0.
    const bool write = blockIdx.x == 0 && threadIdx.y == 0;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int c = lane_channel<T>(cb, lane, j, p.vectorized);
      if (c >= p.C) continue;
      const AccT g = bn_math::fold_backward<AccT>(a.bn, c, write);
      gv[j] = a.grad_var != nullptr ? gv[j] + g : g;
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j) {
    lin_term[j] = AccT(2) * gv[j] * inv_count;
    const_term[j] = gm[j] * inv_count - lin_term[j] * mu[j];
  }
  const bool need_o = a.grad_var != nullptr || bn;
  AccT db[V];
#pragma unroll
  for (int j = 0; j < V; ++j) db[j] = AccT(0);
  constexpr int kUnroll = sizeof(T) == 8 && A == Act::GELU ? 1 : kRowUnroll<T>;
  for_each_row<kUnroll>(p, [&](int64_t r0, auto rows) {
    constexpr int U = decltype(rows)::value;
    AccT pv[U][V], d[U][V];
#pragma unroll
    for (int k = 0; k < U; ++k) {
      const int64_t off = (r0 + k * kRowGroups) * p.C;
      load_row<T>(a.pre + off, cb, lane, p.C, p.vectorized, pv[k]);
      load_row<T>(a.grad_out + off, cb, lane, p.C, p.vectorized, d[k]);
    }
#pragma unroll
    for (int k = 0; k < U; ++k) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const ActAt<A, AccT> at(pv[k][j]);
        AccT dO = d[k][j] + const_term[j];
        if (need_o) dO += lin_term[j] * round_to_storage<T>(at.value());
        d[k][j] = at.backward(dO);
      }
      store_row<T>(a.grad_pre + (r0 + k * kRowGroups) * p.C, cb, lane, p.C, p.vectorized, d[k]);
#pragma unroll
      for (int j = 0; j < V; ++j) db[j] += d[k][j];  // the stored (rounded) dP, as the GEMMs see it
    }
  });
  write_partial_sums<T>(db, s_red, p, cb, a.part_grad_b);
  __shared__ int s_flag;
  if (!arrive_last(a.counters + cb, int(gridDim.x), &s_flag)) return;
  fold_tiles<T>(a.part_grad_b, p, cb, db);
  sum_groups<T>(db, s_red, p, cb, [&](int c, AccT total) { a.grad_bias[c] = from_acc<T>(total); });
}

// A norm's gradients: mean -(sum dU) scale, scale sum dU (v - mean), shift sum dU.
template <typename T>
struct NormGradArgs {
  acc_t<T>* mean;
  acc_t<T>* scale;
  acc_t<T>* shift;
};

template <typename T>
struct ThroughNormsArgs {
  const T* grad_u;         // dU = dP W, [rows, C]
  const T* x;
  const acc_t<T>* x_mean;  // null: no norm on x
  const acc_t<T>* x_scale;
  const T* res;            // null: no residual
  const acc_t<T>* res_mean;  // null: no norm on res
  const acc_t<T>* res_scale;
  T* grad_x;               // null: not written (dU itself without a norm on x; or deferred)
  T* grad_res;             // null: no residual, or grad_res is dU itself
  acc_t<T>* part_sum;      // [tiles][C]: sum dU
  acc_t<T>* part_sum_xc;   // [tiles][C]: sum dU (x - mean_x), with a norm on x
  acc_t<T>* part_sum_rc;   // [tiles][C]: sum dU (res - mean_res), with a norm on res
  NormGradArgs<T> x_grads;   // [C] each, with a norm on x: by each channel block's last CTA
  NormGradArgs<T> res_grads; // [C] each, with a norm on res
  int* counters;           // [channel_blocks], zero (last_cta.cuh)
};

template <typename T, bool kXAct, Act XA>
__global__ void __launch_bounds__(kThreads, kMinCtasPerSm) pw_through_norms_kernel(const ThroughNormsArgs<T> a,
                                                                    const Plan p) {
  using AccT = acc_t<T>;
  constexpr int V = kVecWidth<T>;
  __shared__ __align__(16) AccT s_red[kRowGroups * kLanes * V];
  const int lane = threadIdx.x, cb = blockIdx.y;
  const bool nx = a.x_mean != nullptr, nr = a.res != nullptr && a.res_mean != nullptr;
  AccT xm[V], xs[V], rm[V], rs[V], s0[V], s1[V], s2[V];
  load_channels<T>(a.x_mean, cb, lane, p.C, p.vectorized, AccT(0), xm);
  load_channels<T>(a.x_scale, cb, lane, p.C, p.vectorized, AccT(1), xs);
  load_channels<T>(a.res_mean, cb, lane, p.C, p.vectorized, AccT(0), rm);
  load_channels<T>(a.res_scale, cb, lane, p.C, p.vectorized, AccT(1), rs);
#pragma unroll
  for (int j = 0; j < V; ++j) s0[j] = s1[j] = s2[j] = AccT(0);
  const bool wres = a.grad_res != nullptr, wx = a.grad_x != nullptr;
  // 16-bit: three input streams a row already put three vectors in flight.
  constexpr int kUnroll = sizeof(T) == 2 ? 1 : kRowUnroll<T>;
  for_each_row<kUnroll>(p, [&](int64_t r0, auto rows) {
    constexpr int U = decltype(rows)::value;
    AccT du[U][V], xv[U][V], rv[U][V];
#pragma unroll
    for (int k = 0; k < U; ++k) {
      const int64_t off = (r0 + k * kRowGroups) * p.C;
      load_row<T>(a.grad_u + off, cb, lane, p.C, p.vectorized, du[k]);
      if (nx) load_row<T>(a.x + off, cb, lane, p.C, p.vectorized, xv[k]);
      if (wres && nr) load_row<T>(a.res + off, cb, lane, p.C, p.vectorized, rv[k]);
    }
#pragma unroll
    for (int k = 0; k < U; ++k) {
      const int64_t off = (r0 + k * kRowGroups) * p.C;
#pragma unroll
      for (int j = 0; j < V; ++j) s0[j] += du[k][j];
      if (nx) {
        act_on_load<T, kXAct, XA>(xv[k]);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          s1[j] = fma_acc(du[k][j], xv[k][j] - xm[j], s1[j]);
          xv[k][j] = du[k][j] * xs[j];
        }
        if (wx) store_row<T>(a.grad_x + off, cb, lane, p.C, p.vectorized, xv[k]);
      }
      if (wres) {
        if (nr) {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            s2[j] = fma_acc(du[k][j], rv[k][j] - rm[j], s2[j]);
            rv[k][j] = du[k][j] * rs[j];
          }
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) rv[k][j] = du[k][j];  // a copy: the op's outputs may not alias
        }
        store_row<T>(a.grad_res + off, cb, lane, p.C, p.vectorized, rv[k]);
      }
    }
  });
  write_partial_sums<T>(s0, s_red, p, cb, a.part_sum);
  if (nx) write_partial_sums<T>(s1, s_red, p, cb, a.part_sum_xc);
  if (nr) write_partial_sums<T>(s2, s_red, p, cb, a.part_sum_rc);
  if (!nx && !nr) return;  // the sums feed nothing

  // The channel block's last CTA turns the tiles' sums into the norms' gradients.
  __shared__ int s_flag;
  if (!arrive_last(a.counters + cb, int(gridDim.x), &s_flag)) return;
  fold_tiles<T>(a.part_sum, p, cb, s0);
  sum_groups<T>(s0, s_red, p, cb, [&](int c, AccT total) {
    if (nx) {
      a.x_grads.mean[c] = -total * a.x_scale[c];
      a.x_grads.shift[c] = total;
    }
    if (nr) {
      a.res_grads.mean[c] = -total * a.res_scale[c];
      a.res_grads.shift[c] = total;
    }
  });
  if (nx) {
    fold_tiles<T>(a.part_sum_xc, p, cb, s1);
    sum_groups<T>(s1, s_red, p, cb, [&](int c, AccT total) { a.x_grads.scale[c] = total; });
  }
  if (nr) {
    fold_tiles<T>(a.part_sum_rc, p, cb, s2);
    sum_groups<T>(s2, s_red, p, cb, [&](int c, AccT total) { a.res_grads.scale[c] = total; });
  }
}

}  // namespace pw
}  // namespace cuda
}  // namespace convmixer_kernels
