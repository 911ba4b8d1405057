// The protocol the check TUs' extern "C" entry points (called through ctypes by the CPU emulation
// tests, python_tests/cuda_emulation) keep around a launch entry of kernels/*_launch.cuh. Their
// arguments: dtype, a code of cuda::DType (0 float, 1 double, 2 half, 3 bfloat16); act, an
// activation code of csrc/activation.h (convmixer_kernels.activations' `code`); per-channel
// vectors float (double for dtype 1). They return a cudaError_t value.
#pragma once

#include "../kernels/launch.cuh"

namespace convmixer_kernels {
namespace cuda {

// cudaErrorInvalidValue for a call the kernels cannot take; else the call's workspace size into
// *workspace_bytes_out when that is given, and, unless `output` is null (a size query), the launch.
template <typename Call>
int run_entry(const Call& call, const void* output, void* workspace, size_t workspace_bytes,
              size_t* workspace_bytes_out, cudaStream_t stream) {
  const Requirements need = requirements(call);
  if (!need.valid) return int(cudaErrorInvalidValue);
  if (workspace_bytes_out != nullptr) *workspace_bytes_out = need.workspace_bytes;
  if (output == nullptr) return int(cudaSuccess);
  return int(launch(call, workspace, workspace_bytes, stream));
}

}  // namespace cuda
}  // namespace convmixer_kernels
