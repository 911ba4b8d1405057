// The protocol the check TUs' extern "C" entry points (called through ctypes by the CPU emulation
// tests, python_tests/cuda_emulation) keep around a launch entry of kernels/*_launch.cuh. Their
// arguments: dtype, a code of cuda::DType (0 float, 1 double, 2 half, 3 bfloat16); act, an
// activation code of csrc/activation.h (convmixer_kernels.activations' `code`); per-channel
// vectors float (double for dtype 1). They return a cudaError_t value.
#pragma once

#include "../kernels/bn_math.cuh"
#include "../kernels/launch.cuh"

namespace convmixer_kernels {
namespace cuda {

// The finalize counters of the check TUs' launches (kernels/last_cta.cuh): one buffer, zero, grown
// as calls need it (the torch launchers keep theirs per stream, cuda_common.h).
#ifdef CONVMIXER_CUDA_EMULATION
// Host memory is the device's here, and a launch has finished when it returns.
inline int* check_counters(int64_t n) {
  static std::vector<int> counters;
  if (int64_t(counters.size()) < n) counters.resize(size_t(n), 0);
  return counters.data();
}
#else
// This build is only compiled (registers and spills), never run; the buffer is right all the same.
inline int* check_counters(int64_t n) {
  static int* counters = nullptr;
  static int64_t size = 0;
  if (size < n) {
    cudaFree(counters);
    if (cudaMalloc(&counters, size_t(n) * sizeof(int)) != cudaSuccess) return nullptr;
    cudaMemset(counters, 0, size_t(n) * sizeof(int));
    cudaDeviceSynchronize();  // before a launch on any stream, blocking or not
    size = n;
  }
  return counters;
}
#endif

// A stage's folded BatchNorm (kernels/bn_math.cuh) from an entry point's trailing arguments; the
// weight's (and bias's, and their gradients') element type is one Elem code, `type`.
inline BnNorm bn_norm_of(const void* weight, const void* bias, int type, double eps, void* scale,
                         void* shift) {
  BnNorm b;
  b.weight = {weight, static_cast<Elem>(type)};
  b.bias = {bias, static_cast<Elem>(type)};
  b.eps = eps;
  b.scale = scale;
  b.shift = shift;
  return b;
}

inline BnGrad bn_grad_of(const void* grad_scale, const void* grad_shift, const void* var,
                         const void* weight, int type, double eps, void* grad_weight,
                         void* grad_bias) {
  BnGrad b;
  b.grad_scale = grad_scale;
  b.grad_shift = grad_shift;
  b.var = var;
  b.weight = {weight, static_cast<Elem>(type)};
  b.eps = eps;
  b.grad_weight = {grad_weight, static_cast<Elem>(type)};
  b.grad_bias = {grad_bias, static_cast<Elem>(type)};
  return b;
}

// cudaErrorInvalidValue for a call the kernels cannot take; else the call's workspace size into
// *workspace_bytes_out when that is given, and, unless `output` is null (a size query), the launch.
// Under the emulation a launch that leaves a finalize counter other than zero (a last CTA that did
// not put it back, so the stream's next launch would miscount) is cudaErrorIllegalState.
template <typename Call>
int run_entry(const Call& call, const void* output, void* workspace, size_t workspace_bytes,
              size_t* workspace_bytes_out, cudaStream_t stream) {
  const Requirements need = requirements(call);
  if (!need.valid) return int(cudaErrorInvalidValue);
  if (workspace_bytes_out != nullptr) *workspace_bytes_out = need.workspace_bytes;
  if (output == nullptr) return int(cudaSuccess);
  int* const counters = need.counters > 0 ? check_counters(need.counters) : nullptr;
  const cudaError_t err = launch(call, workspace, workspace_bytes, counters, stream);
#ifdef CONVMIXER_CUDA_EMULATION
  for (int64_t i = 0; err == cudaSuccess && i < need.counters; ++i)
    if (counters[i] != 0) return int(cudaErrorIllegalState);
#endif
  return int(err);
}

}  // namespace cuda
}  // namespace convmixer_kernels
