// The BatchNorm glue ops (docs/OPS.md § BatchNorm ops; schemas in ops_schema.cpp): their checks,
// shared by every backend's implementation, and the CPU implementations (csrc/cpu/bn_ops.cpp; the
// CUDA ones are csrc/cuda/bn_ops.cu). Each check raises before anything is read or written.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace convmixer_kernels {

// var [C] of a floating dtype; weight and bias both [C] (each of a floating dtype of its own) or
// both absent; dtype, the accumulation dtype of scale and shift, float32 or float64; all on var's
// device. Returns C.
int64_t check_bn_scale_shift(const char* op, const at::Tensor& var,
                             const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias, at::ScalarType dtype);

// check_bn_scale_shift, and grad_scale and grad_shift [C] of `dtype` on var's device or absent.
int64_t check_bn_scale_shift_backward(const char* op, const std::optional<at::Tensor>& grad_scale,
                                      const std::optional<at::Tensor>& grad_shift,
                                      const at::Tensor& var,
                                      const std::optional<at::Tensor>& weight,
                                      const std::optional<at::Tensor>& bias,
                                      at::ScalarType dtype);

// mean and var [C] of one dtype, float32 or float64; the running statistics [C] contiguous of a
// floating dtype each; num_batches_tracked a one-element int64 tensor, required when momentum is
// None; count_tensor a one-element floating or int64 tensor; all on mean's device. Returns C.
int64_t check_bn_update_running_stats(const char* op, const at::Tensor& mean,
                                      const at::Tensor& var,
                                      const std::optional<at::Tensor>& running_mean,
                                      const std::optional<at::Tensor>& running_var,
                                      const std::optional<at::Tensor>& num_batches_tracked,
                                      std::optional<double> momentum,
                                      const std::optional<at::Tensor>& count_tensor);

// check_bn_update_running_stats, then check_bn_scale_shift of var, weight, bias and the
// statistics' dtype.
int64_t check_bn_train_norm(const char* op, const at::Tensor& mean, const at::Tensor& var,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, at::ScalarType dtype,
                            const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var,
                            const std::optional<at::Tensor>& num_batches_tracked,
                            std::optional<double> momentum,
                            const std::optional<at::Tensor>& count_tensor);

namespace cpu {

std::tuple<at::Tensor, at::Tensor> bn_scale_shift(const at::Tensor& var,
                                                  const std::optional<at::Tensor>& weight,
                                                  const std::optional<at::Tensor>& bias,
                                                  double eps, at::ScalarType dtype);

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_scale_shift_backward(
    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& grad_shift,
    const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, at::ScalarType dtype);

void bn_update_running_stats(const at::Tensor& mean, const at::Tensor& var,
                             const std::optional<at::Tensor>& running_mean,
                             const std::optional<at::Tensor>& running_var,
                             const std::optional<at::Tensor>& num_batches_tracked,
                             std::optional<double> momentum, double count,
                             const std::optional<at::Tensor>& count_tensor);

std::tuple<at::Tensor, at::Tensor> bn_train_norm(
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, at::ScalarType dtype,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, std::optional<double> momentum,
    double count, const std::optional<at::Tensor>& count_tensor);

}  // namespace cpu
}  // namespace convmixer_kernels
