// The BatchNorm glue of the fused model on [C] vectors (docs/OPS.md § BatchNorm ops), one kernel
// per job instead of a dozen ATen ops each:
//   bn_scale_shift_kernel           (var, weight, bias) -> the Norm's scale = weight / sqrt(var +
//                                   eps) and shift = bias (invstd and 0 without weight and bias)
//   bn_scale_shift_backward_kernel  (grad_scale, grad_shift) -> grad_var, grad_weight, grad_bias
//   bn_running_stats_kernel         running_mean, running_var, num_batches_tracked in place, as
//                                   nn.BatchNorm2d updates them
//   bn_train_norm_kernel            a training BatchNorm's both: the running statistics, then
//                                   scale and shift of the batch var (one launch instead of two)
// Every vector is read and written in its own element type (the running statistics of a
// half-precision model, bfloat16 parameters, ...), converted in registers: no cast launches. The
// maths is in the accumulation type, with correctly rounded sqrt and division, so the results do
// not depend on the compiler's contraction choices. Torch-free (docs/DESIGN.md §8).
#pragma once

#include "bn_math.cuh"
#include "launch.cuh"

#include <type_traits>

namespace convmixer_kernels {
namespace cuda {
namespace bn {

using ::convmixer_kernels::cuda::Elem;
using ::convmixer_kernels::cuda::In;
using ::convmixer_kernels::cuda::load;
using ::convmixer_kernels::cuda::Out;
using ::convmixer_kernels::cuda::store;

// problem.dtype: the accumulation type (Float32 or Float64), that of scale and shift, of
// grad_scale and grad_shift, of the batch statistics. C: the channels.
struct Problem {
  DType dtype = DType::Float32;
  int64_t C = 0;
};

// scale, shift [C] of the accumulation type from var (and weight and bias, both or neither).
struct ScaleShift {
  Problem problem;
  double eps = 0;
  In var, weight, bias;
  void* scale = nullptr;
  void* shift = nullptr;
};

// The gradients of ScaleShift's inputs from those of its outputs (null: zero), each in its input's
// element type; grad_weight and grad_bias exactly when weight (and so bias) was given.
struct ScaleShiftBackward {
  Problem problem;
  double eps = 0;
  const void* grad_scale = nullptr;
  const void* grad_shift = nullptr;
  In var, weight;
  Out grad_var, grad_weight, grad_bias;
};

// running <- (1 - f) running + f stat for the mean and the unbiased variance var · n / (n - 1),
// f = momentum, or 1 / num_batches_tracked (after its increment) when `cumulative`; n is `count`,
// or the 0-d `count_tensor` when given (read on the device: a gathered count needs no host sync).
// Each of the three running tensors may be absent; cumulative needs num_batches_tracked.
struct RunningStats {
  Problem problem;
  const void* mean = nullptr;
  const void* var = nullptr;
  Out running_mean, running_var;
  int64_t* num_batches_tracked = nullptr;
  double momentum = 0.1;
  bool cumulative = false;
  double count = 0;
  In count_tensor;
};

// Up to kManyItems RunningStats (each its own C) in one launch, one CTA each: the BatchNorms that
// a model's stages fold in (bn_math.cuh) update their running statistics together once the
// forward has run, one launch a step instead of one per BatchNorm. Every item's update is
// computed in one type (updates_in_double), as it would be alone.
constexpr int kManyItems = 32;
struct RunningStatsMany {
  Problem problem;  // dtype: the statistics' accumulation type; C unused
  int count = 0;
  RunningStats items[kManyItems];
};
// A kernel's parameters (this and the statistics' type code) fit the 4 KiB every CUDA version takes.
static_assert(sizeof(RunningStatsMany) + sizeof(Elem) <= 4096, "too many items for one launch");

// RunningStats, then ScaleShift of the batch var, in one kernel; the three problems are one.
struct TrainNorm {
  Problem problem;
  ScaleShift norm;
  RunningStats running;
};

constexpr int kThreads = 256;

// The statistics' explicitly rounded arithmetic; the BatchNorm's own in bn_math.cuh.
using channel_stats::acc_add;
using channel_stats::acc_div;
using channel_stats::acc_mul;

// Channel i of ScaleShift.
template <typename Acc>
__device__ __forceinline__ void scale_shift_at(const ScaleShift& c, int64_t i) {
  bn_math::scale_shift(load<Acc>(c.var.data, c.var.type, i), c.weight, c.bias, c.eps, i,
                       static_cast<Acc*>(c.scale)[i], static_cast<Acc*>(c.shift)[i]);
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads)
bn_scale_shift_kernel(ScaleShift c) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i < c.problem.C) scale_shift_at<Acc>(c, i);
}

// d scale / d var = -weight · invstd³ / 2; d scale / d weight = invstd; d shift / d bias = 1.
template <typename Acc>
__global__ void __launch_bounds__(kThreads)
bn_scale_shift_backward_kernel(ScaleShiftBackward c) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= c.problem.C) return;
  const Acc var = load<Acc>(c.var.data, c.var.type, i);
  store(c.grad_var, i, bn_math::backward_at<Acc>(c.grad_scale, c.grad_shift, var, c.weight, c.eps,
                                                 c.grad_weight, c.grad_bias, i, true));
}

// RunningStats, by one CTA: every thread reads num_batches_tracked before thread 0 increments it,
// which a grid of CTAs could not order without a second launch.
template <typename Acc>
__device__ __forceinline__ void update_running(const RunningStats& c, Elem stat_type) {
  // A momentum and an integer count are host numbers: 1 - momentum and n / (n - 1) in double,
  // as Python computes them for the ATen formula; a count tensor's in its own arithmetic.
  Acc factor = Acc(c.momentum), keep = Acc(1.0 - c.momentum);
  if (c.num_batches_tracked != nullptr) {
    const int64_t tracked = *c.num_batches_tracked + 1;
    if (c.cumulative) {
      factor = acc_div(Acc(1), Acc(tracked));
      keep = Acc(1) - factor;
    }
    __syncthreads();
    if (threadIdx.x == 0) *c.num_batches_tracked = tracked;
  }
  Acc bessel = Acc(c.count / (c.count - 1.0));
  if (c.count_tensor.data != nullptr) {
    const Acc n = load<Acc>(c.count_tensor.data, c.count_tensor.type, 0);
    bessel = acc_div(n, n - Acc(1));
  }
  for (int64_t i = threadIdx.x; i < c.problem.C; i += kThreads) {
    if (c.running_mean.data != nullptr) {
      const Acc r = load<Acc>(c.running_mean.data, c.running_mean.type, i);
      const Acc m = load<Acc>(c.mean, stat_type, i);
      store(c.running_mean, i, acc_add(acc_mul(r, keep), acc_mul(m, factor)));
    }
    if (c.running_var.data != nullptr) {
      const Acc r = load<Acc>(c.running_var.data, c.running_var.type, i);
      const Acc v = acc_mul(load<Acc>(c.var, stat_type, i), bessel);
      store(c.running_var, i, acc_add(acc_mul(r, keep), acc_mul(v, factor)));
    }
  }
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads)
bn_running_stats_kernel(RunningStats c, Elem stat_type) {
  update_running<Acc>(c, stat_type);
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads)
bn_running_stats_many_kernel(const RunningStatsMany c, Elem stat_type) {
  update_running<Acc>(c.items[blockIdx.x], stat_type);
}

// One CTA, as bn_running_stats_kernel must be; the [C] scale and shift are no work for it.
template <typename AccNorm, typename AccRunning>
__global__ void __launch_bounds__(kThreads)
bn_train_norm_kernel(TrainNorm c, Elem stat_type) {
  update_running<AccRunning>(c.running, stat_type);
  for (int64_t i = threadIdx.x; i < c.norm.problem.C; i += kThreads)
    scale_shift_at<AccNorm>(c.norm, i);
}

// ---------------------------------------------------------------------------------------------
// Launch entries (launch.cuh's protocol; no workspace)
// ---------------------------------------------------------------------------------------------

inline bool is_acc(DType d) { return d == DType::Float32 || d == DType::Float64; }

inline Requirements invalid(const char* why) { return {false, why, 0}; }

inline Requirements requirements(const ScaleShift& c) {
  if (!is_acc(c.problem.dtype)) return invalid("the accumulation type must be float32 or float64");
  if (c.problem.C < 0) return invalid("negative channel count");
  if (c.problem.C > 0 && (c.var.data == nullptr || c.scale == nullptr || c.shift == nullptr))
    return invalid("var, scale and shift are required");
  if ((c.weight.data == nullptr) != (c.bias.data == nullptr))
    return invalid("weight and bias are both given or both absent");
  if (!is_float(c.var.type) || !is_float(c.weight.type) || !is_float(c.bias.type))
    return invalid("var, weight and bias must be floating");
  return {true, "", 0};
}

inline Requirements requirements(const ScaleShiftBackward& c) {
  if (!is_acc(c.problem.dtype)) return invalid("the accumulation type must be float32 or float64");
  if (c.problem.C < 0) return invalid("negative channel count");
  if (c.problem.C > 0 && (c.var.data == nullptr || c.grad_var.data == nullptr))
    return invalid("var and grad_var are required");
  if ((c.weight.data == nullptr) != (c.grad_weight.data == nullptr))
    return invalid("grad_weight is written exactly when weight is given");
  if (!is_float(c.var.type) || !is_float(c.weight.type) || !is_float(c.grad_var.type) ||
      !is_float(c.grad_weight.type) || !is_float(c.grad_bias.type))
    return invalid("every vector must be floating");
  return {true, "", 0};
}

inline Requirements requirements(const RunningStats& c) {
  if (!is_acc(c.problem.dtype)) return invalid("the statistics must be float32 or float64");
  if (c.problem.C < 0) return invalid("negative channel count");
  if (c.cumulative && c.num_batches_tracked == nullptr)
    return invalid("a cumulative average (momentum None) needs num_batches_tracked");
  if (c.problem.C > 0 && ((c.running_mean.data != nullptr && c.mean == nullptr) ||
                          (c.running_var.data != nullptr && c.var == nullptr)))
    return invalid("a running statistic needs its batch statistic");
  if (!is_float(c.running_mean.type) || !is_float(c.running_var.type))
    return invalid("the running statistics must be floating");
  if (int(c.count_tensor.type) < 0 || int(c.count_tensor.type) > int(Elem::Int64))
    return invalid("the count tensor must be floating or int64");
  return {true, "", 0};
}

// Whether an update runs in double: when its statistics or a running statistic are double (a
// running statistic is updated in its own precision at least, as the in-place ATen update
// computes it), else in float.
inline bool updates_in_double(const RunningStats& c) {
  return c.problem.dtype == DType::Float64 ||
         (c.running_mean.data != nullptr && c.running_mean.type == Elem::Float64) ||
         (c.running_var.data != nullptr && c.running_var.type == Elem::Float64);
}

inline Requirements requirements(const RunningStatsMany& c) {
  if (c.count < 0 || c.count > kManyItems)
    return invalid("more running statistics than a launch takes");
  for (int i = 0; i < c.count; ++i) {
    const RunningStats& item = c.items[i];
    if (item.problem.dtype != c.problem.dtype)
      return invalid("every item's statistics must be of the launch's accumulation type");
    const Requirements r = requirements(item);
    if (!r.valid) return r;
    if (updates_in_double(item) != updates_in_double(c.items[0]))
      return invalid("the items must all update in float or all in double");
  }
  return {true, "", 0};
}

inline Requirements requirements(const TrainNorm& c) {
  for (const Problem& p : {c.norm.problem, c.running.problem})
    if (p.dtype != c.problem.dtype || p.C != c.problem.C)
      return invalid("the norm and the running statistics must have one dtype and channel count");
  const Requirements r = requirements(c.running);
  return r.valid ? requirements(c.norm) : r;
}

inline unsigned blocks_for(int64_t C) { return unsigned((C + kThreads - 1) / kThreads); }

template <typename T>
inline cudaError_t launch_as(T, const ScaleShift& c, void*, size_t, int*, cudaStream_t stream) {
  if (!requirements(c).valid) return cudaErrorInvalidValue;
  if (c.problem.C == 0) return cudaSuccess;
  bn_scale_shift_kernel<acc_t<T>><<<blocks_for(c.problem.C), kThreads, 0, stream>>>(c);
  return cudaGetLastError();
}

template <typename T>
inline cudaError_t launch_as(T, const ScaleShiftBackward& c, void*, size_t, int*, cudaStream_t stream) {
  if (!requirements(c).valid) return cudaErrorInvalidValue;
  if (c.problem.C == 0) return cudaSuccess;
  bn_scale_shift_backward_kernel<acc_t<T>><<<blocks_for(c.problem.C), kThreads, 0, stream>>>(c);
  return cudaGetLastError();
}

// The statistics' element type.
template <typename T>
inline Elem stat_type_of() {
  return std::is_same<acc_t<T>, double>::value ? Elem::Float64 : Elem::Float32;
}

template <typename T>
inline cudaError_t launch_as(T, const RunningStats& c, void*, size_t, int*, cudaStream_t stream) {
  if (!requirements(c).valid) return cudaErrorInvalidValue;
  if (c.num_batches_tracked == nullptr && c.running_mean.data == nullptr &&
      c.running_var.data == nullptr)
    return cudaSuccess;
  if (updates_in_double(c)) {
    bn_running_stats_kernel<double><<<1, kThreads, 0, stream>>>(c, stat_type_of<T>());
  } else {
    bn_running_stats_kernel<float><<<1, kThreads, 0, stream>>>(c, stat_type_of<T>());
  }
  return cudaGetLastError();
}

template <typename T>
inline cudaError_t launch_as(T, const RunningStatsMany& c, void*, size_t, int*,
                             cudaStream_t stream) {
  if (!requirements(c).valid) return cudaErrorInvalidValue;
  if (c.count == 0) return cudaSuccess;
  if (updates_in_double(c.items[0])) {
    bn_running_stats_many_kernel<double><<<unsigned(c.count), kThreads, 0, stream>>>(
        c, stat_type_of<T>());
  } else {
    bn_running_stats_many_kernel<float><<<unsigned(c.count), kThreads, 0, stream>>>(
        c, stat_type_of<T>());
  }
  return cudaGetLastError();
}

// T: the statistics' (and the norm's) accumulation type.
template <typename T>
inline cudaError_t launch_as(T, const TrainNorm& c, void*, size_t, int*, cudaStream_t stream) {
  if (!requirements(c).valid) return cudaErrorInvalidValue;
  using AccNorm = acc_t<T>;
  if (updates_in_double(c.running)) {
    bn_train_norm_kernel<AccNorm, double><<<1, kThreads, 0, stream>>>(c, stat_type_of<T>());
  } else {
    bn_train_norm_kernel<AccNorm, float><<<1, kThreads, 0, stream>>>(c, stat_type_of<T>());
  }
  return cudaGetLastError();
}

}  // namespace bn
}  // namespace cuda
}  // namespace convmixer_kernels
