// Vectors of any element type, read and written through a runtime type code: the BatchNorm glue
// (bn_ops.cuh), whose [C] vectors each come in their own dtype, and the parameter cast
// (cat_cast.cuh). Conversions happen in registers, so no cast launches. Torch-free
// (docs/DESIGN.md §8).
#pragma once

#include "types.cuh"

namespace convmixer_kernels {
namespace cuda {

// The element type of one vector: the storage codes of DType, and int64 (num_batches_tracked, a
// count gathered as an integer tensor).
enum class Elem : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3, Int64 = 4 };

// Whether t is one of the floating element types.
inline bool is_float(Elem t) { return int(t) >= 0 && int(t) <= int(Elem::BFloat16); }

struct In {
  const void* data = nullptr;  // null: absent
  Elem type = Elem::Float32;
};

struct Out {
  void* data = nullptr;  // null: absent
  Elem type = Elem::Float32;
};

template <typename Acc>
__device__ __forceinline__ Acc load(const void* p, Elem t, int64_t i) {
  switch (t) {
    case Elem::Float32: return Acc(static_cast<const float*>(p)[i]);
    case Elem::Float64: return Acc(static_cast<const double*>(p)[i]);
    case Elem::Float16: return Acc(__half2float(static_cast<const __half*>(p)[i]));
    case Elem::BFloat16: return Acc(__bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]));
    case Elem::Int64: return Acc(static_cast<const int64_t*>(p)[i]);
  }
  return Acc(0);
}

__device__ __forceinline__ void store(const Out& o, int64_t i, float v) {
  switch (o.type) {
    case Elem::Float32: static_cast<float*>(o.data)[i] = v; break;
    case Elem::Float64: static_cast<double*>(o.data)[i] = double(v); break;
    case Elem::Float16: static_cast<__half*>(o.data)[i] = __float2half_rn(v); break;
    case Elem::BFloat16: static_cast<__nv_bfloat16*>(o.data)[i] = __float2bfloat16_rn(v); break;
    case Elem::Int64: break;  // no floating output is an integer (requirements)
  }
}

__device__ __forceinline__ void store(const Out& o, int64_t i, double v) {
  switch (o.type) {
    case Elem::Float32: static_cast<float*>(o.data)[i] = float(v); break;
    case Elem::Float64: static_cast<double*>(o.data)[i] = v; break;
    case Elem::Float16: static_cast<__half*>(o.data)[i] = __double2half(v); break;
    case Elem::BFloat16: static_cast<__nv_bfloat16*>(o.data)[i] = __double2bfloat16(v); break;
    case Elem::Int64: break;
  }
}

}  // namespace cuda
}  // namespace convmixer_kernels
