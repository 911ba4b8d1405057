// CPU implementation of pw_stage and pw_stage_backward (docs/OPS.md, docs/CPU.md).
//
// The 1×1 conv is a GEMM on NHWC rows, [N*H*W, Cin] × [Cin, Cout], left to ATen's BLAS (MKL's
// sgemm for float, oneDNN for bfloat16), which no hand-written loop here would beat. What is ours
// is everything around it: the BN1-apply + residual prologue, the bias/act/statistics epilogue,
// its backward, and the norm gradients, each a vectorised pass over rows (PwRows).
//
// For float and double the passes and the GEMMs run chunk by chunk of rows (the fused pipeline):
// a chunk's u, p or dP and dU stay in L2 between the GEMMs and the passes around them, so the
// stage reads and writes each activation once instead of materialising u, dP and dU (forward 4
// passes over [rows, C] instead of 7, backward 6 instead of 15). The chunk GEMMs run one per
// thread (MKL is sequential inside a parallel region). bfloat16 and half keep whole-matrix GEMMs:
// oneDNN's per-call cost makes row chunks slower there than the passes they save.
//
// Every per-channel reduction is summed per chunk of rows and the chunks are added in order in
// double, and the weight gradient of the fused pipeline is accumulated over a fixed, shape-given
// set of row groups: results do not depend on the thread count (the whole-matrix GEMMs of the
// bfloat16 path are MKL/oneDNN's own).
#include "cpu_common.h"
#include "../stage_checks.h"

#include <ATen/ThreadLocalState.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>

namespace convmixer_kernels {
namespace cpu {
namespace {

// Rows per chunk of the row passes when they run on their own (bfloat16/half path).
constexpr int64_t kPassRows = 128;
// Bytes of one [rows, C] operand of a fused-pipeline chunk (512 rows at C = 256 in float). Chunks
// of 128 KiB to 2 MiB measured within a few per cent of each other at ConvMixer-256/8's shape:
// smaller ones leave the chunk in L2 but pay more per-GEMM overhead (MKL repacks Wᵀ every call).
constexpr int64_t kChunkBytes = 512 << 10;
// Weight-gradient row groups of the fused pipeline: at most kMaxGroups partial [Cout, Cin] sums,
// and no more than kGroupBytes of them.
constexpr int64_t kMaxGroups = 16;
constexpr int64_t kGroupBytes = 64 << 20;

template <typename scalar_t>
constexpr bool fused_pipeline() {
  return std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;
}

int64_t chunk_rows(int64_t C, int64_t elem) {
  return std::clamp<int64_t>(kChunkBytes / std::max<int64_t>(C * elem, 1) / 16 * 16, 64, 1024);
}

// The row passes of the stage, on blocks of whole rows ([n][C] row-major, C = Cin or Cout), with
// the per-call constants (padded norm vectors, the statistics' gradient terms) set up once.
template <typename scalar_t, Act A>
struct PwRows {
  using L = Lanes<scalar_t>;
  using opmath_t = typename L::opmath_t;
  using V = typename L::V;
  static constexpr int64_t kVS = L::kHalf;

  int64_t Cin, Cout, win, wout;  // channel counts, and padded to whole pairs of lanes
  PaddedNorm<opmath_t> nx, nr;
  std::vector<opmath_t> const_term, lin_term;  // backward: dO = go + const + lin * o
  bool need_o = false;
  // Backward: grad_res is dU itself, the gradient of norm_res(res), and the res norm's sums are
  // not taken (pw_stage_backward's grad_res_normed).
  bool grad_res_normed = false;

  PwRows(const PwGeometry& g, const Norm& x_norm, const Norm& res_norm)
      : Cin(g.Cin),
        Cout(g.Cout),
        win(pair_width<scalar_t>(g.Cin)),
        wout(pair_width<scalar_t>(g.Cout)),
        nx(x_norm, g.Cin, win),
        nr(res_norm, g.Cin, win),
        const_term(wout, opmath_t(0)),
        lin_term(wout, opmath_t(0)) {}

  // The statistics' gradient enters the backward as dO = grad_out + const_term + lin_term * o.
  void set_stat_grads(const at::Tensor* grad_mean, const at::Tensor* grad_var,
                      const at::Tensor* mean, int64_t count) {
    const opmath_t inv = opmath_t(1) / static_cast<opmath_t>(std::max<int64_t>(count, 1));
    for (int64_t c = 0; c < Cout; ++c) {
      if (grad_mean != nullptr) const_term[c] += grad_mean->data_ptr<opmath_t>()[c] * inv;
      if (grad_var != nullptr) {
        lin_term[c] = 2 * grad_var->data_ptr<opmath_t>()[c] * inv;
        const_term[c] -= lin_term[c] * mean->data_ptr<opmath_t>()[c];
      }
    }
    need_o = grad_var != nullptr;
  }

  static void apply(const PaddedNorm<opmath_t>& nm, int64_t c, V& v0, V& v1) {
    v0 = (v0 - V::loadu(&nm.mean[c])) * V::loadu(&nm.scale[c]) + V::loadu(&nm.shift[c]);
    v1 = (v1 - V::loadu(&nm.mean[c + kVS])) * V::loadu(&nm.scale[c + kVS]) +
         V::loadu(&nm.shift[c + kVS]);
  }

  static void add_to(opmath_t* acc, const V& a, const V& b) {
    (V::loadu(acc) + a).store(acc);
    (V::loadu(acc + kVS) + b).store(acc + kVS);
  }

  bool has_prologue(bool residual) const { return nx.defined() || residual; }

  // The bias in opmath lanes (wout, zero-padded), or empty without one.
  std::vector<opmath_t> bias_lanes(const std::optional<at::Tensor>& bias) const {
    std::vector<opmath_t> b;
    if (!bias.has_value()) return b;
    b.assign(wout, opmath_t(0));
    const auto contiguous = bias->contiguous();
    const scalar_t* bp = contiguous.data_ptr<scalar_t>();
    for (int64_t c = 0; c < Cout; ++c) b[c] = static_cast<opmath_t>(bp[c]);
    return b;
  }

  // The prologue on one pair of lanes (k of them valid) at channel c: x and res loaded (res is
  // null without a residual), u = norm_x(x) + norm_res(res).
  void prologue_pair(const scalar_t* x, const scalar_t* res, int64_t c, int64_t k, V (&xv)[2],
                     V (&rv)[2], V (&u)[2]) const {
    L::load(x + c, k, xv[0], xv[1]);
    u[0] = xv[0], u[1] = xv[1];
    if (nx.defined()) apply(nx, c, u[0], u[1]);
    if (res != nullptr) {
      L::load(res + c, k, rv[0], rv[1]);
      V w0 = rv[0], w1 = rv[1];
      if (nr.defined()) apply(nr, c, w0, w1);
      u[0] = u[0] + w0, u[1] = u[1] + w1;
    }
  }

  // u = norm_x(x) + norm_res(res) for n rows, in the storage dtype; res may be null.
  void prologue(const scalar_t* x, const scalar_t* res, scalar_t* u, int64_t n) const {
    for (int64_t r = 0; r < n; ++r, x += Cin, u += Cin, res += res ? Cin : 0) {
      for_pairs<scalar_t>(Cin, [&](int64_t c, int64_t k) {
        V xv[2], rv[2], uv[2];
        prologue_pair(x, res, c, k, xv, rv, uv);
        L::store(u + c, k, uv[0], uv[1]);
      });
    }
  }

  // o = act(p) for n rows. With bias (wout lanes), p = u Wᵀ is completed to u Wᵀ + bias first and
  // stored back (the GEMM then needs no bias pass of its own). With s (3 × wout lanes): the rows'
  // shifted sums of o as stored, s = [K | Σ(o - K) | Σ(o - K)²] with K the first row's o.
  void forward(scalar_t* p, scalar_t* o, int64_t n, const opmath_t* bias, opmath_t* s) const {
    for (int64_t r = 0; r < n; ++r, p += Cout, o += Cout) {
      for_pairs<scalar_t>(Cout, [&](int64_t c, int64_t k) {
        V a, b;
        L::load(p + c, k, a, b);
        if (bias != nullptr) {
          a = a + V::loadu(bias + c), b = b + V::loadu(bias + c + kVS);
          L::round(a, b);
          L::store(p + c, k, a, b);
        }
        a = act_forward<A>(a), b = act_forward<A>(b);
        L::store(o + c, k, a, b);
        if (s == nullptr) return;
        L::round(a, b);
        if (r == 0) a.store(s + c), b.store(s + c + kVS);
        const V d0 = a - V::loadu(s + c), d1 = b - V::loadu(s + c + kVS);
        add_to(s + wout + c, d0, d1);
        add_to(s + 2 * wout + c, d0 * d0, d1 * d1);
      });
    }
  }

  // dP = dO · act'(p) rounded to the storage dtype, for n rows; db += Σ dP (wout lanes). With
  // bias, p is u Wᵀ and the pre-activation is p + bias (rounded as stored).
  void backward(const scalar_t* go, const scalar_t* p, scalar_t* dp, int64_t n,
                const opmath_t* bias, opmath_t* db) const {
    for (int64_t r = 0; r < n; ++r, go += Cout, p += Cout, dp += Cout) {
      for_pairs<scalar_t>(Cout, [&](int64_t c, int64_t k) {
        V p0, p1, d0, d1;
        L::load(p + c, k, p0, p1);
        if (bias != nullptr) {
          p0 = p0 + V::loadu(bias + c), p1 = p1 + V::loadu(bias + c + kVS);
          L::round(p0, p1);
        }
        L::load(go + c, k, d0, d1);
        const ActAt<A, opmath_t> a0(p0), a1(p1);
        d0 = d0 + V::loadu(&const_term[c]), d1 = d1 + V::loadu(&const_term[c + kVS]);
        if (need_o) {
          // The statistics were of the output as stored: round act(p) before using it.
          V o0 = a0.value(), o1 = a1.value();
          L::round(o0, o1);
          d0 = at::vec::fmadd(V::loadu(&lin_term[c]), o0, d0);
          d1 = at::vec::fmadd(V::loadu(&lin_term[c + kVS]), o1, d1);
        }
        d0 = a0.backward(d0), d1 = a1.backward(d1);
        L::round(d0, d1);
        L::store(dp + c, k, d0, d1);
        add_to(db + c, d0, d1);
      });
    }
  }

  // The norm gradients on one pair of lanes at channel c of a row, from its dU (du0, du1) and
  // its x and res lanes: grad_x = dU·scale_x (dU itself without a norm), grad_res likewise (when
  // res is given), and acc (3 × win lanes) += Σ dU, Σ dU (x - mean_x), Σ dU (res - mean_res).
  // gx or gr may alias dur, the row of dU (then dU is the gradient itself and is not copied);
  // gx is null where the caller forms grad_x itself (defer_grad_x): the sums alone.
  void through_pair(const V& du0, const V& du1, const V (&xv)[2], const V (&rv)[2], bool res,
                    const scalar_t* dur, scalar_t* gx, scalar_t* gr, int64_t c, int64_t k,
                    opmath_t* acc) const {
    auto through = [&](const PaddedNorm<opmath_t>& nm, const V (&v)[2], scalar_t* out,
                       opmath_t* sum) {
      if (!nm.defined()) {
        if (out != nullptr && out != dur) L::store(out + c, k, du0, du1);
        return;
      }
      (at::vec::fmadd(du0, v[0] - V::loadu(&nm.mean[c]), V::loadu(sum + c))).store(sum + c);
      (at::vec::fmadd(du1, v[1] - V::loadu(&nm.mean[c + kVS]), V::loadu(sum + c + kVS)))
          .store(sum + c + kVS);
      if (out != nullptr)
        L::store(out + c, k, du0 * V::loadu(&nm.scale[c]), du1 * V::loadu(&nm.scale[c + kVS]));
    };
    add_to(acc + c, du0, du1);
    through(nx, xv, gx, acc + win);
    if (!res) return;
    if (grad_res_normed) {
      if (gr != dur) L::store(gr + c, k, du0, du1);
    } else {
      through(nr, rv, gr, acc + 2 * win);
    }
  }

  // The norm gradients (through_pair) for n rows of dU, x and res (res may be null).
  void through_norms(const scalar_t* du, const scalar_t* x, const scalar_t* res, scalar_t* gx,
                     scalar_t* gr, int64_t n, opmath_t* acc) const {
    for (int64_t r = 0; r < n; ++r) {
      const int64_t off = r * Cin;
      for_pairs<scalar_t>(Cin, [&](int64_t c, int64_t k) {
        V du0, du1, xv[2], rv[2];
        L::load(du + off + c, k, du0, du1);
        if (nx.defined()) L::load(x + off + c, k, xv[0], xv[1]);
        if (res != nullptr && nr.defined() && !grad_res_normed)
          L::load(res + off + c, k, rv[0], rv[1]);
        through_pair(du0, du1, xv, rv, res != nullptr, du + off, gx ? gx + off : nullptr,
                     res ? gr + off : nullptr, c, k, acc);
      });
    }
  }

  // The prologue and the norm gradients in one pass over n rows of x and res (read once): u
  // (when u is not null) as prologue() writes it, and what through_norms() computes from dU.
  void prologue_and_through_norms(const scalar_t* x, const scalar_t* res, const scalar_t* du,
                                  scalar_t* u, scalar_t* gx, scalar_t* gr, int64_t n,
                                  opmath_t* acc) const {
    // res is read for u, or for its norm's sums; not when neither is wanted (grad_res is dU).
    const scalar_t* res_read =
        res != nullptr && (u != nullptr || (nr.defined() && !grad_res_normed)) ? res : nullptr;
    for (int64_t r = 0; r < n; ++r) {
      const int64_t off = r * Cin;
      for_pairs<scalar_t>(Cin, [&](int64_t c, int64_t k) {
        V xv[2], rv[2], uv[2], du0, du1;
        prologue_pair(x + off, res_read ? res_read + off : nullptr, c, k, xv, rv, uv);
        if (u != nullptr) L::store(u + off + c, k, uv[0], uv[1]);
        L::load(du + off + c, k, du0, du1);
        through_pair(du0, du1, xv, rv, res != nullptr, du + off, gx ? gx + off : nullptr,
                     res ? gr + off : nullptr, c, k, acc);
      });
    }
  }
};

// Row chunks: chunk i covers rows [i * size, min((i + 1) * size, rows)).
struct Chunks {
  int64_t rows, size, count;
  Chunks(int64_t rows_, int64_t size_) : rows(rows_), size(size_), count((rows_ + size_ - 1) / size_) {}
  int64_t begin(int64_t i) const { return i * size; }
  int64_t length(int64_t i) const { return std::min(size, rows - i * size); }
};

// Σ over the chunks, in chunk order, in double, of per-chunk sums
// parts[i * stride + offset + k * width + c] for c < C: the totals as [nacc][C].
template <typename opmath_t>
std::vector<double> total_parts(const std::vector<opmath_t>& parts, int64_t chunks, int64_t stride,
                                int64_t offset, int64_t width, int nacc, int64_t C) {
  std::vector<double> total(static_cast<size_t>(nacc * C), 0.0);
  for (int64_t i = 0; i < chunks; ++i) {
    for (int k = 0; k < nacc; ++k) {
      const opmath_t* p = parts.data() + i * stride + offset + k * width;
      for (int64_t c = 0; c < C; ++c) total[k * C + c] += static_cast<double>(p[c]);
    }
  }
  return total;
}

// Whether oneDNN has kernels for `dtype` on this CPU (torch's own test, which Inductor asks too):
// half needs AVX512-FP16 or AMX-FP16, bfloat16 AVX512-BF16 or AMX; elsewhere creating the primitive
// fails (an AMD EPYC with AVX512-BF16 and no FP16 refuses half).
bool onednn_supports(at::ScalarType dtype) {
  const auto ask = [](const char* name) {
    const auto op = c10::Dispatcher::singleton().findSchema({name, ""});
    if (!op.has_value()) return false;
    torch::jit::Stack stack;
    op->callBoxed(&stack);
    return stack[0].toBool();
  };
  static const bool half = ask("mkldnn::_is_mkldnn_fp16_supported");
  static const bool bfloat16 = ask("mkldnn::_is_mkldnn_bf16_supported");
  return dtype == at::kHalf ? half : dtype == at::kBFloat16 ? bfloat16 : false;
}

// p = u Wᵀ + bias for the whole matrix (the bfloat16/half path). With a bias, oneDNN's linear
// (mkldnn::_linear_pointwise, what Inductor calls) adds it inside the GEMM: bitwise what addmm
// gives, without addmm's first pass copying the broadcast bias into the output. A torch without
// that op, or a CPU oneDNN has no kernels of the dtype for, gets addmm.
at::Tensor gemm(const at::Tensor& u, const at::Tensor& w2d, const std::optional<at::Tensor>& bias) {
  if (!bias.has_value()) return at::mm(u, w2d.t());
  static const auto linear =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  if (!linear.has_value() || !w2d.is_contiguous() || !onednn_supports(u.scalar_type()))
    return at::addmm(*bias, u, w2d.t());
  torch::jit::Stack stack{u, w2d, *bias, std::string("none"),
                          c10::List<std::optional<at::Scalar>>(), std::string("")};
  linear->callBoxed(&stack);
  return stack[0].toTensor();
}

at::Tensor rows_of(const at::Tensor& t2d, int64_t begin, int64_t length) {
  return t2d.narrow(0, begin, length);
}

template <typename scalar_t>
scalar_t* ptr_or_null(const at::Tensor* t) {
  return t != nullptr ? t->data_ptr<scalar_t>() : nullptr;
}

// u = the prologue of every row, as one [rows, Cin] matrix (the whole-matrix path), chunk by
// chunk on the pool's threads.
template <typename K, typename scalar_t>
at::Tensor whole_prologue(const K& k, const Chunks& ch, int64_t Cin, const scalar_t* xp,
                          const scalar_t* rp, const at::TensorOptions& opts) {
  at::Tensor u = at::empty({ch.rows, Cin}, opts);
  scalar_t* up = u.data_ptr<scalar_t>();
  at::parallel_for(0, ch.count, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r0 = ch.begin(i);
      k.prologue(xp + r0 * Cin, rp ? rp + r0 * Cin : nullptr, up + r0 * Cin, ch.length(i));
    }
  });
  return u;
}

// The forward: out = act(p), p = u Wᵀ + bias, u the prologue; pre2d = p when keep_pre_act; u2d
// = u when keep_u and there is a prologue (u is x otherwise); the statistics of out into mean and
// var when stats.
template <typename scalar_t, Act A>
void pw_forward(const PwGeometry& g, const at::Tensor& x2d, const Norm& nx, const at::Tensor* r2d,
                const Norm& nr, const at::Tensor& w2d, const std::optional<at::Tensor>& bias,
                bool stats, bool keep_pre_act, bool keep_u, at::Tensor& out2d, at::Tensor& pre2d,
                at::Tensor& u2d, at::Tensor& mean, at::Tensor& var) {
  using K = PwRows<scalar_t, A>;
  using opmath_t = typename K::opmath_t;
  const K k(g, nx, nr);
  const int64_t rows = g.rows();
  const bool prologue = k.has_prologue(r2d != nullptr);
  const scalar_t* xp = x2d.data_ptr<scalar_t>();
  const scalar_t* rp = ptr_or_null<scalar_t>(r2d);
  scalar_t* op = out2d.data_ptr<scalar_t>();
  const auto opts = x2d.options();
  constexpr bool fused = fused_pipeline<scalar_t>();
  const Chunks ch(rows, fused ? chunk_rows(std::max(g.Cin, g.Cout), sizeof(scalar_t)) : kPassRows);
  const int64_t stride = 3 * k.wout;
  // The fused pipeline adds the bias in its row pass, after a plain GEMM: ATen's addmm would
  // first copy the broadcast bias into the output, a pass of its own.
  const auto bias_vec = k.bias_lanes(bias);
  const opmath_t* bias_or_null = bias_vec.empty() ? nullptr : bias_vec.data();
  std::vector<opmath_t> parts(stats ? ch.count * stride : 0, opmath_t(0));
  auto part = [&](int64_t i) { return stats ? parts.data() + i * stride : nullptr; };

  if constexpr (fused) {
    pre2d = at::empty({rows, g.Cout}, opts);
    // A kept u is written whole, each chunk's rows in place of the thread's scratch.
    if (keep_u && prologue) u2d = at::empty({rows, g.Cin}, opts);
    // The chunk GEMMs are ATen ops called from the pool's threads: they must see this thread's
    // dispatch state (below autograd), not a fresh thread's.
    const at::ThreadLocalState tls;
    at::parallel_for(0, ch.count, 1, [&](int64_t i0, int64_t i1) {
      const at::ThreadLocalStateGuard tls_guard(tls);
      const SequentialBlas one_thread;
      at::Tensor ubuf =
          prologue && !u2d.defined() ? at::empty({ch.size, g.Cin}, opts) : at::Tensor();
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r0 = ch.begin(i), n = ch.length(i);
        at::Tensor u = rows_of(x2d, r0, n);
        if (prologue) {
          u = u2d.defined() ? rows_of(u2d, r0, n) : ubuf.narrow(0, 0, n);
          k.prologue(xp + r0 * g.Cin, rp ? rp + r0 * g.Cin : nullptr, u.data_ptr<scalar_t>(), n);
        }
        at::Tensor p = rows_of(pre2d, r0, n);
        at::mm_out(p, u, w2d.t());
        k.forward(p.data_ptr<scalar_t>(), op + r0 * g.Cout, n, bias_or_null, part(i));
      }
    });
  } else {
    const at::Tensor u = prologue ? whole_prologue(k, ch, g.Cin, xp, rp, x2d.options()) : x2d;
    if (keep_u && prologue) u2d = u;
    pre2d = gemm(u, w2d, bias);
    scalar_t* pp = pre2d.data_ptr<scalar_t>();
    at::parallel_for(0, ch.count, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r0 = ch.begin(i);
        k.forward(pp + r0 * g.Cout, op + r0 * g.Cout, ch.length(i), nullptr, part(i));
      }
    });
  }
  if (!keep_pre_act) pre2d = at::Tensor();
  if (!stats) return;
  auto* m = mean.data_ptr<opmath_t>();
  auto* v = var.data_ptr<opmath_t>();
  for (int64_t c = 0; c < g.Cout; ++c) {
    const auto [mc, vc] = merge_shifted_sums(ch.count, [&](int64_t i) {
      const opmath_t* s = parts.data() + i * stride + c;
      return std::make_tuple(s[0], s[k.wout], s[2 * k.wout], ch.length(i));
    });
    m[c] = static_cast<opmath_t>(mc);
    v[c] = static_cast<opmath_t>(vc);
  }
}

// The backward's tensors: gx and gr (gr undefined without a residual), the weight gradient
// [Cout, Cin], and the double sums db [Cout] and norm sums [3][Cin] (Σ dU, Σ dU (x - mean_x),
// Σ dU (res - mean_res)).
struct PwGrads {
  at::Tensor gx, gr, gw;
  std::vector<double> db, norm_sums;
};

template <typename scalar_t, Act A>
PwGrads pw_backward(const PwGeometry& g, const at::Tensor& go2d, const at::Tensor& x2d,
                    const Norm& nx, const at::Tensor* r2d, const Norm& nr, const at::Tensor& w2d,
                    const std::optional<at::Tensor>& bias, const at::Tensor* pre2d,
                    const at::Tensor* u2d, const at::Tensor* grad_mean,
                    const at::Tensor* grad_var, const at::Tensor* mean, bool grad_res_normed,
                    bool write_grad_x) {
  using K = PwRows<scalar_t, A>;
  using opmath_t = typename K::opmath_t;
  K k(g, nx, nr);
  k.grad_res_normed = grad_res_normed;
  k.set_stat_grads(grad_mean, grad_var, mean, g.rows());
  const int64_t rows = g.rows();
  // With the forward's u given (saved_u) there is nothing to form: x and res are still read,
  // for the norms' gradients.
  const bool prologue = k.has_prologue(r2d != nullptr) && u2d == nullptr;
  const scalar_t* xp = x2d.data_ptr<scalar_t>();
  const scalar_t* rp = ptr_or_null<scalar_t>(r2d);
  const scalar_t* gop = go2d.data_ptr<scalar_t>();
  const auto opts = x2d.options();
  constexpr bool fused = fused_pipeline<scalar_t>();
  const Chunks ch(rows, fused ? chunk_rows(std::max(g.Cin, g.Cout), sizeof(scalar_t)) : kPassRows);
  const auto bias_vec = k.bias_lanes(bias);
  const opmath_t* bias_or_null = bias_vec.empty() ? nullptr : bias_vec.data();
  // Per chunk: Σ dP (wout lanes), then the three norm sums (3 × win lanes).
  const int64_t stride = k.wout + 3 * k.win;
  std::vector<opmath_t> parts(ch.count * stride, opmath_t(0));
  auto db_part = [&](int64_t i) { return parts.data() + i * stride; };
  auto norm_part = [&](int64_t i) { return parts.data() + i * stride + k.wout; };

  PwGrads out;
  if constexpr (fused) {
    if (write_grad_x) out.gx = at::empty({rows, g.Cin}, opts);
    if (r2d != nullptr) out.gr = at::empty({rows, g.Cin}, opts);
    scalar_t* gxp = write_grad_x ? out.gx.data_ptr<scalar_t>() : nullptr;
    scalar_t* grp = r2d != nullptr ? out.gr.data_ptr<scalar_t>() : nullptr;
    // Weight-gradient groups: group j accumulates dPᵀu over its chunks, in chunk order.
    const int64_t groups = std::clamp<int64_t>(
        kGroupBytes / std::max<int64_t>(g.Cout * g.Cin * int64_t(sizeof(scalar_t)), 1), 1,
        std::min<int64_t>(kMaxGroups, std::max<int64_t>(ch.count, 1)));
    std::vector<at::Tensor> gw_parts(groups);
    const at::ThreadLocalState tls;  // as in pw_forward
    at::parallel_for(0, groups, 1, [&](int64_t j0, int64_t j1) {
      const at::ThreadLocalStateGuard tls_guard(tls);
      const SequentialBlas one_thread;
      at::Tensor ubuf = prologue ? at::empty({ch.size, g.Cin}, opts) : at::Tensor();
      at::Tensor pbuf = pre2d == nullptr ? at::empty({ch.size, g.Cout}, opts) : at::Tensor();
      at::Tensor dpbuf = at::empty({ch.size, g.Cout}, opts);
      at::Tensor dubuf = at::empty({ch.size, g.Cin}, opts);
      for (int64_t j = j0; j < j1; ++j) {
        // The group's first chunk writes gw (no zero fill), the others add to it.
        at::Tensor gw = at::empty({g.Cout, g.Cin}, opts);
        const int64_t first = j * ch.count / groups, last = (j + 1) * ch.count / groups;
        if (first == last) gw.zero_();  // no rows at all
        for (int64_t i = first; i < last; ++i) {
          const int64_t r0 = ch.begin(i), n = ch.length(i);
          const scalar_t* xr = xp + r0 * g.Cin;
          const scalar_t* rr = rp ? rp + r0 * g.Cin : nullptr;
          at::Tensor u = prologue ? ubuf.narrow(0, 0, n) : rows_of(u2d ? *u2d : x2d, r0, n);
          at::Tensor p;
          if (pre2d != nullptr) {
            p = rows_of(*pre2d, r0, n);
          } else {
            // Recomputing p needs u before anything else.
            if (prologue) k.prologue(xr, rr, u.data_ptr<scalar_t>(), n);
            p = pbuf.narrow(0, 0, n);
            at::mm_out(p, u, w2d.t());
          }
          at::Tensor dp = dpbuf.narrow(0, 0, n), du = dubuf.narrow(0, 0, n);
          k.backward(gop + r0 * g.Cout, p.data_ptr<scalar_t>(), dp.data_ptr<scalar_t>(), n,
                     pre2d == nullptr ? bias_or_null : nullptr, db_part(i));
          at::mm_out(du, dp, w2d);
          // x and res are read once, for u and for the norm gradients together.
          k.prologue_and_through_norms(xr, rr, du.data_ptr<scalar_t>(),
                                       prologue && pre2d != nullptr ? u.data_ptr<scalar_t>() : nullptr,
                                       gxp ? gxp + r0 * g.Cin : nullptr,
                                       grp ? grp + r0 * g.Cin : nullptr, n, norm_part(i));
          if (i == first) {
            at::mm_out(gw, dp.t(), u);
          } else {
            gw.addmm_(dp.t(), u);
          }
        }
        gw_parts[j] = gw;
      }
    });
    // Σ of the groups' partial weight gradients, in group order, in double.
    out.gw = at::empty({g.Cout, g.Cin}, opts);
    scalar_t* gwp = out.gw.data_ptr<scalar_t>();
    std::vector<const scalar_t*> parts_p(groups);
    for (int64_t j = 0; j < groups; ++j) parts_p[j] = gw_parts[j].data_ptr<scalar_t>();
    at::parallel_for(0, g.Cout * g.Cin, 4096, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        double s = 0;
        for (int64_t j = 0; j < groups; ++j) s += static_cast<double>(parts_p[j][e]);
        gwp[e] = static_cast<scalar_t>(s);
      }
    });
  } else {
    const at::Tensor u = prologue ? whole_prologue(k, ch, g.Cin, xp, rp, x2d.options())
                                  : (u2d ? *u2d : x2d);
    const at::Tensor p = pre2d != nullptr ? *pre2d : gemm(u, w2d, bias);
    auto dp = at::empty({rows, g.Cout}, opts);
    const scalar_t* pp = p.data_ptr<scalar_t>();
    scalar_t* dpp = dp.data_ptr<scalar_t>();
    at::parallel_for(0, ch.count, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r0 = ch.begin(i);
        k.backward(gop + r0 * g.Cout, pp + r0 * g.Cout, dpp + r0 * g.Cout, ch.length(i), nullptr,
                   db_part(i));
      }
    });
    out.gw = dp.t().mm(u);
    const auto du = dp.mm(w2d);
    // Outputs may not alias: dU itself is returned at most once, as the gradient of an input
    // without a norm.
    if (write_grad_x) out.gx = nx.defined() ? at::empty_like(du) : du;
    if (r2d != nullptr)
      out.gr = ((nr.defined() && !grad_res_normed) || (!nx.defined() && write_grad_x))
                   ? at::empty_like(du)
                   : du;
    const scalar_t* dup = du.data_ptr<scalar_t>();
    scalar_t* gxp = write_grad_x ? out.gx.data_ptr<scalar_t>() : nullptr;
    scalar_t* grp = r2d != nullptr ? out.gr.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, ch.count, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r0 = ch.begin(i);
        k.through_norms(dup + r0 * g.Cin, xp + r0 * g.Cin, rp ? rp + r0 * g.Cin : nullptr,
                        gxp ? gxp + r0 * g.Cin : nullptr, grp ? grp + r0 * g.Cin : nullptr,
                        ch.length(i), norm_part(i));
      }
    });
  }
  out.db = total_parts(parts, ch.count, stride, 0, k.wout, 1, g.Cout);
  out.norm_sums = total_parts(parts, ch.count, stride, k.wout, k.win, 3, g.Cin);
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pw_stage(
    const at::Tensor& x_in, const std::optional<at::Tensor>& x_mean,
    const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& x_shift,
    const std::optional<at::Tensor>& res_in, const std::optional<at::Tensor>& res_mean,
    const std::optional<at::Tensor>& res_scale, const std::optional<at::Tensor>& res_shift,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias_in, c10::string_view act_name,
    bool stats, bool keep_pre_act, bool keep_u) {
  const PwArgs a = check_pw_stage("pw_stage", x_in, x_mean, x_scale, x_shift, res_in, res_mean,
                                  res_scale, res_shift, weight, bias_in, act_name, stats);
  const PwGeometry& g = a.g;
  const auto acc = a.acc;
  const Norm &nx = a.nx, &nr = a.nr;

  const auto x2d = rows_view(x_in);
  const auto r2d = res_in.has_value() ? std::optional<at::Tensor>(rows_view(*res_in)) : std::nullopt;
  const auto w2d = weight.reshape({g.Cout, g.Cin});
  const auto out_sizes = a.out_sizes();
  auto out2d = at::empty({g.rows(), g.Cout}, x_in.options());
  at::Tensor mean = empty_output(x_in, acc), var = empty_output(x_in, acc), pre2d, u2d;
  if (stats) {
    mean = at::empty({g.Cout}, x_in.options().dtype(acc));
    var = at::empty({g.Cout}, x_in.options().dtype(acc));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_in.scalar_type(), "pw_stage_cpu", [&] {
    dispatch_act(a.act, [&](auto act) {
      pw_forward<scalar_t, decltype(act)::value>(g, x2d, nx, r2d ? &*r2d : nullptr, nr, w2d,
                                                 bias_in, stats, keep_pre_act, keep_u, out2d,
                                                 pre2d, u2d, mean, var);
    });
  });
  auto pre_act = keep_pre_act ? from_rows(pre2d, out_sizes) : empty_output(x_in, x_in.scalar_type());
  auto u = u2d.defined() ? from_rows(u2d, a.in_sizes()) : empty_output(x_in, x_in.scalar_type());
  return {from_rows(out2d, out_sizes), pre_act, mean, var, u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor>
pw_stage_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_mean_in,
                  const std::optional<at::Tensor>& grad_var_in, const at::Tensor& x_in,
                  const std::optional<at::Tensor>& x_mean,
                  const std::optional<at::Tensor>& x_scale,
                  const std::optional<at::Tensor>& x_shift, const std::optional<at::Tensor>& res_in,
                  const std::optional<at::Tensor>& res_mean,
                  const std::optional<at::Tensor>& res_scale,
                  const std::optional<at::Tensor>& res_shift, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias_in, const std::optional<at::Tensor>& pre_act_in,
                  const std::optional<at::Tensor>& mean_in, c10::string_view act_name,
                  const std::optional<at::Tensor>& saved_out_in,
                  const std::optional<at::Tensor>& saved_u_in, bool grad_res_normed,
                  bool write_grad_x) {
  const PwArgs a = check_pw_stage_backward("pw_stage_backward", grad_out, grad_mean_in,
                                           grad_var_in, x_in, x_mean, x_scale, x_shift, res_in,
                                           res_mean, res_scale, res_shift, weight, bias_in,
                                           pre_act_in, mean_in, act_name, saved_out_in,
                                           saved_u_in);
  const PwGeometry& g = a.g;
  const auto acc = a.acc;
  const Norm &nx = a.nx, &nr = a.nr;
  const auto& grad_mean = a.sg.grad_mean;
  const auto& grad_var = a.sg.grad_var;
  const auto& mean = a.sg.mean;

  const auto x2d = rows_view(x_in);
  const auto r2d = res_in.has_value() ? std::optional<at::Tensor>(rows_view(*res_in)) : std::nullopt;
  const auto w2d = weight.reshape({g.Cout, g.Cin});
  const auto go2d = rows_view(grad_out);
  // Where act' follows from the output (relu), the saved output serves as the pre-activation:
  // the backward reads it exactly as it would read p (act(o) = o, o <= 0 exactly where p <= 0).
  std::optional<at::Tensor> pre2d;
  if (a.have_pre_act) {
    pre2d = rows_view(*pre_act_in);
  } else if (a.have_saved_out && derivative_from_output(a.act)) {
    pre2d = rows_view(*saved_out_in);
  }
  const auto u2d = a.have_saved_u ? std::optional<at::Tensor>(rows_view(*saved_u_in)) : std::nullopt;
  const auto in_sizes = a.in_sizes();
  PwGrads gr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_in.scalar_type(), "pw_stage_backward_cpu", [&] {
    dispatch_act(a.act, [&](auto act) {
      gr = pw_backward<scalar_t, decltype(act)::value>(
          g, go2d, x2d, nx, r2d ? &*r2d : nullptr, nr, w2d, bias_in, pre2d ? &*pre2d : nullptr,
          u2d ? &*u2d : nullptr, grad_mean ? &*grad_mean : nullptr, grad_var ? &*grad_var : nullptr,
          mean ? &*mean : nullptr, grad_res_normed, write_grad_x);
    });
  });
  auto grad_x = gr.gx.defined() ? from_rows(gr.gx, in_sizes) : empty_output(x_in, x_in.scalar_type());
  auto grad_res = r2d.has_value() ? from_rows(gr.gr, in_sizes) : empty_output(x_in, x_in.scalar_type());
  auto grad_w = gr.gw.view(weight.sizes());

  // The per-channel outputs, written straight from the double sums (no small ATen ops).
  auto vec_tensor = [&](const double* v, int64_t n, at::ScalarType dtype) {
    auto t = at::empty({n}, x_in.options().dtype(dtype));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "pw_stage_backward_vec", [&] {
      auto* p = t.data_ptr<scalar_t>();
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(v[i]);
    });
    return t;
  };
  auto grad_bias = vec_tensor(gr.db.data(), g.Cout, weight.scalar_type());
  auto empty = [&] { return empty_output(x_in, acc); };
  at::Tensor gx_mean = empty(), gx_scale = empty(), gx_shift = empty();
  at::Tensor gr_mean = empty(), gr_scale = empty(), gr_shift = empty();
  // For a norm (mean, scale, shift) of the input: grad_mean = -scale·Σ dU, grad_scale = the
  // centred sum, grad_shift = Σ dU (Σ dU rounded to the accumulation dtype first).
  auto norm_grads = [&](const Norm& n, const double* centred, at::Tensor& gm, at::Tensor& gs,
                        at::Tensor& gt) {
    gt = vec_tensor(gr.norm_sums.data(), g.Cin, acc);
    gs = vec_tensor(centred, g.Cin, acc);
    gm = at::empty({g.Cin}, x_in.options().dtype(acc));
    AT_DISPATCH_FLOATING_TYPES(acc, "pw_stage_backward_norm", [&] {
      const auto* shift = gt.data_ptr<scalar_t>();
      const auto* scale = n.scale.data_ptr<scalar_t>();
      auto* m = gm.data_ptr<scalar_t>();
      for (int64_t c = 0; c < g.Cin; ++c) m[c] = -shift[c] * scale[c];
    });
  };
  if (nx.defined()) norm_grads(nx, gr.norm_sums.data() + g.Cin, gx_mean, gx_scale, gx_shift);
  if (nr.defined() && !grad_res_normed)
    norm_grads(nr, gr.norm_sums.data() + 2 * g.Cin, gr_mean, gr_scale, gr_shift);
  return {grad_x, gx_mean, gx_scale, gx_shift, grad_res, gr_mean, gr_scale, gr_shift, grad_w, grad_bias};
}

}  // namespace cpu
}  // namespace convmixer_kernels
