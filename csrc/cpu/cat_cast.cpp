// cat_cast on the CPU (cat_cast.h): a converting copy per tensor into its slice of the output.
#include "../cat_cast.h"

#include <ATen/ATen.h>

namespace convmixer_kernels {
namespace cpu {

at::Tensor cat_cast(at::TensorList tensors, at::ScalarType dtype) {
  const int64_t total = check_cat_cast("cat_cast", tensors, dtype);
  at::Tensor out = at::empty({total}, tensors[0].options().dtype(dtype));
  int64_t begin = 0;
  for (const at::Tensor& t : tensors) {
    out.narrow(0, begin, t.numel()).copy_(t.reshape({-1}));
    begin += t.numel();
  }
  return out;
}

}  // namespace cpu
}  // namespace convmixer_kernels
