// CPU implementations of the BatchNorm glue ops (bn_ops.h): the maths of the CUDA kernels
// (csrc/cuda/kernels/bn_ops.cuh) in the same order of operations, one loop over the channels.
// Inputs of another dtype are converted to the accumulation type first, outputs back to theirs.
#include "../bn_ops.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cmath>

namespace convmixer_kernels {
namespace cpu {
namespace {

// `t` as a contiguous tensor of `dtype` (itself when it is one already).
at::Tensor as(const at::Tensor& t, at::ScalarType dtype) { return t.to(dtype).contiguous(); }

template <typename acc_t>
acc_t invstd_of(acc_t var, acc_t eps) {
  return acc_t(1) / std::sqrt(var + eps);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> bn_scale_shift(const at::Tensor& var_in,
                                                  const std::optional<at::Tensor>& weight_in,
                                                  const std::optional<at::Tensor>& bias_in,
                                                  double eps, at::ScalarType dtype) {
  const int64_t C = check_bn_scale_shift("bn_scale_shift", var_in, weight_in, bias_in, dtype);
  const bool affine = weight_in.has_value();
  const auto var = as(var_in, dtype);
  const auto weight = affine ? as(*weight_in, dtype) : at::Tensor();
  auto scale = at::empty({C}, var.options());
  auto shift = affine ? bias_in->to(dtype, false, /*copy=*/true) : at::zeros({C}, var.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "bn_scale_shift", [&] {
    const scalar_t* v = var.data_ptr<scalar_t>();
    const scalar_t* w = affine ? weight.data_ptr<scalar_t>() : nullptr;
    scalar_t* s = scale.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t invstd = invstd_of(v[c], scalar_t(eps));
      s[c] = affine ? w[c] * invstd : invstd;
    }
  });
  return {scale, shift};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_scale_shift_backward(
    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& grad_shift,
    const at::Tensor& var_in, const std::optional<at::Tensor>& weight_in,
    const std::optional<at::Tensor>& bias_in, double eps, at::ScalarType dtype) {
  const int64_t C = check_bn_scale_shift_backward("bn_scale_shift_backward", grad_scale,
                                                  grad_shift, var_in, weight_in, bias_in, dtype);
  const bool affine = weight_in.has_value();
  const auto opts = var_in.options().dtype(dtype);
  const auto gs = grad_scale.has_value() ? as(*grad_scale, dtype) : at::zeros({C}, opts);
  const auto var = as(var_in, dtype);
  const auto weight = affine ? as(*weight_in, dtype) : at::Tensor();
  auto grad_var = at::empty({C}, opts);
  auto grad_weight = affine ? at::empty({C}, opts) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(dtype, "bn_scale_shift_backward", [&] {
    const scalar_t* g = gs.data_ptr<scalar_t>();
    const scalar_t* v = var.data_ptr<scalar_t>();
    const scalar_t* w = affine ? weight.data_ptr<scalar_t>() : nullptr;
    scalar_t* gv = grad_var.data_ptr<scalar_t>();
    scalar_t* gw = affine ? grad_weight.data_ptr<scalar_t>() : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t invstd = invstd_of(v[c], scalar_t(eps));
      const scalar_t cube = invstd * invstd * invstd;
      gv[c] = g[c] * (affine ? w[c] : scalar_t(1)) * scalar_t(-0.5) * cube;
      if (affine) gw[c] = g[c] * invstd;
    }
  });
  if (!affine) {  // two empty outputs, not one tensor twice: outputs must not alias
    return {grad_var.to(var_in.scalar_type()), at::empty({0}, opts), at::empty({0}, opts)};
  }
  const auto grad_bias = grad_shift.has_value() ? grad_shift->to(bias_in->scalar_type(), false, /*copy=*/true)
                                                : at::zeros({C}, opts.dtype(bias_in->scalar_type()));
  return {grad_var.to(var_in.scalar_type()), grad_weight.to(weight_in->scalar_type()), grad_bias};
}

void bn_update_running_stats(const at::Tensor& mean_in, const at::Tensor& var_in,
                             const std::optional<at::Tensor>& running_mean,
                             const std::optional<at::Tensor>& running_var,
                             const std::optional<at::Tensor>& num_batches_tracked,
                             std::optional<double> momentum, double count,
                             const std::optional<at::Tensor>& count_tensor) {
  const int64_t C = check_bn_update_running_stats("bn_update_running_stats", mean_in, var_in,
                                                  running_mean, running_var, num_batches_tracked,
                                                  momentum, count_tensor);
  // In double when the statistics or a running statistic are double, as the CUDA kernel.
  const bool wide = mean_in.scalar_type() == at::kDouble ||
                    (running_mean.has_value() && running_mean->scalar_type() == at::kDouble) ||
                    (running_var.has_value() && running_var->scalar_type() == at::kDouble);
  const at::ScalarType acc = wide ? at::kDouble : at::kFloat;
  int64_t tracked = 0;
  if (num_batches_tracked.has_value()) {
    tracked = num_batches_tracked->item<int64_t>() + 1;
    num_batches_tracked->fill_(tracked);
  }
  const auto mean = as(mean_in, acc), var = as(var_in, acc);
  AT_DISPATCH_FLOATING_TYPES(acc, "bn_update_running_stats", [&] {
    scalar_t factor = scalar_t(momentum.value_or(0)), keep = scalar_t(1.0 - momentum.value_or(0));
    if (!momentum.has_value()) {
      factor = scalar_t(1) / scalar_t(tracked);
      keep = scalar_t(1) - factor;
    }
    scalar_t bessel = scalar_t(count / (count - 1.0));
    if (count_tensor.has_value()) {
      const scalar_t n = count_tensor->item().to<scalar_t>();
      bessel = n / (n - scalar_t(1));
    }
    const auto update = [&](const at::Tensor& running, const scalar_t* stat, scalar_t mul) {
      auto r = as(running, acc);
      scalar_t* p = r.data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) p[c] = p[c] * keep + (stat[c] * mul) * factor;
      running.copy_(r);
    };
    if (running_mean.has_value()) update(*running_mean, mean.data_ptr<scalar_t>(), scalar_t(1));
    if (running_var.has_value()) update(*running_var, var.data_ptr<scalar_t>(), bessel);
  });
}

// One call per item: the CUDA op is one launch for them all.
void bn_update_running_stats_many(at::TensorList mean, at::TensorList var,
                                  at::TensorList running_mean, at::TensorList running_var,
                                  at::TensorList num_batches_tracked,
                                  std::optional<double> momentum, double count) {
  const int64_t n = check_bn_update_running_stats_many("bn_update_running_stats_many", mean, var,
                                                       running_mean, running_var,
                                                       num_batches_tracked, momentum);
  for (int64_t i = 0; i < n; ++i) {
    bn_update_running_stats(mean[i], var[i], running_mean[i], running_var[i],
                            num_batches_tracked[i], momentum, count, std::nullopt);
  }
}

// Two calls on the CPU, where launches cost nothing; the CUDA op is one kernel.
std::tuple<at::Tensor, at::Tensor> bn_train_norm(
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, at::ScalarType dtype,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, std::optional<double> momentum,
    double count, const std::optional<at::Tensor>& count_tensor) {
  check_bn_train_norm("bn_train_norm", mean, var, weight, bias, dtype, running_mean, running_var,
                      num_batches_tracked, momentum, count_tensor);
  bn_update_running_stats(mean, var, running_mean, running_var, num_batches_tracked, momentum,
                          count, count_tensor);
  return bn_scale_shift(var, weight, bias, eps, dtype);
}

}  // namespace cpu
}  // namespace convmixer_kernels
