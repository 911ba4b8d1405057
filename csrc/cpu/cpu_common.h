// Building blocks shared by the CPU stage kernels: activations on Vectorized lanes, NHWC views,
// and the deterministic per-channel reductions that give BatchNorm statistics and gradients.
#pragma once

#include "../ops.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <dlfcn.h>

#include <cmath>
#include <limits>
#include <memory>
#include <new>
#include <tuple>
#include <utility>
#include <vector>

namespace convmixer_kernels {
namespace cpu {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// exp and erf on float lanes, inline. ATen's Vectorized<float> calls Sleef out of line for exp
// (and so for erf): a call per vector in the kernels' innermost loops, with every live vector of
// the caller spilled around it, since the ABI preserves none. These are as accurate as ATen's:
// exp to about 1 ulp (Cody–Waite reduction by ln 2, degree-7 Taylor polynomial on
// |r| <= ln2/2, whose truncation error is below 1e-8 relative), and erf by the same
// Abramowitz–Stegun formula 7.1.26 that Vectorized<float>::erf evaluates (absolute error below
// 1.5e-7). NaN propagates; exp overflows to inf and flushes results below FLT_MIN to zero.
struct FloatLanes {
  using V = Vec<float>;
  using I = Vec<int32_t>;

  static V exp(const V& x) {
    // Below lo exp(x) rounds to zero even as a denormal; above hi it overflows to inf.
    const V lo(-104.0f), hi(88.7229f);
    const V xc = V::blendv(V::blendv(x, lo, x < lo), hi, x > hi);
    const V n = (xc * V(1.44269504088896341f)).round();
    // r = x - n ln2, with ln2 = 0.693359375 (9 bits, so n·0.693359375 is exact) - 2.12194440e-4
    const V r = at::vec::fmadd(n, V(2.12194440e-4f), at::vec::fmadd(n, V(-0.693359375f), xc));
    V p(1.0f / 5040);
    p = at::vec::fmadd(p, r, V(1.0f / 720));
    p = at::vec::fmadd(p, r, V(1.0f / 120));
    p = at::vec::fmadd(p, r, V(1.0f / 24));
    p = at::vec::fmadd(p, r, V(1.0f / 6));
    p = at::vec::fmadd(p, r, V(0.5f));
    p = at::vec::fmadd(p, r, V(1.0f));
    p = at::vec::fmadd(p, r, V(1.0f));
    // 2^n as two normal powers of two 2^n1 · 2^n2 (n in [-150, 128]), so that the products
    // underflow through the denormals and overflow to inf as exp itself does.
    const I ni = at::vec::convert_to_int_of_same_size(n);
    const I n1 = ni >> I(1), n2 = ni - n1;
    const V s1 = at::vec::cast<float>((n1 + I(127)) << I(23));
    const V s2 = at::vec::cast<float>((n2 + I(127)) << I(23));
    return V::blendv((p * s1) * s2, x, x != x);  // NaN in, NaN out
  }

  // 1 / d for d >= 1: the hardware's approximate reciprocal and one Newton step (relative error
  // about 2^-24 after it), instead of a full-width division, the slowest instruction of the
  // GELU (erf's t = 1 / (1 + p|x|) is never below 1, so no special values reach it).
  static V reciprocal(const V& d) {
#if defined(CPU_CAPABILITY_AVX512)
    const V r(_mm512_rcp14_ps(d));
#elif defined(CPU_CAPABILITY_AVX2)
    const V r(_mm256_rcp_ps(d));
#else
    return V(1.0f) / d;
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    return at::vec::fmadd(at::vec::fmadd(d, V(0.0f) - r, V(1.0f)), r, r);  // r + r (1 - d r)
#endif
  }

  static V erf(const V& x) {
    const V sign = x & V(-0.0f);
    const V a = x.abs();
    const V t = reciprocal(at::vec::fmadd(V(0.3275911f), a, V(1.0f)));
    V poly(1.061405429f);
    poly = at::vec::fmadd(poly, t, V(-1.453152027f));
    poly = at::vec::fmadd(poly, t, V(1.421413741f));
    poly = at::vec::fmadd(poly, t, V(-0.284496736f));
    poly = at::vec::fmadd(poly, t, V(0.254829592f));
    poly = poly * t;
    const V y = V(1.0f) - poly * exp(V(0.0f) - a * a);
    return y | sign;
  }
};

// The lane policy of the activation maths (csrc/activation.h) on Vectorized lanes.
template <typename T>
struct VecMath {
  using V = Vec<T>;
  static V c(double v) { return V(T(v)); }
  static V erf(const V& v) {
    if constexpr (std::is_same_v<T, float>) {
      return FloatLanes::erf(v);
    } else {
      return v.erf();
    }
  }
  static V exp(const V& v) {
    if constexpr (std::is_same_v<T, float>) {
      return FloatLanes::exp(v);
    } else {
      return v.exp();
    }
  }
  static V where(const V& mask, const V& x, const V& y) { return V::blendv(y, x, mask); }
};

// act(a) on the lanes of `a`.
template <Act A, typename T>
inline Vec<T> act_forward(const Vec<T>& a) {
  return ActMath<A>::template forward<VecMath<T>>(a);
}

// act(a) and dy * act'(a) at the same lanes, for the backward passes (activation.h).
template <Act A, typename T>
using ActAt = typename ActMath<A>::template At<VecMath<T>>;

// Vector registers of the ISA the kernels are compiled for (setup.py picks it): register tiles
// are sized to fit without spilling.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kVecRegs = 32;
#else
constexpr int kVecRegs = 16;
#endif

// f(integral_constant<int, 0>), ..., f(integral_constant<int, N - 1>), expanded at compile time.
// Register tiles index their accumulator arrays only through it: with every index a constant
// from the start, the compiler keeps the array in registers (a runtime-indexed loop, even one it
// unrolls later, leaves it on the stack and stores it back on every iteration).
template <typename F, int... I>
inline void unroll_impl(const F& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename F>
inline void unroll(const F& f) {
  unroll_impl(f, std::make_integer_sequence<int, N>{});
}

// A zero-filled array aligned to a cache line: the kernels' vector loads from their staging
// buffers then never straddle two lines (std::vector only guarantees 16 bytes).
template <typename T>
class AlignedBuffer {
 public:
  explicit AlignedBuffer(int64_t n = 0) : n_(n), p_(new (std::align_val_t(64)) T[n]()) {}
  T* data() { return p_.get(); }
  const T* data() const { return p_.get(); }
  int64_t size() const { return n_; }
  T& operator[](int64_t i) { return p_[i]; }
  const T& operator[](int64_t i) const { return p_[i]; }

 private:
  struct Free {
    void operator()(T* p) const { ::operator delete[](p, std::align_val_t(64)); }
  };
  int64_t n_;
  std::unique_ptr<T[], Free> p_;
};

// Keeps the BLAS on one thread for the calling thread while alive. The fused pw pipeline runs
// its chunk GEMMs on the pool's threads, one GEMM per thread; MKL does not reliably stay
// sequential there (with two pool threads it measurably split a GEMM's reduction, changing the
// weight gradient's rounding with the thread count, and oversubscribed the cores). MKL's
// thread-local setting is looked up at run time (its C entry point: the lower-case symbol is the
// Fortran one, which takes a pointer), so a torch built on another BLAS loads as well.
class SequentialBlas {
 public:
  SequentialBlas() : set_(lookup()) {
    if (set_ != nullptr) prev_ = set_(1);
  }
  ~SequentialBlas() {
    if (set_ != nullptr) set_(prev_);
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;

 private:
  using SetLocal = int (*)(int);
  static SetLocal lookup() {
    static const SetLocal f =
        reinterpret_cast<SetLocal>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
    return f;
  }
  SetLocal set_;
  int prev_ = 0;
};

// Storage values <-> opmath lanes, a pair of opmath vectors at a time: a bfloat16/half vector
// converts to exactly two float vectors, so pairs load, round and store with whole-vector moves
// (a partial move goes through memcpy, which dominated the old per-pixel loops).
template <typename scalar_t>
struct Lanes {
  using opmath_t = at::opmath_type<scalar_t>;
  using V = Vec<opmath_t>;
  static constexpr bool kReduced = !std::is_same_v<scalar_t, opmath_t>;
  static constexpr int64_t kHalf = V::size();
  static constexpr int64_t kPair = 2 * V::size();

  // Between a reduced-precision vector and its two float vectors (the conversions every ISA's
  // Vectorized defines; convert_to/from_float are not instantiated for AVX-512).
  static std::tuple<V, V> widen(const Vec<scalar_t>& r) {
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      return at::vec::convert_bfloat16_float(r);
    } else {
      return at::vec::convert_half_float(r);
    }
  }
  static Vec<scalar_t> narrow(const V& a, const V& b) {
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      return at::vec::convert_float_bfloat16(a, b);
    } else {
      return at::vec::convert_float_half(a, b);
    }
  }

  static void load(const scalar_t* p, V& a, V& b) {
    if constexpr (kReduced) {
      std::tie(a, b) = widen(Vec<scalar_t>::loadu(p));
    } else {
      a = V::loadu(p);
      b = V::loadu(p + kHalf);
    }
  }
  // The first n (<= kPair) values at p, zeros in the lanes after them.
  static void load(const scalar_t* p, int64_t n, V& a, V& b) {
    if (n >= kPair) return load(p, a, b);
    if constexpr (kReduced) {
      std::tie(a, b) = widen(Vec<scalar_t>::loadu(p, static_cast<int16_t>(n)));
    } else {
      a = V::loadu(p, std::min<int64_t>(n, kHalf));
      b = n > kHalf ? V::loadu(p + kHalf, n - kHalf) : V(opmath_t(0));
    }
  }
  // Rounds a and b to values of the storage dtype (a no-op for float and double), so that what
  // follows (statistics, derivatives) sees exactly the values stored.
  static void round(V& a, V& b) {
    if constexpr (kReduced) {
      std::tie(a, b) = widen(narrow(a, b));
    }
  }
  // Stores the first n (<= kPair) lanes of (a, b) at p in the storage dtype.
  static void store(scalar_t* p, int64_t n, const V& a, const V& b) {
    if constexpr (kReduced) {
      narrow(a, b).store(p, static_cast<int>(std::min<int64_t>(n, kPair)));
    } else if (n >= kPair) {
      a.store(p);
      b.store(p + kHalf);
    } else {
      a.store(p, static_cast<int>(std::min<int64_t>(n, kHalf)));
      if (n > kHalf) b.store(p + kHalf, static_cast<int>(n - kHalf));
    }
  }
};

// Applies `pair(c, n)` to the channels [0, C) of a row, kPair at a time (n < kPair only for the
// last, partial, pair).
template <typename scalar_t, typename F>
inline void for_pairs(int64_t C, const F& pair) {
  constexpr int64_t P = Lanes<scalar_t>::kPair;
  int64_t c = 0;
  for (; c + P <= C; c += P) pair(c, P);
  if (c < C) pair(c, C - c);
}

// Rounds `n` opmath values to the storage dtype in place, so that what follows (statistics,
// derivatives) sees exactly the values stored. A no-op for float and double storage.
template <typename scalar_t, typename opmath_t>
inline void round_to_storage(opmath_t* v, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, opmath_t>) {
    for (int64_t i = 0; i < n; ++i) v[i] = static_cast<opmath_t>(static_cast<scalar_t>(v[i]));
  }
}

// An NHWC view [N*H*W, C] of a 4-d tensor, copying only when it is not channels_last already.
inline at::Tensor rows_view(const at::Tensor& t) {
  auto nhwc = t.contiguous(at::MemoryFormat::ChannelsLast);
  return nhwc.permute({0, 2, 3, 1}).reshape({-1, t.size(1)});
}

// The [N, C, H, W] channels_last tensor whose memory is the [N*H*W, C] row-major `rows`.
inline at::Tensor from_rows(const at::Tensor& rows, at::IntArrayRef nchw) {
  return rows.view({nchw[0], nchw[2], nchw[3], nchw[1]}).permute({0, 3, 1, 2});
}

// Per-channel sums over the rows of a [rows, C] problem, deterministic whatever the thread
// count: rows are cut into fixed chunks, each chunk accumulates `nacc` rows of sums in its own
// opmath slice, acc[k * width + c] (width >= C, e.g. C rounded up to whole pairs of lanes), and
// the slices are added in chunk order in double. Returns the totals as [nacc][C].
// body(r0, r1, acc) accumulates rows [r0, r1) into its zeroed slice acc.
template <typename opmath_t, typename Body>
std::vector<double> reduce_rows(int64_t rows, int64_t C, int64_t width, int nacc, const Body& body) {
  constexpr int64_t kChunk = 128;
  const int64_t chunks = (rows + kChunk - 1) / kChunk;
  std::vector<opmath_t> partial(static_cast<size_t>(chunks * nacc * width), opmath_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) {
      body(ch * kChunk, std::min(rows, (ch + 1) * kChunk), partial.data() + ch * nacc * width);
    }
  });
  std::vector<double> total(static_cast<size_t>(nacc * C), 0.0);
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const opmath_t* p = partial.data() + ch * nacc * width;
    for (int k = 0; k < nacc; ++k) {
      for (int64_t c = 0; c < C; ++c) total[k * C + c] += static_cast<double>(p[k * width + c]);
    }
  }
  return total;
}

// C rounded up to whole pairs of lanes of scalar_t's opmath vectors.
template <typename scalar_t>
constexpr int64_t pair_width(int64_t C) {
  constexpr int64_t P = Lanes<scalar_t>::kPair;
  return (C + P - 1) / P * P;
}

// `n` values copied into a zero-padded array of `width` lanes, so every pair loads whole.
template <typename T>
std::vector<T> padded(const T* v, int64_t n, int64_t width) {
  std::vector<T> out(static_cast<size_t>(width), T(0));
  if (v != nullptr) std::copy(v, v + n, out.begin());
  return out;
}

// A norm's vectors, zero-padded to `width` lanes; empty when there is no norm.
template <typename opmath_t>
struct PaddedNorm {
  std::vector<opmath_t> mean, scale, shift;
  PaddedNorm(const Norm& n, int64_t C, int64_t width) {
    if (!n.defined()) return;
    mean = padded(n.mean.data_ptr<opmath_t>(), C, width);
    scale = padded(n.scale.data_ptr<opmath_t>(), C, width);
    shift = padded(n.shift.data_ptr<opmath_t>(), C, width);
  }
  bool defined() const { return !mean.empty(); }
};

// Mean and biased variance of one channel from shifted sums kept per part (an image, a chunk of
// rows): part(p) gives (K, Σ(v - K), Σ(v - K)², count) with its own shift K, a value of its data,
// so that the sums lose little even when |mean| >> std (docs/DESIGN.md §6). The parts are moved
// onto part 0's shift and added in part order, in double (Chan's update for a change of shift):
// the same result whatever the thread count. No values give NaN, as 0/0 does.
template <typename Part>
std::pair<double, double> merge_shifted_sums(int64_t parts, const Part& part) {
  double K = 0, s1 = 0, s2 = 0, total = 0;
  for (int64_t p = 0; p < parts; ++p) {
    const auto [k, a, b, count] = part(p);
    const double n = static_cast<double>(count);
    if (p == 0) K = static_cast<double>(k);
    const double dk = static_cast<double>(k) - K;
    s1 += static_cast<double>(a) + n * dk;
    s2 += static_cast<double>(b) + 2 * dk * static_cast<double>(a) + n * dk * dk;
    total += n;
  }
  const double d = s1 / total;
  return {K + d, std::max(s2 / total - d * d, 0.0)};  // std::max keeps a NaN first argument
}

}  // namespace cpu
}  // namespace convmixer_kernels
