// CUDA implementation of the BatchNorm glue ops (bn_ops.h, docs/OPS.md § BatchNorm ops): checks,
// allocation, and one launch entry of kernels/bn_ops.cuh each on the current stream.
#include "../bn_ops.h"
#include "cuda_common.h"
#include "kernels/bn_ops.cuh"

#include <torch/library.h>

namespace convmixer_kernels {
namespace cuda_ops {
namespace {

namespace bn = ::convmixer_kernels::cuda::bn;

bn::Problem problem_of(at::ScalarType acc, int64_t C) {
  return {acc == at::kDouble ? cuda::DType::Float64 : cuda::DType::Float32, C};
}

// ScaleShift's call, its inputs kept contiguous and its outputs allocated (the checks done).
struct ScaleShiftCall {
  at::Tensor var, weight, bias, scale, shift;
  bn::ScaleShift c;
  ScaleShiftCall(const at::Tensor& var_in, const std::optional<at::Tensor>& weight_in,
                 const std::optional<at::Tensor>& bias_in, double eps, at::ScalarType dtype,
                 int64_t C)
      : var(var_in.contiguous()),
        weight(contiguous_or_none(weight_in)),
        bias(contiguous_or_none(bias_in)),
        scale(at::empty({C}, var.options().dtype(dtype))),
        shift(at::empty({C}, var.options().dtype(dtype))) {
    c.problem = problem_of(dtype, C);
    c.eps = eps;
    c.var = in_of(var);
    c.weight = in_of(weight);
    c.bias = in_of(bias);
    c.scale = scale.data_ptr();
    c.shift = shift.data_ptr();
  }
};

// RunningStats's call (the checks done; the running statistics are contiguous, the buffers
// themselves).
struct RunningStatsCall {
  at::Tensor mean, var;
  bn::RunningStats c;
  RunningStatsCall(const at::Tensor& mean_in, const at::Tensor& var_in,
                   const std::optional<at::Tensor>& running_mean,
                   const std::optional<at::Tensor>& running_var,
                   const std::optional<at::Tensor>& num_batches_tracked,
                   std::optional<double> momentum, double count,
                   const std::optional<at::Tensor>& count_tensor, int64_t C)
      : mean(mean_in.contiguous()), var(var_in.contiguous()) {
    c.problem = problem_of(mean.scalar_type(), C);
    c.mean = mean.data_ptr();
    c.var = var.data_ptr();
    if (running_mean.has_value()) c.running_mean = out_of(*running_mean);
    if (running_var.has_value()) c.running_var = out_of(*running_var);
    c.num_batches_tracked =
        num_batches_tracked.has_value() ? num_batches_tracked->data_ptr<int64_t>() : nullptr;
    c.momentum = momentum.value_or(0.0);
    c.cumulative = !momentum.has_value();
    c.count = count;
    if (count_tensor.has_value()) c.count_tensor = in_of(*count_tensor);
  }
};

std::tuple<at::Tensor, at::Tensor> bn_scale_shift(const at::Tensor& var_in,
                                                  const std::optional<at::Tensor>& weight_in,
                                                  const std::optional<at::Tensor>& bias_in,
                                                  double eps, at::ScalarType dtype) {
  const char* op = "bn_scale_shift";
  const int64_t C = check_bn_scale_shift(op, var_in, weight_in, bias_in, dtype);
  const c10::cuda::CUDAGuard guard(var_in.device());
  const ScaleShiftCall call(var_in, weight_in, bias_in, eps, dtype, C);
  launch_entry(op, call.c, call.var, false, C, " channels");
  return {call.scale, call.shift};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_scale_shift_backward(
    const std::optional<at::Tensor>& grad_scale_in, const std::optional<at::Tensor>& grad_shift_in,
    const at::Tensor& var_in, const std::optional<at::Tensor>& weight_in,
    const std::optional<at::Tensor>& bias_in, double eps, at::ScalarType dtype) {
  const char* op = "bn_scale_shift_backward";
  const int64_t C = check_bn_scale_shift_backward(op, grad_scale_in, grad_shift_in, var_in,
                                                  weight_in, bias_in, dtype);
  const c10::cuda::CUDAGuard guard(var_in.device());
  const auto var = var_in.contiguous();
  const auto weight = contiguous_or_none(weight_in);
  const auto grad_scale = contiguous_or_none(grad_scale_in);
  const auto grad_shift = contiguous_or_none(grad_shift_in);
  const bool affine = weight.defined();
  auto grad_var = at::empty({C}, var.options());
  auto grad_weight = affine ? at::empty({C}, weight.options()) : empty_output(var, dtype);
  auto grad_bias = affine ? at::empty({C}, bias_in->options()) : empty_output(var, dtype);
  bn::ScaleShiftBackward c;
  c.problem = problem_of(dtype, C);
  c.eps = eps;
  c.grad_scale = ptr_or_null(grad_scale);
  c.grad_shift = ptr_or_null(grad_shift);
  c.var = in_of(var);
  c.weight = in_of(weight);
  c.grad_var = out_of(grad_var);
  if (affine) {
    c.grad_weight = out_of(grad_weight);
    c.grad_bias = out_of(grad_bias);
  }
  launch_entry(op, c, var, false, C, " channels");
  return {grad_var, grad_weight, grad_bias};
}

void bn_update_running_stats(const at::Tensor& mean_in, const at::Tensor& var_in,
                             const std::optional<at::Tensor>& running_mean,
                             const std::optional<at::Tensor>& running_var,
                             const std::optional<at::Tensor>& num_batches_tracked,
                             std::optional<double> momentum, double count,
                             const std::optional<at::Tensor>& count_tensor) {
  const char* op = "bn_update_running_stats";
  const int64_t C = check_bn_update_running_stats(op, mean_in, var_in, running_mean, running_var,
                                                  num_batches_tracked, momentum, count_tensor);
  const c10::cuda::CUDAGuard guard(mean_in.device());
  const RunningStatsCall call(mean_in, var_in, running_mean, running_var, num_batches_tracked,
                              momentum, count, count_tensor, C);
  launch_entry(op, call.c, call.mean, false, C, " channels");
}

void bn_update_running_stats_many(at::TensorList mean, at::TensorList var,
                                  at::TensorList running_mean, at::TensorList running_var,
                                  at::TensorList num_batches_tracked,
                                  std::optional<double> momentum, double count) {
  const char* op = "bn_update_running_stats_many";
  const int64_t n = check_bn_update_running_stats_many(op, mean, var, running_mean, running_var,
                                                       num_batches_tracked, momentum);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(mean[0].device());
  std::vector<RunningStatsCall> calls;
  calls.reserve(size_t(n));
  for (int64_t i = 0; i < n; ++i) {
    calls.emplace_back(mean[i], var[i], running_mean[i], running_var[i], num_batches_tracked[i],
                       momentum, count, std::nullopt, mean[i].size(0));
  }
  // Launches of up to kManyItems items that all update in float or all in double (in order: the
  // items are independent, so any grouping gives each the bits it would get alone).
  for (const bool dbl : {false, true}) {
    bn::RunningStatsMany c;
    c.problem = problem_of(mean[0].scalar_type(), 0);
    for (const RunningStatsCall& call : calls) {
      if (bn::updates_in_double(call.c) != dbl) continue;
      c.items[c.count++] = call.c;
      if (c.count == bn::kManyItems) {
        launch_entry(op, c, mean[0], false, c.count, " BatchNorms");
        c.count = 0;
      }
    }
    if (c.count > 0) launch_entry(op, c, mean[0], false, c.count, " BatchNorms");
  }
}

std::tuple<at::Tensor, at::Tensor> bn_train_norm(
    const at::Tensor& mean_in, const at::Tensor& var_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, at::ScalarType dtype,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, std::optional<double> momentum,
    double count, const std::optional<at::Tensor>& count_tensor) {
  const char* op = "bn_train_norm";
  const int64_t C = check_bn_train_norm(op, mean_in, var_in, weight, bias, dtype, running_mean,
                                        running_var, num_batches_tracked, momentum, count_tensor);
  const c10::cuda::CUDAGuard guard(mean_in.device());
  const RunningStatsCall running(mean_in, var_in, running_mean, running_var, num_batches_tracked,
                                 momentum, count, count_tensor, C);
  const ScaleShiftCall norm(var_in, weight, bias, eps, dtype, C);
  bn::TrainNorm c;
  c.problem = problem_of(dtype, C);
  c.norm = norm.c;
  c.running = running.c;
  launch_entry(op, c, running.mean, false, C, " channels");
  return {norm.scale, norm.shift};
}

}  // namespace
}  // namespace cuda_ops
}  // namespace convmixer_kernels

TORCH_LIBRARY_IMPL(convmixer_kernels, CUDA, m) {
  m.impl("bn_scale_shift", &convmixer_kernels::cuda_ops::bn_scale_shift);
  m.impl("bn_scale_shift_backward", &convmixer_kernels::cuda_ops::bn_scale_shift_backward);
  m.impl("bn_update_running_stats", &convmixer_kernels::cuda_ops::bn_update_running_stats);
  m.impl("bn_update_running_stats_many",
         &convmixer_kernels::cuda_ops::bn_update_running_stats_many);
  m.impl("bn_train_norm", &convmixer_kernels::cuda_ops::bn_train_norm);
}
