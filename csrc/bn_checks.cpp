// The checks of the BatchNorm glue ops (bn_ops.h).
#include "bn_ops.h"

#include <c10/util/Exception.h>

namespace convmixer_kernels {
namespace {

bool floating(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// A [C] vector (C = -1: any length) of a floating dtype (`acc`: exactly that one) on `device`.
void check_vector(const char* op, const char* name, const at::Tensor& t, int64_t C,
                  const at::Device& device, std::optional<at::ScalarType> acc = std::nullopt) {
  TORCH_CHECK_VALUE(t.dim() == 1 && (C < 0 || t.size(0) == C), op, ": ", name, " must be [",
                    C < 0 ? std::string("C") : std::to_string(C), "], got ", t.sizes());
  if (acc.has_value()) {
    TORCH_CHECK_TYPE(t.scalar_type() == *acc, op, ": ", name, " must be ", *acc, ", got ",
                     t.scalar_type());
  } else {
    TORCH_CHECK_TYPE(floating(t.scalar_type()), op, ": ", name,
                     " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  }
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " is on ", t.device(),
                    ", expected ", device);
}

void check_acc(const char* op, const char* name, at::ScalarType t) {
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble, op, ": ", name,
                   " must be float32 or float64, got ", t);
}

}  // namespace

int64_t check_bn_scale_shift(const char* op, const at::Tensor& var,
                             const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias, at::ScalarType dtype) {
  check_acc(op, "dtype", dtype);
  check_vector(op, "var", var, -1, var.device());
  const int64_t C = var.size(0);
  TORCH_CHECK_VALUE(weight.has_value() == bias.has_value(), op,
                    ": weight and bias must be given together (affine) or both be None");
  if (weight.has_value()) {
    check_vector(op, "weight", *weight, C, var.device());
    check_vector(op, "bias", *bias, C, var.device());
  }
  return C;
}

int64_t check_bn_scale_shift_backward(const char* op, const std::optional<at::Tensor>& grad_scale,
                                      const std::optional<at::Tensor>& grad_shift,
                                      const at::Tensor& var,
                                      const std::optional<at::Tensor>& weight,
                                      const std::optional<at::Tensor>& bias,
                                      at::ScalarType dtype) {
  const int64_t C = check_bn_scale_shift(op, var, weight, bias, dtype);
  if (grad_scale.has_value()) check_vector(op, "grad_scale", *grad_scale, C, var.device(), dtype);
  if (grad_shift.has_value()) check_vector(op, "grad_shift", *grad_shift, C, var.device(), dtype);
  return C;
}

int64_t check_bn_update_running_stats(const char* op, const at::Tensor& mean,
                                      const at::Tensor& var,
                                      const std::optional<at::Tensor>& running_mean,
                                      const std::optional<at::Tensor>& running_var,
                                      const std::optional<at::Tensor>& num_batches_tracked,
                                      std::optional<double> momentum,
                                      const std::optional<at::Tensor>& count_tensor) {
  check_acc(op, "mean", mean.scalar_type());
  const at::Device device = mean.device();
  check_vector(op, "mean", mean, -1, device);
  const int64_t C = mean.size(0);
  check_vector(op, "var", var, C, device, mean.scalar_type());
  for (const auto& [name, t] : {std::pair{"running_mean", &running_mean},
                                std::pair{"running_var", &running_var}}) {
    if (!t->has_value()) continue;
    check_vector(op, name, **t, C, device);
    TORCH_CHECK_VALUE((*t)->is_contiguous(), op, ": ", name, " must be contiguous");
  }
  if (num_batches_tracked.has_value()) {
    const at::Tensor& n = *num_batches_tracked;
    TORCH_CHECK_VALUE(n.numel() == 1, op, ": num_batches_tracked must have one element, got ",
                      n.sizes());
    TORCH_CHECK_TYPE(n.scalar_type() == at::kLong, op, ": num_batches_tracked must be int64, got ",
                     n.scalar_type());
    TORCH_CHECK_VALUE(n.device() == device, op, ": num_batches_tracked is on ", n.device(),
                      ", expected ", device);
  }
  TORCH_CHECK_VALUE(momentum.has_value() || num_batches_tracked.has_value(), op,
                    ": momentum None (a cumulative average) needs num_batches_tracked");
  if (count_tensor.has_value()) {
    const at::Tensor& n = *count_tensor;
    TORCH_CHECK_VALUE(n.numel() == 1, op, ": count_tensor must have one element, got ",
                      n.sizes());
    TORCH_CHECK_TYPE(floating(n.scalar_type()) || n.scalar_type() == at::kLong, op,
                     ": count_tensor must be floating or int64, got ", n.scalar_type());
    TORCH_CHECK_VALUE(n.device() == device, op, ": count_tensor is on ", n.device(),
                      ", expected ", device);
  }
  return C;
}

int64_t check_bn_update_running_stats_many(const char* op, at::TensorList mean,
                                           at::TensorList var, at::TensorList running_mean,
                                           at::TensorList running_var,
                                           at::TensorList num_batches_tracked,
                                           std::optional<double> momentum) {
  const size_t n = mean.size();
  TORCH_CHECK_VALUE(var.size() == n && running_mean.size() == n && running_var.size() == n &&
                        num_batches_tracked.size() == n,
                    op, ": mean, var, running_mean, running_var and num_batches_tracked must be "
                    "lists of one length, got ", n, ", ", var.size(), ", ", running_mean.size(),
                    ", ", running_var.size(), " and ", num_batches_tracked.size());
  for (size_t i = 0; i < n; ++i) {
    check_bn_update_running_stats(op, mean[i], var[i], running_mean[i], running_var[i],
                                  num_batches_tracked[i], momentum, std::nullopt);
    TORCH_CHECK_VALUE(mean[i].device() == mean[0].device(), op, ": item ", i, " is on ",
                      mean[i].device(), ", item 0 on ", mean[0].device());
    TORCH_CHECK_TYPE(mean[i].scalar_type() == mean[0].scalar_type(), op, ": item ", i,
                     "'s statistics are ", mean[i].scalar_type(), ", item 0's ",
                     mean[0].scalar_type());
    // The items update in parallel: one buffer twice would lose an update.
    const auto shares = [](const at::Tensor& a, const at::Tensor& b) {
      return a.numel() > 0 && b.numel() > 0 && a.data_ptr() == b.data_ptr();
    };
    for (size_t j = 0; j < i; ++j) {
      TORCH_CHECK_VALUE(!shares(running_mean[i], running_mean[j]) &&
                            !shares(running_var[i], running_var[j]) &&
                            !shares(num_batches_tracked[i], num_batches_tracked[j]),
                        op, ": items ", j, " and ", i, " share a running statistic (one "
                        "BatchNorm twice): update them in separate calls");
    }
  }
  return int64_t(n);
}

int64_t check_bn_train_norm(const char* op, const at::Tensor& mean, const at::Tensor& var,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, at::ScalarType dtype,
                            const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var,
                            const std::optional<at::Tensor>& num_batches_tracked,
                            std::optional<double> momentum,
                            const std::optional<at::Tensor>& count_tensor) {
  const int64_t C = check_bn_update_running_stats(op, mean, var, running_mean, running_var,
                                                  num_batches_tracked, momentum, count_tensor);
  TORCH_CHECK_TYPE(dtype == mean.scalar_type(), op, ": dtype must be the statistics' dtype ",
                   mean.scalar_type(), ", got ", dtype);
  check_bn_scale_shift(op, var, weight, bias, dtype);
  return C;
}

BnFold check_bn_fold(const char* op, const std::optional<at::Tensor>& bn_weight,
                     const std::optional<at::Tensor>& bn_bias, std::optional<double> bn_eps,
                     bool stats, int64_t C, const at::Device& device) {
  BnFold f;
  if (!bn_eps.has_value()) {
    TORCH_CHECK_VALUE(!bn_weight.has_value() && !bn_bias.has_value(), op,
                      ": bn_weight and bn_bias need bn_eps (the folded BatchNorm's eps)");
    return f;
  }
  TORCH_CHECK_VALUE(stats, op, ": a folded BatchNorm (bn_eps) needs stats=True");
  TORCH_CHECK_VALUE(bn_weight.has_value() == bn_bias.has_value(), op,
                    ": bn_weight and bn_bias must be given together (affine) or both be None");
  if (bn_weight.has_value()) {
    check_vector(op, "bn_weight", *bn_weight, C, device);
    check_vector(op, "bn_bias", *bn_bias, C, device);
  }
  f.on = true;
  f.weight = bn_weight;
  f.bias = bn_bias;
  f.eps = *bn_eps;
  return f;
}

BnFoldGrad check_bn_fold_grad(const char* op, const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& grad_shift,
                              const std::optional<at::Tensor>& var,
                              const std::optional<at::Tensor>& bn_weight,
                              std::optional<double> bn_eps, bool have_mean, int64_t C,
                              at::ScalarType acc, const at::Device& device) {
  BnFoldGrad f;
  if (!bn_eps.has_value()) {
    TORCH_CHECK_VALUE(!grad_scale.has_value() && !grad_shift.has_value() && !var.has_value() &&
                          !bn_weight.has_value(),
                      op, ": grad_scale, grad_shift, var and bn_weight need bn_eps (the folded "
                      "BatchNorm's eps)");
    return f;
  }
  TORCH_CHECK_VALUE(var.has_value(), op, ": a folded BatchNorm's gradients need the forward's var");
  TORCH_CHECK_VALUE(have_mean, op, ": a folded BatchNorm's gradients need the forward's mean");
  check_vector(op, "var", *var, C, device, acc);
  if (grad_scale.has_value()) check_vector(op, "grad_scale", *grad_scale, C, device, acc);
  if (grad_shift.has_value()) check_vector(op, "grad_shift", *grad_shift, C, device, acc);
  if (bn_weight.has_value()) check_vector(op, "bn_weight", *bn_weight, C, device);
  f.on = true;
  f.grad_scale = grad_scale;
  f.grad_shift = grad_shift;
  f.weight = bn_weight;
  f.var = *var;
  f.eps = *bn_eps;
  return f;
}

}  // namespace convmixer_kernels
