// The activations of the ops, for every C++ backend: the one list of them, the dispatch from a
// runtime value to a template parameter, and the maths of each. Adding one: docs/EXTENDING.md.
//
// Torch-free and CUDA-runtime-free (docs/DESIGN.md §8): the CPU kernels, the CUDA kernel
// headers, the torch launchers and the check TUs all include it. Python's table is
// convmixer_kernels/activations.py; python_tests/test_activations.py checks that the two agree.
#pragma once

#include <optional>
#include <string_view>
#include <type_traits>

// X(enumerator, name, code): one line per activation. `name` is the ops' `act` string and `code`
// the enumerator's value, which is ACTIVATIONS[name].code in convmixer_kernels/activations.py
// (the check TUs' entry points and the Triton kernels take it). Every line needs an ActMath
// specialisation below; dispatch_act instantiates the kernels for every line, so a line without
// maths does not compile.
#define CONVMIXER_ACTIVATIONS(X) \
  X(GELU, "gelu", 0)             \
  X(ReLU, "relu", 1)

// The CUDA kernels call the maths from device code, the CPU kernels from host code; both inline it.
#ifdef __CUDACC__
#define CONVMIXER_ACT_FN __device__ __forceinline__
#else
#define CONVMIXER_ACT_FN inline
#endif

namespace convmixer_kernels {

enum class Act : int {
#define CONVMIXER_ACT_ENUMERATOR(E, name, code) E = code,
  CONVMIXER_ACTIVATIONS(CONVMIXER_ACT_ENUMERATOR)
#undef CONVMIXER_ACT_ENUMERATOR
};

// Every activation, in list order.
inline constexpr Act kActs[] = {
#define CONVMIXER_ACT_VALUE(E, name, code) Act::E,
    CONVMIXER_ACTIVATIONS(CONVMIXER_ACT_VALUE)
#undef CONVMIXER_ACT_VALUE
};

// An activation as a type, for the generic lambdas of dispatch_act: decltype(tag)::value.
template <Act A>
using ActTag = std::integral_constant<Act, A>;

// The `act` string of an activation; nullptr for a value that is no enumerator (an int code from
// outside C++ can be anything).
constexpr const char* act_name(Act act) {
  switch (act) {
#define CONVMIXER_ACT_NAME(E, name, code) \
  case Act::E:                            \
    return name;
    CONVMIXER_ACTIVATIONS(CONVMIXER_ACT_NAME)
#undef CONVMIXER_ACT_NAME
  }
  return nullptr;
}

// The activation called `name`, if any. The only string-to-enum mapping in C++: parse_act (the
// torch ops) wraps it with the error a user sees.
constexpr std::optional<Act> act_from_name(std::string_view name) {
  for (const Act a : kActs) {
    if (name == act_name(a)) return a;
  }
  return std::nullopt;
}

// f(ActTag<A>{}) for the enumerator A equal to `act`, or unknown() when `act` is none: a value the
// list lacks never runs another activation's kernels. The result is f's (unknown()'s converts to
// it). Host code only: it picks which kernel instantiation to launch or call.
template <typename F, typename U>
auto dispatch_act(Act act, F&& f, U&& unknown) -> decltype(f(ActTag<kActs[0]>{})) {
  switch (act) {
#define CONVMIXER_ACT_CASE(E, name, code) \
  case Act::E:                            \
    return f(ActTag<Act::E>{});
    CONVMIXER_ACTIVATIONS(CONVMIXER_ACT_CASE)
#undef CONVMIXER_ACT_CASE
  }
  return unknown();
}

// ---------------------------------------------------------------------------------------------
// The maths, written once for every backend against a lane policy M:
//   M::V             the lane type (a CPU at::vec::Vectorized, a CUDA float or double)
//   M::c(double)     a constant as V
//   M::erf, M::exp   elementwise functions of V
//   M::where(m, x, y) x where the mask m (what V's comparisons return) holds, y elsewhere
// (cpu::VecMath in csrc/cpu/cpu_common.h, cuda::ScalarMath in csrc/cuda/kernels/elementwise.cuh).
// The formulas are docs/OPS.md's, computed in the accumulation type as PyTorch's own kernels do.
//
// ActMath<A>::forward<M>(a) is act(a). ActMath<A>::At<M>(a) serves the backward passes, which need
// both act(a) (the statistics' gradient involves the stored output) and dy * act'(a): what the two
// share (GELU's erf) is computed once, in the constructor.

constexpr double kActSqrtHalf = 0.70710678118654752440;    // 1 / sqrt(2)
constexpr double kActInvSqrt2Pi = 0.39894228040143267794;  // 1 / sqrt(2 pi)

template <Act A>
struct ActMath {
  static_assert(A != A,
                "this activation has no maths: specialise ActMath for it in csrc/activation.h");
};

// The exact GELU, 0.5 a (1 + erf(a / sqrt 2)) (not the tanh approximation); its derivative is
// cdf + a pdf.
template <>
struct ActMath<Act::GELU> {
  template <typename M>
  static CONVMIXER_ACT_FN typename M::V forward(typename M::V a) {
    return M::c(0.5) * a * (M::c(1) + M::erf(a * M::c(kActSqrtHalf)));
  }

  template <typename M>
  struct At {
    using V = typename M::V;
    V a, cdf;
    CONVMIXER_ACT_FN explicit At(V a_)
        : a(a_), cdf(M::c(0.5) * (M::c(1) + M::erf(a_ * M::c(kActSqrtHalf)))) {}
    CONVMIXER_ACT_FN V value() const { return a * cdf; }
    CONVMIXER_ACT_FN V backward(V dy) const {
      const V pdf = M::c(kActInvSqrt2Pi) * M::exp(M::c(-0.5) * a * a);
      return dy * (cdf + a * pdf);
    }
  };
};

// ReLU as torch.relu: only a < 0 becomes 0, so NaN passes. Its derivative follows
// threshold_backward: 0 where a <= 0, dy elsewhere (NaN too).
template <>
struct ActMath<Act::ReLU> {
  template <typename M>
  static CONVMIXER_ACT_FN typename M::V forward(typename M::V a) {
    return M::where(a < M::c(0), M::c(0), a);
  }

  template <typename M>
  struct At {
    using V = typename M::V;
    V a;
    CONVMIXER_ACT_FN explicit At(V a_) : a(a_) {}
    CONVMIXER_ACT_FN V value() const { return forward<M>(a); }
    CONVMIXER_ACT_FN V backward(V dy) const { return M::where(a <= M::c(0), M::c(0), dy); }
  };
};

// Whether a backward may take act'(a) and act(a) from the stored output o = act(a) instead of a:
// At(o) then behaves as At(a) does (ReLU: relu(o) = o, and o <= 0 exactly where a <= 0, NaN
// included), so a backward given the forward's output (saved_out) needs no recompute of a. The
// Python side's ACTIVATIONS[name].needs_pre_activation is its negation.
constexpr bool derivative_from_output(Act a) { return a == Act::ReLU; }

}  // namespace convmixer_kernels
