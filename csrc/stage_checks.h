// Shape and dtype checks of the stage ops, shared by every backend's implementation (CPU, CUDA):
// the invariants their memory accesses depend on. User-facing validation with friendlier messages
// happens in Python first (convmixer_kernels/ops/checks.py); these make a direct torch.ops call
// with bad arguments an error, never an out-of-bounds access.
#pragma once

#include "ops.h"

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace convmixer_kernels {

// The activation an op's `act` string names; a ValueError naming `op`, the string and the
// activations (csrc/activation.h) otherwise.
Act parse_act(const char* op, c10::string_view name, const char* arg = "act");

// pw_stage's x_act: nullopt for None (x read as it is), else the activation x is read through
// (parse_act's error, naming x_act, for a string that names none).
std::optional<Act> parse_x_act(const char* op, const std::optional<c10::string_view>& x_act);

// dw_stage's write_out: false only with keep_pre_act (the pre-activation is then the only
// activation-sized output: its consumer applies act on its load).
void check_write_out(const char* op, bool write_out, bool keep_pre_act);

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

// A backward op's grad_out (or pre_act): the forward output's sizes, x's dtype and device.
void check_like_output(const char* op, const char* name, const at::Tensor& t,
                       at::IntArrayRef sizes, const at::Tensor& x);

// The statistics' gradients and the forward's mean of a backward op, as [channels] vectors of the
// accumulation dtype on `device` (nullopt when absent or empty); grad_var needs mean.
struct StatGrads {
  std::optional<at::Tensor> grad_mean, grad_var, mean;
};
StatGrads check_stat_grads(const char* op, const std::optional<at::Tensor>& grad_mean,
                           const std::optional<at::Tensor>& grad_var,
                           const std::optional<at::Tensor>& mean, int64_t channels,
                           at::ScalarType acc_dtype, const at::Device& device);

// dw_stage_backward's grad_out_scale: nullopt when absent or empty, else [channels] of the
// accumulation dtype on `device`.
std::optional<at::Tensor> check_grad_out_scale(const char* op,
                                               const std::optional<at::Tensor>& grad_out_scale,
                                               int64_t channels, at::ScalarType acc_dtype,
                                               const at::Device& device);

// pw_stage_backward's defer_grad_x: only with grad_res_normed and a residual, whose gradient
// (dU) is then what the caller scales.
void check_defer_grad_x(const char* op, bool defer_grad_x, bool grad_res_normed, bool has_res);

// A stage op's arguments, checked and parsed: what every backend's implementation starts from.
// The backward variants also check grad_out (shape, dtype, device), the statistics' gradients and
// the forward's mean (via check_stat_grads, on x's device) and, for pw, pre_act.
struct DwArgs {
  DwGeometry g;
  Act act;
  at::ScalarType acc;  // accumulation dtype of the norm and statistics vectors
  Norm norm;
  StatGrads sg;        // backward only
  // Backward only: a non-empty grad_res (added into grad_x) / saved_out (the forward's out) /
  // pre_act (the forward's pre-activation a, kept by keep_pre_act).
  bool have_grad_res = false, have_saved_out = false, have_pre_act = false;
};

DwArgs check_dw_stage(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& x_mean,
                      const std::optional<at::Tensor>& x_scale,
                      const std::optional<at::Tensor>& x_shift, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, c10::string_view act, bool stats);

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
                               const std::optional<at::Tensor>& pre_act);

struct PwArgs {
  PwGeometry g;
  Act act;
  at::ScalarType acc;
  Norm nx, nr;
  StatGrads sg;               // backward only
  bool have_pre_act = false;  // backward only: a non-empty pre_act was given
  bool have_saved_out = false;  // backward only: a non-empty saved_out was given
  bool have_saved_u = false;    // backward only: a non-empty saved_u (the forward's u) was given
  std::vector<int64_t> out_sizes() const { return {g.N, g.Cout, g.H, g.W}; }
  std::vector<int64_t> in_sizes() const { return {g.N, g.Cin, g.H, g.W}; }
};

PwArgs check_pw_stage(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& x_mean,
                      const std::optional<at::Tensor>& x_scale,
                      const std::optional<at::Tensor>& x_shift,
                      const std::optional<at::Tensor>& res,
                      const std::optional<at::Tensor>& res_mean,
                      const std::optional<at::Tensor>& res_scale,
                      const std::optional<at::Tensor>& res_shift, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, c10::string_view act, bool stats);

PwArgs check_pw_stage_backward(
    const char* op, const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_mean,
    const std::optional<at::Tensor>& grad_var, const at::Tensor& x,
    const std::optional<at::Tensor>& x_mean, const std::optional<at::Tensor>& x_scale,
    const std::optional<at::Tensor>& x_shift, const std::optional<at::Tensor>& res,
    const std::optional<at::Tensor>& res_mean, const std::optional<at::Tensor>& res_scale,
    const std::optional<at::Tensor>& res_shift, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& pre_act,
    const std::optional<at::Tensor>& mean, c10::string_view act,
    const std::optional<at::Tensor>& saved_out, const std::optional<at::Tensor>& saved_u);

}  // namespace convmixer_kernels
