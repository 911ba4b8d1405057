// CUDA implementation of dw_stage and dw_stage_backward (docs/OPS.md): checks, allocation, and the
// stage's launch entries (kernels/dw_launch.cuh) on the current stream.
#include "cuda_common.h"
#include "kernels/dw_launch.cuh"

#include <torch/library.h>

namespace convmixer_kernels {
namespace cuda_ops {
namespace {

namespace dw = ::convmixer_kernels::cuda::dw;

dw::Problem problem_of(const DwGeometry& g, const at::Tensor& x) {
  dw::Problem p;
  p.dtype = dtype_of(x);
  p.N = g.N;
  p.C = g.C;
  p.H = g.H;
  p.W = g.W;
  p.K = int(g.k);
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_stage(
    const at::Tensor& x_in, const std::optional<at::Tensor>& x_mean,
    const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& x_shift,
    const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
    c10::string_view act_name, bool stats, bool keep_pre_act,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    std::optional<double> bn_eps, bool write_out) {
  const char* op = "dw_stage";
  const DwArgs a = check_dw_stage(op, x_in, x_mean, x_scale, x_shift, weight_in, bias_in, act_name,
                                  stats);
  check_write_out(op, write_out, keep_pre_act);
  const DwGeometry& g = a.g;
  const BnFoldCall bn(check_bn_fold(op, bn_weight, bn_bias, bn_eps, stats, g.C, x_in.device()),
                      g.C, x_in, a.acc);
  const c10::cuda::CUDAGuard guard(x_in.device());

  const auto x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const auto weight = weight_in.contiguous();
  const auto bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const auto cl = x.options().memory_format(at::MemoryFormat::ChannelsLast);
  // Without out (write_out=False) the pre-activation is the output its consumer reads through act.
  at::Tensor out = write_out ? at::empty(x.sizes(), cl) : empty_output(x, x.scalar_type());
  at::Tensor pre_act = keep_pre_act ? at::empty(x.sizes(), cl) : empty_output(x, x.scalar_type());
  at::Tensor mean = stats ? at::empty({g.C}, x.options().dtype(a.acc)) : empty_output(x, a.acc);
  at::Tensor var = stats ? at::empty({g.C}, x.options().dtype(a.acc)) : empty_output(x, a.acc);

  dw::Forward c;
  c.problem = problem_of(g, x);
  c.act = a.act;
  c.x = x.data_ptr();
  c.norm = norm_ptrs(a.norm);
  c.weight = weight.data_ptr();
  c.bias = ptr_or_null(bias);
  c.out = write_out ? out.data_ptr() : nullptr;
  c.mean = stats ? mean.data_ptr() : nullptr;
  c.var = stats ? var.data_ptr() : nullptr;
  c.pre_act = keep_pre_act ? pre_act.data_ptr() : nullptr;
  c.bn = bn.c;  // scale and shift by the statistics' last CTAs
  launch_entry(op, c, x, stats, "input ", x.sizes(), " of dtype ", x.scalar_type(),
               " with kernel size ", g.k);
  return {out, pre_act, mean, var, bn.scale, bn.shift};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
dw_stage_backward(const at::Tensor& grad_out_in, const std::optional<at::Tensor>& grad_mean_in,
                  const std::optional<at::Tensor>& grad_var_in, const at::Tensor& x_in,
                  const std::optional<at::Tensor>& x_mean,
                  const std::optional<at::Tensor>& x_scale,
                  const std::optional<at::Tensor>& x_shift, const at::Tensor& weight_in,
                  const std::optional<at::Tensor>& bias_in,
                  const std::optional<at::Tensor>& mean_in, c10::string_view act_name,
                  const std::optional<at::Tensor>& grad_res_in,
                  const std::optional<at::Tensor>& saved_out_in,
                  const std::optional<at::Tensor>& pre_act_in,
                  const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& grad_shift,
                  const std::optional<at::Tensor>& var,
                  const std::optional<at::Tensor>& bn_weight, std::optional<double> bn_eps,
                  const std::optional<at::Tensor>& grad_out_scale_in) {
  const char* op = "dw_stage_backward";
  const DwArgs a = check_dw_stage_backward(op, grad_out_in, grad_mean_in, grad_var_in, x_in, x_mean,
                                           x_scale, x_shift, weight_in, bias_in, mean_in, act_name,
                                           grad_res_in, saved_out_in, pre_act_in);
  const DwGeometry& g = a.g;
  const Norm& norm = a.norm;
  const BnFoldGradCall bn(check_bn_fold_grad(op, grad_scale, grad_shift, var, bn_weight, bn_eps,
                                             a.sg.mean.has_value(), g.C, a.acc, x_in.device()),
                          g.C, x_in, a.acc);
  const auto grad_out_scale = check_grad_out_scale(op, grad_out_scale_in, g.C, a.acc,
                                                   x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());

  const auto x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const auto grad_out = grad_out_in.contiguous(at::MemoryFormat::ChannelsLast);
  const auto cl_or_none = [](bool given, const std::optional<at::Tensor>& t) {
    return given ? t->contiguous(at::MemoryFormat::ChannelsLast) : at::Tensor();
  };
  const auto grad_res = cl_or_none(a.have_grad_res, grad_res_in);
  const auto saved_out = cl_or_none(a.have_saved_out, saved_out_in);
  const auto pre_act = cl_or_none(a.have_pre_act, pre_act_in);
  const auto weight = weight_in.contiguous();
  const auto bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const auto cl = x.options().memory_format(at::MemoryFormat::ChannelsLast);
  auto grad_x = at::empty(x.sizes(), cl);
  auto grad_weight = at::empty(weight_in.sizes(), weight.options());
  auto grad_bias = at::empty({g.C}, weight.options());
  // The norm's gradients: the kernels' finalize writes all three (grad_scale and grad_shift are
  // the two sums themselves).
  at::Tensor sum_dx, sum_dx_xc, g_mean_out;
  if (norm.defined()) {
    sum_dx = at::empty({g.C}, x.options().dtype(a.acc));
    sum_dx_xc = at::empty({g.C}, x.options().dtype(a.acc));
    g_mean_out = at::empty({g.C}, x.options().dtype(a.acc));
  }

  dw::Backward c;
  c.problem = problem_of(g, x);
  c.act = a.act;
  c.grad_out = grad_out.data_ptr();
  c.grad_mean = ptr_or_null(a.sg.grad_mean);
  c.grad_var = ptr_or_null(a.sg.grad_var);
  c.mean = ptr_or_null(a.sg.mean);
  c.out = ptr_or_null(saved_out);  // ReLU then skips the conv recompute; GELU ignores it
  c.x = x.data_ptr();
  c.norm = norm_ptrs(norm);
  c.weight = weight.data_ptr();
  c.bias = ptr_or_null(bias);
  c.grad_x = grad_x.data_ptr();
  c.grad_weight = grad_weight.data_ptr();
  c.grad_bias = grad_bias.data_ptr();
  c.sum_dx = out_ptr_or_null(sum_dx);
  c.sum_dx_xc = out_ptr_or_null(sum_dx_xc);
  c.grad_norm_mean = out_ptr_or_null(g_mean_out);
  c.grad_res = ptr_or_null(grad_res);
  c.pre_act = ptr_or_null(pre_act);  // read instead of recomputing the conv
  c.bn = bn.c;
  c.grad_out_scale = ptr_or_null(grad_out_scale);  // grad_out is dU: scaled on load
  // dA between the two kernels; with a kept, one kernel forms it on chip (fused_backward).
  at::Tensor grad_pre;
  if (!dw::fused_backward(c)) {
    grad_pre = at::empty(x.sizes(), cl);
    c.grad_pre = grad_pre.data_ptr();
  }
  launch_entry(op, c, x, true, "input ", x.sizes(), " of dtype ", x.scalar_type(),
               " with kernel size ", g.k);

  at::Tensor g_mean = empty_output(x, a.acc), g_scale = empty_output(x, a.acc),
             g_shift = empty_output(x, a.acc);
  if (norm.defined()) {
    g_mean = g_mean_out;
    g_scale = sum_dx_xc;
    g_shift = sum_dx;
  }
  return {grad_x, g_mean, g_scale, g_shift, grad_weight, grad_bias, bn.grad_weight, bn.grad_bias};
}

}  // namespace
}  // namespace cuda_ops
}  // namespace convmixer_kernels

TORCH_LIBRARY_IMPL(convmixer_kernels, CUDA, m) {
  m.impl("dw_stage", &convmixer_kernels::cuda_ops::dw_stage);
  m.impl("dw_stage_backward", &convmixer_kernels::cuda_ops::dw_stage_backward);
}
