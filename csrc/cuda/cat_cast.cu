// CUDA implementation of cat_cast (cat_cast.h, docs/OPS.md § Parameter casts): the check, the
// output, and one launch of kernels/cat_cast.cuh per kMaxTensors tensors on the current stream.
#include "../cat_cast.h"
#include "cuda_common.h"
#include "kernels/cat_cast.cuh"

#include <torch/library.h>

#include <vector>

namespace convmixer_kernels {
namespace cuda_ops {
namespace {

namespace cat = ::convmixer_kernels::cuda::cat;

at::Tensor cat_cast(at::TensorList tensors_in, at::ScalarType dtype) {
  const char* op = "cat_cast";
  const int64_t total = check_cat_cast(op, tensors_in, dtype);
  const c10::cuda::CUDAGuard guard(tensors_in[0].device());
  std::vector<at::Tensor> tensors;
  for (const at::Tensor& t : tensors_in) tensors.push_back(t.contiguous());
  at::Tensor out = at::empty({total}, tensors[0].options().dtype(dtype));
  const auto element_size = out.element_size();
  int64_t begin = 0;
  for (size_t first = 0; first < tensors.size(); first += cat::kMaxTensors) {
    cat::CatCast c;
    c.problem.dtype = dtype_of(out);
    for (size_t j = first; j < tensors.size() && c.count < cat::kMaxTensors; ++j, ++c.count) {
      c.src[c.count] = {tensors[j].data_ptr(), static_cast<cuda::Elem>(int(dtype_of(tensors[j])))};
      c.begin[c.count + 1] = c.begin[c.count] + tensors[j].numel();
    }
    c.problem.numel = c.begin[c.count];
    c.out = c.problem.numel > 0 ? static_cast<char*>(out.data_ptr()) + begin * element_size
                                : nullptr;
    launch_entry(op, c, out, false, c.problem.numel, " elements");
    begin += c.problem.numel;
  }
  return out;
}

}  // namespace
}  // namespace cuda_ops
}  // namespace convmixer_kernels

TORCH_LIBRARY_IMPL(convmixer_kernels, CUDA, m) {
  m.impl("cat_cast", &convmixer_kernels::cuda_ops::cat_cast);
}
