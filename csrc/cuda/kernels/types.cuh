// The basic types of the CUDA kernels: the storage types and their codes, the accumulation type of
// each, and the conversions from storage to accumulation (scalar and 16-byte vector). Every other
// kernel header builds on this one. Torch-free (docs/DESIGN.md §8).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace convmixer_kernels {
namespace cuda {

// A storage type as a runtime value: the code the check TUs' extern "C" entry points take and the
// launch entries (dw_launch.cuh, pw_launch.cuh) dispatch on; the torch launchers map their
// at::ScalarType to it.
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// f(T{}) for the storage type T of `dtype`, or unknown() for a value that is no DType (a code from
// a check TU's caller can be anything). Host code: it picks the instantiation to launch.
template <typename F, typename U>
auto dispatch_dtype(DType dtype, F&& f, U&& unknown) -> decltype(f(float{})) {
  switch (dtype) {
    case DType::Float32: return f(float{});
    case DType::Float64: return f(double{});
    case DType::Float16: return f(__half{});
    case DType::BFloat16: return f(__nv_bfloat16{});
  }
  return unknown();
}

// Sums and statistics accumulate in float for every storage type except double (PyTorch's
// acc_type for BatchNorm, and the op contract in docs/OPS.md).
template <typename T>
struct AccTypeOf {
  using type = float;
};
template <>
struct AccTypeOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccTypeOf<T>::type;

// Elements per 16-byte load: one LDG.128 per thread is what saturates HBM with the fewest
// instructions in flight. (A variable template, not a constexpr function: usable from device code
// without --expt-relaxed-constexpr.)
template <typename T>
constexpr int kVecWidth = int(16 / sizeof(T));

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// Splits a 16-byte load into accumulation-type values. Working on the raw 32-bit words (rather than
// reinterpreting the register as T[]) keeps the value in registers and avoids type punning.
template <typename T>
struct Unpack;

template <>
struct Unpack<float> {
  __device__ __forceinline__ static void run(const uint4& r, float (&o)[4]) {
    o[0] = __uint_as_float(r.x);
    o[1] = __uint_as_float(r.y);
    o[2] = __uint_as_float(r.z);
    o[3] = __uint_as_float(r.w);
  }
};

template <>
struct Unpack<double> {
  __device__ __forceinline__ static void run(const uint4& r, double (&o)[2]) {
    // Little-endian: the lower-addressed word is the low half of each double.
    o[0] = __hiloint2double(int(r.y), int(r.x));
    o[1] = __hiloint2double(int(r.w), int(r.z));
  }
};

// The 16-bit types: two values a 32-bit word, the lower-addressed one in the low half. Only the
// widening of a half-word differs between them.
template <typename T>
struct Widen16;

template <>
struct Widen16<__nv_bfloat16> {
  // bf16 is the upper half of a float, so widening is a shift or a mask (exact, NaN-preserving),
  // cheaper than a cvt instruction per value.
  __device__ __forceinline__ static float lo(unsigned w) { return __uint_as_float(w << 16); }
  __device__ __forceinline__ static float hi(unsigned w) {
    return __uint_as_float(w & 0xffff0000u);
  }
};

template <>
struct Widen16<__half> {
  __device__ __forceinline__ static float lo(unsigned w) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
  }
  __device__ __forceinline__ static float hi(unsigned w) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
};

template <typename T>
struct Unpack16 {
  __device__ __forceinline__ static void run(const uint4& r, float (&o)[8]) {
    const unsigned w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      o[2 * i] = Widen16<T>::lo(w[i]);
      o[2 * i + 1] = Widen16<T>::hi(w[i]);
    }
  }
};

template <>
struct Unpack<__nv_bfloat16> : Unpack16<__nv_bfloat16> {};
template <>
struct Unpack<__half> : Unpack16<__half> {};

}  // namespace cuda
}  // namespace convmixer_kernels
