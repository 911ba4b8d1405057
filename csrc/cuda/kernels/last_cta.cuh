// The second level of the stage kernels' per-channel reductions without a launch of its own: every
// CTA of a group (the CTAs of one channel block) writes its partials, and the last of them to
// finish merges the group's partials, in part order, into the results. Which CTA is last depends
// on the schedule; what it computes does not (it reads every part, in an order fixed by the shape),
// so the results stay bitwise reproducible.
//
// The ticket counters live in a buffer the caller keeps per stream (csrc/cuda/cuda_common.h,
// stream_counters; the check TUs' own in check/entry.cuh): zero before a launch, and zero again
// after it, since the last CTA of each group puts its counter back. A stream runs its launches one
// after another, so they can all use the same counters; two streams never share a buffer.
// Torch-free (docs/DESIGN.md §8).
#pragma once

namespace convmixer_kernels {
namespace cuda {

// Call from every thread of the CTA, after its partials are written (each thread's own writes):
// true in every thread of the last of `group_size` CTAs sharing `counter`, which may then read the
// other CTAs' partials (with __ldcg: written during this kernel, so not through the read-only
// cache). s_flag: one int of shared memory.
__device__ __forceinline__ bool arrive_last(int* counter, int group_size, int* s_flag) {
  // Release: every thread's partials are visible device-wide before its CTA takes a ticket.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    const int ticket = atomicAdd(counter, 1);
    const bool last = ticket == group_size - 1;
    // Every other CTA of the group has taken its ticket: nothing else touches the counter in this
    // launch, and the next launch on the stream finds it zero.
    if (last) *counter = 0;
    *s_flag = last ? 1 : 0;
  }
  __syncthreads();
  const bool last = *s_flag != 0;
  // Acquire: the partials the other CTAs fenced before their tickets, seen by this CTA's loads.
  if (last) __threadfence();
  return last;
}

}  // namespace cuda
}  // namespace convmixer_kernels
