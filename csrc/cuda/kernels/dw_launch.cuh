// The host side of the depthwise stage (kernels in dw_stage.cuh): the plan, and the one launch
// entry per pass (launch.cuh) that the torch launcher (csrc/cuda/dw_stage.cu) and the check TU
// (csrc/cuda/check/dw_stage_check.cu, which the CPU emulation tests drive) both call.
// Torch-free (docs/DESIGN.md §8).
#pragma once

#include "dw_stage.cuh"
#include "launch.cuh"

#include <type_traits>

namespace convmixer_kernels {
namespace cuda {
namespace dw {

struct Plan {
  Shape shape;
  bool valid = false;
  const char* error = "";         // why not valid
  size_t smem_forward = 0, smem_backward_data = 0, smem_backward_input = 0;  // bytes
  // Workspace, in bytes, each region 256-byte aligned (see the offsets below).
  size_t ws_forward = 0, ws_backward = 0;
};

// Whether the 16-byte path may read `p`: every pixel's channel run starts 16-byte aligned.
template <typename T>
inline bool can_vectorize(const void* p, int64_t C) {
  return C % kVecWidth<T> == 0 && aligned16({p});
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
  if (s.channel_blocks > 65535) {
    p.error = "too many channels for the grid";
    return p;
  }
  int64_t parts = target_ctas / (s.channel_blocks > 0 ? s.channel_blocks : 1);
  if (parts < 1) parts = 1;
  if (parts > s.tiles) parts = s.tiles;
  s.tiles_per_part = parts > 0 ? (s.tiles + parts - 1) / parts : 0;
  s.parts = s.tiles_per_part > 0 ? (s.tiles + s.tiles_per_part - 1) / s.tiles_per_part : 0;
  // Per-part pixel counts are int (the statistics' counts, TileCounts): keep them well inside.
  if (s.tiles_per_part * kTH * kTW > (int64_t(1) << 30)) {
    p.error = "too many pixels per part";
    return p;
  }
  p.smem_forward = smem_layout(K, Kernel::Forward).total * sizeof(AccT);
  p.smem_backward_data = smem_layout(K, Kernel::BackwardData).total * sizeof(AccT);
  p.smem_backward_input = smem_layout(K, Kernel::BackwardInput).total * sizeof(AccT);
  if (p.smem_backward_data > kMaxDynamicSmem || p.smem_forward > kMaxDynamicSmem) {
    p.error = "the tile for this kernel size and dtype does not fit in shared memory";
    return p;
  }
  const size_t pc = size_t(s.parts) * size_t(C);
  p.ws_forward = 2 * align_up(pc * sizeof(AccT), 256) + align_up(size_t(s.parts) * sizeof(int), 256);
  p.ws_backward = align_up(pc * size_t(K) * K * sizeof(AccT), 256) + 3 * align_up(pc * sizeof(AccT), 256);
  p.valid = true;
  return p;
}

// The instantiation of a kernel for kernel size K: a register-tap specialisation (k = 3, 5, 7, 9
// with 32-bit accumulation) or the generic runtime-k one. kernel_of(std::integral_constant<int,
// kK>) names the instantiation for kK.
template <typename AccT, typename KernelOf>
inline auto kernel_for_k(int K, KernelOf kernel_of) {
  if constexpr (kRegisterTaps<3, AccT>) {
    switch (K) {
      case 3: return kernel_of(std::integral_constant<int, 3>{});
      case 5: return kernel_of(std::integral_constant<int, 5>{});
      case 7: return kernel_of(std::integral_constant<int, 7>{});
      case 9: return kernel_of(std::integral_constant<int, 9>{});
      default: break;
    }
  }
  return kernel_of(std::integral_constant<int, 0>{});
}

template <typename T, Act A>
inline auto forward_kernel_for(int K) {
  return kernel_for_k<acc_t<T>>(K, [](auto k) { return &dw_forward_kernel<T, decltype(k)::value, A>; });
}

template <typename T, Act A>
inline auto backward_data_kernel_for(int K) {
  return kernel_for_k<acc_t<T>>(
      K, [](auto k) { return &dw_backward_data_kernel<T, decltype(k)::value, A>; });
}

template <typename T>
inline auto backward_input_kernel_for(int K) {
  return kernel_for_k<acc_t<T>>(
      K, [](auto k) { return &dw_backward_input_kernel<T, decltype(k)::value>; });
}

// Workspace regions of the forward: part_mean, part_m2 ([parts][C] AccT), part_count ([parts] int).
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

// out = act(dwconv(norm(x)) + bias), and with `mean` the batch statistics of out as stored.
// Tensors NHWC of the storage type (x, out) or [C] / [C][K*K] (weight, bias); norm, mean and var
// of the accumulation type. The workspace is needed for the statistics only.
struct Forward {
  Problem problem;
  Act act{};
  const void* x = nullptr;
  NormPtrs norm;                 // applied to x on load
  const void* weight = nullptr;  // [C][K*K]
  const void* bias = nullptr;    // [C] or null
  void* out = nullptr;
  void* mean = nullptr;          // [C]; null: no statistics
  void* var = nullptr;           // [C], biased
};

// The backward of Forward (docs/OPS.md): grad_x, the dA scratch grad_pre (x's shape), grad_weight
// ([C][K*K]) and grad_bias ([C]) of the storage type, and with a norm the sums sum_dx and
// sum_dx_xc ([C], accumulation type) from which the caller forms the norm's gradients.
struct Backward {
  Problem problem;
  Act act{};
  const void* grad_out = nullptr;
  const void* grad_mean = nullptr;  // [C] or null
  const void* grad_var = nullptr;   // [C] or null (then `mean` may be null too)
  const void* mean = nullptr;       // the forward's batch mean of out, [C]
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
  const void* grad_res = nullptr;   // like x, or null: added into grad_x
  const void* saved_out = nullptr;  // the forward's out, or null (not read yet: a recompute-free
                                    // dA for relu could use it, docs/OPS.md)
};

inline Requirements requirements(const Forward& c) {
  const Plan p = plan(c.problem);
  return {p.valid, p.error, p.ws_forward};
}

inline Requirements requirements(const Backward& c) {
  const Plan p = plan(c.problem);
  return {p.valid, p.error, p.ws_backward};
}

// The inputs Forward and Backward share, into ForwardArgs<T> or BackwardArgs<T>.
template <typename T, typename Args, typename Call>
inline void set_inputs(Args& args, const Call& c) {
  using AccT = acc_t<T>;
  args.x = static_cast<const T*>(c.x);
  args.norm_mean = static_cast<const AccT*>(c.norm.mean);
  args.norm_scale = static_cast<const AccT*>(c.norm.scale);
  args.norm_shift = static_cast<const AccT*>(c.norm.shift);
  args.weight = static_cast<const T*>(c.weight);
  args.bias = static_cast<const T*>(c.bias);
}

// What cuda::launch (launch.cuh) runs for the storage type T. ws: requirements(c).workspace_bytes
// of device memory (for Forward only with statistics; may be null otherwise).
template <typename T>
inline cudaError_t launch_as(T, const Forward& c, void* ws, size_t ws_bytes, cudaStream_t stream) {
  using AccT = acc_t<T>;
  const Plan p = plan_of<T>(c.problem);
  if (!p.valid) return cudaErrorInvalidValue;
  const Shape& s = p.shape;
  const auto kernel = dispatch_act(
      c.act, [&](auto tag) { return forward_kernel_for<T, decltype(tag)::value>(s.K); },
      [] { return nullptr; });
  if (kernel == nullptr) return cudaErrorInvalidValue;
  ForwardArgs<T> args{};
  set_inputs<T>(args, c);
  args.out = static_cast<T*>(c.out);
  args.vectorized = can_vectorize<T>(c.x, s.C);
  const bool stats = c.mean != nullptr;
  if (stats) {
    if (ws_bytes < p.ws_forward || (ws == nullptr && s.parts > 0)) return cudaErrorInvalidValue;
    ForwardWorkspace<T> w(p, ws);
    args.part_mean = w.part_mean;
    args.part_m2 = w.part_m2;
    args.part_count = w.part_count;
  }
  if (s.parts > 0 && s.C > 0) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           int(p.smem_forward));
    if (err != cudaSuccess) return err;
    const dim3 grid(unsigned(s.parts), unsigned(s.channel_blocks));
    kernel<<<grid, kThreads, p.smem_forward, stream>>>(args, s);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (!stats || s.C == 0) return cudaSuccess;
  const channel_stats::TileCounts counts{0, 0, args.part_count};
  return channel_stats::launch_finalize<AccT>(args.part_mean, args.part_m2, counts, s.parts, s.C,
                                              static_cast<AccT*>(c.mean),
                                              static_cast<AccT*>(c.var), stream);
}

template <typename T>
inline cudaError_t launch_as(T, const Backward& c, void* ws, size_t ws_bytes,
                             cudaStream_t stream) {
  using AccT = acc_t<T>;
  const Plan p = plan_of<T>(c.problem);
  if (!p.valid || ws_bytes < p.ws_backward) return cudaErrorInvalidValue;
  const Shape& s = p.shape;
  const auto data_kernel = dispatch_act(
      c.act, [&](auto tag) { return backward_data_kernel_for<T, decltype(tag)::value>(s.K); },
      [] { return nullptr; });
  if (data_kernel == nullptr) return cudaErrorInvalidValue;
  BackwardArgs<T> args{};
  args.grad_out = static_cast<const T*>(c.grad_out);
  args.grad_mean = static_cast<const AccT*>(c.grad_mean);
  args.grad_var = static_cast<const AccT*>(c.grad_var);
  args.mean = static_cast<const AccT*>(c.mean);
  set_inputs<T>(args, c);
  args.grad_pre = static_cast<T*>(c.grad_pre);
  args.grad_x = static_cast<T*>(c.grad_x);
  args.grad_res = static_cast<const T*>(c.grad_res);
  args.vectorized_x = can_vectorize<T>(c.x, s.C) && can_vectorize<T>(c.grad_pre, s.C);
  T* const grad_weight = static_cast<T*>(c.grad_weight);
  T* const grad_bias = static_cast<T*>(c.grad_bias);
  AccT* const sum_dx = static_cast<AccT*>(c.sum_dx);
  AccT* const sum_dx_xc = static_cast<AccT*>(c.sum_dx_xc);
  const int64_t kk = int64_t(s.K) * s.K;
  const size_t pc = size_t(s.parts) * size_t(s.C);
  if (s.C == 0) return cudaSuccess;
  if (s.parts == 0) {
    // No pixels: every gradient sum is empty.
    cudaError_t err = cudaMemsetAsync(grad_weight, 0, size_t(s.C) * kk * sizeof(T), stream);
    if (err == cudaSuccess) err = cudaMemsetAsync(grad_bias, 0, size_t(s.C) * sizeof(T), stream);
    if (err == cudaSuccess && args.norm_mean != nullptr) {
      err = cudaMemsetAsync(sum_dx, 0, size_t(s.C) * sizeof(AccT), stream);
      if (err == cudaSuccess) err = cudaMemsetAsync(sum_dx_xc, 0, size_t(s.C) * sizeof(AccT), stream);
    }
    return err;
  }
  if (ws == nullptr) return cudaErrorInvalidValue;
  char* base = static_cast<char*>(ws);
  args.part_grad_w = reinterpret_cast<AccT*>(base);
  base += align_up(pc * kk * sizeof(AccT), 256);
  args.part_grad_b = reinterpret_cast<AccT*>(base);
  base += align_up(pc * sizeof(AccT), 256);
  args.part_sum_dx = reinterpret_cast<AccT*>(base);
  base += align_up(pc * sizeof(AccT), 256);
  args.part_sum_dx_xc = reinterpret_cast<AccT*>(base);

  const dim3 grid(unsigned(s.parts), unsigned(s.channel_blocks));
  cudaError_t err = cudaFuncSetAttribute(data_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         int(p.smem_backward_data));
  if (err != cudaSuccess) return err;
  data_kernel<<<grid, kThreads, p.smem_backward_data, stream>>>(args, s);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  auto input_kernel = backward_input_kernel_for<T>(s.K);
  err = cudaFuncSetAttribute(input_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             int(p.smem_backward_input));
  if (err != cudaSuccess) return err;
  input_kernel<<<grid, kThreads, p.smem_backward_input, stream>>>(args, s);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  if ((err = launch_sum_parts<AccT, T>(args.part_grad_w, s.parts, int64_t(s.C) * kk, grad_weight,
                                       stream)) != cudaSuccess)
    return err;
  if ((err = launch_sum_parts<AccT, T>(args.part_grad_b, s.parts, s.C, grad_bias, stream)) !=
      cudaSuccess)
    return err;
  if (args.norm_mean == nullptr) return cudaSuccess;
  if ((err = launch_sum_parts<AccT, AccT>(args.part_sum_dx, s.parts, s.C, sum_dx, stream)) !=
      cudaSuccess)
    return err;
  return launch_sum_parts<AccT, AccT>(args.part_sum_dx_xc, s.parts, s.C, sum_dx_xc, stream);
}

}  // namespace dw
}  // namespace cuda
}  // namespace convmixer_kernels
