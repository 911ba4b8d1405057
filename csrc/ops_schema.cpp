// The op schemas (docs/OPS.md) and the helpers every implementation shares.
#include "ops.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

namespace convmixer_kernels {

Act parse_act(const char* op, c10::string_view name) {
  if (const std::optional<Act> act = act_from_name(name)) return *act;
  // Spelled as Python's check_act spells it (convmixer_kernels/activations.py).
  std::string names;
  for (const Act a : kActs) {
    names += std::string(names.empty() ? "'" : ", '") + act_name(a) + "'";
  }
  TORCH_CHECK_VALUE(false, op, ": act must be one of (", names, "), got '", std::string(name), "'");
}

at::ScalarType acc_dtype_for(at::ScalarType storage) {
  return storage == at::kDouble ? at::kDouble : at::kFloat;
}

std::optional<at::Tensor> stat_vector(const char* op, const char* name,
                                      const std::optional<at::Tensor>& t, int64_t channels,
                                      at::ScalarType acc_dtype) {
  if (!present(t)) return std::nullopt;
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == channels, op, ": ", name, " must be [",
                    channels, "], got ", t->sizes());
  return t->to(acc_dtype).contiguous();
}

at::Tensor empty_output(const at::Tensor& like, at::ScalarType dtype) {
  return at::empty({0}, like.options().dtype(dtype));
}

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

}  // namespace convmixer_kernels

TORCH_LIBRARY(convmixer_kernels, m) {
  m.def(
      "dw_stage(Tensor x, Tensor? x_mean, Tensor? x_scale, Tensor? x_shift, Tensor weight, "
      "Tensor? bias, str act, bool stats) -> (Tensor out, Tensor mean, Tensor var)");
  m.def(
      "dw_stage_backward(Tensor grad_out, Tensor? grad_mean, Tensor? grad_var, Tensor x, "
      "Tensor? x_mean, Tensor? x_scale, Tensor? x_shift, Tensor weight, Tensor? bias, "
      "Tensor? mean, str act) -> (Tensor grad_x, Tensor grad_x_mean, Tensor grad_x_scale, "
      "Tensor grad_x_shift, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "pw_stage(Tensor x, Tensor? x_mean, Tensor? x_scale, Tensor? x_shift, Tensor? res, "
      "Tensor? res_mean, Tensor? res_scale, Tensor? res_shift, Tensor weight, Tensor? bias, "
      "str act, bool stats, bool keep_pre_act) -> (Tensor out, Tensor pre_act, Tensor mean, "
      "Tensor var)");
  m.def(
      "pw_stage_backward(Tensor grad_out, Tensor? grad_mean, Tensor? grad_var, Tensor x, "
      "Tensor? x_mean, Tensor? x_scale, Tensor? x_shift, Tensor? res, Tensor? res_mean, "
      "Tensor? res_scale, Tensor? res_shift, Tensor weight, Tensor? bias, Tensor? pre_act, "
      "Tensor? mean, str act) -> (Tensor grad_x, Tensor grad_x_mean, Tensor grad_x_scale, "
      "Tensor grad_x_shift, Tensor grad_res, Tensor grad_res_mean, Tensor grad_res_scale, "
      "Tensor grad_res_shift, Tensor grad_weight, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(convmixer_kernels, CPU, m) {
  m.impl("dw_stage", &convmixer_kernels::cpu::dw_stage);
  m.impl("dw_stage_backward", &convmixer_kernels::cpu::dw_stage_backward);
  m.impl("pw_stage", &convmixer_kernels::cpu::pw_stage);
  m.impl("pw_stage_backward", &convmixer_kernels::cpu::pw_stage_backward);
}
