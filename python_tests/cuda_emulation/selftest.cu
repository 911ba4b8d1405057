// Self-test of the emulation itself (cuda_emu.h + build.py's rewrites), written the way the real
// kernels are: the features below are the ones csrc/cuda/kernels/*.cuh use or are expected to use
// (dynamic shared memory with an opt-in size, warp shuffles, early-exiting threads). Driven by
// test_cuda_emulation.py through the extern "C" entries at the end.
#include <cuda_runtime.h>

#include <cstdint>

namespace selftest {

template <int kN>
struct Traits {
  static constexpr int kSmemPerThread = kN * int(sizeof(float));
};

// Tree sum over the CTA in dynamic shared memory; threads past `n` leave before the tree, which
// the barriers must tolerate (exited threads stop counting, as on the GPU).
template <typename T, int kN>
__global__ void __launch_bounds__(256)
    block_sum_kernel(const T* __restrict__ x, int n, float* out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  const int t = threadIdx.x + blockDim.x * threadIdx.y;
  const int threads = blockDim.x * blockDim.y;
  const int i = blockIdx.x * threads + t;
  s[t] = i < n ? float(x[i]) * kN : 0.0f;
  __syncthreads();
  for (int stride = threads / 2; stride > 0; stride /= 2) {
    if (t < stride) s[t] += s[t + stride];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

// Reports what a thread sees in shared memory nobody wrote in this CTA: dynamic, and a static
// array that the previous CTA did write.
__global__ void unwritten_shared_kernel(unsigned* out) {
  extern __shared__ unsigned dyn[];
  __shared__ unsigned stat[32];
  out[blockIdx.x * 2 + 0] = dyn[threadIdx.x];
  out[blockIdx.x * 2 + 1] = stat[threadIdx.x];
  __syncthreads();
  stat[threadIdx.x] = 7;
  dyn[threadIdx.x] = 7;
}

// Warp reductions and votes; one value per lane in, per-warp results out.
__global__ void warp_kernel(const float* x, float* xor_sum, float* down_sum, unsigned* ballot) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  float a = x[i], b = x[i];
  for (int m = 16; m > 0; m /= 2) a += __shfl_xor_sync(0xffffffffu, a, m);
  for (int d = 16; d > 0; d /= 2) b += __shfl_down_sync(0xffffffffu, b, d);
  const unsigned votes = __ballot_sync(0xffffffffu, x[i] > 0.0f);
  xor_sum[i] = a;  // every lane holds the sum
  if (threadIdx.x % 32 == 0) {
    down_sum[i / 32] = b;  // only lane 0 does
    ballot[i / 32] = votes;
  }
}

// Which (block, thread) wrote each element of a 3-d launch.
__global__ void index_kernel(unsigned* out) {
  const unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  out[b * blockDim.x * blockDim.y * blockDim.z + t] = b * 1000u + t;
}

// A 16-byte vector load, and a static shared array indexed `skew` past each thread's slot: both
// fault or corrupt memory on a GPU when misused, and the emulation build traps on them.
__global__ void vector_load_kernel(const float* x, int skew, float* out) {
  __shared__ float tile[32];
  const uint4 v = *reinterpret_cast<const uint4*>(x);
  tile[threadIdx.x + skew] = __uint_as_float(v.x) + __uint_as_float(v.w);
  __syncthreads();
  if (threadIdx.x == 0) out[0] = tile[0];
}

}  // namespace selftest

extern "C" {

int selftest_block_sum(const float* x, int n, float* out, int block_x, int block_y) {
  const dim3 block(block_x, block_y);
  const int threads = block_x * block_y;
  const int grid = (n + threads - 1) / threads;
  constexpr int kN = 2;
  selftest::block_sum_kernel<float, kN>
      <<<grid, block,
         size_t(threads) * selftest::Traits<kN>::kSmemPerThread / kN>>>(x, n, out);
  return int(cudaGetLastError());
}

int selftest_unwritten_shared(unsigned* out, int ctas) {
  selftest::unwritten_shared_kernel<<<ctas, 32, 32 * sizeof(unsigned)>>>(out);
  return int(cudaGetLastError());
}

int selftest_warp(const float* x, int n, float* xor_sum, float* down_sum, unsigned* ballot) {
  selftest::warp_kernel<<<n / 64, 64>>>(x, xor_sum, down_sum, ballot);
  return int(cudaGetLastError());
}

int selftest_index(unsigned* out, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                   unsigned bz) {
  selftest::index_kernel<<<dim3(gx, gy, gz), dim3(bx, by, bz)>>>(out);
  return int(cudaGetLastError());
}

// Dynamic shared memory above 48 KiB must be opted into, as on the GPU. Returns the error of the
// launch without the attribute, then with it (times 1000).
int selftest_smem_optin(const float* x, float* out) {
  auto* kernel = &selftest::block_sum_kernel<float, 1>;
  const size_t big = 64 * 1024;
  kernel<<<1, 32, big>>>(x, 32, out);
  const int without = int(cudaGetLastError());
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(big)) !=
      cudaSuccess)
    return -1;
  kernel<<<1, 32, big>>>(x, 32, out);
  return without + 1000 * int(cudaGetLastError());
}

int selftest_vector_load(const float* x, int skew, float* out) {
  selftest::vector_load_kernel<<<1, 32>>>(x, skew, out);
  return int(cudaGetLastError());
}

int selftest_bad_config(float* out) {
  selftest::block_sum_kernel<float, 1><<<1, dim3(1025)>>>(out, 0, out);
  return int(cudaGetLastError());
}

}  // extern "C"
