// The host side of the pointwise stage's fused kernels (pw_stage.cuh): the plan, and the one launch
// entry per kernel (launch.cuh) that the torch launcher (csrc/cuda/pw_stage.cu, which runs the
// GEMMs between them) and the check TU (csrc/cuda/check/pw_stage_check.cu, which the CPU emulation
// tests drive) both call. Matrices are row-major [rows, C] of the storage type; per-channel vectors
// [C] of the accumulation type. Torch-free (docs/DESIGN.md §8).
#pragma once

#include "launch.cuh"
#include "pw_stage.cuh"

#include <type_traits>

namespace convmixer_kernels {
namespace cuda {
namespace pw {

// vectorized: every matrix the kernels touch is 16-byte aligned and C % V == 0 (the launch entries
// check the pointers). The partition does not depend on it.
template <typename T>
inline Plan make_plan(int64_t rows, int64_t C, bool vectorized) {
  constexpr int V = kVecWidth<T>;
  Plan p;
  if (rows < 0 || C < 0 || C > (int64_t(1) << 30)) return p;
  p.rows = rows;
  p.C = int(C);
  p.vectorized = vectorized && C % V == 0;
  const int64_t block_c = int64_t(kLanes) * V;
  p.channel_blocks = int((C + block_c - 1) / block_c);
  if (p.channel_blocks > 65535) return p;
  int64_t target = kTargetCtas / (p.channel_blocks > 0 ? p.channel_blocks : 1);
  if (target < 1) target = 1;
  int64_t rpt = (rows + target - 1) / target;
  if (rpt < kMinRowsPerTile) rpt = kMinRowsPerTile;
  rpt = (rpt + kRowGroups - 1) / kRowGroups * kRowGroups;
  if (rpt > (int64_t(1) << 30)) return p;
  p.rows_per_tile = int(rpt);
  p.tiles = (rows + rpt - 1) / rpt;
  if (p.tiles > 0x7fffffff) return p;
  p.valid = true;
  return p;
}

inline dim3 grid_of(const Plan& p) { return dim3(unsigned(p.tiles), unsigned(p.channel_blocks)); }
inline dim3 block_of() { return dim3(kLanes, kRowGroups); }

// One [tiles][C] region of per-tile partial sums in a workspace.
template <typename T>
inline size_t partials_bytes(const Plan& p) {
  return align_up(size_t(p.tiles) * size_t(p.C) * sizeof(acc_t<T>), 256);
}

// ---------------------------------------------------------------------------------------------
// The launch entries
// ---------------------------------------------------------------------------------------------

struct Problem {
  DType dtype = DType::Float32;
  int64_t rows = 0, C = 0;
};

// An x_act of Prologue and ThroughNorms: x is not a pre-activation (read as it is).
constexpr int kNoXAct = -1;

// The GEMM's A operand: u = norm_x(x) + norm_res(res), rounded to the storage type; with x_act
// (an Act code), x is a pre-activation and is read as act(x), rounded to the storage type.
struct Prologue {
  static constexpr int kPartialRegions = 0;  // no workspace
  Problem problem;
  const void* x = nullptr;
  NormPtrs x_norm;
  const void* res = nullptr;  // null: no residual
  NormPtrs res_norm;
  void* u = nullptr;
  int x_act = kNoXAct;
};

// out = act(pre), and with `mean` the batch statistics (mean, biased var) of out as stored, which
// the kernel's last CTAs finalize. The workspace (part_mean, part_m2) and the counters are needed
// for the statistics only.
struct EpilogueForward {
  static constexpr int kPartialRegions = 2;
  Problem problem;
  Act act{};
  const void* pre = nullptr;  // p = u W^T + b
  void* out = nullptr;
  void* mean = nullptr;       // null: no statistics
  void* var = nullptr;
  BnNorm bn;                  // with statistics: out's BatchNorm's scale and shift (bn_math.cuh)
};

// dP = (grad_out + the statistics' terms) act'(pre) into grad_pre, and sum dP into grad_bias ([C],
// storage type), by the kernel's last CTAs.
struct EpilogueBackward {
  static constexpr int kPartialRegions = 1;
  Problem problem;
  Act act{};
  const void* grad_out = nullptr;
  const void* pre = nullptr;
  const void* grad_mean = nullptr;  // null: no such term
  const void* grad_var = nullptr;   // null: no such term
  const void* mean = nullptr;       // the forward's mean of out, needed with grad_var
  void* grad_pre = nullptr;
  void* grad_bias = nullptr;
  BnGrad bn;  // out's BatchNorm: its gradients back to var (added to grad_var), weight and bias
};

// grad_x = dU scale_x and grad_res = dU scale_res (or a copy of dU without a norm on res), and the
// gradients of the norms' vectors ([C] each, from the sums of dU, dU (x - mean_x), dU (res -
// mean_res), which the kernel's last CTAs finalize): x_grads with a norm on x, res_grads with a
// norm on res. The norms' shift is not read.
struct NormGrads {
  void* mean = nullptr;   // -sum dU * scale
  void* scale = nullptr;  // sum dU (v - mean)
  void* shift = nullptr;  // sum dU
};

struct ThroughNorms {
  static constexpr int kPartialRegions = 3;
  Problem problem;
  const void* grad_u = nullptr;  // dU = dP W
  const void* x = nullptr;
  NormPtrs x_norm;               // null mean: no norm on x
  const void* res = nullptr;     // null: no residual
  NormPtrs res_norm;             // null mean: no norm on res
  void* grad_x = nullptr;        // null: not written (dU itself without a norm on x; or the
                                 // caller forms dU scale_x on its own load)
  void* grad_res = nullptr;      // null: not written (no residual, or grad_res is dU itself)
  NormGrads x_grads;             // written with a norm on x
  NormGrads res_grads;           // written with a norm on res
  int x_act = kNoXAct;           // x read as Prologue reads it; grad_x is then act(x)'s gradient
};

// Whether the kernels can take a call of any of the four kinds, and the workspace it needs.
inline const char* bn_error(const Prologue&) { return nullptr; }
inline const char* bn_error(const ThroughNorms&) { return nullptr; }
inline const char* bn_error(const EpilogueForward& c) {
  return bn_math::bn_norm_error(c.bn, c.mean != nullptr);
}
inline const char* bn_error(const EpilogueBackward& c) {
  return bn_math::bn_grad_error(c.bn, c.mean != nullptr);
}

template <typename Call>
inline Requirements requirements(const Call& c) {
  if (const char* e = bn_error(c)) return {false, e, 0};
  return dispatch_dtype(
      c.problem.dtype,
      [&](auto tag) {
        using T = decltype(tag);
        const Plan p = make_plan<T>(c.problem.rows, c.problem.C, false);
        Requirements r;
        r.valid = p.valid;
        if (!p.valid) r.error = "a negative size, or more rows or channels than the grid takes";
        else r.workspace_bytes = Call::kPartialRegions * partials_bytes<T>(p);
        if (Call::kPartialRegions > 0) r.counters = p.channel_blocks;
        return r;
      },
      [] {
        Requirements r;
        r.error = "unknown storage type code";
        return r;
      });
}

// The plan of a call whose kernel touches the matrices `ptrs`: the 16-byte path when all allow it.
template <typename T>
inline Plan plan_for(const Problem& problem, std::initializer_list<const void*> ptrs) {
  return make_plan<T>(problem.rows, problem.C, aligned16(ptrs));
}

// Kernel<T, kXAct, XA> for an x_act code: kNoXAct, or an activation (null for any other code).
template <template <typename, bool, Act> class Kernel, typename T,
          typename Fn = std::remove_const_t<decltype(Kernel<T, false, kActs[0]>::value)>>
inline Fn kernel_for_x_act(int x_act) {
  if (x_act == kNoXAct) return Kernel<T, false, kActs[0]>::value;
  return dispatch_act(
      static_cast<Act>(x_act),
      [](auto tag) -> Fn { return Kernel<T, true, decltype(tag)::value>::value; },
      []() -> Fn { return nullptr; });
}

template <typename T, bool kXAct, Act XA>
struct PrologueKernel {
  static constexpr auto value = &pw_prologue_kernel<T, kXAct, XA>;
};

template <typename T, bool kXAct, Act XA>
struct ThroughNormsKernel {
  static constexpr auto value = &pw_through_norms_kernel<T, kXAct, XA>;
};

// What cuda::launch (launch.cuh) runs for the storage type T. ws: requirements(c).workspace_bytes
// of device memory, counters: requirements(c).counters zero ints (for EpilogueForward both only
// with statistics; none for Prologue).
template <typename T>
cudaError_t launch_as(T, const Prologue& c, void*, size_t, int*, cudaStream_t stream) {
  using AccT = acc_t<T>;
  const Plan p = plan_for<T>(c.problem, {c.x, c.res, c.u});
  const auto kernel = kernel_for_x_act<PrologueKernel, T>(c.x_act);
  if (!p.valid || kernel == nullptr) return cudaErrorInvalidValue;
  if (p.tiles == 0 || p.C == 0) return cudaSuccess;
  const PrologueArgs<T> a{static_cast<const T*>(c.x),
                          static_cast<const AccT*>(c.x_norm.mean),
                          static_cast<const AccT*>(c.x_norm.scale),
                          static_cast<const AccT*>(c.x_norm.shift),
                          static_cast<const T*>(c.res),
                          static_cast<const AccT*>(c.res_norm.mean),
                          static_cast<const AccT*>(c.res_norm.scale),
                          static_cast<const AccT*>(c.res_norm.shift),
                          static_cast<T*>(c.u)};
  kernel<<<grid_of(p), block_of(), 0, stream>>>(a, p);
  return cudaGetLastError();
}

// Here and in the backward an `act` that is no activation (a code from a check TU's caller) is
// cudaErrorInvalidValue before anything runs.
template <typename T>
cudaError_t launch_as(T, const EpilogueForward& c, void* ws, size_t ws_bytes, int* counters,
                      cudaStream_t stream) {
  using AccT = acc_t<T>;
  const Plan p = plan_for<T>(c.problem, {c.pre, c.out});
  if (!p.valid || bn_error(c)) return cudaErrorInvalidValue;
  const auto kernel = dispatch_act(
      c.act, [](auto tag) { return &pw_epilogue_forward_kernel<T, decltype(tag)::value>; },
      [] { return nullptr; });
  if (kernel == nullptr) return cudaErrorInvalidValue;
  EpilogueForwardArgs<T> a{static_cast<const T*>(c.pre), static_cast<T*>(c.out)};
  const bool stats = c.mean != nullptr;
  if (stats && c.var == nullptr) return cudaErrorInvalidValue;
  if (p.C == 0) return cudaSuccess;
  if (stats && p.tiles > 0) {
    const size_t region = partials_bytes<T>(p);
    if (ws == nullptr || ws_bytes < 2 * region || counters == nullptr) return cudaErrorInvalidValue;
    a.part_mean = static_cast<AccT*>(ws);
    a.part_m2 = reinterpret_cast<AccT*>(static_cast<char*>(ws) + region);
    a.mean = static_cast<AccT*>(c.mean);
    a.var = static_cast<AccT*>(c.var);
    a.bn = c.bn;
    a.counters = counters;
  }
  if (p.tiles > 0) {
    kernel<<<grid_of(p), block_of(), 0, stream>>>(a, p);  // its last CTAs finalize
    return cudaGetLastError();
  }
  if (!stats) return cudaSuccess;
  // No rows: no CTA runs, and the statistics of no rows are NaN.
  const cudaError_t err = channel_stats::launch_no_rows<AccT>(
      p.C, static_cast<AccT*>(c.mean), static_cast<AccT*>(c.var), stream);
  return err != cudaSuccess
             ? err
             : bn_math::launch_fold_forward<AccT>(c.bn, static_cast<AccT*>(c.var), p.C, stream);
}

template <typename T>
cudaError_t launch_as(T, const EpilogueBackward& c, void* ws, size_t ws_bytes, int* counters,
                      cudaStream_t stream) {
  using AccT = acc_t<T>;
  const Plan p = plan_for<T>(c.problem, {c.grad_out, c.pre, c.grad_pre});
  if (!p.valid || ws_bytes < partials_bytes<T>(p) || bn_error(c)) return cudaErrorInvalidValue;
  const auto kernel = dispatch_act(
      c.act, [](auto tag) { return &pw_epilogue_backward_kernel<T, decltype(tag)::value>; },
      [] { return nullptr; });
  if (kernel == nullptr) return cudaErrorInvalidValue;
  T* const grad_bias = static_cast<T*>(c.grad_bias);
  if (p.C == 0) return cudaSuccess;  // (an empty grad_bias may be null)
  if (grad_bias == nullptr) return cudaErrorInvalidValue;
  if (p.tiles == 0) {
    // No rows: dP is empty, its sum zero; the BatchNorm's gradients still come back.
    const cudaError_t err = cudaMemsetAsync(grad_bias, 0, size_t(p.C) * sizeof(T), stream);
    return err != cudaSuccess ? err : bn_math::launch_fold_backward<AccT>(c.bn, p.C, stream);
  }
  if (ws == nullptr || counters == nullptr) return cudaErrorInvalidValue;
  const EpilogueBackwardArgs<T> a{static_cast<const T*>(c.grad_out),
                                  static_cast<const T*>(c.pre),
                                  static_cast<const AccT*>(c.grad_mean),
                                  static_cast<const AccT*>(c.grad_var),
                                  static_cast<const AccT*>(c.mean),
                                  c.bn,
                                  static_cast<T*>(c.grad_pre),
                                  static_cast<AccT*>(ws),
                                  grad_bias,
                                  counters};
  kernel<<<grid_of(p), block_of(), 0, stream>>>(a, p);  // its last CTAs finalize
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_as(T, const ThroughNorms& c, void* ws, size_t ws_bytes, int* counters,
                      cudaStream_t stream) {
  using AccT = acc_t<T>;
  const Plan p = plan_for<T>(c.problem, {c.grad_u, c.x, c.res, c.grad_x, c.grad_res});
  const size_t region = p.valid ? partials_bytes<T>(p) : 0;
  const auto kernel = kernel_for_x_act<ThroughNormsKernel, T>(c.x_act);
  if (!p.valid || ws_bytes < 3 * region || kernel == nullptr) return cudaErrorInvalidValue;
  ThroughNormsArgs<T> a{};
  a.grad_u = static_cast<const T*>(c.grad_u);
  a.x = static_cast<const T*>(c.x);
  a.x_mean = static_cast<const AccT*>(c.x_norm.mean);
  a.x_scale = static_cast<const AccT*>(c.x_norm.scale);
  a.res = static_cast<const T*>(c.res);
  a.res_mean = static_cast<const AccT*>(c.res_norm.mean);
  a.res_scale = static_cast<const AccT*>(c.res_norm.scale);
  a.grad_x = static_cast<T*>(c.grad_x);
  a.grad_res = static_cast<T*>(c.grad_res);
  const bool nx = p.C > 0 && a.x_mean != nullptr;
  const bool nr = p.C > 0 && a.res != nullptr && a.res_mean != nullptr;
  auto complete = [](const NormGrads& g) {
    return g.mean != nullptr && g.scale != nullptr && g.shift != nullptr;
  };
  if ((nx && (a.x_scale == nullptr || !complete(c.x_grads))) ||
      (nr && (a.res_scale == nullptr || !complete(c.res_grads))))
    return cudaErrorInvalidValue;
  auto grads = [](const NormGrads& g) {
    return NormGradArgs<T>{static_cast<AccT*>(g.mean), static_cast<AccT*>(g.scale),
                           static_cast<AccT*>(g.shift)};
  };
  if (nx) a.x_grads = grads(c.x_grads);
  if (nr) a.res_grads = grads(c.res_grads);
  if (p.C == 0) return cudaSuccess;
  if (p.tiles == 0) {
    // No rows: every sum is empty, every gradient zero.
    for (const NormGrads* g : {nx ? &c.x_grads : nullptr, nr ? &c.res_grads : nullptr}) {
      if (g == nullptr) continue;
      for (void* v : {g->mean, g->scale, g->shift}) {
        const cudaError_t err = cudaMemsetAsync(v, 0, size_t(p.C) * sizeof(AccT), stream);
        if (err != cudaSuccess) return err;
      }
    }
    return cudaSuccess;
  }
  if (ws == nullptr || counters == nullptr) return cudaErrorInvalidValue;
  char* base = static_cast<char*>(ws);
  a.part_sum = reinterpret_cast<AccT*>(base);
  a.part_sum_xc = reinterpret_cast<AccT*>(base + region);
  a.part_sum_rc = reinterpret_cast<AccT*>(base + 2 * region);
  a.counters = counters;
  kernel<<<grid_of(p), block_of(), 0, stream>>>(a, p);  // its last CTAs finalize
  return cudaGetLastError();
}

// The build split (docs/CUDA.md "Build"): the kernels of a storage type are instantiated once, in
// csrc/cuda/inst/pw_<type>.cu (CONVMIXER_PW_LAUNCHES( , T)), and every other TU that includes this
// header (the torch launcher, the check TU) only declares them, so neither compiles a kernel and
// no unit holds more than one storage type's. The CPU emulation builds a check TU alone, so there
// the header instantiates what the TU uses, as before.
#define CONVMIXER_PW_LAUNCHES(EXTERN, T)                                                           \
  EXTERN template cudaError_t launch_as<T>(T, const Prologue&, void*, size_t, int*, cudaStream_t);   \
  EXTERN template cudaError_t launch_as<T>(T, const EpilogueForward&, void*, size_t, int*,          \
                                           cudaStream_t);                                           \
  EXTERN template cudaError_t launch_as<T>(T, const EpilogueBackward&, void*, size_t, int*,         \
                                           cudaStream_t);                                           \
  EXTERN template cudaError_t launch_as<T>(T, const ThroughNorms&, void*, size_t, int*,             \
                                           cudaStream_t);

#ifndef CONVMIXER_CUDA_EMULATION
CONVMIXER_PW_LAUNCHES(extern, float)
CONVMIXER_PW_LAUNCHES(extern, double)
CONVMIXER_PW_LAUNCHES(extern, __half)
CONVMIXER_PW_LAUNCHES(extern, __nv_bfloat16)
#endif

}  // namespace pw
}  // namespace cuda
}  // namespace convmixer_kernels
