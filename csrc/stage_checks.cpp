#include "stage_checks.h"

#include <ATen/ATen.h>

namespace convmixer_kernels {

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
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ",
                   weight.scalar_type(), " differs from x dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == x.device(), op, ": weight is on ", weight.device(),
                    " but x is on ", x.device());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == C, op, ": bias must be [", C,
                      "], got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), op, ": bias dtype ",
                     bias->scalar_type(), " differs from x dtype ", x.scalar_type());
    TORCH_CHECK_VALUE(bias->device() == x.device(), op, ": bias is on ", bias->device(),
                      " but x is on ", x.device());
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
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ",
                   weight.scalar_type(), " differs from x dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == x.device(), op, ": weight is on ", weight.device(),
                    " but x is on ", x.device());
  const int64_t Cout = weight.size(0);
  if (res.has_value()) {
    TORCH_CHECK_VALUE(res->sizes() == x.sizes(), op, ": res must have the shape of x ",
                      x.sizes(), ", got ", res->sizes());
    TORCH_CHECK_TYPE(res->scalar_type() == x.scalar_type(), op, ": res dtype ",
                     res->scalar_type(), " differs from x dtype ", x.scalar_type());
    TORCH_CHECK_VALUE(res->device() == x.device(), op, ": res is on ", res->device(),
                      " but x is on ", x.device());
  }
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == Cout, op, ": bias must be [", Cout,
                      "], got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), op, ": bias dtype ",
                     bias->scalar_type(), " differs from x dtype ", x.scalar_type());
    TORCH_CHECK_VALUE(bias->device() == x.device(), op, ": bias is on ", bias->device(),
                      " but x is on ", x.device());
  }
  return {x.size(0), Cin, Cout, x.size(2), x.size(3)};
}

void check_like_output(const char* op, const char* name, const at::Tensor& t,
                       at::IntArrayRef sizes, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " dtype ", t.scalar_type(),
                   " differs from x dtype ", dtype);
}

StatGrads check_stat_grads(const char* op, const std::optional<at::Tensor>& grad_mean,
                           const std::optional<at::Tensor>& grad_var,
                           const std::optional<at::Tensor>& mean, int64_t channels,
                           at::ScalarType acc_dtype) {
  StatGrads s{stat_vector(op, "grad_mean", grad_mean, channels, acc_dtype),
              stat_vector(op, "grad_var", grad_var, channels, acc_dtype),
              stat_vector(op, "mean", mean, channels, acc_dtype)};
  TORCH_CHECK_VALUE(!s.grad_var.has_value() || s.mean.has_value(), op,
                    ": grad_var needs the forward's mean");
  return s;
}

}  // namespace convmixer_kernels
