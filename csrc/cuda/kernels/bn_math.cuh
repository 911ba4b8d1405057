// A training BatchNorm's per-channel maths, in one place for every kernel that does it: the glue
// kernels (bn_ops.cuh) and the stages that fold their output's BatchNorm in (a forward's last CTAs
// turn the batch statistics into the Norm's scale and shift; a backward takes the Norm's gradients
// back to the variance and the BatchNorm's weight and bias on its own per-channel loads), which
// spares the model a glue launch each way per BatchNorm (docs/CUDA.md, "BatchNorm in the stages").
// In the accumulation type, with correctly rounded sqrt and division, so the results do not
// depend on the compiler's contraction choices and the folded and the glue kernels agree bitwise.
// Torch-free (docs/DESIGN.md §8).
#pragma once

#include "channel_stats.cuh"
#include "elements.cuh"

namespace convmixer_kernels {
namespace cuda {

// The forward's fold: scale = weight / sqrt(var + eps), shift = bias of the output's batch var
// (invstd and 0 without weight and bias). scale null: no fold.
struct BnNorm {
  In weight, bias;  // [C] each in its own element type, both or neither
  double eps = 0;
  void* scale = nullptr;  // [C] accumulation type
  void* shift = nullptr;
};

// The backward's fold: the gradients of BnNorm's inputs from those of its outputs (null: zero),
// grad_var added to the statistics' own, grad_weight and grad_bias written (with weight) by one
// CTA per channel block. var null: no fold.
struct BnGrad {
  const void* grad_scale = nullptr;  // [C] accumulation type
  const void* grad_shift = nullptr;
  const void* var = nullptr;  // the forward's batch var, [C] accumulation type
  In weight;
  double eps = 0;
  Out grad_weight, grad_bias;  // with weight, each in weight's element type
};

namespace bn_math {

__device__ __forceinline__ float acc_sqrt(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double acc_sqrt(double a) { return __dsqrt_rn(a); }

// 1 / sqrt(var + eps), as torch.rsqrt(var + eps) (correctly rounded steps, not the approximate
// rsqrt instruction).
template <typename Acc>
__device__ __forceinline__ Acc invstd_of(Acc var, Acc eps) {
  using channel_stats::acc_add;
  using channel_stats::acc_div;
  return acc_div(Acc(1), acc_sqrt(acc_add(var, eps)));
}

// Channel i's scale and shift from its var.
template <typename Acc>
__device__ __forceinline__ void scale_shift(Acc var, In weight, In bias, double eps, int64_t i,
                                            Acc& scale, Acc& shift) {
  const Acc invstd = invstd_of(var, Acc(eps));
  if (weight.data != nullptr) {
    scale = channel_stats::acc_mul(load<Acc>(weight.data, weight.type, i), invstd);
    shift = load<Acc>(bias.data, bias.type, i);
  } else {
    scale = invstd;
    shift = Acc(0);
  }
}

// d scale / d var = -weight · invstd³ / 2, times grad_scale gs, in the order of autograd's formula
// for weight · (var + eps)^(-1/2). w is 1 without a weight.
template <typename Acc>
__device__ __forceinline__ Acc grad_var(Acc gs, Acc invstd, Acc w) {
  using channel_stats::acc_mul;
  const Acc cube = acc_mul(acc_mul(invstd, invstd), invstd);
  return acc_mul(acc_mul(acc_mul(gs, w), Acc(-0.5)), cube);
}

// BnNorm for channel c, from its just-merged var.
template <typename Acc>
__device__ __forceinline__ void fold_forward(const BnNorm& b, int64_t c, Acc var) {
  if (b.scale == nullptr) return;
  Acc scale, shift;
  scale_shift(var, b.weight, b.bias, b.eps, c, scale, shift);
  static_cast<Acc*>(b.scale)[c] = scale;
  static_cast<Acc*>(b.shift)[c] = shift;
}

// Channel i of a BatchNorm's backward: writes grad_weight = grad_scale · invstd and grad_bias =
// grad_shift where given (and `write`), returns the var gradient. Null gradients are zero.
template <typename Acc>
__device__ __forceinline__ Acc backward_at(const void* grad_scale, const void* grad_shift,
                                           Acc var, In weight, double eps, Out grad_weight,
                                           Out grad_bias, int64_t i, bool write) {
  const Acc gs = grad_scale != nullptr ? static_cast<const Acc*>(grad_scale)[i] : Acc(0);
  const Acc invstd = invstd_of(var, Acc(eps));
  const Acc w = weight.data != nullptr ? load<Acc>(weight.data, weight.type, i) : Acc(1);
  if (write && grad_weight.data != nullptr)
    store(grad_weight, i, channel_stats::acc_mul(gs, invstd));
  if (write && grad_bias.data != nullptr)
    store(grad_bias, i, grad_shift != nullptr ? static_cast<const Acc*>(grad_shift)[i] : Acc(0));
  return grad_var(gs, invstd, w);
}

// BnGrad for channel c: the var gradient it adds to the statistics' own; with `write`, also
// grad_weight and grad_bias (one CTA per channel block writes them).
template <typename Acc>
__device__ __forceinline__ Acc fold_backward(const BnGrad& b, int64_t c, bool write) {
  return backward_at<Acc>(b.grad_scale, b.grad_shift, static_cast<const Acc*>(b.var)[c],
                          b.weight, b.eps, b.grad_weight, b.grad_bias, c, write);
}

// A stage with no rows runs no CTA that could fold: these do it over all C channels after the
// statistics of no rows (NaN) are written.
template <typename Acc>
__global__ void fold_forward_kernel(const BnNorm b, const Acc* var, int64_t C) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < C) fold_forward<Acc>(b, c, var[c]);
}

template <typename Acc>
__global__ void fold_backward_kernel(const BnGrad b, int64_t C) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < C) fold_backward<Acc>(b, c, true);
}

constexpr int kFoldThreads = 256;

template <typename Acc>
inline cudaError_t launch_fold_forward(const BnNorm& b, const Acc* var, int64_t C,
                                       cudaStream_t stream) {
  if (b.scale == nullptr || C <= 0) return cudaSuccess;
  fold_forward_kernel<Acc><<<unsigned((C + kFoldThreads - 1) / kFoldThreads), kFoldThreads, 0,
                             stream>>>(b, var, C);
  return cudaGetLastError();
}

template <typename Acc>
inline cudaError_t launch_fold_backward(const BnGrad& b, int64_t C, cudaStream_t stream) {
  if (b.var == nullptr || C <= 0) return cudaSuccess;
  fold_backward_kernel<Acc><<<unsigned((C + kFoldThreads - 1) / kFoldThreads), kFoldThreads, 0,
                              stream>>>(b, C);
  return cudaGetLastError();
}

// Host-side checks of a fold's pointers (the launch entries' requirements).
inline const char* bn_norm_error(const BnNorm& b, bool stats) {
  if (b.scale == nullptr) return b.shift == nullptr ? nullptr : "a BatchNorm shift without scale";
  if (!stats) return "a folded BatchNorm needs the statistics";
  if (b.shift == nullptr) return "a folded BatchNorm needs scale and shift";
  if ((b.weight.data == nullptr) != (b.bias.data == nullptr))
    return "the BatchNorm's weight and bias are both given or both absent";
  if (!is_float(b.weight.type) || !is_float(b.bias.type))
    return "the BatchNorm's weight and bias must be floating";
  return nullptr;
}

inline const char* bn_grad_error(const BnGrad& b, bool have_mean) {
  if (b.var == nullptr) {
    return b.grad_scale == nullptr && b.grad_shift == nullptr && b.grad_weight.data == nullptr
               ? nullptr
               : "a folded BatchNorm's gradients need its var";
  }
  if (!have_mean) return "a folded BatchNorm's gradients need the forward's mean";
  if ((b.weight.data == nullptr) != (b.grad_weight.data == nullptr) ||
      (b.grad_weight.data == nullptr) != (b.grad_bias.data == nullptr))
    return "the BatchNorm's grad_weight and grad_bias are written exactly when its weight is given";
  for (const Elem t : {b.weight.type, b.grad_weight.type, b.grad_bias.type})
    if (!is_float(t)) return "the BatchNorm's weight and its gradients must be floating";
  return nullptr;
}

}  // namespace bn_math
}  // namespace cuda
}  // namespace convmixer_kernels
