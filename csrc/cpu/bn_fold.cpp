// The stage ops on the CPU with their output's BatchNorm folded in (bn_ops.h BnFold): the stage's
// own implementation (dw_stage.cpp, pw_stage.cpp) and the BatchNorm glue's (bn_ops.cpp) one after
// the other. On the CPU a glue call costs a loop over C, not a launch, so this is where the fold
// is composed rather than fused; the CUDA kernels fuse it (kernels/bn_math.cuh). So is the link's
// act on load: write_out=False drops out after the stage wrote it, and x_act reads x through
// act_of, a pass of its own (the CUDA kernels apply act on their loads; the model asks for the
// link only there, ops/block.py).
#include "../bn_ops.h"
#include "../ops.h"
#include "../stage_checks.h"

#include <ATen/ATen.h>

namespace convmixer_kernels {
namespace cpu {
namespace with_bn {
namespace {

int64_t channels_of(const at::Tensor& weight) { return weight.dim() >= 1 ? weight.size(0) : 0; }

// scale and shift of the batch var, or two empty outputs without a fold.
std::tuple<at::Tensor, at::Tensor> fold_forward(const BnFold& f, const at::Tensor& var) {
  if (!f.on) return {empty_output(var, var.scalar_type()), empty_output(var, var.scalar_type())};
  return cpu::bn_scale_shift(var, f.weight, f.bias, f.eps, var.scalar_type());
}

// The statistics' grad_var with the BatchNorm's added, and its weight's and bias's gradients
// (empty without a weight, or without a fold).
struct FoldedGrads {
  std::optional<at::Tensor> grad_var;
  at::Tensor grad_weight, grad_bias;
};

FoldedGrads fold_backward(const char* op, const BnFoldGrad& f,
                          const std::optional<at::Tensor>& grad_var, at::ScalarType acc,
                          const at::Tensor& like) {
  if (!f.on) return {grad_var, empty_output(like, acc), empty_output(like, acc)};
  // The stage checks grad_var after this sum: its shape first, or a [1] would broadcast.
  if (grad_var.has_value() && grad_var->numel() > 0) {
    TORCH_CHECK_VALUE(grad_var->dim() == 1 && grad_var->size(0) == f.var.size(0), op,
                      ": grad_var must be [", f.var.size(0), "], got ", grad_var->sizes());
  }
  // bn_scale_shift_backward learns from its bias only whether the norm is affine; the weight
  // stands in for it, so grad_bias comes back in the weight's dtype, as the parameters share one.
  auto [gv, gw, gb] = cpu::bn_scale_shift_backward(f.grad_scale, f.grad_shift, f.var, f.weight,
                                                   f.weight, f.eps, acc);
  const bool own = grad_var.has_value() && grad_var->numel() > 0;
  return {own ? *grad_var + gv : gv, gw, gb};
}

bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->numel() > 0; }

// The x a pw stage reads: act(x) with an x_act, else x itself.
at::Tensor read_x(const char* op, const at::Tensor& x,
                  const std::optional<c10::string_view>& x_act) {
  const std::optional<Act> act = parse_x_act(op, x_act);
  return act.has_value() ? cpu::act_of(x, *act) : x;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_stage(
    const at::Tensor& x, const std::optional<at::Tensor>& x_mean,
    const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& x_shift,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, c10::string_view act,
    bool stats, bool keep_pre_act, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, std::optional<double> bn_eps, bool write_out) {
  check_write_out("dw_stage", write_out, keep_pre_act);
  const BnFold f = check_bn_fold("dw_stage", bn_weight, bn_bias, bn_eps, stats,
                                 channels_of(weight), x.device());
  auto [out, pre_act, mean, var] =
      cpu::dw_stage(x, x_mean, x_scale, x_shift, weight, bias, act, stats, keep_pre_act);
  if (!write_out) out = empty_output(x, x.scalar_type());
  auto [scale, shift] = fold_forward(f, var);
  return {out, pre_act, mean, var, scale, shift};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
dw_stage_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_mean,
                  const std::optional<at::Tensor>& grad_var, const at::Tensor& x,
                  const std::optional<at::Tensor>& x_mean,
                  const std::optional<at::Tensor>& x_scale,
                  const std::optional<at::Tensor>& x_shift, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mean,
                  c10::string_view act, const std::optional<at::Tensor>& grad_res,
                  const std::optional<at::Tensor>& saved_out,
                  const std::optional<at::Tensor>& pre_act,
                  const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& grad_shift,
                  const std::optional<at::Tensor>& var, const std::optional<at::Tensor>& bn_weight,
                  std::optional<double> bn_eps, const std::optional<at::Tensor>& grad_out_scale) {
  const at::ScalarType acc = acc_dtype_for(x.scalar_type());
  const BnFoldGrad f = check_bn_fold_grad("dw_stage_backward", grad_scale, grad_shift, var,
                                          bn_weight, bn_eps, given(mean), channels_of(weight), acc,
                                          x.device());
  const FoldedGrads b = fold_backward("dw_stage_backward", f, grad_var, acc, x);
  auto [gx, gm, gs, gt, gw, gb] =
      cpu::dw_stage_backward(grad_out, grad_mean, b.grad_var, x, x_mean, x_scale, x_shift, weight,
                             bias, mean, act, grad_res, saved_out, pre_act, grad_out_scale);
  return {gx, gm, gs, gt, gw, gb, b.grad_weight, b.grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
pw_stage(const at::Tensor& x, const std::optional<at::Tensor>& x_mean,
         const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& x_shift,
         const std::optional<at::Tensor>& res, const std::optional<at::Tensor>& res_mean,
         const std::optional<at::Tensor>& res_scale, const std::optional<at::Tensor>& res_shift,
         const at::Tensor& weight, const std::optional<at::Tensor>& bias, c10::string_view act,
         bool stats, bool keep_pre_act, bool keep_u, const std::optional<at::Tensor>& bn_weight,
         const std::optional<at::Tensor>& bn_bias, std::optional<double> bn_eps,
         const std::optional<c10::string_view>& x_act) {
  const BnFold f = check_bn_fold("pw_stage", bn_weight, bn_bias, bn_eps, stats,
                                 channels_of(weight), x.device());
  const at::Tensor xa = read_x("pw_stage", x, x_act);
  auto [out, pre_act, mean, var, u] =
      cpu::pw_stage(xa, x_mean, x_scale, x_shift, res, res_mean, res_scale, res_shift, weight,
                    bias, act, stats, keep_pre_act, keep_u);
  // Without a norm or residual u is the stage's x, which here is act(x): kept as u then.
  if (keep_u && !x_mean.has_value() && !res.has_value() && x_act.has_value()) u = xa;
  auto [scale, shift] = fold_forward(f, var);
  return {out, pre_act, mean, var, u, scale, shift};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
pw_stage_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_mean,
                  const std::optional<at::Tensor>& grad_var, const at::Tensor& x,
                  const std::optional<at::Tensor>& x_mean,
                  const std::optional<at::Tensor>& x_scale,
                  const std::optional<at::Tensor>& x_shift, const std::optional<at::Tensor>& res,
                  const std::optional<at::Tensor>& res_mean,
                  const std::optional<at::Tensor>& res_scale,
                  const std::optional<at::Tensor>& res_shift, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& pre_act,
                  const std::optional<at::Tensor>& mean, c10::string_view act,
                  const std::optional<at::Tensor>& saved_out,
                  const std::optional<at::Tensor>& saved_u, bool grad_res_normed,
                  const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& grad_shift,
                  const std::optional<at::Tensor>& var, const std::optional<at::Tensor>& bn_weight,
                  std::optional<double> bn_eps, bool defer_grad_x,
                  const std::optional<c10::string_view>& x_act) {
  const at::ScalarType acc = acc_dtype_for(x.scalar_type());
  check_defer_grad_x("pw_stage_backward", defer_grad_x, grad_res_normed, res.has_value());
  const BnFoldGrad f = check_bn_fold_grad("pw_stage_backward", grad_scale, grad_shift, var,
                                          bn_weight, bn_eps, given(mean), channels_of(weight), acc,
                                          x.device());
  const FoldedGrads b = fold_backward("pw_stage_backward", f, grad_var, acc, x);
  // With x_act, grad_x is act(x)'s gradient: act' is the caller's (docs/OPS.md).
  const at::Tensor xa = read_x("pw_stage_backward", x, x_act);
  auto [gx, gxm, gxs, gxt, gr, grm, grs, grt, gw, gb] = cpu::pw_stage_backward(
      grad_out, grad_mean, b.grad_var, xa, x_mean, x_scale, x_shift, res, res_mean, res_scale,
      res_shift, weight, bias, pre_act, mean, act, saved_out, saved_u, grad_res_normed,
      !defer_grad_x);  // deferred, grad_x is the caller's to form: the rows write only its sums
  return {gx, gxm, gxs, gxt, gr, grm, grs, grt, gw, gb, b.grad_weight, b.grad_bias};
}

}  // namespace with_bn
}  // namespace cpu
}  // namespace convmixer_kernels
