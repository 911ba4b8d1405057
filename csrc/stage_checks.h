// Shape and dtype checks of the stage ops, shared by every backend's implementation (CPU, CUDA):
// the invariants their memory accesses depend on. User-facing validation with friendlier messages
// happens in Python first (convmixer_kernels/ops/checks.py); these make a direct torch.ops call
// with bad arguments an error, never an out-of-bounds access.
#pragma once

#include "ops.h"

#include <ATen/core/Tensor.h>

#include <optional>

namespace convmixer_kernels {

struct DwGeometry {
  int64_t N, C, H, W, k, pad;
  int64_t Hp() const { return H + 2 * pad; }
  int64_t Wp() const { return W + 2 * pad; }
  int64_t count() const { return N * H * W; }
};

// x [N, C, H, W]; weight [C, 1, k, k] with odd k in [1, 15]; bias [C] or none; one dtype.
DwGeometry check_dw(const char* op, const at::Tensor& x, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias);

struct PwGeometry {
  int64_t N, Cin, Cout, H, W;
  int64_t rows() const { return N * H * W; }
};

// x [N, Cin, H, W]; res none or like x; weight [Cout, Cin, 1, 1]; bias [Cout] or none; one dtype.
PwGeometry check_pw(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& res,
                    const at::Tensor& weight, const std::optional<at::Tensor>& bias);

// A backward op's grad_out (or pre_act): the forward output's sizes and x's dtype.
void check_like_output(const char* op, const char* name, const at::Tensor& t,
                       at::IntArrayRef sizes, at::ScalarType dtype);

// The statistics' gradients and the forward's mean of a backward op, as [channels] vectors of the
// accumulation dtype (nullopt when absent or empty); grad_var needs mean.
struct StatGrads {
  std::optional<at::Tensor> grad_mean, grad_var, mean;
};
StatGrads check_stat_grads(const char* op, const std::optional<at::Tensor>& grad_mean,
                           const std::optional<at::Tensor>& grad_var,
                           const std::optional<at::Tensor>& mean, int64_t channels,
                           at::ScalarType acc_dtype);

}  // namespace convmixer_kernels
