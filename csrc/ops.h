// Declarations shared by the op schemas and every backend's implementation.
// The contract (shapes, maths, what each output means) is docs/OPS.md.
#pragma once

#include "activation.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>
#include <utility>

namespace convmixer_kernels {

// The activation an op's `act` string names; a ValueError naming `op`, the string and the
// activations (csrc/activation.h) otherwise.
Act parse_act(const char* op, c10::string_view name);

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

// Builds a Norm from the three optional schema arguments, checking that they come as a set of
// [channels] vectors of dtype `acc_dtype` on x's device.
Norm make_norm(const char* op, const char* name, const std::optional<at::Tensor>& mean,
               const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
               int64_t channels, at::ScalarType acc_dtype, const at::Device& device);

// A statistics input of a backward op (grad_mean, grad_var, the forward's mean): nullopt when
// absent or empty, else checked to be [channels] and cast to `acc_dtype`.
std::optional<at::Tensor> stat_vector(const char* op, const char* name,
                                      const std::optional<at::Tensor>& t, int64_t channels,
                                      at::ScalarType acc_dtype);

// The accumulation dtype for a storage dtype: double for double, float otherwise.
at::ScalarType acc_dtype_for(at::ScalarType storage);

// An empty [0] tensor, the value of an output that the call did not ask for.
at::Tensor empty_output(const at::Tensor& like, at::ScalarType dtype);

// True when an optional tensor argument is present and non-empty.
inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined() && t->numel() > 0; }

namespace cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> dw_stage(
    const at::Tensor& x, const std::optional<at::Tensor>& x_mean,
    const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& x_shift,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, c10::string_view act,
    bool stats);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dw_stage_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_mean,
                  const std::optional<at::Tensor>& grad_var, const at::Tensor& x,
                  const std::optional<at::Tensor>& x_mean,
                  const std::optional<at::Tensor>& x_scale,
                  const std::optional<at::Tensor>& x_shift, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mean,
                  c10::string_view act);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pw_stage(
    const at::Tensor& x, const std::optional<at::Tensor>& x_mean,
    const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& x_shift,
    const std::optional<at::Tensor>& res, const std::optional<at::Tensor>& res_mean,
    const std::optional<at::Tensor>& res_scale, const std::optional<at::Tensor>& res_shift,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, c10::string_view act,
    bool stats, bool keep_pre_act);

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
                  const std::optional<at::Tensor>& mean, c10::string_view act);

}  // namespace cpu
}  // namespace convmixer_kernels
