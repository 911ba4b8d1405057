// The check TU of the BatchNorm glue kernels (kernels/bn_ops.cuh): nvcc compiles them here for
// the cuda_kernels_check target, and the extern "C" entry points run the launch entries the torch
// launcher csrc/cuda/bn_ops.cu runs, from plain pointers, for the CPU emulation tests
// (python_tests/test_cuda_emulation_bn.py); the protocol is entry.cuh's. Element types are
// bn::Elem codes (DType's, and 4 for int64); a null pointer is an absent vector. Nothing here may
// include torch.
#include "entry.cuh"
#include "../kernels/bn_ops.cuh"

namespace cuda = convmixer_kernels::cuda;
namespace bn = convmixer_kernels::cuda::bn;

static bn::In in(const void* p, int type) { return {p, static_cast<bn::Elem>(type)}; }
static bn::Out out(void* p, int type) { return {p, static_cast<bn::Elem>(type)}; }

static bn::ScaleShift scale_shift(int acc, long long C, double eps, const void* var,
                                 int var_type, const void* weight, int weight_type,
                                 const void* bias, int bias_type, void* scale, void* shift) {
  bn::ScaleShift c;
  c.problem = {static_cast<cuda::DType>(acc), C};
  c.eps = eps;
  c.var = in(var, var_type);
  c.weight = in(weight, weight_type);
  c.bias = in(bias, bias_type);
  c.scale = scale;
  c.shift = shift;
  return c;
}

static bn::RunningStats running_stats(int acc, long long C, const void* mean, const void* var,
                                      void* running_mean, int running_mean_type,
                                      void* running_var, int running_var_type,
                                      long long* num_batches_tracked, double momentum,
                                      int cumulative, double count, const void* count_tensor,
                                      int count_type) {
  bn::RunningStats c;
  c.problem = {static_cast<cuda::DType>(acc), C};
  c.mean = mean;
  c.var = var;
  c.running_mean = out(running_mean, running_mean_type);
  c.running_var = out(running_var, running_var_type);
  c.num_batches_tracked = reinterpret_cast<int64_t*>(num_batches_tracked);
  c.momentum = momentum;
  c.cumulative = cumulative != 0;
  c.count = count;
  c.count_tensor = in(count_tensor, count_type);
  return c;
}

extern "C" int convmixer_bn_scale_shift(int acc, long long C, double eps, const void* var,
                                        int var_type, const void* weight, int weight_type,
                                        const void* bias, int bias_type, void* scale,
                                        void* shift, cudaStream_t stream) {
  const bn::ScaleShift c = scale_shift(acc, C, eps, var, var_type, weight, weight_type, bias,
                                       bias_type, scale, shift);
  return cuda::run_entry(c, scale, nullptr, 0, nullptr, stream);
}

extern "C" int convmixer_bn_scale_shift_backward(int acc, long long C, double eps,
                                                 const void* grad_scale, const void* grad_shift,
                                                 const void* var, int var_type,
                                                 const void* weight, int weight_type,
                                                 void* grad_var, void* grad_weight,
                                                 void* grad_bias, int bias_type,
                                                 cudaStream_t stream) {
  bn::ScaleShiftBackward c;
  c.problem = {static_cast<cuda::DType>(acc), C};
  c.eps = eps;
  c.grad_scale = grad_scale;
  c.grad_shift = grad_shift;
  c.var = in(var, var_type);
  c.weight = in(weight, weight_type);
  c.grad_var = out(grad_var, var_type);
  c.grad_weight = out(grad_weight, weight_type);
  c.grad_bias = out(grad_bias, bias_type);
  return cuda::run_entry(c, grad_var, nullptr, 0, nullptr, stream);
}

extern "C" int convmixer_bn_running_stats(int acc, long long C, const void* mean,
                                          const void* var, void* running_mean,
                                          int running_mean_type, void* running_var,
                                          int running_var_type, long long* num_batches_tracked,
                                          double momentum, int cumulative, double count,
                                          const void* count_tensor, int count_type,
                                          cudaStream_t stream) {
  const bn::RunningStats c = running_stats(acc, C, mean, var, running_mean, running_mean_type,
                                           running_var, running_var_type, num_batches_tracked,
                                           momentum, cumulative, count, count_tensor, count_type);
  // Always launched (an update has no single output to test for null): a non-null marker.
  return cuda::run_entry(c, &c, nullptr, 0, nullptr, stream);
}

// convmixer_bn_running_stats's arguments, then convmixer_bn_scale_shift's from eps on (its var
// the statistics' var, of the accumulation type).
extern "C" int convmixer_bn_train_norm(int acc, long long C, const void* mean, const void* var,
                                       void* running_mean, int running_mean_type,
                                       void* running_var, int running_var_type,
                                       long long* num_batches_tracked, double momentum,
                                       int cumulative, double count, const void* count_tensor,
                                       int count_type, double eps, const void* weight,
                                       int weight_type, const void* bias, int bias_type,
                                       void* scale, void* shift, cudaStream_t stream) {
  bn::TrainNorm c;
  c.problem = {static_cast<cuda::DType>(acc), C};
  c.running = running_stats(acc, C, mean, var, running_mean, running_mean_type, running_var,
                            running_var_type, num_batches_tracked, momentum, cumulative, count,
                            count_tensor, count_type);
  c.norm = scale_shift(acc, C, eps, var, acc, weight, weight_type, bias, bias_type, scale, shift);
  return cuda::run_entry(c, scale, nullptr, 0, nullptr, stream);
}

// convmixer_bn_running_stats of `count` items at once (no count tensor), the items' vectors and
// element types in arrays (at most bn::kManyItems).
extern "C" int convmixer_bn_running_stats_many(int acc, int count, const long long* C,
                                               const void* const* mean, const void* const* var,
                                               void* const* running_mean,
                                               const int* running_mean_type,
                                               void* const* running_var,
                                               const int* running_var_type,
                                               long long* const* num_batches_tracked,
                                               double momentum, int cumulative,
                                               double stat_count, cudaStream_t stream) {
  if (count < 0 || count > bn::kManyItems) return int(cudaErrorInvalidValue);
  bn::RunningStatsMany c;
  c.problem = {static_cast<cuda::DType>(acc), 0};
  c.count = count;
  for (int i = 0; i < count; ++i) {
    c.items[i] = running_stats(acc, C[i], mean[i], var[i], running_mean[i], running_mean_type[i],
                               running_var[i], running_var_type[i], num_batches_tracked[i],
                               momentum, cumulative, stat_count, nullptr, 0);
  }
  return cuda::run_entry(c, &c, nullptr, 0, nullptr, stream);
}
