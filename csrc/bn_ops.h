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

// check_bn_update_running_stats of each item of five lists of one length (no count tensor), every
// buffer given. Returns the length.
int64_t check_bn_update_running_stats_many(const char* op, at::TensorList mean,
                                           at::TensorList var, at::TensorList running_mean,
                                           at::TensorList running_var,
                                           at::TensorList num_batches_tracked,
                                           std::optional<double> momentum);

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

// The BatchNorm of a stage's output folded into the stage ops (their trailing bn_* arguments,
// docs/OPS.md § BatchNorm in the stages): the forward returns the Norm's scale and shift of its
// batch statistics as bn_scale_shift would, the backward takes their gradients and adds
// bn_scale_shift_backward's work to its own. `on` exactly when bn_eps is given.
struct BnFold {
  bool on = false;
  std::optional<at::Tensor> weight, bias;
  double eps = 0;
};

// weight and bias [C] of a floating dtype each, both or neither, on `device`; only with bn_eps,
// which needs the statistics.
BnFold check_bn_fold(const char* op, const std::optional<at::Tensor>& bn_weight,
                     const std::optional<at::Tensor>& bn_bias, std::optional<double> bn_eps,
                     bool stats, int64_t C, const at::Device& device);

struct BnFoldGrad {
  bool on = false;
  std::optional<at::Tensor> grad_scale, grad_shift, weight;
  at::Tensor var;
  double eps = 0;
};

// With bn_eps: var [C] of `acc` (the forward's batch var), grad_scale and grad_shift [C] of `acc`
// or absent, weight as check_bn_fold's, all on `device`, and the forward's mean given
// (`have_mean`); without it, none of them.
BnFoldGrad check_bn_fold_grad(const char* op, const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& grad_shift,
                              const std::optional<at::Tensor>& var,
                              const std::optional<at::Tensor>& bn_weight,
                              std::optional<double> bn_eps, bool have_mean, int64_t C,
                              at::ScalarType acc, const at::Device& device);

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

void bn_update_running_stats_many(at::TensorList mean, at::TensorList var,
                                  at::TensorList running_mean, at::TensorList running_var,
                                  at::TensorList num_batches_tracked,
                                  std::optional<double> momentum, double count);

std::tuple<at::Tensor, at::Tensor> bn_train_norm(
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, at::ScalarType dtype,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, std::optional<double> momentum,
    double count, const std::optional<at::Tensor>& count_tensor);

}  // namespace cpu
}  // namespace convmixer_kernels
