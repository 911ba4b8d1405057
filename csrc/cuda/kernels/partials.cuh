// The second level of every per-channel reduction in the stage kernels: a CTA writes its partial
// sums as one row of a [parts][n] array, and sum_parts_kernel adds the rows in part order. No
// float atomics, and the order depends only on the shape, so results are bitwise reproducible.
// Torch-free (docs/DESIGN.md §8).
#pragma once

#include "elementwise.cuh"

namespace convmixer_kernels {
namespace cuda {

// out[i] = sum over parts p (in order) of part[p][i], converted to OutT.
template <typename AccT, typename OutT>
__global__ void sum_parts_kernel(const AccT* __restrict__ part, int64_t parts, int64_t n,
                                 OutT* __restrict__ out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  AccT total = AccT(0);
  for (int64_t p = 0; p < parts; ++p) total += part[p * n + i];
  out[i] = from_acc<OutT>(total);
}

template <typename AccT, typename OutT>
inline cudaError_t launch_sum_parts(const AccT* part, int64_t parts, int64_t n, OutT* out,
                                    cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  constexpr int kBlock = 256;
  sum_parts_kernel<AccT, OutT><<<unsigned((n + kBlock - 1) / kBlock), kBlock, 0, stream>>>(
      part, parts, n, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace convmixer_kernels
