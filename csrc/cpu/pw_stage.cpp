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

// Pointers to a norm's vectors, or nulls.
template <typename T>
struct NormPtrs {
  const T *mean = nullptr, *scale = nullptr, *shift = nullptr;
  explicit NormPtrs(const Norm& n) {
    if (n.defined()) {
      mean = n.mean.data_ptr<T>();
      scale = n.scale.data_ptr<T>();
      shift = n.shift.data_ptr<T>();
    }
  }
};

// u = norm_x(x) + norm_res(res) as [rows, Cin] in the storage dtype (the GEMM's A operand).
template <typename scalar_t>
at::Tensor prologue(const PwGeometry& g, const at::Tensor& x2d, const Norm& nx,
                    const at::Tensor* r2d, const Norm& nr) {
  if (!nx.defined() && r2d == nullptr) return x2d;
  using opmath_t = at::opmath_type<scalar_t>;
  auto u = at::empty_like(x2d);
  const scalar_t* xp = x2d.data_ptr<scalar_t>();
  const scalar_t* rp = r2d != nullptr ? r2d->data_ptr<scalar_t>() : nullptr;
  scalar_t* up = u.data_ptr<scalar_t>();
  const NormPtrs<opmath_t> a(nx), b(nr);
  const int64_t C = g.Cin;
  at::parallel_for(0, g.rows(), 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* xr = xp + r * C;
      scalar_t* ur = up + r * C;
      for (int64_t c = 0; c < C; ++c) {
        opmath_t v = static_cast<opmath_t>(xr[c]);
        if (a.mean != nullptr) v = (v - a.mean[c]) * a.scale[c] + a.shift[c];
        if (rp != nullptr) {
          opmath_t w = static_cast<opmath_t>(rp[r * C + c]);
          if (b.mean != nullptr) w = (w - b.mean[c]) * b.scale[c] + b.shift[c];
          v += w;
        }
        ur[c] = static_cast<scalar_t>(v);
      }
    }
  });
  return u;
}

at::Tensor gemm_pre_act(const at::Tensor& u, const at::Tensor& w2d,
                        const std::optional<at::Tensor>& bias) {
  return bias.has_value() ? at::addmm(*bias, u, w2d.t()) : at::mm(u, w2d.t());
}

// Loads n storage values into opmath lanes.
template <typename scalar_t, typename opmath_t>
inline void load_row(const scalar_t* src, opmath_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<opmath_t>(src[i]);
}

// out = act(p), and the shifted sums of out (as stored) when stats are asked for.
template <typename scalar_t, Act A>
void epilogue_forward(const PwGeometry& g, bool stats, const at::Tensor& p2d,
                      at::Tensor& out2d, at::Tensor& mean, at::Tensor& var) {
  using opmath_t = at::opmath_type<scalar_t>;
  using V = Vec<opmath_t>;
  const int64_t C = g.Cout, rows = g.rows();
  const scalar_t* pp = p2d.data_ptr<scalar_t>();
  scalar_t* op = out2d.data_ptr<scalar_t>();

  // act(p) of a row into vals, rounded to the storage dtype.
  auto activate = [&](int64_t r, opmath_t* vals) {
    load_row(pp + r * C, vals, C);
    int64_t c = 0;
    for (; c + V::size() <= C; c += V::size()) act_forward<A>(V::loadu(vals + c)).store(vals + c);
    if (c < C) act_forward<A>(V::loadu(vals + c, C - c)).store(vals + c, C - c);
    round_to_storage<scalar_t>(vals, C);
  };
  std::vector<double> shift(C, 0.0);
  if (stats && rows > 0) {
    std::vector<opmath_t> first(C);
    activate(0, first.data());
    std::copy(first.begin(), first.end(), shift.begin());
  }
  auto sums = reduce_rows<opmath_t>(rows, C, stats ? 2 : 0, [&](int64_t r0, int64_t r1, opmath_t* acc) {
    std::vector<opmath_t> vals(C), k(shift.begin(), shift.end());
    for (int64_t r = r0; r < r1; ++r) {
      activate(r, vals.data());
      scalar_t* dst = op + r * C;
      for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(vals[c]);
      if (!stats) continue;
      for (int64_t c = 0; c < C; ++c) {
        const opmath_t d = vals[c] - k[c];
        acc[c] += d;
        acc[C + c] += d * d;
      }
    }
  });
  if (stats) {
    std::tie(mean, var) = stats_from_shifted_sums(shift, sums.data(), sums.data() + C, C, rows,
                                                  out2d.options());
  }
}

// dP = (grad_out + grad_mean/M + grad_var·2(o - mean)/M) · act'(p), rounded to storage; and
// Σ dP per channel (the bias gradient).
template <typename scalar_t, Act A>
std::vector<double> epilogue_backward(const PwGeometry& g, const at::Tensor& go2d,
                                      const at::Tensor& p2d, const at::Tensor* grad_mean,
                                      const at::Tensor* grad_var, const at::Tensor* mean,
                                      at::Tensor& dp2d) {
  using opmath_t = at::opmath_type<scalar_t>;
  using V = Vec<opmath_t>;
  const int64_t C = g.Cout, rows = g.rows();
  const scalar_t* gop = go2d.data_ptr<scalar_t>();
  const scalar_t* pp = p2d.data_ptr<scalar_t>();
  scalar_t* dpp = dp2d.data_ptr<scalar_t>();
  const opmath_t inv_count = opmath_t(1) / static_cast<opmath_t>(std::max<int64_t>(rows, 1));
  std::vector<opmath_t> const_term(C, opmath_t(0)), lin_term(C, opmath_t(0));
  for (int64_t c = 0; c < C; ++c) {
    if (grad_mean != nullptr) const_term[c] += grad_mean->data_ptr<opmath_t>()[c] * inv_count;
    if (grad_var != nullptr) {
      lin_term[c] = 2 * grad_var->data_ptr<opmath_t>()[c] * inv_count;
      const_term[c] -= lin_term[c] * mean->data_ptr<opmath_t>()[c];
    }
  }
  const bool need_o = grad_var != nullptr;
  return reduce_rows<opmath_t>(rows, C, 1, [&](int64_t r0, int64_t r1, opmath_t* acc) {
    std::vector<opmath_t> pv(C), ov(C), dv(C);
    for (int64_t r = r0; r < r1; ++r) {
      load_row(pp + r * C, pv.data(), C);
      load_row(gop + r * C, dv.data(), C);
      auto step = [&](int64_t c, int64_t n) {
        const ActAt<A, opmath_t> at_p(V::loadu(&pv[c], n));
        V dO = V::loadu(&dv[c], n) + V::loadu(&const_term[c], n);
        if (need_o) {
          // The statistics were of the output as stored: round act(p) before using it.
          at_p.value().store(&ov[c], n);
          round_to_storage<scalar_t>(&ov[c], n);
          dO = at::vec::fmadd(V::loadu(&lin_term[c], n), V::loadu(&ov[c], n), dO);
        }
        at_p.backward(dO).store(&dv[c], n);
      };
      int64_t c = 0;
      for (; c + V::size() <= C; c += V::size()) step(c, V::size());
      if (c < C) step(c, C - c);
      round_to_storage<scalar_t>(dv.data(), C);
      scalar_t* dst = dpp + r * C;
      for (int64_t k = 0; k < C; ++k) {
        dst[k] = static_cast<scalar_t>(dv[k]);
        acc[k] += dv[k];
      }
    }
  });
}

// From dU = dP W: grad_x = dU·scale_x, grad_res = dU·scale_res (or dU itself without a norm),
// and the BN-backward sums Σ dU, Σ dU (x - mean_x), Σ dU (res - mean_res).
template <typename scalar_t>
std::vector<double> through_norms(const PwGeometry& g, const at::Tensor& du2d,
                                  const at::Tensor& x2d, const Norm& nx, const at::Tensor* r2d,
                                  const Norm& nr, at::Tensor* gx2d, at::Tensor* gr2d) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t C = g.Cin;
  const scalar_t* dup = du2d.data_ptr<scalar_t>();
  const scalar_t* xp = x2d.data_ptr<scalar_t>();
  const scalar_t* rp = r2d != nullptr ? r2d->data_ptr<scalar_t>() : nullptr;
  scalar_t* gxp = gx2d != nullptr ? gx2d->data_ptr<scalar_t>() : nullptr;
  scalar_t* grp = gr2d != nullptr ? gr2d->data_ptr<scalar_t>() : nullptr;
  const NormPtrs<opmath_t> a(nx), b(nr);
  return reduce_rows<opmath_t>(g.rows(), C, 3, [&](int64_t r0, int64_t r1, opmath_t* acc) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t off = r * C;
      for (int64_t c = 0; c < C; ++c) {
        const opmath_t du = static_cast<opmath_t>(dup[off + c]);
        acc[c] += du;
        if (a.mean != nullptr) {
          acc[C + c] += du * (static_cast<opmath_t>(xp[off + c]) - a.mean[c]);
          gxp[off + c] = static_cast<scalar_t>(du * a.scale[c]);
        }
        if (rp != nullptr && b.mean != nullptr) {
          acc[2 * C + c] += du * (static_cast<opmath_t>(rp[off + c]) - b.mean[c]);
          grp[off + c] = static_cast<scalar_t>(du * b.scale[c]);
        } else if (grp != nullptr) {
          grp[off + c] = dup[off + c];
        }
      }
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
  if (stats) {
    mean = mean.to(acc);
    var = var.to(acc);
  }
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

  auto vec_tensor = [&](const double* v, int64_t n, at::ScalarType dtype) {
    auto t = at::empty({n}, x_in.options().dtype(at::kDouble));
    std::copy(v, v + n, t.data_ptr<double>());
    return t.to(dtype);
  };
  auto grad_bias = vec_tensor(db.data(), g.Cout, weight.scalar_type());
  auto empty = [&] { return empty_output(x_in, acc); };
  at::Tensor gx_mean = empty(), gx_scale = empty(), gx_shift = empty();
  at::Tensor gr_mean = empty(), gr_scale = empty(), gr_shift = empty();
  const auto sum_du = vec_tensor(norm_sums.data(), g.Cin, acc);
  if (nx.defined()) {
    gx_mean = -sum_du * nx.scale;
    gx_scale = vec_tensor(norm_sums.data() + g.Cin, g.Cin, acc);
    gx_shift = sum_du.clone();
  }
  if (nr.defined()) {
    gr_mean = -sum_du * nr.scale;
    gr_scale = vec_tensor(norm_sums.data() + 2 * g.Cin, g.Cin, acc);
    gr_shift = sum_du.clone();
  }
  return {grad_x, gx_mean, gx_scale, gx_shift, grad_res, gr_mean, gr_scale, gr_shift, grad_w, grad_bias};
}

}  // namespace cpu
}  // namespace convmixer_kernels
