// What the torch launchers in csrc/cuda/*.cu share: ATen <-> CUDA type mapping, error checks and
// raw pointers of optional tensors. Only these launchers include torch; the kernels they call are
// in the torch-free headers under kernels/.
#pragma once

#include "../ops.h"
#include "../stage_checks.h"
#include "kernels/elementwise.cuh"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace convmixer_kernels {
namespace cuda_ops {

// The kernels' storage type for an ATen scalar type (bit-identical layouts).
template <typename scalar_t>
struct KernelType {
  using type = scalar_t;
};
template <>
struct KernelType<at::Half> {
  using type = __half;
};
template <>
struct KernelType<at::BFloat16> {
  using type = __nv_bfloat16;
};

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

template <typename P>
inline const P* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? static_cast<const P*>(t->data_ptr()) : nullptr;
}

template <typename P>
inline const P* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? static_cast<const P*>(t.data_ptr()) : nullptr;
}

// A workspace of `bytes` device bytes (a [0] tensor when none is needed).
inline at::Tensor workspace(const at::Tensor& like, size_t bytes) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

}  // namespace cuda_ops
}  // namespace convmixer_kernels
