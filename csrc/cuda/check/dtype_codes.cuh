// The storage-type codes of the check TUs' extern "C" entry points (the GPU smoke tests and the CPU
// emulation tests call them through ctypes): 0 float, 1 double, 2 half, 3 bfloat16.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace convmixer_kernels {
namespace cuda {

// f(T{}) for the storage type of `dtype`; cudaErrorInvalidValue for an unknown code.
template <typename F>
int dispatch_dtype_code(int dtype, F&& f) {
  switch (dtype) {
    case 0: return f(float{});
    case 1: return f(double{});
    case 2: return f(__half{});
    case 3: return f(__nv_bfloat16{});
    default: return int(cudaErrorInvalidValue);
  }
}

}  // namespace cuda
}  // namespace convmixer_kernels
