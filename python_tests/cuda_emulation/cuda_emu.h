// CPU emulation of the CUDA subset that csrc/cuda/kernels/*.cuh use, for tests on machines
// without a GPU. Compiled with g++ by build.py (which also rewrites the syntax no macro can
// express: <<<...>>> launches and extern __shared__ arrays).
//
// THIS IS EMULATION, NOT CUDA. A launch runs one std::thread per CUDA thread of a CTA (from a pool
// that persists across launches) and the CTAs one after another, so every thread of every CTA
// executes, with real __syncthreads ordering, and the kernel's arithmetic and indexing get
// checked. It cannot find data races, bank conflicts, performance problems or anything that
// depends on CTAs running concurrently, and results match a GPU bit for bit only where the kernel
// uses explicitly rounded intrinsics (nvcc contracts a*b+c into FMAs by default, build.py passes
// -ffp-contract=off; libm's expf/erff differ from CUDA's in the last ulps). build.py's sanitizer
// flags make misaligned vector loads and out-of-range array indices trap, as they would fault (or
// corrupt memory) on a GPU while x86 tolerates them.
//
// Shared memory, static and dynamic, is filled with 0xFF bytes before every CTA: NaN in every
// floating type and -1 in integers, so a read of shared memory that no thread wrote shows up in
// the results instead of silently reading zero or the previous CTA's values.
//
// Anything not emulated here is left undeclared, so a kernel that needs it fails to compile
// rather than running wrongly.
#pragma once
#ifndef CONVMIXER_CUDA_EMULATION
#define CONVMIXER_CUDA_EMULATION 1
#endif

// Every standard header before the keyword macros, so that none of them leak into the library.
#include <cxxabi.h>
#include <dlfcn.h>
#include <math.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <condition_variable>
#include <functional>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---------------------------------------------------------------------------------------------
// Keywords. __shared__ variables become static storage: CTAs run one at a time, so one copy per
// kernel is enough (build.py additionally registers them for poisoning).
// ---------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __grid_constant__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

// ---------------------------------------------------------------------------------------------
// Vector types, with CUDA's alignments (they decide the layout of reinterpret-cast loads).
// ---------------------------------------------------------------------------------------------
#define EMU_VEC2(T, N, A)                                   \
  struct alignas(A) N##2 { T x, y; };                       \
  inline constexpr N##2 make_##N##2(T x, T y) { return {x, y}; }
#define EMU_VEC3(T, N)                                      \
  struct N##3 { T x, y, z; };                               \
  inline constexpr N##3 make_##N##3(T x, T y, T z) { return {x, y, z}; }
#define EMU_VEC4(T, N, A)                                   \
  struct alignas(A) N##4 { T x, y, z, w; };                 \
  inline constexpr N##4 make_##N##4(T x, T y, T z, T w) { return {x, y, z, w}; }
EMU_VEC2(float, float, 8)
EMU_VEC3(float, float)
EMU_VEC4(float, float, 16)
EMU_VEC2(int, int, 8)
EMU_VEC3(int, int)
EMU_VEC4(int, int, 16)
EMU_VEC2(unsigned, uint, 8)
EMU_VEC3(unsigned, uint)
EMU_VEC4(unsigned, uint, 16)
EMU_VEC2(unsigned short, ushort, 4)
EMU_VEC4(unsigned short, ushort, 8)
EMU_VEC2(double, double, 16)
EMU_VEC2(long long, longlong, 16)
EMU_VEC2(unsigned long long, ulonglong, 16)
#undef EMU_VEC2
#undef EMU_VEC3
#undef EMU_VEC4

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

// Per emulated thread; blockDim/gridDim are the same for every thread of the (only) running launch.
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline dim3 blockDim;
inline dim3 gridDim;
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------
// __half and __nv_bfloat16: storage types with IEEE round-to-nearest-even conversions. The
// implicit float conversions mirror cuda_fp16.hpp without __CUDA_NO_HALF_CONVERSIONS__; no
// half-precision arithmetic operators are emulated (h1 + h2 computes in float here).
// ---------------------------------------------------------------------------------------------
namespace emu {
static_assert(sizeof(_Float16) == 2, "g++ with _Float16 support (GCC >= 12 on x86-64) required");

// The compiler's _Float16 conversions are correctly rounded (libgcc's __truncsfhf2 or F16C).
template <class A>
inline unsigned short to_f16_bits(A a) {
  return std::bit_cast<unsigned short>(static_cast<_Float16>(a));
}
inline float f16_bits_to_float(unsigned short b) {
  return static_cast<float>(std::bit_cast<_Float16>(b));
}

// bf16 is the upper half of a float: round the lower half away with RNE; NaN becomes the canonical
// 0x7fff that the GPU's cvt.rn.bf16.f32 returns (a carry could otherwise turn a NaN into Inf).
inline unsigned short float_to_bf16_bits(float f) {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
  return static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
// double -> float rounded to odd, then float -> bf16: a single correct rounding overall (float has
// more than two bits beyond bf16's precision), where double -> float -> bf16 could round twice.
inline unsigned short double_to_bf16_bits(double d) {
  float f = static_cast<float>(d);
  if (std::isfinite(f) && static_cast<double>(f) != d) {
    if (std::fabs(static_cast<double>(f)) > std::fabs(d)) f = std::nextafter(f, 0.0f);
    f = std::bit_cast<float>(std::bit_cast<std::uint32_t>(f) | 1u);
  }
  return float_to_bf16_bits(f);
}
inline float bf16_bits_to_float(unsigned short b) {
  return std::bit_cast<float>(std::uint32_t(b) << 16);
}
}  // namespace emu

struct __half {
  unsigned short __x;
  __half() = default;
  template <class A, std::enable_if_t<std::is_arithmetic_v<A>, int> = 0>
  __half(A a) : __x(emu::to_f16_bits(a)) {}
  operator float() const { return emu::f16_bits_to_float(__x); }
};
struct __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  template <class A, std::enable_if_t<std::is_arithmetic_v<A>, int> = 0>
  __nv_bfloat16(A a)
      : __x(std::is_same_v<A, double> ? emu::double_to_bf16_bits(double(a))
                                      : emu::float_to_bf16_bits(float(a))) {}
  operator float() const { return emu::bf16_bits_to_float(__x); }
};
struct alignas(4) __half2 { __half x, y; };
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2 && sizeof(__half2) == 4);

inline float __half2float(__half h) { return float(h); }
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline __half __double2half(double d) { return __half(d); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { __half h; h.__x = u; return h; }
inline __half2 __halves2half2(__half a, __half b) { return {a, b}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__half(a), __half(b)}; }
inline __half2 __float22half2_rn(float2 v) { return {__half(v.x), __half(v.y)}; }
inline __half2 __float2half2_rn(float a) { return {__half(a), __half(a)}; }
inline float2 __half22float2(__half2 h) { return {float(h.x), float(h.y)}; }
inline float __low2float(__half2 h) { return float(h.x); }
inline float __high2float(__half2 h) { return float(h.y); }

inline float __bfloat162float(__nv_bfloat16 h) { return float(h); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __double2bfloat16(double d) { return __nv_bfloat16(d); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) {
  __nv_bfloat16 h;
  h.__x = u;
  return h;
}
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return {a, b}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return {__nv_bfloat16(a), __nv_bfloat16(b)};
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {float(h.x), float(h.y)}; }
inline float __low2float(__nv_bfloat162 h) { return float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return float(h.y); }

// ---------------------------------------------------------------------------------------------
// Bit reinterpretation, explicitly rounded arithmetic, math, integer intrinsics. The _rn
// intrinsics are plain IEEE operations: with -ffp-contract=off g++ rounds each one separately.
// ---------------------------------------------------------------------------------------------
inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }
inline float __int_as_float(int i) { return std::bit_cast<float>(i); }
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
inline int __float_as_int(float f) { return std::bit_cast<int>(f); }
inline double __longlong_as_double(long long i) { return std::bit_cast<double>(i); }
inline long long __double_as_longlong(double d) { return std::bit_cast<long long>(d); }
inline double __hiloint2double(int hi, int lo) {
  return std::bit_cast<double>((std::uint64_t(unsigned(hi)) << 32) | unsigned(lo));
}
inline int __double2hiint(double d) { return int(std::bit_cast<std::uint64_t>(d) >> 32); }
inline int __double2loint(double d) { return int(std::uint32_t(std::bit_cast<std::uint64_t>(d))); }

// The round-to-nearest intrinsics, each operation in both precisions: IEEE arithmetic on the
// CPU rounds to nearest, and std::fma rounds once, as the device's fma does.
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline double __drcp_rn(double a) { return 1.0 / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }

// erff, expf, sqrtf, fmaxf, fminf, fabsf, tanhf, logf, ... come from <math.h>.
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline double rsqrt(double a) { return 1.0 / std::sqrt(a); }
inline float __expf(float a) { return std::exp(a); }
inline float __logf(float a) { return std::log(a); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float a) { return a > 0.0f ? (a < 1.0f ? a : 1.0f) : 0.0f; }
inline int __float2int_rn(float a) { return int(std::nearbyint(a)); }
inline int __float2int_rz(float a) { return int(a); }
// CUDA's device min/max accept mixed operand types (converted like arithmetic operands).
template <class A, class B>
constexpr std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <class A, class B>
constexpr std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }

inline int __popc(unsigned v) { return std::popcount(v); }
inline int __popcll(unsigned long long v) { return std::popcount(v); }
inline int __clz(int v) { return std::countl_zero(unsigned(v)); }
inline int __clzll(long long v) { return std::countl_zero((unsigned long long)v); }
inline int __ffs(int v) { return v == 0 ? 0 : std::countr_zero(unsigned(v)) + 1; }
inline int __ffsll(long long v) { return v == 0 ? 0 : std::countr_zero((unsigned long long)v) + 1; }
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((std::uint64_t(a) * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}

// Cache-hinted loads and stores are plain memory accesses on the host.
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }

// Atomics only need to be atomic among the threads of one CTA (CTAs never overlap here).
template <class T> inline T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
template <class T> inline T atomicSub(T* p, T v) { return std::atomic_ref<T>(*p).fetch_sub(v); }
template <class T> inline T atomicExch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v); }
template <class T> inline T atomicCAS(T* p, T expected, T desired) {
  std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired);
  return expected;
}
template <class T> inline T atomicMax(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (old < v && !a.compare_exchange_weak(old, v)) {}
  return old;
}
template <class T> inline T atomicMin(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (v < old && !a.compare_exchange_weak(old, v)) {}
  return old;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
[[noreturn]] inline void __trap() {
  std::fputs("cuda_emu: __trap() in a kernel\n", stderr);
  std::abort();
}

// ---------------------------------------------------------------------------------------------
// Runtime API (synchronous: every "async" call has finished when it returns).
// ---------------------------------------------------------------------------------------------
// Values as in CUDA's driver_types.h, so codes returned through ctypes mean the same thing.
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorIllegalState = 401,
  cudaErrorNotSupported = 801,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

namespace emu {
// Hopper's limits (H100/H200), so launches that would fail there fail here too.
constexpr std::size_t kDefaultDynamicSmem = 48 * 1024;
constexpr std::size_t kMaxDynamicSmemOptin = 227 * 1024;

inline cudaError_t last_error = cudaSuccess;
inline std::mutex state_mutex;                          // guards the maps below and launches
inline std::map<const void*, int> max_dynamic_smem;      // set by cudaFuncSetAttribute
inline bool reverse_cta_order = false;                   // set from Python to vary CTA order
inline std::string launch_log;                           // one line per launch, for tests

inline cudaError_t fail(cudaError_t e) { return last_error = e; }
}  // namespace emu

inline cudaError_t cudaGetLastError() { return std::exchange(emu::last_error, cudaSuccess); }
inline cudaError_t cudaPeekAtLastError() { return emu::last_error; }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error (emulated)";
    case cudaErrorInvalidValue: return "invalid argument (emulated)";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (emulated)";
    default: return "error (emulated)";
  }
}
inline const char* cudaGetErrorName(cudaError_t e) { return cudaGetErrorString(e); }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *v = 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = int(emu::kDefaultDynamicSmem); break;
    case cudaDevAttrWarpSize: *v = 32; break;
    case cudaDevAttrMultiProcessorCount: *v = 132; break;
    case cudaDevAttrComputeCapabilityMajor: *v = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *v = 0; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = int(emu::kMaxDynamicSmemOptin); break;
    default: return emu::fail(cudaErrorInvalidValue);
  }
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, std::size_t n, cudaStream_t = nullptr) {
  if (n != 0 && p == nullptr) return emu::fail(cudaErrorInvalidValue);
  std::memset(p, value, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t n, cudaMemcpyKind,
                                   cudaStream_t = nullptr) {
  if (n != 0 && (dst == nullptr || src == nullptr)) return emu::fail(cudaErrorInvalidValue);
  std::memcpy(dst, src, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemset(void* p, int value, std::size_t n) {
  return cudaMemsetAsync(p, value, n);
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, std::size_t n, cudaMemcpyKind kind) {
  return cudaMemcpyAsync(dst, src, n, kind);
}
template <class T>
inline cudaError_t cudaMemcpyToSymbol(T& symbol, const void* src, std::size_t n,
                                      std::size_t offset = 0,
                                      cudaMemcpyKind = cudaMemcpyHostToDevice) {
  if (offset + n > sizeof(T)) return emu::fail(cudaErrorInvalidValue);
  std::memcpy(reinterpret_cast<char*>(&symbol) + offset, src, n);
  return cudaSuccess;
}
// Records the opt-in limit that launches are then checked against; other attributes are accepted.
inline cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || std::size_t(value) > emu::kMaxDynamicSmemOptin)
      return emu::fail(cudaErrorInvalidValue);
    std::lock_guard<std::mutex> lock(emu::state_mutex);
    emu::max_dynamic_smem[func] = value;
  }
  return cudaSuccess;
}
template <class F>
inline cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(func), attr, value);
}

// ---------------------------------------------------------------------------------------------
// The launch engine.
// ---------------------------------------------------------------------------------------------
namespace emu {

inline void poison(void* p, std::size_t n) { std::memset(p, 0xFF, n); }

// Static __shared__ arrays, registered by the declarations build.py rewrites. Registration runs
// inside a function-local static's initialiser, which every thread of the first CTA passes (and
// waits on) before it can touch the array, so poisoning it there cannot overwrite a live write.
struct StaticShared {
  std::mutex mutex;
  std::vector<std::pair<void*, std::size_t>> arrays;
};
inline StaticShared& static_shared() {
  static StaticShared s;
  return s;
}
inline bool register_static_shared(void* p, std::size_t n) {
  poison(p, n);
  std::lock_guard<std::mutex> lock(static_shared().mutex);
  static_shared().arrays.emplace_back(p, n);
  return true;
}

// State of the running CTA. __syncthreads and the warp barriers are std::barriers that a thread
// leaves (arrive_and_drop) when it returns from the kernel, the way exited threads stop counting
// towards bar.sync on the GPU; they are rebuilt before every CTA.
struct Cta {
  unsigned threads = 0;
  unsigned warps = 0;
  unsigned char* dyn_smem = nullptr;
  std::size_t dyn_smem_bytes = 0;
  std::optional<std::barrier<>> sync;
  std::unique_ptr<std::optional<std::barrier<>>[]> warp_sync;
  std::unique_ptr<std::uint64_t[]> warp_slots;  // one exchange slot per thread, for shuffles

  void reset() noexcept {
    sync.emplace(std::ptrdiff_t(threads));
    for (unsigned w = 0; w < warps; ++w)
      warp_sync[w].emplace(std::ptrdiff_t(std::min(32u, threads - 32 * w)));
    if (dyn_smem_bytes != 0) poison(dyn_smem, dyn_smem_bytes);
    std::lock_guard<std::mutex> lock(static_shared().mutex);
    for (auto& [p, n] : static_shared().arrays) poison(p, n);
  }
};
inline Cta* cta = nullptr;  // non-null only while a launch runs

struct ResetCta {
  Cta* c;
  void operator()() noexcept { c->reset(); }
};

inline unsigned linear_tid() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

// Base of the running launch's dynamic shared memory (what `extern __shared__ T name[];` becomes).
inline unsigned char* dynamic_shared_memory() {
  if (cta == nullptr) {
    std::fputs("cuda_emu: extern __shared__ used outside a kernel "
               "(only function-scope declarations are emulated)\n", stderr);
    std::abort();
  }
  return cta->dyn_smem;
}

// Demangled kernel name from the symbol table: lets tests check which instantiation ran.
inline std::string kernel_name(const void* fn) {
  Dl_info info{};
  if (dladdr(fn, &info) == 0 || info.dli_sname == nullptr) return "?";
  int status = 0;
  char* name = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
  std::string out = status == 0 && name != nullptr ? name : info.dli_sname;
  std::free(name);
  return out;
}

inline cudaError_t check_config(const void* fn, dim3 grid, dim3 block, std::size_t smem) {
  const std::uint64_t threads = std::uint64_t(block.x) * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 ||
      block.z > 64 || threads > 1024)
    return cudaErrorInvalidConfiguration;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 ||
      grid.z > 65535)
    return cudaErrorInvalidConfiguration;
  if (smem > kDefaultDynamicSmem) {
    const auto it = max_dynamic_smem.find(fn);
    if (it == max_dynamic_smem.end() || smem > std::size_t(it->second))
      return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

// Worker threads outlive launches: creating hundreds of threads per launch cost more than running
// small kernels. Launches are serialised (state_mutex), so one job runs at a time. Never destroyed:
// parked workers die with the process instead of needing a join at exit.
class ThreadPool {
 public:
  static ThreadPool& get() {
    static ThreadPool* pool = new ThreadPool;
    return *pool;
  }
  // Runs job(0) ... job(n - 1) on n distinct threads and returns when all have finished.
  void run(unsigned n, const std::function<void(unsigned)>& job) {
    std::unique_lock<std::mutex> lock(mutex_);
    // A new worker waits for the generation after the current one: this job's.
    while (workers_ < n) std::thread(&ThreadPool::work, this, workers_++, generation_).detach();
    job_ = &job;
    active_ = n;
    remaining_ = n;
    ++generation_;
    wake_.notify_all();
    done_.wait(lock, [&] { return remaining_ == 0; });
    job_ = nullptr;
  }

 private:
  void work(unsigned index, std::uint64_t seen) {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (index >= active_) continue;
      const auto* job = job_;
      lock.unlock();
      (*job)(index);
      lock.lock();
      if (--remaining_ == 0) done_.notify_one();
    }
  }
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(unsigned)>* job_ = nullptr;
  unsigned workers_ = 0, active_ = 0, remaining_ = 0;
  std::uint64_t generation_ = 0;
};

template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, std::size_t smem,
            std::tuple<A...>&& args) {
  // Convert the arguments to the parameter types once, as a call would (implicitly).
  const auto params = std::apply(
      [](std::decay_t<P>... p) { return std::tuple<std::decay_t<P>...>(p...); }, std::move(args));
  const void* fn = reinterpret_cast<const void*>(kernel);

  std::lock_guard<std::mutex> lock(state_mutex);
  const cudaError_t err = check_config(fn, grid, block, smem);
  char line[160];
  std::snprintf(line, sizeof line, " grid=(%u,%u,%u) block=(%u,%u,%u) smem=%zu%s\n", grid.x, grid.y,
                grid.z, block.x, block.y, block.z, smem, err != cudaSuccess ? " REJECTED" : "");
  launch_log += kernel_name(fn) + line;
  if (err != cudaSuccess) {
    fail(err);
    return;
  }

  Cta state;
  state.threads = block.x * block.y * block.z;
  state.warps = (state.threads + 31) / 32;
  state.warp_sync = std::make_unique<std::optional<std::barrier<>>[]>(state.warps);
  state.warp_slots = std::make_unique<std::uint64_t[]>(state.warps * 32);
  // 128-byte aligned like the GPU's shared window (CUDA only promises what __align__ asks for).
  const std::size_t dyn_bytes = (smem + 127) / 128 * 128 + 128;
  std::unique_ptr<unsigned char, void (*)(void*)> dyn(
      static_cast<unsigned char*>(std::aligned_alloc(128, dyn_bytes)), std::free);
  state.dyn_smem = dyn.get();
  state.dyn_smem_bytes = smem;
  state.reset();
  std::barrier<ResetCta> cta_done(std::ptrdiff_t(state.threads), ResetCta{&state});

  blockDim = block;
  gridDim = grid;
  cta = &state;
  const std::uint64_t ctas = std::uint64_t(grid.x) * grid.y * grid.z;
  const bool reverse = reverse_cta_order;
  const std::function<void(unsigned)> worker = [&](unsigned t) {
    threadIdx = {t % block.x, t / block.x % block.y, t / (block.x * block.y)};
    const unsigned warp = linear_tid() / 32;
    for (std::uint64_t i = 0; i < ctas; ++i) {
      const std::uint64_t b = reverse ? ctas - 1 - i : i;
      blockIdx = {unsigned(b % grid.x), unsigned(b / grid.x % grid.y),
                  unsigned(b / (std::uint64_t(grid.x) * grid.y))};
      std::apply(kernel, params);
      state.sync->arrive_and_drop();
      state.warp_sync[warp]->arrive_and_drop();
      cta_done.arrive_and_wait();  // the last arrival resets shared state for the next CTA
    }
  };
  ThreadPool::get().run(state.threads, worker);
  cta = nullptr;
}

// `kernel<<<cfg>>>(args)` is rewritten by build.py to `kernel % ::emu::LaunchConfig(cfg)(args)`:
// only the brackets change, so the kernel expression (template arguments and all) and the
// argument list stay exactly as written, and C++ parses them.
template <class... A>
struct BoundLaunch {
  dim3 grid, block;
  std::size_t smem;
  std::tuple<A...> args;
};
struct LaunchConfig {
  dim3 grid, block;
  std::size_t smem;
  LaunchConfig(dim3 g, dim3 b, std::size_t s = 0, cudaStream_t = nullptr)
      : grid(g), block(b), smem(s) {}
  template <class... A>
  BoundLaunch<std::decay_t<A>...> operator()(A&&... a) const {
    return {grid, block, smem, std::tuple<std::decay_t<A>...>(std::forward<A>(a)...)};
  }
};
template <class... P, class... A>
void operator%(void (*kernel)(P...), BoundLaunch<A...>&& b) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  launch(kernel, b.grid, b.block, b.smem, std::move(b.args));
}

// Shuffles and votes: each lane publishes its value, the warp meets at its barrier, each lane
// reads its source, and the warp meets again before the slots can be reused. Every live lane of
// the warp must take part (masks are not emulated).
template <class T, class Src>
inline T warp_exchange(T v, Src src_of) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type > 8 bytes");
  const unsigned tid = linear_tid();
  const unsigned warp = tid / 32, lane = tid % 32;
  std::uint64_t* slots = cta->warp_slots.get() + warp * 32;
  std::uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  slots[lane] = bits;
  cta->warp_sync[warp]->arrive_and_wait();
  const unsigned src = src_of(lane);
  const unsigned live = std::min(32u, cta->threads - warp * 32);
  if (src < live) std::memcpy(&v, &slots[src], sizeof(T));
  cta->warp_sync[warp]->arrive_and_wait();
  return v;
}
inline unsigned warp_ballot(bool pred) {
  const unsigned tid = linear_tid();
  const unsigned warp = tid / 32, lane = tid % 32;
  std::uint64_t* slots = cta->warp_slots.get() + warp * 32;
  slots[lane] = pred ? 1 : 0;
  cta->warp_sync[warp]->arrive_and_wait();
  unsigned mask = 0;
  const unsigned live = std::min(32u, cta->threads - warp * 32);
  for (unsigned l = 0; l < live; ++l) mask |= unsigned(slots[l]) << l;
  cta->warp_sync[warp]->arrive_and_wait();
  return mask;
}
}  // namespace emu

inline void __syncthreads() { emu::cta->sync->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  emu::cta->warp_sync[emu::linear_tid() / 32]->arrive_and_wait();
}
// Lanes form segments of `width`; a source outside the lane's segment yields the lane's own value.
template <class T>
inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
  return emu::warp_exchange(
      v, [=](unsigned l) { return (l & ~unsigned(width - 1)) + unsigned(src & (width - 1)); });
}
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  return emu::warp_exchange(v, [=](unsigned l) {
    const unsigned s = l ^ unsigned(mask);
    return (s & ~unsigned(width - 1)) == (l & ~unsigned(width - 1)) ? s : l;
  });
}
template <class T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  return emu::warp_exchange(v, [=](unsigned l) {
    return (l & unsigned(width - 1)) + delta < unsigned(width) ? l + delta : l;
  });
}
template <class T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
  return emu::warp_exchange(
      v, [=](unsigned l) { return (l & unsigned(width - 1)) >= delta ? l - delta : l; });
}
inline unsigned __ballot_sync(unsigned, int pred) { return emu::warp_ballot(pred != 0); }
inline int __any_sync(unsigned m, int pred) { return __ballot_sync(m, pred) != 0; }
inline int __all_sync(unsigned, int pred) {
  const unsigned live = std::min(32u, emu::cta->threads - emu::linear_tid() / 32 * 32);
  const unsigned full = live == 32 ? 0xffffffffu : (1u << live) - 1;
  return emu::warp_ballot(pred != 0) == full;
}
