// CPU implementation of pw_stage and pw_stage_backward (docs/OPS.md).
//
// The 1×1 conv is a GEMM on NHWC rows, [N*H*W, Cin] × [Cin, Cout], left to ATen's BLAS
// (at::addmm), which no hand-written CPU loop would beat. What is ours is everything around
// it: the BN1-apply + residual prologue, and the bias/act/statistics epilogue and its backward,
// each a single vectorised pass instead of eager's separate elementwise kernels.
#include "cpu_common.h"
#include "../stage_checks.h"

namespace convmixer_kernels {
namespace cpu {
namespace {

// Rows per parallel_for grain of the row-wise passes: enough work to amortise a thread's start.
constexpr int64_t kRowGrain = 64;

// u = norm_x(x) + norm_res(res) as [rows, Cin] in the storage dtype (the GEMM's A operand).
template <typename scalar_t>
at::Tensor prologue(const PwGeometry& g, const at::Tensor& x2d, const Norm& nx,
                    const at::Tensor* r2d, const Norm& nr) {
  if (!nx.defined() && r2d == nullptr) return x2d;
  using L = Lanes<scalar_t>;
  using opmath_t = typename L::opmath_t;
  using V = typename L::V;
  constexpr int64_t kVS = L::kHalf;
  auto u = at::empty_like(x2d);
  const scalar_t* xp = x2d.data_ptr<scalar_t>();
  const scalar_t* rp = r2d != nullptr ? r2d->data_ptr<scalar_t>() : nullptr;
  scalar_t* up = u.data_ptr<scalar_t>();
  const int64_t C = g.Cin, width = pair_width<scalar_t>(C);
  const PaddedNorm<opmath_t> a(nx, C, width), b(nr, C, width);
  auto apply = [](const PaddedNorm<opmath_t>& nm, int64_t c, V& v0, V& v1) {
    v0 = (v0 - V::loadu(&nm.mean[c])) * V::loadu(&nm.scale[c]) + V::loadu(&nm.shift[c]);
    v1 = (v1 - V::loadu(&nm.mean[c + kVS])) * V::loadu(&nm.scale[c + kVS]) +
         V::loadu(&nm.shift[c + kVS]);
  };
  at::parallel_for(0, g.rows(), kRowGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for_pairs<scalar_t>(C, [&](int64_t c, int64_t n) {
        V v0, v1;
        L::load(xp + r * C + c, n, v0, v1);
        if (a.defined()) apply(a, c, v0, v1);
        if (rp != nullptr) {
          V w0, w1;
          L::load(rp + r * C + c, n, w0, w1);
          if (b.defined()) apply(b, c, w0, w1);
          v0 = v0 + w0, v1 = v1 + w1;
        }
        L::store(up + r * C + c, n, v0, v1);
      });
    }
  });
  return u;
}

at::Tensor gemm_pre_act(const at::Tensor& u, const at::Tensor& w2d,
                        const std::optional<at::Tensor>& bias) {
  return bias.has_value() ? at::addmm(*bias, u, w2d.t()) : at::mm(u, w2d.t());
}

// out = act(p), and the shifted sums of out (as stored) when stats are asked for.
template <typename scalar_t, Act A>
void epilogue_forward(const PwGeometry& g, bool stats, const at::Tensor& p2d,
                      at::Tensor& out2d, at::Tensor& mean, at::Tensor& var) {
  using L = Lanes<scalar_t>;
  using opmath_t = typename L::opmath_t;
  using V = typename L::V;
  constexpr int64_t kVS = L::kHalf;
  const int64_t C = g.Cout, rows = g.rows(), width = pair_width<scalar_t>(C);
  const scalar_t* pp = p2d.data_ptr<scalar_t>();
  scalar_t* op = out2d.data_ptr<scalar_t>();

  // The shift of the sums: the first row of out, as stored.
  std::vector<opmath_t> shift(width, opmath_t(0));
  if (stats && rows > 0) {
    for_pairs<scalar_t>(C, [&](int64_t c, int64_t n) {
      V a, b;
      L::load(pp + c, n, a, b);
      a = act_forward<A>(a), b = act_forward<A>(b);
      L::round(a, b);
      a.store(&shift[c]), b.store(&shift[c + kVS]);
    });
  }
  auto sums = reduce_rows<opmath_t>(rows, C, width, stats ? 2 : 0, [&](int64_t r0, int64_t r1, opmath_t* acc) {
    for (int64_t r = r0; r < r1; ++r) {
      for_pairs<scalar_t>(C, [&](int64_t c, int64_t n) {
        V a, b;
        L::load(pp + r * C + c, n, a, b);
        a = act_forward<A>(a), b = act_forward<A>(b);
        L::store(op + r * C + c, n, a, b);
        if (!stats) return;
        L::round(a, b);
        const V d0 = a - V::loadu(&shift[c]), d1 = b - V::loadu(&shift[c + kVS]);
        (V::loadu(acc + c) + d0).store(acc + c);
        (V::loadu(acc + c + kVS) + d1).store(acc + c + kVS);
        at::vec::fmadd(d0, d0, V::loadu(acc + width + c)).store(acc + width + c);
        at::vec::fmadd(d1, d1, V::loadu(acc + width + c + kVS)).store(acc + width + c + kVS);
      });
    }
  });
  if (stats) {
    std::vector<double> k(shift.begin(), shift.begin() + C);
    std::tie(mean, var) = stats_from_shifted_sums(k, sums.data(), sums.data() + C, C, rows,
                                                  out2d.options(), acc_dtype_for(out2d.scalar_type()));
  }
}

// dP = (grad_out + grad_mean/M + grad_var·2(o - mean)/M) · act'(p), rounded to storage; and
// Σ dP per channel (the bias gradient).
template <typename scalar_t, Act A>
std::vector<double> epilogue_backward(const PwGeometry& g, const at::Tensor& go2d,
                                      const at::Tensor& p2d, const at::Tensor* grad_mean,
                                      const at::Tensor* grad_var, const at::Tensor* mean,
                                      at::Tensor& dp2d) {
  using L = Lanes<scalar_t>;
  using opmath_t = typename L::opmath_t;
  using V = typename L::V;
  constexpr int64_t kVS = L::kHalf;
  const int64_t C = g.Cout, rows = g.rows(), width = pair_width<scalar_t>(C);
  const scalar_t* gop = go2d.data_ptr<scalar_t>();
  const scalar_t* pp = p2d.data_ptr<scalar_t>();
  scalar_t* dpp = dp2d.data_ptr<scalar_t>();
  const opmath_t inv_count = opmath_t(1) / static_cast<opmath_t>(std::max<int64_t>(rows, 1));
  std::vector<opmath_t> const_term(width, opmath_t(0)), lin_term(width, opmath_t(0));
  for (int64_t c = 0; c < C; ++c) {
    if (grad_mean != nullptr) const_term[c] += grad_mean->data_ptr<opmath_t>()[c] * inv_count;
    if (grad_var != nullptr) {
      lin_term[c] = 2 * grad_var->data_ptr<opmath_t>()[c] * inv_count;
      const_term[c] -= lin_term[c] * mean->data_ptr<opmath_t>()[c];
    }
  }
  const bool need_o = grad_var != nullptr;
  return reduce_rows<opmath_t>(rows, C, width, 1, [&](int64_t r0, int64_t r1, opmath_t* acc) {
    for (int64_t r = r0; r < r1; ++r) {
      for_pairs<scalar_t>(C, [&](int64_t c, int64_t n) {
        V p0, p1, d0, d1;
        L::load(pp + r * C + c, n, p0, p1);
        L::load(gop + r * C + c, n, d0, d1);
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
        L::store(dpp + r * C + c, n, d0, d1);
        (V::loadu(acc + c) + d0).store(acc + c);
        (V::loadu(acc + c + kVS) + d1).store(acc + c + kVS);
      });
    }
  });
}

// From dU = dP W: grad_x = dU·scale_x, grad_res = dU·scale_res (or dU itself without a norm),
// and the BN-backward sums Σ dU, Σ dU (x - mean_x), Σ dU (res - mean_res).
template <typename scalar_t>
std::vector<double> through_norms(const PwGeometry& g, const at::Tensor& du2d,
                                  const at::Tensor& x2d, const Norm& nx, const at::Tensor* r2d,
                                  const Norm& nr, at::Tensor* gx2d, at::Tensor* gr2d) {
  using L = Lanes<scalar_t>;
  using opmath_t = typename L::opmath_t;
  using V = typename L::V;
  constexpr int64_t kVS = L::kHalf;
  const int64_t C = g.Cin, width = pair_width<scalar_t>(C);
  const scalar_t* dup = du2d.data_ptr<scalar_t>();
  const scalar_t* xp = x2d.data_ptr<scalar_t>();
  const scalar_t* rp = r2d != nullptr ? r2d->data_ptr<scalar_t>() : nullptr;
  scalar_t* gxp = gx2d != nullptr ? gx2d->data_ptr<scalar_t>() : nullptr;
  scalar_t* grp = gr2d != nullptr ? gr2d->data_ptr<scalar_t>() : nullptr;
  const PaddedNorm<opmath_t> a(nx, C, width), b(nr, C, width);
  const bool res_normed = rp != nullptr && b.defined();
  // acc[k * width + c] += Σ du (k = 0), du (v - mean) (k = 1 for x, 2 for res); and the
  // gradient du·scale of that input stored at out.
  auto through = [&](const PaddedNorm<opmath_t>& nm, const scalar_t* v, scalar_t* out, int k,
                     opmath_t* acc, int64_t c, int64_t n, const V& du0, const V& du1) {
    V v0, v1;
    L::load(v, n, v0, v1);
    opmath_t* s = acc + k * width + c;
    at::vec::fmadd(du0, v0 - V::loadu(&nm.mean[c]), V::loadu(s)).store(s);
    at::vec::fmadd(du1, v1 - V::loadu(&nm.mean[c + kVS]), V::loadu(s + kVS)).store(s + kVS);
    L::store(out, n, du0 * V::loadu(&nm.scale[c]), du1 * V::loadu(&nm.scale[c + kVS]));
  };
  return reduce_rows<opmath_t>(g.rows(), C, width, 3, [&](int64_t r0, int64_t r1, opmath_t* acc) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t off = r * C;
      for_pairs<scalar_t>(C, [&](int64_t c, int64_t n) {
        V du0, du1;
        L::load(dup + off + c, n, du0, du1);
        (V::loadu(acc + c) + du0).store(acc + c);
        (V::loadu(acc + c + kVS) + du1).store(acc + c + kVS);
        if (a.defined()) through(a, xp + off + c, gxp + off + c, 1, acc, c, n, du0, du1);
        if (res_normed) {
          through(b, rp + off + c, grp + off + c, 2, acc, c, n, du0, du1);
        } else if (grp != nullptr) {
          L::store(grp + off + c, n, du0, du1);
        }
      });
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pw_stage(
    const at::Tensor& x_in, const std::optional<at::Tensor>& x_mean,
    const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& x_shift,
    const std::optional<at::Tensor>& res_in, const std::optional<at::Tensor>& res_mean,
    const std::optional<at::Tensor>& res_scale, const std::optional<at::Tensor>& res_shift,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias_in, c10::string_view act_name,
    bool stats, bool keep_pre_act) {
  const PwArgs a = check_pw_stage("pw_stage", x_in, x_mean, x_scale, x_shift, res_in, res_mean,
                                  res_scale, res_shift, weight, bias_in, act_name, stats);
  const PwGeometry& g = a.g;
  const auto acc = a.acc;
  const Norm &nx = a.nx, &nr = a.nr;

  const auto x2d = rows_view(x_in);
  const auto r2d = res_in.has_value() ? std::optional<at::Tensor>(rows_view(*res_in)) : std::nullopt;
  const auto w2d = weight.reshape({g.Cout, g.Cin});
  const auto out_sizes = std::vector<int64_t>{g.N, g.Cout, g.H, g.W};
  auto out2d = at::empty({g.rows(), g.Cout}, x_in.options());
  at::Tensor mean = empty_output(x_in, acc), var = empty_output(x_in, acc), pre_act;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_in.scalar_type(), "pw_stage_cpu", [&] {
    const auto u = prologue<scalar_t>(g, x2d, nx, r2d ? &*r2d : nullptr, nr);
    const auto p2d = gemm_pre_act(u, w2d, bias_in);
    dispatch_act(a.act, [&](auto act) {
      epilogue_forward<scalar_t, decltype(act)::value>(g, stats, p2d, out2d, mean, var);
    });
    pre_act = keep_pre_act ? from_rows(p2d, out_sizes) : empty_output(x_in, x_in.scalar_type());
  });
  return {from_rows(out2d, out_sizes), pre_act, mean, var};
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
                  const std::optional<at::Tensor>& mean_in, c10::string_view act_name) {
  const PwArgs a = check_pw_stage_backward("pw_stage_backward", grad_out, grad_mean_in,
                                           grad_var_in, x_in, x_mean, x_scale, x_shift, res_in,
                                           res_mean, res_scale, res_shift, weight, bias_in,
                                           pre_act_in, mean_in, act_name);
  const PwGeometry& g = a.g;
  const auto acc = a.acc;
  const Norm &nx = a.nx, &nr = a.nr;
  const auto& grad_mean = a.sg.grad_mean;
  const auto& grad_var = a.sg.grad_var;
  const auto& mean = a.sg.mean;
  const bool have_pre_act = a.have_pre_act;

  const auto x2d = rows_view(x_in);
  const auto r2d = res_in.has_value() ? std::optional<at::Tensor>(rows_view(*res_in)) : std::nullopt;
  const auto w2d = weight.reshape({g.Cout, g.Cin});
  const auto go2d = rows_view(grad_out);
  const std::vector<int64_t> in_sizes{g.N, g.Cin, g.H, g.W};
  at::Tensor grad_x, grad_res = empty_output(x_in, x_in.scalar_type()), grad_w, dU;
  std::vector<double> db, norm_sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_in.scalar_type(), "pw_stage_backward_cpu", [&] {
    const auto u = prologue<scalar_t>(g, x2d, nx, r2d ? &*r2d : nullptr, nr);
    const auto p2d = have_pre_act ? rows_view(*pre_act_in) : gemm_pre_act(u, w2d, bias_in);
    auto dp2d = at::empty({g.rows(), g.Cout}, x_in.options());
    db = dispatch_act(a.act, [&](auto act) {
      return epilogue_backward<scalar_t, decltype(act)::value>(
          g, go2d, p2d, grad_mean ? &*grad_mean : nullptr, grad_var ? &*grad_var : nullptr,
          mean ? &*mean : nullptr, dp2d);
    });
    grad_w = dp2d.t().mm(u).view(weight.sizes());
    dU = dp2d.mm(w2d);
    // Outputs may not alias: dU itself is returned at most once.
    at::Tensor gx2d = nx.defined() ? at::empty_like(dU) : dU;
    at::Tensor gr2d;
    if (r2d.has_value()) gr2d = (nr.defined() || !nx.defined()) ? at::empty_like(dU) : dU;
    norm_sums = through_norms<scalar_t>(g, dU, x2d, nx, r2d ? &*r2d : nullptr, nr,
                                        nx.defined() ? &gx2d : nullptr,
                                        (r2d.has_value() && gr2d.data_ptr() != dU.data_ptr()) ? &gr2d : nullptr);
    grad_x = from_rows(gx2d, in_sizes);
    if (r2d.has_value()) grad_res = from_rows(gr2d, in_sizes);
  });

  // The per-channel outputs, written straight from the double sums (no small ATen ops).
  auto vec_tensor = [&](const double* v, int64_t n, at::ScalarType dtype) {
    auto t = at::empty({n}, x_in.options().dtype(dtype));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "pw_stage_backward_vec", [&] {
      auto* p = t.data_ptr<scalar_t>();
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(v[i]);
    });
    return t;
  };
  auto grad_bias = vec_tensor(db.data(), g.Cout, weight.scalar_type());
  auto empty = [&] { return empty_output(x_in, acc); };
  at::Tensor gx_mean = empty(), gx_scale = empty(), gx_shift = empty();
  at::Tensor gr_mean = empty(), gr_scale = empty(), gr_shift = empty();
  // For a norm (mean, scale, shift) of the input: grad_mean = -scale·Σ dU, grad_scale = the
  // centred sum, grad_shift = Σ dU (Σ dU rounded to the accumulation dtype first).
  auto norm_grads = [&](const Norm& n, const double* centred, at::Tensor& gm, at::Tensor& gs,
                        at::Tensor& gt) {
    gt = vec_tensor(norm_sums.data(), g.Cin, acc);
    gs = vec_tensor(centred, g.Cin, acc);
    gm = at::empty({g.Cin}, x_in.options().dtype(acc));
    AT_DISPATCH_FLOATING_TYPES(acc, "pw_stage_backward_norm", [&] {
      const auto* shift = gt.data_ptr<scalar_t>();
      const auto* scale = n.scale.data_ptr<scalar_t>();
      auto* m = gm.data_ptr<scalar_t>();
      for (int64_t c = 0; c < g.Cin; ++c) m[c] = -shift[c] * scale[c];
    });
  };
  if (nx.defined()) norm_grads(nx, norm_sums.data() + g.Cin, gx_mean, gx_scale, gx_shift);
  if (nr.defined()) norm_grads(nr, norm_sums.data() + 2 * g.Cin, gr_mean, gr_scale, gr_shift);
  return {grad_x, gx_mean, gx_scale, gx_shift, grad_res, gr_mean, gr_scale, gr_shift, grad_w, grad_bias};
}

}  // namespace cpu
}  // namespace convmixer_kernels
