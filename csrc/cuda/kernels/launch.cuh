// What the launch entries of the stages (dw_launch.cuh, pw_launch.cuh) have in common.
//
// Each pass of a stage has ONE host entry, torch-free and on raw device pointers:
//   a call struct     (namespace dw or pw) the storage type, the shape, the act, the pointers
//   requirements(c)   whether the kernels can take the call, the workspace and the finalize
//                     counters it needs
//   cuda::launch(c, ws, ws_bytes, counters, stream)
//                     the plan, the kernel arguments, the kernels on `stream`;
//                     cudaErrorInvalidValue for a call they cannot take (unknown storage type or
//                     activation code, a shape beyond the plan's limits, a missing or short
//                     workspace) before anything runs
// The torch launchers (csrc/cuda/*_stage.cu) call it with tensors' pointers on the current stream;
// the check TUs (csrc/cuda/check/*_check.cu) with the pointers their extern "C" callers pass, which
// is how the CPU emulation tests run this same code. Torch-free (docs/DESIGN.md §8).
#pragma once

#include "types.cuh"

#include <cstddef>
#include <cstdint>
#include <initializer_list>

namespace convmixer_kernels {
namespace cuda {

struct Requirements {
  bool valid = false;
  const char* error = "";      // why not valid
  size_t workspace_bytes = 0;  // device bytes launch() needs (see each call for when)
  // Zero ints launch() needs, for the kernels whose last CTAs finalize (last_cta.cuh): the
  // caller's per-stream buffer, left zero again.
  int64_t counters = 0;
};

// A per-channel norm applied on load, (v - mean) * scale + shift: three [C] vectors of the
// accumulation type, all null for none.
struct NormPtrs {
  const void* mean = nullptr;
  const void* scale = nullptr;
  const void* shift = nullptr;
};

// The entry of every call: its storage type code as a type T, then its stage's
// launch_as(T{}, c, ws, ws_bytes, counters, stream) for that kind of call (found by
// argument-dependent lookup).
template <typename Call>
inline cudaError_t launch(const Call& c, void* ws, size_t ws_bytes, int* counters,
                          cudaStream_t stream) {
  return dispatch_dtype(
      c.problem.dtype,
      [&](auto tag) { return launch_as(tag, c, ws, ws_bytes, counters, stream); },
      [] { return cudaErrorInvalidValue; });
}

inline size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

// Whether every non-null pointer is 16-byte aligned (the kernels' 16-byte load and store paths).
inline bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

}  // namespace cuda
}  // namespace convmixer_kernels
