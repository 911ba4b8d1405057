// The host side of the depthwise stage (kernels in dw_stage.cuh): the plan, and the one launch
// entry per pass (launch.cuh) that the torch launcher (csrc/cuda/dw_stage.cu) and the check TU
// (csrc/cuda/check/dw_stage_check.cu, which the CPU emulation tests drive) both call.
// Torch-free (docs/DESIGN.md §8).
#pragma once

#include "dw_stage.cuh"
#include "launch.cuh"

namespace convmixer_kernels {
namespace cuda {
namespace dw {

struct Plan {
  Shape shape;
  bool valid = false;
  const char* error = "";         // why not valid
  size_t smem_forward = 0, smem_backward_data = 0, smem_backward_input = 0;  // bytes
  size_t smem_backward_fused = 0;  // bytes; above kMaxDynamicSmem: the two backward kernels
  // Workspace, in bytes, each region 256-byte aligned (see the offsets below).
  size_t ws_forward = 0, ws_backward = 0;
};

// Whether the 16-byte path may read `p`: every pixel's channel run starts 16-byte aligned.
template <typename T>
inline bool can_vectorize(const void* p, int64_t C) {
  return C % kVecWidth<T> == 0 && aligned16({p});
}

// How many parts (grid y) the tiles are split into. The CTA count parts x channel_blocks is a
// whole number of waves of kWaveCtas where the shape allows (parts a multiple of
// kWaveCtas / gcd(channel_blocks, kWaveCtas)), as close to target_ctas as that allows from
// below; parts differ by at most one tile. Otherwise (few tiles, or a lowered target) the most
// parts within target_ctas and the tile count.
inline int64_t plan_parts(int64_t tiles, int64_t channel_blocks, int64_t target_ctas) {
  if (tiles <= 0 || channel_blocks <= 0) return 0;
  int64_t parts = target_ctas / channel_blocks;
  if (parts < 1) parts = 1;
  if (parts > tiles) parts = tiles;
  int64_t a = channel_blocks, b = kWaveCtas;  // gcd
  while (b != 0) {
    const int64_t r = a % b;
    a = b;
    b = r;
  }
  const int64_t step = kWaveCtas / a;
  return parts >= step ? parts / step * step : parts;
}

// Partitions an [N, H, W, C] problem with odd kernel size K for storage type T. Pure host
// arithmetic, so the caller can size the workspace first. target_ctas is kTargetCtas except in
// tests, which lower it to make a CTA walk several tiles on small shapes.
template <typename T>
inline Plan make_plan(int64_t N, int64_t C, int64_t H, int64_t W, int K,
                      int64_t target_ctas = kTargetCtas) {
  using AccT = acc_t<T>;
  Plan p;
  if (N < 0 || C < 0 || H < 0 || W < 0) {
    p.error = "negative size";
    return p;
  }
  if (K < 1 || K > kMaxK || K % 2 == 0) {
    p.error = "kernel size must be odd and in [1, 15]";
    return p;
  }
  if (H > (1 << 30) || W > (1 << 30) || C > (1 << 30)) {
    p.error = "a dimension exceeds 2^30";
    return p;
  }
  Shape& s = p.shape;
  s.N = N;
  s.C = int(C);
  s.H = int(H);
  s.W = int(W);
  s.K = K;
  s.tiles_h = int((H + kTH - 1) / kTH);
  s.tiles_w = int((W + kTW - 1) / kTW);
  s.tiles = N * s.tiles_h * s.tiles_w;
  s.channel_blocks = int((C + kCB - 1) / kCB);
  s.parts = plan_parts(s.tiles, s.channel_blocks, target_ctas);
  if (s.parts > 65535) {  // grid y (only reachable with a raised target)
    p.error = "too many parts for the grid";
    return p;
  }
  s.tiles_base = s.parts > 0 ? s.tiles / s.parts : 0;
  s.tiles_extra = s.parts > 0 ? int(s.tiles % s.parts) : 0;
  // Per-part pixel counts are int (the statistics' counts, TileCounts): keep them well inside.
  if ((s.tiles_base + 1) * kTH * kTW > (int64_t(1) << 30)) {
    p.error = "too many pixels per part";
    return p;
  }
  const auto bytes = [&](Kernel kernel) {
    return smem_layout(K, kernel, sizeof(AccT), sizeof(T)).total * sizeof(AccT);
  };
  p.smem_forward = bytes(Kernel::Forward);
  p.smem_backward_data = bytes(Kernel::BackwardData);
  p.smem_backward_input = bytes(Kernel::BackwardInput);
  p.smem_backward_fused = bytes(Kernel::BackwardFused);
  if (p.smem_backward_data > kMaxDynamicSmem || p.smem_forward > kMaxDynamicSmem ||
      p.smem_backward_input > kMaxDynamicSmem) {
    p.error = "the tile for this kernel size and dtype does not fit in shared memory";
    return p;
  }
  const size_t pc = size_t(s.parts) * size_t(C);
  p.ws_forward = 2 * align_up(pc * sizeof(AccT), 256) +
                 align_up(size_t(s.parts) * size_t(s.channel_blocks) * sizeof(int), 256);
  p.ws_backward = align_up(pc * size_t(K) * K * sizeof(AccT), 256) + 3 * align_up(pc * sizeof(AccT), 256);
  p.valid = true;
  return p;
}

// The kernels' launches (set the shared-memory limit, launch on the plan's grid, report the
// launch error), one class per storage type and activation. Only declared here: their members
// are defined in dw_instances.cuh and explicitly instantiated in csrc/cuda/inst/dw_*.cu, a
// few translation units per storage type (as FlashAttention splits its kernels), so the units
// that run the launch entries (the torch launcher, the check TU) compile no kernel and the
// kernels build in parallel.
// The kernels' grid: one CTA per (channel block, part).
inline dim3 grid_of(const Shape& s) { return dim3(unsigned(s.channel_blocks), unsigned(s.parts)); }

template <typename Args>
using LaunchFn = cudaError_t (*)(const Args& args, const Shape& s, size_t smem,
                                 cudaStream_t stream);

template <typename T, Act A>
struct ForwardKernels {
  static cudaError_t launch(const ForwardArgs<T>& args, const Shape& s, size_t smem,
                            cudaStream_t stream);
};
template <typename T, Act A>
struct BackwardDataKernels {
  static cudaError_t launch(const BackwardArgs<T>& args, const Shape& s, size_t smem,
                            cudaStream_t stream);
};
template <typename T, Act A>
struct BackwardFusedKernels {
  static cudaError_t launch(const BackwardArgs<T>& args, const Shape& s, size_t smem,
                            cudaStream_t stream);
};
template <typename T>
struct BackwardInputKernels {
  static cudaError_t launch(const BackwardArgs<T>& args, const Shape& s, size_t smem,
                            cudaStream_t stream);
};
template <typename T>
struct BackwardFinalizeKernel {  // for no parts only: else the last backward kernel's last CTAs
  static cudaError_t launch(const BackwardFinalizeArgs<T>& a, int64_t parts, int C, int64_t kk,
                            cudaStream_t stream);
};

// The launch function of the kernel family Kernels<T, A> for activation `act`; null for a code
// that names no activation.
template <template <typename, Act> class Kernels, typename T, typename Args>
inline LaunchFn<Args> launcher_for(Act act) {
  return dispatch_act(
      act, [](auto tag) -> LaunchFn<Args> { return &Kernels<T, decltype(tag)::value>::launch; },
      []() -> LaunchFn<Args> { return nullptr; });
}

// Workspace regions of the forward: part_mean, part_m2 ([parts][C] AccT), part_count
// ([channel_blocks][parts] int: each channel block's last CTA reads the counts its own CTAs wrote).
template <typename T>
struct ForwardWorkspace {
  acc_t<T>* part_mean;
  acc_t<T>* part_m2;
  int* part_count;
  ForwardWorkspace(const Plan& p, void* ws) {
    const size_t pc = size_t(p.shape.parts) * size_t(p.shape.C);
    char* base = static_cast<char*>(ws);
    part_mean = reinterpret_cast<acc_t<T>*>(base);
    base += align_up(pc * sizeof(acc_t<T>), 256);
    part_m2 = reinterpret_cast<acc_t<T>*>(base);
    base += align_up(pc * sizeof(acc_t<T>), 256);
    part_count = reinterpret_cast<int*>(base);
  }
};

// ---------------------------------------------------------------------------------------------
// The launch entries
// ---------------------------------------------------------------------------------------------

// The storage type and shape of a call, and the CTA-count target of its partition: kTargetCtas
// except in the emulation tests, which lower it to make a CTA walk several tiles on small shapes.
struct Problem {
  DType dtype = DType::Float32;
  int64_t N = 0, C = 0, H = 0, W = 0;
  int K = 0;
  int64_t target_ctas = kTargetCtas;
};

template <typename T>
inline Plan plan_of(const Problem& p) {
  return make_plan<T>(p.N, p.C, p.H, p.W, p.K, p.target_ctas);
}

inline Plan plan(const Problem& p) {
  return dispatch_dtype(
      p.dtype, [&](auto tag) { return plan_of<decltype(tag)>(p); },
      [] {
        Plan bad;
        bad.error = "unknown storage type code";
        return bad;
      });
}

// out = act(dwconv(norm(x)) + bias), and with `mean` the batch statistics of out as stored; with
// `pre_act` also the pre-activation a = dwconv(norm(x)) + bias, in the storage type.
// Tensors NHWC of the storage type (x, out) or [C] / [C][K*K] (weight, bias); norm, mean and var
// of the accumulation type. The workspace is needed for the statistics only.
struct Forward {
  Problem problem;
  Act act{};
  const void* x = nullptr;
  NormPtrs norm;                 // applied to x on load
  const void* weight = nullptr;  // [C][K*K]
  const void* bias = nullptr;    // [C] or null
  void* out = nullptr;           // null: not written (the consumer reads act(pre_act) on its
                                 // load); the statistics are still out's
  void* mean = nullptr;          // [C]; null: no statistics
  void* var = nullptr;           // [C], biased
  void* pre_act = nullptr;       // like x, or null: a is not kept
  BnNorm bn;                     // with statistics: out's BatchNorm's scale and shift (bn_math.cuh)
};

// The backward of Forward (docs/OPS.md): grad_x, the dA scratch grad_pre (x's shape; not needed
// where fused_backward), grad_weight ([C][K*K]) and grad_bias ([C]) of the storage type, and with a
// norm the sums sum_dx and sum_dx_xc ([C], accumulation type) from which the caller forms the
// norm's gradients.
struct Backward {
  Problem problem;
  Act act{};
  const void* grad_out = nullptr;
  const void* grad_mean = nullptr;  // [C] or null
  const void* grad_var = nullptr;   // [C] or null (then `mean` may be null too)
  const void* mean = nullptr;       // the forward's batch mean of out, [C]
  // The forward's out (x's shape and layout), or null. With ReLU the backward then skips the conv
  // recompute (relu'(a) = relu'(out)): 81 of its 243 FMAs per element at k = 9. Ignored with GELU,
  // whose derivative needs a itself (docs/CUDA.md, "Backward: recompute or save").
  const void* out = nullptr;
  const void* x = nullptr;
  NormPtrs norm;
  const void* weight = nullptr;
  const void* bias = nullptr;
  void* grad_pre = nullptr;
  void* grad_x = nullptr;
  void* grad_weight = nullptr;
  void* grad_bias = nullptr;
  void* sum_dx = nullptr;     // with a norm only
  void* sum_dx_xc = nullptr;  // with a norm only
  const void* grad_res = nullptr;  // like x, or null: the residual's gradient of norm(x), added to dX
  void* grad_norm_mean = nullptr;  // with a norm, [C] accumulation type or null: -sum_dx * scale
  // The forward's pre_act (Forward::pre_act), or null. Given, the backward reads a from it
  // instead of recomputing the conv, for every activation, in one kernel (fused_backward;
  // docs/CUDA.md, "Backward: recompute or save").
  const void* pre_act = nullptr;
  BnGrad bn;  // out's BatchNorm: its gradients back to var (added to grad_var), weight and bias
  // [C] or null: grad_out is the next stage's dU and the stage's own gradient grad_out times this
  // (that stage's input norm's scale), formed on load (docs/OPS.md, dw_stage_backward).
  const void* grad_out_scale = nullptr;
};

inline Requirements requirements(const Forward& c) {
  const Plan p = plan(c.problem);
  if (const char* e = bn_math::bn_norm_error(c.bn, c.mean != nullptr)) return {false, e, 0};
  return {p.valid, p.error, p.ws_forward, c.mean != nullptr ? p.shape.channel_blocks : 0};
}

// The tensor the backward reads a from instead of recomputing it: the forward's pre_act, or with
// ReLU its out (relu'(a) = relu'(out)); null: recompute.
inline const void* saved_a(const Backward& c) {
  return c.pre_act != nullptr ? c.pre_act : (c.act == Act::ReLU ? c.out : nullptr);
}

// Whether the backward runs as one kernel (dw_backward_fused.cuh): a is saved and the fused tile
// fits in shared memory. Then the call needs no grad_pre (its launcher need not allocate one).
inline bool fused_backward(const Plan& p, const Backward& c) {
  return p.valid && saved_a(c) != nullptr && p.smem_backward_fused <= kMaxDynamicSmem;
}
inline bool fused_backward(const Backward& c) { return fused_backward(plan(c.problem), c); }

inline Requirements requirements(const Backward& c) {
  const Plan p = plan(c.problem);
  if (const char* e = bn_math::bn_grad_error(c.bn, c.mean != nullptr)) return {false, e, 0};
  return {p.valid, p.error, p.ws_backward, p.shape.channel_blocks};
}

// The inputs Forward and Backward share, into ForwardArgs<T> or BackwardArgs<T>.
template <typename T, typename Args, typename Call>
inline void set_inputs(Args& args, const Call& c) {
  using AccT = acc_t<T>;
  args.x = static_cast<const T*>(c.x);
  args.norm = {static_cast<const AccT*>(c.norm.mean), static_cast<const AccT*>(c.norm.scale),
               static_cast<const AccT*>(c.norm.shift)};
  args.weight = static_cast<const T*>(c.weight);
  args.bias = static_cast<const T*>(c.bias);
}

// What cuda::launch (launch.cuh) runs for the storage type T. ws: requirements(c).workspace_bytes
// of device memory, counters: requirements(c).counters zero ints (for Forward both only with
// statistics; may be null otherwise).
template <typename T>
inline cudaError_t launch_as(T, const Forward& c, void* ws, size_t ws_bytes, int* counters,
                             cudaStream_t stream) {
  using AccT = acc_t<T>;
  const Plan p = plan_of<T>(c.problem);
  if (!p.valid || bn_math::bn_norm_error(c.bn, c.mean != nullptr)) return cudaErrorInvalidValue;
  const Shape& s = p.shape;
  const auto run = launcher_for<ForwardKernels, T, ForwardArgs<T>>(c.act);
  if (run == nullptr) return cudaErrorInvalidValue;
  ForwardArgs<T> args{};
  set_inputs<T>(args, c);
  args.out = static_cast<T*>(c.out);
  args.pre_act = static_cast<T*>(c.pre_act);
  args.vectorized = can_vectorize<T>(c.x, s.C);
  const bool stats = c.mean != nullptr;
  if (stats) {
    if (c.var == nullptr || ws_bytes < p.ws_forward ||
        ((ws == nullptr || counters == nullptr) && s.parts > 0))
      return cudaErrorInvalidValue;
    ForwardWorkspace<T> w(p, ws);
    args.part_mean = w.part_mean;
    args.part_m2 = w.part_m2;
    args.part_count = w.part_count;
    args.mean = static_cast<AccT*>(c.mean);
    args.var = static_cast<AccT*>(c.var);
    args.bn = c.bn;
    args.counters = counters;
  }
  if (s.C == 0) return cudaSuccess;
  if (s.parts > 0) return run(args, s, p.smem_forward, stream);  // its last CTAs finalize
  if (!stats) return cudaSuccess;
  // No pixels: no CTA runs, and the statistics of no rows are NaN.
  const cudaError_t err = channel_stats::launch_no_rows<AccT>(s.C, args.mean, args.var, stream);
  return err != cudaSuccess ? err : bn_math::launch_fold_forward<AccT>(c.bn, args.var, s.C, stream);
}

template <typename T>
inline cudaError_t launch_as(T, const Backward& c, void* ws, size_t ws_bytes, int* counters,
                             cudaStream_t stream) {
  using AccT = acc_t<T>;
  const Plan p = plan_of<T>(c.problem);
  if (!p.valid || ws_bytes < p.ws_backward || bn_math::bn_grad_error(c.bn, c.mean != nullptr))
    return cudaErrorInvalidValue;
  const Shape& s = p.shape;
  const auto run_data = launcher_for<BackwardDataKernels, T, BackwardArgs<T>>(c.act);
  if (run_data == nullptr) return cudaErrorInvalidValue;
  BackwardArgs<T> args{};
  args.grad_out = static_cast<const T*>(c.grad_out);
  args.grad_mean = static_cast<const AccT*>(c.grad_mean);
  args.grad_var = static_cast<const AccT*>(c.grad_var);
  args.mean = static_cast<const AccT*>(c.mean);
  args.bn = c.bn;
  args.grad_out_scale = static_cast<const AccT*>(c.grad_out_scale);
  args.out = static_cast<const T*>(c.out);
  args.pre_act = static_cast<const T*>(c.pre_act);
  set_inputs<T>(args, c);
  args.grad_pre = static_cast<T*>(c.grad_pre);
  args.grad_x = static_cast<T*>(c.grad_x);
  args.grad_res = static_cast<const T*>(c.grad_res);
  const bool fused = fused_backward(p, c);
  args.vectorized_x = can_vectorize<T>(c.x, s.C) && (fused || can_vectorize<T>(c.grad_pre, s.C));
  args.vectorized_grad = fused && can_vectorize<T>(saved_a(c), s.C) &&
                         can_vectorize<T>(c.grad_out, s.C);
  const int64_t kk = int64_t(s.K) * s.K;
  const size_t pc = size_t(s.parts) * size_t(s.C);
  if (s.C == 0) return cudaSuccess;
  const bool norm = args.norm.mean != nullptr;
  BackwardFinalizeArgs<T>& f = args.fin;
  if (s.parts > 0) {
    if (ws == nullptr || counters == nullptr) return cudaErrorInvalidValue;
    char* base = static_cast<char*>(ws);
    f.part_grad_w = reinterpret_cast<AccT*>(base);
    base += align_up(pc * kk * sizeof(AccT), 256);
    f.part_grad_b = reinterpret_cast<AccT*>(base);
    base += align_up(pc * sizeof(AccT), 256);
    f.part_sum_dx = reinterpret_cast<AccT*>(base);
    base += align_up(pc * sizeof(AccT), 256);
    f.part_sum_dx_xc = reinterpret_cast<AccT*>(base);
  }
  f.norm_scale = args.norm.scale;
  f.grad_weight = static_cast<T*>(c.grad_weight);
  f.grad_bias = static_cast<T*>(c.grad_bias);
  f.sum_dx = norm ? static_cast<AccT*>(c.sum_dx) : nullptr;  // null: no norm, no sums
  f.sum_dx_xc = static_cast<AccT*>(c.sum_dx_xc);
  f.grad_norm_mean = norm ? static_cast<AccT*>(c.grad_norm_mean) : nullptr;
  args.counters = counters;
  if (s.parts > 0 && fused) {  // its last CTAs finalize
    const auto run_fused = launcher_for<BackwardFusedKernels, T, BackwardArgs<T>>(c.act);
    return run_fused(args, s, p.smem_backward_fused, stream);
  }
  if (s.parts > 0) {
    if (c.grad_pre == nullptr) return cudaErrorInvalidValue;
    const cudaError_t err = run_data(args, s, p.smem_backward_data, stream);
    if (err != cudaSuccess) return err;
    // Its last CTAs finalize.
    return BackwardInputKernels<T>::launch(args, s, p.smem_backward_input, stream);
  }
  // No parts (no pixels): every sum is empty, zero; the BatchNorm's gradients still come back.
  const cudaError_t err = BackwardFinalizeKernel<T>::launch(args.fin, 0, s.C, kk, stream);
  return err != cudaSuccess ? err : bn_math::launch_fold_backward<AccT>(c.bn, s.C, stream);
}

}  // namespace dw
}  // namespace cuda
}  // namespace convmixer_kernels
