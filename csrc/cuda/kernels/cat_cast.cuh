// The parameter cast of the fused model under autocast (docs/OPS.md § Parameter casts): tensors
// of any floating types, flattened one after another into one buffer of the output type,
// converted as they are copied. One launch where a concatenation and a cast were two, each way
// (the backward casts the gradients back with the same kernel). Conversions as torch's .to():
// float32 and float64 directly, float64 to a 16-bit type through float32. Torch-free
// (docs/DESIGN.md §8).
#pragma once

#include "elements.cuh"
#include "launch.cuh"

#include <type_traits>

namespace convmixer_kernels {
namespace cuda {
namespace cat {

constexpr int kMaxTensors = 8;  // per launch, passed by value; the launcher splits longer lists
constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1024;  // a grid-stride loop beyond: the buffers are small

struct Problem {
  DType dtype = DType::Float32;  // the output's
  int64_t numel = 0;             // the output's elements: the inputs' in all
};

// out[begin[j] + i] = src[j][i] for i < begin[j + 1] - begin[j], converted to the output type.
struct CatCast {
  Problem problem;
  int count = 0;  // tensors, 1..kMaxTensors
  In src[kMaxTensors];
  int64_t begin[kMaxTensors + 1] = {};  // prefix sums of the numels, begin[count] = problem.numel
  void* out = nullptr;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) cat_cast_kernel(const CatCast c) {
  // 16-bit outputs through float (as torch converts double); double stays double.
  using Acc = std::conditional_t<std::is_same<T, double>::value, double, float>;
  const Out out{c.out, Elem(int(c.problem.dtype))};
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < c.problem.numel;
       i += int64_t(gridDim.x) * kThreads) {
    int j = 0;
    while (j + 1 < c.count && i >= c.begin[j + 1]) ++j;
    store(out, i, load<Acc>(c.src[j].data, c.src[j].type, i - c.begin[j]));
  }
}

inline Requirements requirements(const CatCast& c) {
  Requirements r;
  if (c.count < 1 || c.count > kMaxTensors) {
    r.error = "between 1 and 8 (kMaxTensors) tensors a launch";
    return r;
  }
  if (c.begin[0] != 0 || c.begin[c.count] != c.problem.numel) {
    r.error = "the offsets must start at 0 and end at the output's size";
    return r;
  }
  for (int j = 0; j < c.count; ++j) {
    if (c.begin[j + 1] < c.begin[j] || int(c.src[j].type) < 0 || int(c.src[j].type) > 3 ||
        (c.begin[j + 1] > c.begin[j] && c.src[j].data == nullptr)) {
      r.error = "every tensor floating, with its data, and the offsets increasing";
      return r;
    }
  }
  if (c.problem.numel > 0 && c.out == nullptr) {
    r.error = "no output";
    return r;
  }
  r.valid = true;
  return r;
}

template <typename T>
inline cudaError_t launch_as(T, const CatCast& c, void*, size_t, int*, cudaStream_t stream) {
  if (!requirements(c).valid) return cudaErrorInvalidValue;
  if (c.problem.numel == 0) return cudaSuccess;
  int64_t blocks = (c.problem.numel + kThreads - 1) / kThreads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  cat_cast_kernel<T><<<unsigned(blocks), kThreads, 0, stream>>>(c);
  return cudaGetLastError();
}

}  // namespace cat
}  // namespace cuda
}  // namespace convmixer_kernels
