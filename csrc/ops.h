// What every backend's implementation of the ops shares, and the CPU implementations
// (registered by csrc/cpu/register_cpu.cpp). The op schemas are csrc/ops_schema.cpp; the checks
// that turn an op's arguments into its implementation's inputs are csrc/stage_checks.h.
// The contract (shapes, maths, what each output means) is docs/OPS.md.
#pragma once

#include "activation.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>
#include <utility>

namespace convmixer_kernels {

// dispatch_act (activation.h) for the torch code, where `act` came from parse_act: a value that is
// no activation is an internal error rather than a silent choice of one.
template <typename F>
decltype(auto) dispatch_act(Act act, F&& f) {
  return dispatch_act(act, std::forward<F>(f), [act]() -> decltype(f(ActTag<kActs[0]>{})) {
    TORCH_INTERNAL_ASSERT(false, "convmixer_kernels: activation code ", static_cast<int>(act),
                          " is not in csrc/activation.h");
  });
}

// A per-channel normalisation applied on load: (v - mean) * scale + shift.
// Either all three are defined or none is.
struct Norm {
  at::Tensor mean, scale, shift;
  bool defined() const { return mean.defined(); }
};

// The dtype of the statistics and norm vectors for activations stored as `storage`.
inline at::ScalarType acc_dtype_for(at::ScalarType storage) {
  return storage == at::kDouble ? at::kDouble : at::kFloat;
}

// An empty [0] tensor, the value of an output that the call did not ask for.
inline at::Tensor empty_output(const at::Tensor& like, at::ScalarType dtype) {
  return at::empty({0}, like.options().dtype(dtype));
}

namespace cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_stage(
    const at::Tensor& x, const std::optional<at::Tensor>& x_mean,
    const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& x_shift,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, c10::string_view act,
    bool stats, bool keep_pre_act);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dw_stage_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_mean,
                  const std::optional<at::Tensor>& grad_var, const at::Tensor& x,
                  const std::optional<at::Tensor>& x_mean,
                  const std::optional<at::Tensor>& x_scale,
                  const std::optional<at::Tensor>& x_shift, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mean,
                  c10::string_view act, const std::optional<at::Tensor>& grad_res,
                  const std::optional<at::Tensor>& saved_out,
                  const std::optional<at::Tensor>& pre_act,
                  const std::optional<at::Tensor>& grad_out_scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pw_stage(
    const at::Tensor& x, const std::optional<at::Tensor>& x_mean,
    const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& x_shift,
    const std::optional<at::Tensor>& res, const std::optional<at::Tensor>& res_mean,
    const std::optional<at::Tensor>& res_scale, const std::optional<at::Tensor>& res_shift,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, c10::string_view act,
    bool stats, bool keep_pre_act, bool keep_u);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor>
pw_stage_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_mean,
                  const std::optional<at::Tensor>& grad_var, const at::Tensor& x,
                  const std::optional<at::Tensor>& x_mean,
                  const std::optional<at::Tensor>& x_scale,
                  const std::optional<at::Tensor>& x_shift, const std::optional<at::Tensor>& res,
                  const std::optional<at::Tensor>& res_mean,
                  const std::optional<at::Tensor>& res_scale,
                  const std::optional<at::Tensor>& res_shift, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& pre_act,
                  const std::optional<at::Tensor>& mean, c10::string_view act,
                  const std::optional<at::Tensor>& saved_out,
                  const std::optional<at::Tensor>& saved_u, bool grad_res_normed,
                  bool write_grad_x);  // false: grad_x empty, x's norm sums still taken

// act(x) of every element, rounded to x's dtype, as a new tensor of x's sizes and layout: what a
// stage that had written act's output would have stored (the CPU's x_act, csrc/cpu/act_in.cpp).
at::Tensor act_of(const at::Tensor& x, Act act);

// The registered CPU implementations: the four above with the output's BatchNorm folded in
// (bn_ops.h BnFold, csrc/cpu/bn_fold.cpp), the schemas' trailing bn_* arguments, and the link's
// write_out and x_act composed around them.
namespace with_bn {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_stage(
    const at::Tensor& x, const std::optional<at::Tensor>& x_mean,
    const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& x_shift,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, c10::string_view act,
    bool stats, bool keep_pre_act, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, std::optional<double> bn_eps, bool write_out);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
dw_stage_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_mean,
                  const std::optional<at::Tensor>& grad_var, const at::Tensor& x,
                  const std::optional<at::Tensor>& x_mean,
                  const std::optional<at::Tensor>& x_scale,
                  const std::optional<at::Tensor>& x_shift, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mean,
                  c10::string_view act, const std::optional<at::Tensor>& grad_res,
                  const std::optional<at::Tensor>& saved_out,
                  const std::optional<at::Tensor>& pre_act,
                  const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& grad_shift,
                  const std::optional<at::Tensor>& var, const std::optional<at::Tensor>& bn_weight,
                  std::optional<double> bn_eps, const std::optional<at::Tensor>& grad_out_scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
pw_stage(const at::Tensor& x, const std::optional<at::Tensor>& x_mean,
         const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& x_shift,
         const std::optional<at::Tensor>& res, const std::optional<at::Tensor>& res_mean,
         const std::optional<at::Tensor>& res_scale, const std::optional<at::Tensor>& res_shift,
         const at::Tensor& weight, const std::optional<at::Tensor>& bias, c10::string_view act,
         bool stats, bool keep_pre_act, bool keep_u, const std::optional<at::Tensor>& bn_weight,
         const std::optional<at::Tensor>& bn_bias, std::optional<double> bn_eps,
         const std::optional<c10::string_view>& x_act);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
pw_stage_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_mean,
                  const std::optional<at::Tensor>& grad_var, const at::Tensor& x,
                  const std::optional<at::Tensor>& x_mean,
                  const std::optional<at::Tensor>& x_scale,
                  const std::optional<at::Tensor>& x_shift, const std::optional<at::Tensor>& res,
                  const std::optional<at::Tensor>& res_mean,
                  const std::optional<at::Tensor>& res_scale,
                  const std::optional<at::Tensor>& res_shift, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& pre_act,
                  const std::optional<at::Tensor>& mean, c10::string_view act,
                  const std::optional<at::Tensor>& saved_out,
                  const std::optional<at::Tensor>& saved_u, bool grad_res_normed,
                  const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& grad_shift,
                  const std::optional<at::Tensor>& var, const std::optional<at::Tensor>& bn_weight,
                  std::optional<double> bn_eps, bool defer_grad_x,
                  const std::optional<c10::string_view>& x_act);

}  // namespace with_bn
}  // namespace cpu
}  // namespace convmixer_kernels
