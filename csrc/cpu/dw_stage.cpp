// CPU implementation of dw_stage and dw_stage_backward (docs/OPS.md).
//
// Work is split into tasks of one image and one block of kCB channels (a pair of vectors), so
// there are N·C/kCB tasks to share between threads whatever the channel count. A task stages its
// image's channels in a zero-bordered opmath buffer with the input norm already applied (the
// padding stays zero, docs/DESIGN.md §4), then runs the k×k taps on register tiles: kXT output
// pixels of a row times the pair of vectors, with each tap loaded once per tile. The weight
// gradient keeps kJT taps of a kernel row in registers and streams the image through them.
//
// Every per-channel reduction (statistics, weight and bias gradients, norm gradients) is summed
// in pixel order within a task into that task's own slot, and the slots are then added in image
// order in double: results are bitwise the same run to run and whatever the thread count.
#include "cpu_common.h"
#include "../stage_checks.h"

namespace convmixer_kernels {
namespace cpu {
namespace {

template <typename scalar_t>
struct DwPlan {
  using L = Lanes<scalar_t>;
  using opmath_t = typename L::opmath_t;
  using V = typename L::V;
  static constexpr int64_t kCB = L::kPair;
  static constexpr int64_t kVS = L::kHalf;
  // Output pixels per register tile (2·kXT accumulators) and taps per weight-gradient tile
  // (2·kJT accumulators), leaving registers for the loads.
  static constexpr int kXT = kVecRegs == 32 ? 8 : 4;
  static constexpr int kJT = kVecRegs == 32 ? 12 : 5;
  // Bytes of staged input a task aims to keep in L2.
  static constexpr int64_t kStageBytes = 1 << 20;

  const DwGeometry& g;
  int64_t blocks, kk, Wt, Wb, Hb;
  int64_t group;  // channel blocks per task
  AlignedBuffer<opmath_t> taps, flipped;  // [blocks][k*k][kCB], zero past C
  AlignedBuffer<opmath_t> bias;           // [blocks][kCB]
  PaddedNorm<opmath_t> norm;            // the input norm, [blocks * kCB] lanes

  DwPlan(const DwGeometry& geo, const at::Tensor& weight, const at::Tensor* b, const Norm& in_norm)
      : g(geo),
        blocks((geo.C + kCB - 1) / kCB),
        kk(geo.k * geo.k),
        Wt((geo.W + kXT - 1) / kXT * kXT),
        Wb(Wt + 2 * geo.pad),
        Hb(geo.H + 2 * geo.pad),
        taps(blocks * kk * kCB),
        flipped(blocks * kk * kCB),
        bias(blocks * kCB),
        norm(in_norm, geo.C, blocks * kCB) {
    // A task stages `group` blocks of one image at once, so that it reads the NHWC input a
    // pixel's group·kCB channels at a time rather than as a C-strided gather. Grouping changes
    // the order tasks run in, not any sum: each (image, block) keeps its own slot.
    const int64_t fit = std::max<int64_t>(1, kStageBytes / (buffer_size() * int64_t(sizeof(opmath_t))));
    const int64_t spread = std::max<int64_t>(1, g.N * blocks / (4 * at::get_num_threads()));
    group = std::min({blocks, fit, spread});
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    for (int64_t c = 0; c < g.C; ++c) {
      const int64_t blk = c / kCB, l = c % kCB;
      for (int64_t t = 0; t < kk; ++t) {
        const opmath_t v = static_cast<opmath_t>(wp[c * kk + t]);
        taps[(blk * kk + t) * kCB + l] = v;
        flipped[(blk * kk + kk - 1 - t) * kCB + l] = v;
      }
      if (b != nullptr) bias[c] = static_cast<opmath_t>(b->data_ptr<scalar_t>()[c]);
    }
  }

  int64_t groups() const { return (blocks + group - 1) / group; }
  int64_t tasks() const { return g.N * groups(); }
  int64_t slots() const { return g.N * blocks; }
  int64_t buffer_size() const { return Hb * Wb * kCB; }
  int64_t width(int64_t blk) const { return std::min(kCB, g.C - blk * kCB); }
  // Offset of pixel (y, x) of the padded buffer.
  int64_t at(int64_t y, int64_t x) const { return (y * Wb + x) * kCB; }

  // Copies image n's channels of blocks [b0, b1) of the NHWC `src` into the interiors of the
  // blocks' buffers (buffer_size() apart from buf), applying the norm (v - mean) * scale + shift
  // when there is one. Borders and lanes past C stay zero.
  void stage(const scalar_t* src, int64_t n, int64_t b0, int64_t b1, opmath_t* buf) const {
    const bool normed = norm.defined();
    for (int64_t y = 0; y < g.H; ++y) {
      for (int64_t x = 0; x < g.W; ++x) {
        const scalar_t* in = src + ((n * g.H + y) * g.W + x) * g.C;
        opmath_t* dst = buf + at(y + g.pad, x + g.pad);
        for (int64_t blk = b0; blk < b1; ++blk, dst += buffer_size()) {
          const int64_t c0 = blk * kCB;
          V a, b;
          L::load(in + c0, width(blk), a, b);
          if (normed) {
            a = (a - V::loadu(&norm.mean[c0])) * V::loadu(&norm.scale[c0]) + V::loadu(&norm.shift[c0]);
            b = (b - V::loadu(&norm.mean[c0 + kVS])) * V::loadu(&norm.scale[c0 + kVS]) +
                V::loadu(&norm.shift[c0 + kVS]);
          }
          a.store(dst);
          b.store(dst + kVS);
        }
      }
    }
  }

  // Runs body(n, blk, xs, scratch) for every image n and channel block blk, in parallel over
  // the tasks: xs is the block's staged input (buffer_size() lanes), scratch `scratch_size`
  // zero-initialised lanes private to the thread.
  template <typename Body>
  void for_each_block(const scalar_t* x, int64_t scratch_size, const Body& body) const {
    at::parallel_for(0, tasks(), 1, [&](int64_t t0, int64_t t1) {
      AlignedBuffer<opmath_t> bufs(group * buffer_size()), scratch(scratch_size);
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t n = task / groups(), b0 = task % groups() * group;
        const int64_t b1 = std::min(b0 + group, blocks);
        stage(x, n, b0, b1, bufs.data());
        for (int64_t blk = b0; blk < b1; ++blk) {
          body(n, blk, bufs.data() + (blk - b0) * buffer_size(), scratch.data());
        }
      }
    });
  }

  // tile[x] = init + Σ_ij buf[i][x + j] * taps[i][j] for the kXT pixels x of a tile (kCB lanes
  // each); `buf` points at the tile's top-left input pixel, `init` is kCB lanes or null for zero.
  void correlate(const opmath_t* buf, const opmath_t* tp, const opmath_t* init,
                 opmath_t* tile) const {
    V acc[kXT][2];
    const V i0 = init ? V::loadu(init) : V(opmath_t(0)), i1 = init ? V::loadu(init + kVS) : V(opmath_t(0));
    unroll<kXT>([&](auto x) { acc[x][0] = i0, acc[x][1] = i1; });
    const int64_t row = Wb * kCB;
    for (int64_t i = 0; i < g.k; ++i, buf += row) {
      for (int64_t j = 0; j < g.k; ++j, tp += kCB) {
        const V w0 = V::loadu(tp), w1 = V::loadu(tp + kVS);
        const opmath_t* px = buf + j * kCB;
        unroll<kXT>([&](auto x) {
          acc[x][0] = at::vec::fmadd(V::loadu(px + x * kCB), w0, acc[x][0]);
          acc[x][1] = at::vec::fmadd(V::loadu(px + x * kCB + kVS), w1, acc[x][1]);
        });
      }
    }
    unroll<kXT>([&](auto x) {
      acc[x][0].store(tile + x * kCB);
      acc[x][1].store(tile + x * kCB + kVS);
    });
  }

  // Prefetches the block's lanes of the nx pixels of a tile of the NHWC tensor at p (its first
  // pixel's block): they are a C-strided gather the hardware prefetchers do not follow, and the
  // tile's taps take long enough to hide the memory latency. For writing when `write`.
  template <bool write = false>
  void prefetch_tile(const scalar_t* p, int64_t nx) const {
    constexpr int64_t kLine = 64 / sizeof(scalar_t);
    for (int64_t x = 0; x < nx; ++x, p += g.C) {
      for (int64_t l = 0; l < kCB; l += kLine) __builtin_prefetch(p + l, write ? 1 : 0);
    }
  }

  // gw[t] += Σ_{y,x} dA[y][x] * xs[y + i][x + j] for the taps t = i·k + j, j in [j0, j0 + J):
  // J taps of kernel row i stay in registers while the image streams through them.
  template <int J>
  void weight_grad_tile(const opmath_t* dA, const opmath_t* xs, int64_t i, int64_t j0,
                        opmath_t* gw) const {
    V acc[J][2];
    unroll<J>([&](auto j) { acc[j][0] = acc[j][1] = V(opmath_t(0)); });
    for (int64_t y = 0; y < g.H; ++y) {
      const opmath_t* d = dA + at(y + g.pad, g.pad);
      const opmath_t* px = xs + at(y + i, j0);
      for (int64_t x = 0; x < g.W; ++x, d += kCB, px += kCB) {
        const V d0 = V::loadu(d), d1 = V::loadu(d + kVS);
        unroll<J>([&](auto j) {
          acc[j][0] = at::vec::fmadd(d0, V::loadu(px + j * kCB), acc[j][0]);
          acc[j][1] = at::vec::fmadd(d1, V::loadu(px + j * kCB + kVS), acc[j][1]);
        });
      }
    }
    unroll<J>([&](auto j) {
      acc[j][0].store(gw + (i * g.k + j0 + j) * kCB);
      acc[j][1].store(gw + (i * g.k + j0 + j) * kCB + kVS);
    });
  }

  template <int J = kJT>
  void weight_grad_row(const opmath_t* dA, const opmath_t* xs, int64_t i, int64_t j0,
                       opmath_t* gw) const {
    if constexpr (J > 0) {
      if (g.k - j0 >= J) {
        weight_grad_tile<J>(dA, xs, i, j0, gw);
        if (g.k - j0 > J) weight_grad_row<J>(dA, xs, i, j0 + J, gw);
      } else {
        weight_grad_row<J - 1>(dA, xs, i, j0, gw);
      }
    }
  }
};

// Per-task slots of per-channel sums, [tasks][count][kCB], added in image order by `total`.
template <typename opmath_t>
struct Slots {
  int64_t count, width, blocks;
  std::vector<opmath_t> v;
  Slots(int64_t tasks, int64_t count_, int64_t width_, int64_t blocks_)
      : count(count_), width(width_), blocks(blocks_), v(tasks * count_ * width_) {}
  opmath_t* slot(int64_t task) { return v.data() + task * count * width; }
  const opmath_t* slot(int64_t task) const { return v.data() + task * count * width; }
  // Σ over images n of slot (n, blk)[k][l], in n order, in double.
  double total(int64_t N, int64_t blk, int64_t k, int64_t l) const {
    double s = 0;
    for (int64_t n = 0; n < N; ++n) s += static_cast<double>(v[((n * blocks + blk) * count + k) * width + l]);
    return s;
  }
};

template <typename scalar_t, Act A>
void dw_forward(const DwGeometry& g, const at::Tensor& x, const Norm& norm,
                const at::Tensor& weight, const at::Tensor* bias, bool stats, at::Tensor& out,
                at::Tensor* pre_act, at::Tensor& mean, at::Tensor& var) {
  using Plan = DwPlan<scalar_t>;
  using L = typename Plan::L;
  using opmath_t = typename Plan::opmath_t;
  using V = typename Plan::V;
  constexpr int kXT = Plan::kXT;
  constexpr int64_t kCB = Plan::kCB, kVS = Plan::kVS;
  const Plan plan(g, weight, bias, norm);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  scalar_t* pp = pre_act != nullptr ? pre_act->data_ptr<scalar_t>() : nullptr;
  // Per task: the shift K (its first output), Σ (o - K) and Σ (o - K)².
  Slots<opmath_t> sums(stats ? plan.slots() : 0, 3, kCB, plan.blocks);

  plan.for_each_block(xp, 0, [&](int64_t n, int64_t blk, const opmath_t* buf, opmath_t*) {
    const int64_t c0 = blk * kCB, cb = plan.width(blk);
    alignas(64) opmath_t tile[kXT * kCB];
    V k0(opmath_t(0)), k1(opmath_t(0)), s10(opmath_t(0)), s11(opmath_t(0)), s20(opmath_t(0)),
        s21(opmath_t(0));
    for (int64_t y = 0; y < g.H; ++y) {
      for (int64_t x0 = 0; x0 < g.W; x0 += kXT) {
        const int64_t nx = std::min<int64_t>(kXT, g.W - x0);
        scalar_t* dst = op + ((n * g.H + y) * g.W + x0) * g.C + c0;
        plan.template prefetch_tile<true>(dst, nx);
        plan.correlate(buf + plan.at(y, x0), plan.taps.data() + blk * plan.kk * kCB,
                       plan.bias.data() + c0, tile);
        if (pp != nullptr) plan.template prefetch_tile<true>(pp + (dst - op), nx);
        for (int64_t xo = 0; xo < nx; ++xo, dst += g.C) {
          const V p0 = V::loadu(tile + xo * kCB), p1 = V::loadu(tile + xo * kCB + kVS);
          if (pp != nullptr) L::store(pp + (dst - op), cb, p0, p1);
          V a = act_forward<A>(p0);
          V b = act_forward<A>(p1);
          L::store(dst, cb, a, b);
          if (!stats) continue;
          L::round(a, b);
          if (y == 0 && x0 == 0 && xo == 0) k0 = a, k1 = b;
          const V d0 = a - k0, d1 = b - k1;
          s10 = s10 + d0, s11 = s11 + d1;
          s20 = at::vec::fmadd(d0, d0, s20), s21 = at::vec::fmadd(d1, d1, s21);
        }
      }
    }
    if (stats) {
      opmath_t* s = sums.slot(n * plan.blocks + blk);
      k0.store(s), k1.store(s + kVS);
      s10.store(s + kCB), s11.store(s + kCB + kVS);
      s20.store(s + 2 * kCB), s21.store(s + 2 * kCB + kVS);
    }
  });
  if (!stats) return;
  auto* m = mean.data_ptr<opmath_t>();
  auto* v = var.data_ptr<opmath_t>();
  const int64_t per_image = g.H * g.W;
  at::parallel_for(0, g.C, 16, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t blk = c / kCB, l = c % kCB;
      const auto [mc, vc] = merge_shifted_sums(g.N, [&](int64_t n) {
        const opmath_t* s = sums.slot(n * plan.blocks + blk) + l;
        return std::make_tuple(s[0], s[kCB], s[2 * kCB], per_image);
      });
      m[c] = static_cast<opmath_t>(mc);
      v[c] = static_cast<opmath_t>(vc);
    }
  });
}

template <typename scalar_t, Act A>
void dw_backward(const DwGeometry& g, const at::Tensor& grad_out, const at::Tensor* grad_mean,
                 const at::Tensor* grad_var, const at::Tensor& x, const Norm& norm,
                 const at::Tensor& weight, const at::Tensor* bias, const at::Tensor* mean,
                 const at::Tensor* grad_res, const at::Tensor* saved_out,
                 const at::Tensor* pre_act, const at::Tensor* grad_out_scale, at::Tensor& grad_x,
                 at::Tensor& grad_weight, at::Tensor& grad_bias, at::Tensor& g_mean,
                 at::Tensor& g_scale, at::Tensor& g_shift) {
  using Plan = DwPlan<scalar_t>;
  using L = typename Plan::L;
  using opmath_t = typename Plan::opmath_t;
  using V = typename Plan::V;
  constexpr int kXT = Plan::kXT;
  constexpr int64_t kCB = Plan::kCB, kVS = Plan::kVS;
  const Plan plan(g, weight, bias, norm);
  const int64_t kk = plan.kk;
  const scalar_t* gop = grad_out.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* gxp = grad_x.data_ptr<scalar_t>();
  const bool normed = norm.defined();
  // grad_res (the gradient the residual branch gives the same normed input, norm(x)) joins dX
  // before the norm's backward, in pass 2.
  const scalar_t* grp = grad_res != nullptr ? grad_res->data_ptr<scalar_t>() : nullptr;
  // With the forward's pre-activation a (any activation), or its output where act' follows
  // from it (relu), pass 1 reads act' (and act) from that instead of recomputing the
  // convolution (k² FMA per element of the 3k² it costs otherwise).
  const scalar_t* sop = pre_act != nullptr ? pre_act->data_ptr<scalar_t>()
                        : derivative_from_output(A) && saved_out != nullptr
                            ? saved_out->data_ptr<scalar_t>() : nullptr;

  // The statistics' gradient enters as dO = grad_out + const_term + lin_term * o.
  std::vector<opmath_t> const_term(plan.blocks * kCB, opmath_t(0)), lin_term(plan.blocks * kCB, opmath_t(0));
  const opmath_t inv_count = opmath_t(1) / static_cast<opmath_t>(std::max<int64_t>(g.count(), 1));
  for (int64_t c = 0; c < g.C; ++c) {
    if (grad_mean != nullptr) const_term[c] += grad_mean->data_ptr<opmath_t>()[c] * inv_count;
    if (grad_var != nullptr) {
      lin_term[c] = 2 * grad_var->data_ptr<opmath_t>()[c] * inv_count;
      const_term[c] -= lin_term[c] * mean->data_ptr<opmath_t>()[c];
    }
  }
  const bool need_o = grad_var != nullptr;
  // grad_out_scale: grad_out is the next stage's dU, this stage's gradient dU times it.
  std::vector<opmath_t> go_scale(grad_out_scale != nullptr ? plan.blocks * kCB : 0, opmath_t(1));
  for (int64_t c = 0; c < g.C && grad_out_scale != nullptr; ++c)
    go_scale[c] = grad_out_scale->data_ptr<opmath_t>()[c];
  // Per task: the weight gradient [k*k], then Σ dA (bias), Σ dX and Σ dX (x - mean) (norm).
  Slots<opmath_t> sums(plan.slots(), kk + 3, kCB, plan.blocks);

  plan.for_each_block(xp, plan.buffer_size(), [&](int64_t n, int64_t blk, const opmath_t* xs,
                                                 opmath_t* dA) {
    alignas(64) opmath_t tile[kXT * kCB];
    const int64_t c0 = blk * kCB, cb = plan.width(blk);
    opmath_t* slot = sums.slot(n * plan.blocks + blk);
    const V ct0 = V::loadu(&const_term[c0]), ct1 = V::loadu(&const_term[c0 + kVS]);
    const V lt0 = V::loadu(&lin_term[c0]), lt1 = V::loadu(&lin_term[c0 + kVS]);
    const bool scaled = !go_scale.empty();
    const V gs0 = scaled ? V::loadu(&go_scale[c0]) : V(opmath_t(1));
    const V gs1 = scaled ? V::loadu(&go_scale[c0 + kVS]) : V(opmath_t(1));
    V db0(opmath_t(0)), db1(opmath_t(0));
    // Pass 1: recompute a, form dA into its padded buffer, sum the bias gradient.
    for (int64_t y = 0; y < g.H; ++y) {
      for (int64_t x0 = 0; x0 < g.W; x0 += kXT) {
        const int64_t nx = std::min<int64_t>(kXT, g.W - x0);
        const scalar_t* go = gop + ((n * g.H + y) * g.W + x0) * g.C + c0;
        const scalar_t* so = sop != nullptr ? sop + (go - gop) : nullptr;
        plan.prefetch_tile(go, nx);
        if (so != nullptr) {
          plan.prefetch_tile(so, nx);
          for (int64_t xo = 0; xo < nx; ++xo) {
            V o0, o1;
            L::load(so + xo * g.C, cb, o0, o1);
            o0.store(tile + xo * kCB), o1.store(tile + xo * kCB + kVS);
          }
        } else {
          plan.correlate(xs + plan.at(y, x0), plan.taps.data() + blk * kk * kCB,
                         plan.bias.data() + c0, tile);
        }
        opmath_t* da = dA + plan.at(y + g.pad, x0 + g.pad);
        for (int64_t xo = 0; xo < nx; ++xo, go += g.C, da += kCB) {
          V d0, d1;
          L::load(go, cb, d0, d1);
          if (scaled) d0 = d0 * gs0, d1 = d1 * gs1;
          // a (recomputed or pre_act), or (saved_out) the output, which serves act' and act
          // alike here.
          const ActAt<A, opmath_t> a0(V::loadu(tile + xo * kCB)), a1(V::loadu(tile + xo * kCB + kVS));
          d0 = d0 + ct0, d1 = d1 + ct1;
          if (need_o) {
            // The statistics were of the output as stored: round act(a) before using it.
            V o0 = a0.value(), o1 = a1.value();
            L::round(o0, o1);
            d0 = at::vec::fmadd(lt0, o0, d0), d1 = at::vec::fmadd(lt1, o1, d1);
          }
          // Lanes past C: grad_out, the terms, taps and bias are zero there, so dA is zero too.
          d0 = a0.backward(d0), d1 = a1.backward(d1);
          d0.store(da), d1.store(da + kVS);
          db0 = db0 + d0, db1 = db1 + d1;
        }
      }
    }
    db0.store(slot + kk * kCB), db1.store(slot + kk * kCB + kVS);
    for (int64_t i = 0; i < g.k; ++i) plan.weight_grad_row(dA, xs, i, 0, slot);
    // Pass 2: dX = dA correlated with the rotated taps; then through the input norm.
    V sx0(opmath_t(0)), sx1(opmath_t(0)), sc0(opmath_t(0)), sc1(opmath_t(0));
    V m0, m1, s0, s1;
    if (normed) {
      m0 = V::loadu(&plan.norm.mean[c0]), m1 = V::loadu(&plan.norm.mean[c0 + kVS]);
      s0 = V::loadu(&plan.norm.scale[c0]), s1 = V::loadu(&plan.norm.scale[c0 + kVS]);
    }
    for (int64_t y = 0; y < g.H; ++y) {
      for (int64_t x0 = 0; x0 < g.W; x0 += kXT) {
        const int64_t nx = std::min<int64_t>(kXT, g.W - x0);
        const int64_t pix = (n * g.H + y) * g.W + x0;
        plan.template prefetch_tile<true>(gxp + pix * g.C + c0, nx);
        if (normed) plan.prefetch_tile(xp + pix * g.C + c0, nx);
        if (grp != nullptr) plan.prefetch_tile(grp + pix * g.C + c0, nx);
        plan.correlate(dA + plan.at(y, x0), plan.flipped.data() + blk * kk * kCB, nullptr,
                       tile);
        for (int64_t xo = 0; xo < nx; ++xo) {
          const int64_t off = (pix + xo) * g.C + c0;
          V dx0 = V::loadu(tile + xo * kCB), dx1 = V::loadu(tile + xo * kCB + kVS);
          if (grp != nullptr) {  // a gradient of norm(x) too: before the norm's backward
            V r0, r1;
            L::load(grp + off, cb, r0, r1);
            dx0 = dx0 + r0, dx1 = dx1 + r1;
          }
          const V gx0 = normed ? dx0 * s0 : dx0, gx1 = normed ? dx1 * s1 : dx1;
          L::store(gxp + off, cb, gx0, gx1);
          if (!normed) continue;
          V x0v, x1v;
          L::load(xp + off, cb, x0v, x1v);
          sx0 = sx0 + dx0, sx1 = sx1 + dx1;
          sc0 = at::vec::fmadd(dx0, x0v - m0, sc0), sc1 = at::vec::fmadd(dx1, x1v - m1, sc1);
        }
      }
    }
    sx0.store(slot + (kk + 1) * kCB), sx1.store(slot + (kk + 1) * kCB + kVS);
    sc0.store(slot + (kk + 2) * kCB), sc1.store(slot + (kk + 2) * kCB + kVS);
  });

  // Sum the tasks' slots in image order, in double, channel by channel.
  scalar_t* gw = grad_weight.data_ptr<scalar_t>();
  scalar_t* gb = grad_bias.data_ptr<scalar_t>();
  opmath_t* gm = normed ? g_mean.data_ptr<opmath_t>() : nullptr;
  opmath_t* gs = normed ? g_scale.data_ptr<opmath_t>() : nullptr;
  opmath_t* gt = normed ? g_shift.data_ptr<opmath_t>() : nullptr;
  at::parallel_for(0, g.C, 16, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t blk = c / kCB, l = c % kCB;
      for (int64_t t = 0; t < kk; ++t) gw[c * kk + t] = static_cast<scalar_t>(sums.total(g.N, blk, t, l));
      gb[c] = static_cast<scalar_t>(sums.total(g.N, blk, kk, l));
      if (!normed) continue;
      const opmath_t sum_dx = static_cast<opmath_t>(sums.total(g.N, blk, kk + 1, l));
      gm[c] = -sum_dx * plan.norm.scale[c];
      gs[c] = static_cast<opmath_t>(sums.total(g.N, blk, kk + 2, l));
      gt[c] = sum_dx;
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_stage(
    const at::Tensor& x_in, const std::optional<at::Tensor>& x_mean,
    const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& x_shift,
    const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in, c10::string_view act_name,
    bool stats, bool keep_pre_act) {
  const DwArgs a = check_dw_stage("dw_stage", x_in, x_mean, x_scale, x_shift, weight_in, bias_in,
                                  act_name, stats);
  const DwGeometry& g = a.g;
  const auto acc = a.acc;
  const Norm& norm = a.norm;

  const auto x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const auto weight = weight_in.contiguous();
  const auto bias = bias_in.has_value() ? std::optional<at::Tensor>(bias_in->contiguous()) : std::nullopt;
  auto out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor pre_act = keep_pre_act ? at::empty_like(out) : empty_output(x, x.scalar_type());
  at::Tensor mean = empty_output(x, acc), var = empty_output(x, acc);
  if (stats) {
    mean = at::empty({g.C}, x.options().dtype(acc));
    var = at::empty({g.C}, x.options().dtype(acc));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dw_stage_cpu", [&] {
    dispatch_act(a.act, [&](auto act) {
      dw_forward<scalar_t, decltype(act)::value>(g, x, norm, weight, bias ? &*bias : nullptr,
                                                 stats, out, keep_pre_act ? &pre_act : nullptr,
                                                 mean, var);
    });
  });
  return {out, pre_act, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dw_stage_backward(const at::Tensor& grad_out_in, const std::optional<at::Tensor>& grad_mean_in,
                  const std::optional<at::Tensor>& grad_var_in, const at::Tensor& x_in,
                  const std::optional<at::Tensor>& x_mean,
                  const std::optional<at::Tensor>& x_scale,
                  const std::optional<at::Tensor>& x_shift, const at::Tensor& weight_in,
                  const std::optional<at::Tensor>& bias_in, const std::optional<at::Tensor>& mean_in,
                  c10::string_view act_name, const std::optional<at::Tensor>& grad_res_in,
                  const std::optional<at::Tensor>& saved_out_in,
                  const std::optional<at::Tensor>& pre_act_in,
                  const std::optional<at::Tensor>& grad_out_scale_in) {
  const DwArgs a = check_dw_stage_backward("dw_stage_backward", grad_out_in, grad_mean_in,
                                           grad_var_in, x_in, x_mean, x_scale, x_shift, weight_in,
                                           bias_in, mean_in, act_name, grad_res_in, saved_out_in,
                                           pre_act_in);
  const DwGeometry& g = a.g;
  const auto acc = a.acc;
  const auto grad_out_scale = check_grad_out_scale("dw_stage_backward", grad_out_scale_in, g.C,
                                                   acc, x_in.device());
  const Norm& norm = a.norm;
  const auto& grad_mean = a.sg.grad_mean;
  const auto& grad_var = a.sg.grad_var;
  const auto& mean = a.sg.mean;

  const auto x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const auto grad_out = grad_out_in.contiguous(at::MemoryFormat::ChannelsLast);
  const auto cl_or_none = [](bool given, const std::optional<at::Tensor>& t) {
    return given ? t->contiguous(at::MemoryFormat::ChannelsLast) : at::Tensor();
  };
  const auto grad_res = cl_or_none(a.have_grad_res, grad_res_in);
  const auto saved_out = cl_or_none(a.have_saved_out, saved_out_in);
  const auto pre_act = cl_or_none(a.have_pre_act, pre_act_in);
  const auto weight = weight_in.contiguous();
  const auto bias = bias_in.has_value() ? std::optional<at::Tensor>(bias_in->contiguous()) : std::nullopt;
  auto grad_x = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto grad_weight = at::empty(weight_in.sizes(), weight_in.options().memory_format(at::MemoryFormat::Contiguous));
  auto grad_bias = at::empty({g.C}, weight_in.options());
  at::Tensor g_mean = empty_output(x, acc), g_scale = empty_output(x, acc), g_shift = empty_output(x, acc);
  if (norm.defined()) {
    g_mean = at::empty({g.C}, x.options().dtype(acc));
    g_scale = at::empty({g.C}, x.options().dtype(acc));
    g_shift = at::empty({g.C}, x.options().dtype(acc));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dw_stage_backward_cpu", [&] {
    dispatch_act(a.act, [&](auto act) {
      dw_backward<scalar_t, decltype(act)::value>(
          g, grad_out, grad_mean ? &*grad_mean : nullptr, grad_var ? &*grad_var : nullptr, x,
          norm, weight, bias ? &*bias : nullptr, mean ? &*mean : nullptr,
          a.have_grad_res ? &grad_res : nullptr, a.have_saved_out ? &saved_out : nullptr,
          a.have_pre_act ? &pre_act : nullptr, grad_out_scale ? &*grad_out_scale : nullptr,
          grad_x,
          grad_weight, grad_bias, g_mean, g_scale, g_shift);
    });
  });
  return {grad_x, g_mean, g_scale, g_shift, grad_weight, grad_bias};
}

}  // namespace cpu
}  // namespace convmixer_kernels
