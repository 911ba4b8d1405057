// The check of cat_cast (cat_cast.h).
#include "cat_cast.h"

#include <c10/util/Exception.h>

namespace convmixer_kernels {
namespace {

bool floating(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

int64_t check_cat_cast(const char* op, at::TensorList tensors, at::ScalarType dtype) {
  // (Through the dispatcher an empty list never gets here: no tensor, no device to dispatch on.)
  TORCH_CHECK_VALUE(!tensors.empty(), op, ": needs at least one tensor");
  TORCH_CHECK_TYPE(floating(dtype), op, ": dtype must be float32, float64, float16 or bfloat16, "
                   "got ", dtype);
  int64_t total = 0;
  for (size_t j = 0; j < tensors.size(); ++j) {
    const at::Tensor& t = tensors[j];
    TORCH_CHECK_TYPE(floating(t.scalar_type()), op, ": tensor ", j,
                     " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == tensors[0].device(), op, ": tensor ", j, " is on ",
                      t.device(), ", expected ", tensors[0].device());
    total += t.numel();
  }
  return total;
}

}  // namespace convmixer_kernels
