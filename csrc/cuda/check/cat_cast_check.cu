// The check TU of the parameter cast (kernels/cat_cast.cuh): nvcc compiles its kernels here for
// the cuda_kernels_check target, and the extern "C" entry point runs the launch entry the torch
// launcher csrc/cuda/cat_cast.cu runs, from plain pointers, for the CPU emulation tests
// (python_tests/test_cuda_emulation_bn.py); the protocol is entry.cuh's. Types are DType codes.
// Nothing here may include torch.
#include "entry.cuh"
#include "../kernels/cat_cast.cuh"

namespace cuda = convmixer_kernels::cuda;
namespace cat = convmixer_kernels::cuda::cat;

extern "C" int convmixer_cat_cast(int out_type, int count, const void* const* srcs,
                                  const int* src_types, const long long* numels, void* out,
                                  cudaStream_t stream) {
  cat::CatCast c;
  c.problem.dtype = static_cast<cuda::DType>(out_type);
  c.count = count;
  for (int j = 0; j < count && j < cat::kMaxTensors; ++j) {
    c.src[j] = {srcs[j], static_cast<cuda::Elem>(src_types[j])};
    c.begin[j + 1] = c.begin[j] + numels[j];
  }
  c.problem.numel = count >= 1 && count <= cat::kMaxTensors ? c.begin[count] : 0;
  c.out = out;
  return cuda::run_entry(c, out, nullptr, 0, nullptr, stream);
}
