// cat_cast (docs/OPS.md § Parameter casts; schema in ops_schema.cpp): tensors flattened one after
// another into one [Σ numel] tensor of `dtype`, each converted as torch's .to() converts. Its
// check, shared by every backend, and the CPU implementation (csrc/cpu/cat_cast.cpp; the CUDA one
// is csrc/cuda/cat_cast.cu).
#pragma once

#include <ATen/core/Tensor.h>

namespace convmixer_kernels {

// At least one tensor, each of a floating dtype, all on one device; dtype floating. Returns the
// total number of elements.
int64_t check_cat_cast(const char* op, at::TensorList tensors, at::ScalarType dtype);

namespace cpu {

at::Tensor cat_cast(at::TensorList tensors, at::ScalarType dtype);

}  // namespace cpu
}  // namespace convmixer_kernels
