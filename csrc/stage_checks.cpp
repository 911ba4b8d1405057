// The checks of csrc/stage_checks.h, and the parsing of the arguments they share (act, the norm
// vectors, the statistics vectors).
#include "stage_checks.h"

#include <ATen/ATen.h>

#include <string>

namespace convmixer_kernels {

Act parse_act(const char* op, c10::string_view name, const char* arg) {
  if (const std::optional<Act> act = act_from_name(name)) return *act;
  // Spelled as Python's check_act spells it (convmixer_kernels/activations.py).
  std::string names;
  for (const Act a : kActs) {
    names += std::string(names.empty() ? "'" : ", '") + act_name(a) + "'";
  }
  TORCH_CHECK_VALUE(false, op, ": ", arg, " must be one of (", names, "), got '",
                    std::string(name), "'");
}

std::optional<Act> parse_x_act(const char* op, const std::optional<c10::string_view>& x_act) {
  if (!x_act.has_value()) return std::nullopt;
  return parse_act(op, *x_act, "x_act");
}

void check_write_out(const char* op, bool write_out, bool keep_pre_act) {
  TORCH_CHECK_VALUE(write_out || keep_pre_act, op,
                    ": write_out=False needs keep_pre_act=True: the pre-activation is then the "
                    "stage's output, which its consumer reads through act (pw_stage's x_act)");
}

namespace {

// `t` (named `name`) has x's dtype and device: every tensor input of a stage but the norm
// vectors, which are in the accumulation dtype.
void check_dtype_device_of_x(const char* op, const char* name, const at::Tensor& t,
                             const at::Tensor& x) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
                   " differs from x dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(),
                    " but x is on ", x.device());
}

// True when an optional tensor argument is present and non-empty.
bool present(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() && t->numel() > 0;
}

// A statistics input of a backward op (grad_mean, grad_var, the forward's mean): nullopt when
// absent or empty, else checked to be [channels] and cast to `acc_dtype`.
std::optional<at::Tensor> stat_vector(const char* op, const char* name,
                                      const std::optional<at::Tensor>& t, int64_t channels,
                                      at::ScalarType acc_dtype) {
  if (!present(t)) return std::nullopt;
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == channels, op, ": ", name, " must be [",
                    channels, "], got ", t->sizes());
  return t->to(acc_dtype).contiguous();
}

// A Norm from the three optional schema arguments, checked to come as a set of [channels] vectors
// of dtype `acc_dtype` on x's device.
Norm make_norm(const char* op, const char* name, const std::optional<at::Tensor>& mean,
               const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
               int64_t channels, at::ScalarType acc_dtype, const at::Device& device) {
  const int given = int(mean.has_value()) + int(scale.has_value()) + int(shift.has_value());
  TORCH_CHECK_VALUE(given == 0 || given == 3, op, ": ", name,
                    "_mean, ", name, "_scale and ", name, "_shift must be given together");
  if (given == 0) return {};
  for (const at::Tensor* t : {&*mean, &*scale, &*shift}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == channels, op, ": ", name,
                      " norm vectors must have shape [", channels, "], got ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == acc_dtype, op, ": ", name, " norm vectors must be ",
                     acc_dtype, ", got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == device, op, ": ", name, " norm vectors are on ",
                      t->device(), " but the input is on ", device);
  }
  return {mean->contiguous(), scale->contiguous(), shift->contiguous()};
}

}  // namespace

std::optional<at::Tensor> check_grad_out_scale(const char* op,
                                               const std::optional<at::Tensor>& grad_out_scale,
                                               int64_t channels, at::ScalarType acc_dtype,
                                               const at::Device& device) {
  std::optional<at::Tensor> t =
      stat_vector(op, "grad_out_scale", grad_out_scale, channels, acc_dtype);
  TORCH_CHECK_VALUE(!t.has_value() || t->device() == device, op, ": grad_out_scale is on ",
                    t.has_value() ? t->device() : device, " but x is on ", device);
  return t;
}

void check_defer_grad_x(const char* op, bool defer_grad_x, bool grad_res_normed, bool has_res) {
  TORCH_CHECK_VALUE(!defer_grad_x || (grad_res_normed && has_res), op,
                    ": defer_grad_x needs grad_res_normed and a residual: grad_x is then "
                    "grad_res times x_scale, which the caller forms");
}

DwGeometry check_dw(const char* op, const at::Tensor& x, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be 4-d [N, C, H, W], got ", x.sizes());
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 &&
                        weight.size(2) == weight.size(3),
                    op, ": weight must be [", C, ", 1, k, k] for an input with ", C,
                    " channels, got ", weight.sizes());
  const int64_t k = weight.size(2);
  TORCH_CHECK_VALUE(k % 2 == 1 && k >= 1 && k <= 15, op,
                    ": kernel size must be odd and in [1, 15], got ", k);
  check_dtype_device_of_x(op, "weight", weight, x);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == C, op, ": bias must be [", C,
                      "], got ", bias->sizes());
    check_dtype_device_of_x(op, "bias", *bias, x);
  }
  return {x.size(0), C, x.size(2), x.size(3), k, k / 2};
}

PwGeometry check_pw(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& res,
                    const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be 4-d [N, C, H, W], got ", x.sizes());
  const int64_t Cin = x.size(1);
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(1) == Cin && weight.size(2) == 1 &&
                        weight.size(3) == 1,
                    op, ": weight must be [Cout, ", Cin, ", 1, 1] for an input with ", Cin,
                    " channels, got ", weight.sizes());
  check_dtype_device_of_x(op, "weight", weight, x);
  const int64_t Cout = weight.size(0);
  if (res.has_value()) {
    TORCH_CHECK_VALUE(res->sizes() == x.sizes(), op, ": res must have the shape of x ",
                      x.sizes(), ", got ", res->sizes());
    check_dtype_device_of_x(op, "res", *res, x);
  }
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == Cout, op, ": bias must be [", Cout,
                      "], got ", bias->sizes());
    check_dtype_device_of_x(op, "bias", *bias, x);
  }
  return {x.size(0), Cin, Cout, x.size(2), x.size(3)};
}

void check_like_output(const char* op, const char* name, const at::Tensor& t,
                       at::IntArrayRef sizes, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ",
                    t.sizes());
  check_dtype_device_of_x(op, name, t, x);
}

StatGrads check_stat_grads(const char* op, const std::optional<at::Tensor>& grad_mean,
                           const std::optional<at::Tensor>& grad_var,
                           const std::optional<at::Tensor>& mean, int64_t channels,
                           at::ScalarType acc_dtype, const at::Device& device) {
  StatGrads s{stat_vector(op, "grad_mean", grad_mean, channels, acc_dtype),
              stat_vector(op, "grad_var", grad_var, channels, acc_dtype),
              stat_vector(op, "mean", mean, channels, acc_dtype)};
  TORCH_CHECK_VALUE(!s.grad_var.has_value() || s.mean.has_value(), op,
                    ": grad_var needs the forward's mean");
  // A kernel reads these through raw pointers of x's device.
  for (const auto* t : {&s.grad_mean, &s.grad_var, &s.mean}) {
    TORCH_CHECK_VALUE(!t->has_value() || (*t)->device() == device, op,
                      ": statistics vectors are on ", (*t)->device(), " but x is on ", device);
  }
  return s;
}

DwArgs check_dw_stage(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& x_mean,
                      const std::optional<at::Tensor>& x_scale,
                      const std::optional<at::Tensor>& x_shift, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, c10::string_view act, bool stats) {
  DwArgs a;
  a.g = check_dw(op, x, weight, bias);
  a.act = parse_act(op, act);
  a.acc = acc_dtype_for(x.scalar_type());
  a.norm = make_norm(op, "x", x_mean, x_scale, x_shift, a.g.C, a.acc, x.device());
  TORCH_CHECK_VALUE(!stats || a.g.count() != 1, op,
                    ": expected more than 1 value per channel when training, got input size ",
                    x.sizes());
  return a;
}

DwArgs check_dw_stage_backward(const char* op, const at::Tensor& grad_out,
                               const std::optional<at::Tensor>& grad_mean,
                               const std::optional<at::Tensor>& grad_var, const at::Tensor& x,
                               const std::optional<at::Tensor>& x_mean,
                               const std::optional<at::Tensor>& x_scale,
                               const std::optional<at::Tensor>& x_shift, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& mean, c10::string_view act,
                               const std::optional<at::Tensor>& grad_res,
                               const std::optional<at::Tensor>& saved_out,
                               const std::optional<at::Tensor>& pre_act) {
  DwArgs a = check_dw_stage(op, x, x_mean, x_scale, x_shift, weight, bias, act, false);
  check_like_output(op, "grad_out", grad_out, x.sizes(), x);
  a.sg = check_stat_grads(op, grad_mean, grad_var, mean, a.g.C, a.acc, x.device());
  a.have_grad_res = present(grad_res);
  if (a.have_grad_res) check_like_output(op, "grad_res", *grad_res, x.sizes(), x);
  a.have_saved_out = present(saved_out);
  if (a.have_saved_out) check_like_output(op, "saved_out", *saved_out, x.sizes(), x);
  a.have_pre_act = present(pre_act);
  if (a.have_pre_act) check_like_output(op, "pre_act", *pre_act, x.sizes(), x);
  return a;
}

PwArgs check_pw_stage(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& x_mean,
                      const std::optional<at::Tensor>& x_scale,
                      const std::optional<at::Tensor>& x_shift,
                      const std::optional<at::Tensor>& res,
                      const std::optional<at::Tensor>& res_mean,
                      const std::optional<at::Tensor>& res_scale,
                      const std::optional<at::Tensor>& res_shift, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, c10::string_view act, bool stats) {
  PwArgs a;
  a.g = check_pw(op, x, res, weight, bias);
  a.act = parse_act(op, act);
  a.acc = acc_dtype_for(x.scalar_type());
  a.nx = make_norm(op, "x", x_mean, x_scale, x_shift, a.g.Cin, a.acc, x.device());
  a.nr = make_norm(op, "res", res_mean, res_scale, res_shift, a.g.Cin, a.acc, x.device());
  TORCH_CHECK_VALUE(res.has_value() || !a.nr.defined(), op, ": a res norm needs res");
  TORCH_CHECK_VALUE(!stats || a.g.rows() != 1, op,
                    ": expected more than 1 value per channel when training, got input size ",
                    x.sizes());
  return a;
}

PwArgs check_pw_stage_backward(
    const char* op, const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_mean,
    const std::optional<at::Tensor>& grad_var, const at::Tensor& x,
    const std::optional<at::Tensor>& x_mean, const std::optional<at::Tensor>& x_scale,
    const std::optional<at::Tensor>& x_shift, const std::optional<at::Tensor>& res,
    const std::optional<at::Tensor>& res_mean, const std::optional<at::Tensor>& res_scale,
    const std::optional<at::Tensor>& res_shift, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& pre_act,
    const std::optional<at::Tensor>& mean, c10::string_view act,
    const std::optional<at::Tensor>& saved_out, const std::optional<at::Tensor>& saved_u) {
  PwArgs a = check_pw_stage(op, x, x_mean, x_scale, x_shift, res, res_mean, res_scale, res_shift,
                            weight, bias, act, false);
  const auto out_sizes = a.out_sizes();
  check_like_output(op, "grad_out", grad_out, out_sizes, x);
  a.sg = check_stat_grads(op, grad_mean, grad_var, mean, a.g.Cout, a.acc, x.device());
  a.have_pre_act = present(pre_act);
  if (a.have_pre_act) check_like_output(op, "pre_act", *pre_act, out_sizes, x);
  a.have_saved_out = present(saved_out);
  if (a.have_saved_out) check_like_output(op, "saved_out", *saved_out, out_sizes, x);
  a.have_saved_u = present(saved_u);
  if (a.have_saved_u) check_like_output(op, "saved_u", *saved_u, a.in_sizes(), x);
  return a;
}

}  // namespace convmixer_kernels
