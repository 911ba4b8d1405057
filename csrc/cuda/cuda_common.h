// What the torch launchers in csrc/cuda/*.cu share: tensors to the launch entries of
// kernels/*_launch.cuh (storage type codes, raw pointers, the workspace) on the current stream.
// Only these launchers include torch; the entries and the kernels are torch-free.
#pragma once

#include "../ops.h"
#include "../stage_checks.h"
#include "../bn_ops.h"
#include "kernels/bn_math.cuh"
#include "kernels/launch.cuh"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <utility>

namespace convmixer_kernels {
namespace cuda_ops {

// The launch entries' code of a tensor's storage type (the stage checks admit only these four).
inline cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::Float32;
    case at::kDouble: return cuda::DType::Float64;
    case at::kHalf: return cuda::DType::Float16;
    case at::kBFloat16: return cuda::DType::BFloat16;
    default:
      TORCH_CHECK_TYPE(false, "convmixer_kernels: no CUDA kernels for dtype ", t.scalar_type());
  }
}

inline const void* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr() : nullptr;
}

inline const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

inline void* out_ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// A [C] vector of its own element type (kernels/elements.cuh): the BatchNorm's parameters, the
// running statistics, a count tensor.
inline cuda::Elem elem_of(const at::Tensor& t) {
  return t.scalar_type() == at::kLong ? cuda::Elem::Int64
                                      : static_cast<cuda::Elem>(static_cast<int>(dtype_of(t)));
}

inline cuda::In in_of(const at::Tensor& t) {
  return t.defined() ? cuda::In{t.data_ptr(), elem_of(t)} : cuda::In{};
}

inline cuda::Out out_of(const at::Tensor& t) {
  return t.defined() ? cuda::Out{t.data_ptr(), elem_of(t)} : cuda::Out{};
}

inline at::Tensor contiguous_or_none(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

// A stage's folded BatchNorm (bn_ops.h BnFold) for its launch entry: the parameters kept
// contiguous, scale and shift allocated ([C] of the accumulation type; empty without a fold).
struct BnFoldCall {
  at::Tensor weight, bias, scale, shift;
  cuda::BnNorm c;
  BnFoldCall(const BnFold& f, int64_t C, const at::Tensor& like, at::ScalarType acc)
      : weight(contiguous_or_none(f.weight)),
        bias(contiguous_or_none(f.bias)),
        scale(f.on ? at::empty({C}, like.options().dtype(acc)) : empty_output(like, acc)),
        shift(f.on ? at::empty({C}, like.options().dtype(acc)) : empty_output(like, acc)) {
    if (!f.on) return;
    c.weight = in_of(weight);
    c.bias = in_of(bias);
    c.eps = f.eps;
    c.scale = scale.data_ptr();
    c.shift = shift.data_ptr();
  }
};

// The backward's (bn_ops.h BnFoldGrad): grad_weight and grad_bias allocated in the weight's dtype
// (empty without a weight or a fold).
struct BnFoldGradCall {
  at::Tensor grad_scale, grad_shift, var, weight, grad_weight, grad_bias;
  cuda::BnGrad c;
  BnFoldGradCall(const BnFoldGrad& f, int64_t C, const at::Tensor& like, at::ScalarType acc)
      : grad_scale(contiguous_or_none(f.grad_scale)),
        grad_shift(contiguous_or_none(f.grad_shift)),
        var(f.on ? f.var.contiguous() : at::Tensor()),
        weight(contiguous_or_none(f.weight)),
        grad_weight(weight.defined() ? at::empty({C}, weight.options()) : empty_output(like, acc)),
        grad_bias(weight.defined() ? at::empty({C}, weight.options()) : empty_output(like, acc)) {
    if (!f.on) return;
    c.grad_scale = grad_scale.defined() ? grad_scale.data_ptr() : nullptr;
    c.grad_shift = grad_shift.defined() ? grad_shift.data_ptr() : nullptr;
    c.var = var.data_ptr();
    c.weight = in_of(weight);
    c.eps = f.eps;
    if (weight.defined()) {
      c.grad_weight = out_of(grad_weight);
      c.grad_bias = out_of(grad_bias);
    }
  }
};

inline cuda::NormPtrs norm_ptrs(const Norm& n) {
  return {ptr_or_null(n.mean), ptr_or_null(n.scale), ptr_or_null(n.shift)};
}

// The workspace one launch entry's call needs, on `like`'s device (undefined when it needs none, or
// when `with_workspace` is false: a forward without statistics); a ValueError naming `op`, `what`
// and the reason when the kernels cannot take the call.
template <typename Call, typename... What>
at::Tensor workspace_for(const char* op, const Call& call, const at::Tensor& like,
                         bool with_workspace, const What&... what) {
  const cuda::Requirements need = requirements(call);
  TORCH_CHECK_VALUE(need.valid, op, ": the CUDA kernels cannot run ", what..., ": ", need.error);
  const size_t bytes = with_workspace ? need.workspace_bytes : 0;
  if (bytes == 0) return at::Tensor();
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

// The finalize counters (kernels/last_cta.cuh) of the current stream: at least n ints, zero. One
// buffer per (device, stream), zeroed once when made and kept: the kernels' last CTAs leave it
// zero, and a stream's launches run one after another, so they share it while two streams never
// do. While the stream captures a CUDA graph, a buffer of that launch's own, zeroed by a node of
// the graph: a replay (on any stream) then never shares counters with eager launches, nor with
// the graph's other launches.
inline at::Tensor stream_counters(int64_t n) {
  const auto options =
      at::TensorOptions().dtype(at::kInt).device(at::kCUDA, c10::cuda::current_device());
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    // Freed after the launch: the graph's pool keeps the memory for its replays.
    return at::zeros({n}, options);
  }
  static std::mutex mutex;
  // Never destroyed: tensors must not be freed after the CUDA runtime at exit.
  static auto* buffers = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& buffer = (*buffers)[{int(c10::cuda::current_device()), stream}];
  // Grown (never shrunk) to a whole number of 1024 ints; the old buffer is freed in stream order.
  if (!buffer.defined() || buffer.numel() < n)
    buffer = at::zeros({(n + 1023) / 1024 * 1024}, options);
  return buffer;
}

// Runs one launch entry on the current stream in the workspace `ws` (from workspace_for), with the
// stream's finalize counters; a RuntimeError if that fails.
template <typename Call>
void launch_in(const char* op, const Call& call, const at::Tensor& ws) {
  const size_t bytes = ws.defined() ? size_t(ws.numel()) : 0;
  const int64_t n = requirements(call).counters;
  const at::Tensor counters = n > 0 ? stream_counters(n) : at::Tensor();
  const cudaError_t err =
      cuda::launch(call, bytes > 0 ? ws.data_ptr() : nullptr, bytes,
                   n > 0 ? counters.data_ptr<int>() : nullptr, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// Both: the workspace, then the launch.
template <typename Call, typename... What>
void launch_entry(const char* op, const Call& call, const at::Tensor& like, bool with_workspace,
                  const What&... what) {
  launch_in(op, call, workspace_for(op, call, like, with_workspace, what...));
}

}  // namespace cuda_ops
}  // namespace convmixer_kernels
