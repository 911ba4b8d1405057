// CUDA implementation of pw_stage and pw_stage_backward (docs/OPS.md): the fused kernels' launch
// entries (kernels/pw_launch.cuh) around cuBLAS GEMMs (at::addmm / at::mm), on the current stream.
#include "cuda_common.h"
#include "kernels/pw_launch.cuh"

#include <torch/library.h>

#include <array>

namespace convmixer_kernels {
namespace cuda_ops {
namespace {

namespace pw = ::convmixer_kernels::cuda::pw;

// The [rows, C] row-major matrix of an NHWC tensor (a view when x is channels_last already).
at::Tensor rows_of(const at::Tensor& t) {
  return t.contiguous(at::MemoryFormat::ChannelsLast).permute({0, 2, 3, 1}).reshape({-1, t.size(1)});
}

// The channels_last [N, C, H, W] tensor whose memory is the row-major [rows, C] matrix.
at::Tensor nchw_of(const at::Tensor& rows, at::IntArrayRef nchw) {
  return rows.view({nchw[0], nchw[2], nchw[3], nchw[1]}).permute({0, 3, 1, 2});
}

int x_act_code(std::optional<Act> x_act) {
  return x_act.has_value() ? static_cast<int>(*x_act) : pw::kNoXAct;
}

pw::Problem problem_of(const at::Tensor& like, int64_t rows, int64_t C) {
  pw::Problem p;
  p.dtype = dtype_of(like);
  p.rows = rows;
  p.C = C;
  return p;
}

// u = norm_x(x) + norm_res(res) in the storage dtype, x read as act(x) with an x_act; x itself
// when there is nothing to apply.
at::Tensor prologue(const char* op, const at::Tensor& x2d, const Norm& nx, const at::Tensor& r2d,
                    const Norm& nr, std::optional<Act> x_act) {
  if (!nx.defined() && !r2d.defined() && !x_act.has_value()) return x2d;
  auto u = at::empty_like(x2d);
  pw::Prologue c;
  c.problem = problem_of(x2d, x2d.size(0), x2d.size(1));
  c.x = x2d.data_ptr();
  c.x_norm = norm_ptrs(nx);
  c.res = ptr_or_null(r2d);
  c.res_norm = norm_ptrs(nr);
  c.u = u.data_ptr();
  c.x_act = x_act_code(x_act);
  launch_entry(op, c, x2d, false, x2d.size(0), " rows of ", x2d.size(1), " channels");
  return u;
}

at::Tensor gemm_pre_act(const at::Tensor& u, const at::Tensor& w2d, const at::Tensor& bias) {
  return bias.defined() ? at::addmm(bias, u, w2d.t()) : at::mm(u, w2d.t());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
pw_stage(
    const at::Tensor& x_in, const std::optional<at::Tensor>& x_mean,
    const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& x_shift,
    const std::optional<at::Tensor>& res_in, const std::optional<at::Tensor>& res_mean,
    const std::optional<at::Tensor>& res_scale, const std::optional<at::Tensor>& res_shift,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias_in, c10::string_view act_name,
    bool stats, bool keep_pre_act, bool keep_u, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, std::optional<double> bn_eps,
    const std::optional<c10::string_view>& x_act_name) {
  const char* op = "pw_stage";
  const PwArgs args = check_pw_stage(op, x_in, x_mean, x_scale, x_shift, res_in, res_mean,
                                     res_scale, res_shift, weight, bias_in, act_name, stats);
  const std::optional<Act> x_act = parse_x_act(op, x_act_name);
  const PwGeometry& g = args.g;
  const auto acc = args.acc;
  const BnFoldCall bn(check_bn_fold(op, bn_weight, bn_bias, bn_eps, stats, g.Cout, x_in.device()),
                      g.Cout, x_in, acc);
  const c10::cuda::CUDAGuard guard(x_in.device());

  const auto x2d = rows_of(x_in);
  const auto r2d = res_in.has_value() ? rows_of(*res_in) : at::Tensor();
  const auto w2d = weight.reshape({g.Cout, g.Cin});
  const auto bias = bias_in.has_value() ? *bias_in : at::Tensor();
  const std::vector<int64_t> out_sizes = args.out_sizes();
  auto out2d = at::empty({g.rows(), g.Cout}, x_in.options());
  at::Tensor mean = stats ? at::empty({g.Cout}, x_in.options().dtype(acc)) : empty_output(x_in, acc);
  at::Tensor var = stats ? at::empty({g.Cout}, x_in.options().dtype(acc)) : empty_output(x_in, acc);
  const auto u = prologue(op, x2d, args.nx, r2d, args.nr, x_act);
  const auto p2d = gemm_pre_act(u, w2d, bias);
  pw::EpilogueForward c;
  c.problem = problem_of(x_in, g.rows(), g.Cout);
  c.act = args.act;
  c.pre = p2d.data_ptr();
  c.out = out2d.data_ptr();
  c.mean = stats ? mean.data_ptr() : nullptr;
  c.var = stats ? var.data_ptr() : nullptr;
  c.bn = bn.c;  // scale and shift by the statistics' last CTAs
  launch_entry(op, c, x_in, stats, g.rows(), " rows of ", g.Cout, " channels");
  const at::Tensor pre_act =
      keep_pre_act ? nchw_of(p2d, out_sizes) : empty_output(x_in, x_in.scalar_type());
  // u is written above for the GEMM in any case: handing it over costs no pass, only the memory
  // it keeps (none without a norm, residual or x_act: u is x then, which the backward has). Not
  // told by the pointers: both are null in an empty batch.
  const bool u_written = args.nx.defined() || r2d.defined() || x_act.has_value();
  const at::Tensor u_out = keep_u && u_written ? nchw_of(u, args.in_sizes())
                                               : empty_output(x_in, x_in.scalar_type());
  return {nchw_of(out2d, out_sizes), pre_act, mean, var, u_out, bn.scale, bn.shift};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
pw_stage_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_mean_in,
                  const std::optional<at::Tensor>& grad_var_in, const at::Tensor& x_in,
                  const std::optional<at::Tensor>& x_mean,
                  const std::optional<at::Tensor>& x_scale,
                  const std::optional<at::Tensor>& x_shift, const std::optional<at::Tensor>& res_in,
                  const std::optional<at::Tensor>& res_mean,
                  const std::optional<at::Tensor>& res_scale,
                  const std::optional<at::Tensor>& res_shift, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias_in,
                  const std::optional<at::Tensor>& pre_act_in,
                  const std::optional<at::Tensor>& mean_in, c10::string_view act_name,
                  const std::optional<at::Tensor>& saved_out_in,
                  const std::optional<at::Tensor>& saved_u_in, bool grad_res_normed,
                  const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& grad_shift,
                  const std::optional<at::Tensor>& var,
                  const std::optional<at::Tensor>& bn_weight, std::optional<double> bn_eps,
                  bool defer_grad_x, const std::optional<c10::string_view>& x_act_name) {
  const char* op = "pw_stage_backward";
  const PwArgs args = check_pw_stage_backward(op, grad_out, grad_mean_in, grad_var_in, x_in, x_mean,
                                              x_scale, x_shift, res_in, res_mean, res_scale,
                                              res_shift, weight, bias_in, pre_act_in, mean_in,
                                              act_name, saved_out_in, saved_u_in);
  const PwGeometry& g = args.g;
  const auto acc = args.acc;
  const BnFoldGradCall bn(check_bn_fold_grad(op, grad_scale, grad_shift, var, bn_weight, bn_eps,
                                             args.sg.mean.has_value(), g.Cout, acc, x_in.device()),
                          g.Cout, x_in, acc);
  check_defer_grad_x(op, defer_grad_x, grad_res_normed, res_in.has_value());
  // With x_act, grad_x is act(x)'s gradient: act' is the caller's (docs/OPS.md "Act on load").
  const std::optional<Act> x_act = parse_x_act(op, x_act_name);
  const Norm &nx = args.nx, &nr = args.nr;
  // The res norm's backward, unless the caller takes dU itself as the residual's gradient (the
  // gradient of norm_res(res)) and does that backward elsewhere (grad_res_normed).
  const Norm nr_back = grad_res_normed ? Norm{} : nr;
  const c10::cuda::CUDAGuard guard(x_in.device());

  const auto x2d = rows_of(x_in);
  const auto r2d = res_in.has_value() ? rows_of(*res_in) : at::Tensor();
  const auto w2d = weight.reshape({g.Cout, g.Cin});
  const auto bias = bias_in.has_value() ? *bias_in : at::Tensor();
  const auto go2d = rows_of(grad_out);
  const std::vector<int64_t> in_sizes = args.in_sizes();
  auto grad_bias = at::empty({g.Cout}, weight.options());
  // The norms' gradients, written by the through-norms finalize (empty without that norm).
  auto norm_grads = [&](const Norm& n) {
    std::array<at::Tensor, 3> v;
    for (auto& t : v)
      t = n.defined() ? at::empty({g.Cin}, x_in.options().dtype(acc)) : empty_output(x_in, acc);
    return v;
  };
  const std::array<at::Tensor, 3> gx_norm = norm_grads(nx), gr_norm = norm_grads(nr_back);

  // The forward's u when it was kept (keep_u): recomputing it costs 3E (read x and res, write u)
  // and a launch, keeping it E of memory per block (docs/CUDA.md "pw stage").
  const auto u =
      args.have_saved_u ? rows_of(*saved_u_in) : prologue(op, x2d, nx, r2d, nr, x_act);
  // Where act' follows from the output (relu), the saved output serves as the pre-activation.
  const bool out_as_pre =
      !args.have_pre_act && args.have_saved_out && derivative_from_output(args.act);
  const auto p2d = args.have_pre_act ? rows_of(*pre_act_in)
                   : out_as_pre      ? rows_of(*saved_out_in)
                                     : gemm_pre_act(u, w2d, bias);
  auto dp2d = at::empty({g.rows(), g.Cout}, x_in.options());
  pw::EpilogueBackward e;
  e.problem = problem_of(x_in, g.rows(), g.Cout);
  e.act = args.act;
  e.grad_out = go2d.data_ptr();
  e.pre = p2d.data_ptr();
  e.grad_mean = ptr_or_null(args.sg.grad_mean);
  e.grad_var = ptr_or_null(args.sg.grad_var);
  e.mean = ptr_or_null(args.sg.mean);
  e.grad_pre = dp2d.data_ptr();
  e.grad_bias = grad_bias.data_ptr();
  e.bn = bn.c;
  launch_entry(op, e, x_in, true, g.rows(), " rows of ", g.Cout, " channels");

  const at::Tensor grad_w = dp2d.t().mm(u).view(weight.sizes());
  const auto du = dp2d.mm(w2d);
  // Outputs may not alias: dU itself is returned at most once (as docs/OPS.md's CPU kernels do).
  const bool gx_is_du = !nx.defined() && !defer_grad_x;
  at::Tensor gx2d = defer_grad_x ? at::Tensor() : gx_is_du ? du : at::empty_like(du);
  at::Tensor gr2d;
  if (r2d.defined()) gr2d = (nr_back.defined() || gx_is_du) ? at::empty_like(du) : du;
  const bool write_res = r2d.defined() && gr2d.data_ptr() != du.data_ptr();
  pw::ThroughNorms t;
  t.problem = problem_of(x_in, g.rows(), g.Cin);
  t.grad_u = du.data_ptr();
  t.x = x2d.data_ptr();
  t.x_norm = norm_ptrs(nx);
  t.x_act = x_act_code(x_act);
  t.res = ptr_or_null(r2d);
  t.res_norm = norm_ptrs(nr_back);
  // Deferred: the caller forms dU scale_x on its own load (dw_stage_backward's grad_out_scale).
  t.grad_x = nx.defined() && !defer_grad_x ? gx2d.data_ptr() : nullptr;
  t.grad_res = write_res ? gr2d.data_ptr() : nullptr;
  auto grads_ptrs = [](const Norm& n, const std::array<at::Tensor, 3>& v) {
    return n.defined() ? pw::NormGrads{v[0].data_ptr(), v[1].data_ptr(), v[2].data_ptr()}
                       : pw::NormGrads{};
  };
  t.x_grads = grads_ptrs(nx, gx_norm);
  t.res_grads = grads_ptrs(nr_back, gr_norm);
  // Nothing to write or sum (no norm, grad_x deferred, grad_res dU itself): no launch.
  if (t.grad_x != nullptr || t.grad_res != nullptr || nx.defined() || nr_back.defined())
    launch_entry(op, t, x_in, true, g.rows(), " rows of ", g.Cin, " channels");
  const at::Tensor grad_x =
      defer_grad_x ? empty_output(x_in, x_in.scalar_type()) : nchw_of(gx2d, in_sizes);
  const at::Tensor grad_res =
      r2d.defined() ? nchw_of(gr2d, in_sizes) : empty_output(x_in, x_in.scalar_type());
  return {grad_x,     gx_norm[0], gx_norm[1], gx_norm[2], grad_res,       gr_norm[0],
          gr_norm[1], gr_norm[2], grad_w,     grad_bias,  bn.grad_weight, bn.grad_bias};
}

}  // namespace
}  // namespace cuda_ops
}  // namespace convmixer_kernels

TORCH_LIBRARY_IMPL(convmixer_kernels, CUDA, m) {
  m.impl("pw_stage", &convmixer_kernels::cuda_ops::pw_stage);
  m.impl("pw_stage_backward", &convmixer_kernels::cuda_ops::pw_stage_backward);
}
