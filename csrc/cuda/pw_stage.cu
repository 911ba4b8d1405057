// CUDA implementation of pw_stage and pw_stage_backward (docs/OPS.md): the fused kernels of
// kernels/pw_stage.cuh around cuBLAS GEMMs (at::addmm / at::mm on the current stream).
#include "cuda_common.h"
#include "kernels/pw_stage.cuh"

#include <torch/library.h>

namespace convmixer_kernels {
namespace cuda_ops {
namespace {

namespace pw = ::convmixer_kernels::cuda::pw;
using ::convmixer_kernels::cuda::acc_t;

// The [rows, C] row-major matrix of an NHWC tensor (a view when x is channels_last already).
at::Tensor rows_of(const at::Tensor& t) {
  return t.contiguous(at::MemoryFormat::ChannelsLast).permute({0, 2, 3, 1}).reshape({-1, t.size(1)});
}

// The channels_last [N, C, H, W] tensor whose memory is the row-major [rows, C] matrix.
at::Tensor nchw_of(const at::Tensor& rows, at::IntArrayRef nchw) {
  return rows.view({nchw[0], nchw[2], nchw[3], nchw[1]}).permute({0, 3, 1, 2});
}

bool aligned16(std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts)
    if (t != nullptr && t->defined() && reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0)
      return false;
  return true;
}

template <typename T>
pw::Plan plan_for(const char* op, int64_t rows, int64_t C, bool vectorized) {
  const pw::Plan plan = pw::make_plan<T>(rows, C, vectorized);
  TORCH_CHECK_VALUE(plan.valid, op, ": the CUDA kernels cannot run ", rows, " rows of ", C,
                    " channels");
  return plan;
}

// u = norm_x(x) + norm_res(res) in the storage dtype; x itself when there is nothing to apply.
template <typename T>
at::Tensor prologue(const char* op, const at::Tensor& x2d, const Norm& nx, const at::Tensor& r2d,
                    const Norm& nr, cudaStream_t stream) {
  using AccT = acc_t<T>;
  if (!nx.defined() && !r2d.defined()) return x2d;
  auto u = at::empty_like(x2d);
  const pw::Plan plan = plan_for<T>(op, x2d.size(0), x2d.size(1), aligned16({&x2d, &r2d, &u}));
  const pw::PrologueArgs<T> a{ptr_or_null<T>(x2d),        ptr_or_null<AccT>(nx.mean),
                              ptr_or_null<AccT>(nx.scale), ptr_or_null<AccT>(nx.shift),
                              ptr_or_null<T>(r2d),        ptr_or_null<AccT>(nr.mean),
                              ptr_or_null<AccT>(nr.scale), ptr_or_null<AccT>(nr.shift),
                              static_cast<T*>(u.data_ptr())};
  check_launch(pw::launch_prologue<T>(plan, a, stream), op);
  return u;
}

at::Tensor gemm_pre_act(const at::Tensor& u, const at::Tensor& w2d, const at::Tensor& bias) {
  return bias.defined() ? at::addmm(bias, u, w2d.t()) : at::mm(u, w2d.t());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pw_stage(
    const at::Tensor& x_in, const std::optional<at::Tensor>& x_mean,
    const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& x_shift,
    const std::optional<at::Tensor>& res_in, const std::optional<at::Tensor>& res_mean,
    const std::optional<at::Tensor>& res_scale, const std::optional<at::Tensor>& res_shift,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias_in, c10::string_view act_name,
    bool stats, bool keep_pre_act) {
  const char* op = "pw_stage";
  const PwArgs args = check_pw_stage(op, x_in, x_mean, x_scale, x_shift, res_in, res_mean,
                                     res_scale, res_shift, weight, bias_in, act_name, stats);
  const PwGeometry& g = args.g;
  const Act act = args.act;
  const auto acc = args.acc;
  const Norm &nx = args.nx, &nr = args.nr;
  const c10::cuda::CUDAGuard guard(x_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const auto x2d = rows_of(x_in);
  const auto r2d = res_in.has_value() ? rows_of(*res_in) : at::Tensor();
  const auto w2d = weight.reshape({g.Cout, g.Cin});
  const auto bias = bias_in.has_value() ? *bias_in : at::Tensor();
  const std::vector<int64_t> out_sizes = args.out_sizes();
  auto out2d = at::empty({g.rows(), g.Cout}, x_in.options());
  at::Tensor mean = stats ? at::empty({g.Cout}, x_in.options().dtype(acc)) : empty_output(x_in, acc);
  at::Tensor var = stats ? at::empty({g.Cout}, x_in.options().dtype(acc)) : empty_output(x_in, acc);
  at::Tensor pre_act;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_in.scalar_type(), "pw_stage_cuda", [&] {
    using T = typename KernelType<scalar_t>::type;
    using AccT = acc_t<T>;
    const auto u = prologue<T>(op, x2d, nx, r2d, nr, stream);
    const auto p2d = gemm_pre_act(u, w2d, bias);
    const pw::Plan plan = plan_for<T>(op, g.rows(), g.Cout, aligned16({&p2d, &out2d}));
    const at::Tensor ws = workspace(x_in, stats ? pw::forward_workspace_bytes<T>(plan) : 0);
    check_launch(pw::launch_epilogue_forward<T>(
                     plan, ptr_or_null<T>(p2d), static_cast<T*>(out2d.data_ptr()), act,
                     stats ? static_cast<AccT*>(mean.data_ptr()) : nullptr,
                     stats ? static_cast<AccT*>(var.data_ptr()) : nullptr,
                     ws.numel() > 0 ? ws.data_ptr() : nullptr, stream),
                 op);
    pre_act = keep_pre_act ? nchw_of(p2d, out_sizes) : empty_output(x_in, x_in.scalar_type());
  });
  return {nchw_of(out2d, out_sizes), pre_act, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor>
pw_stage_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_mean_in,
                  const std::optional<at::Tensor>& grad_var_in, const at::Tensor& x_in,
                  const std::optional<at::Tensor>& x_mean,
                  const std::optional<at::Tensor>& x_scale,
                  const std::optional<at::Tensor>& x_shift, const std::optional<at::Tensor>& res_in,
                  const std::optional<at::Tensor>& res_mean,
                  const std::optional<at::Tensor>& res_scale,
                  const std::optional<at::Tensor>& res_shift, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias_in,
                  const std::optional<at::Tensor>& pre_act_in,
                  const std::optional<at::Tensor>& mean_in, c10::string_view act_name) {
  const char* op = "pw_stage_backward";
  const PwArgs args = check_pw_stage_backward(op, grad_out, grad_mean_in, grad_var_in, x_in, x_mean,
                                              x_scale, x_shift, res_in, res_mean, res_scale,
                                              res_shift, weight, bias_in, pre_act_in, mean_in,
                                              act_name);
  const PwGeometry& g = args.g;
  const Act act = args.act;
  const auto acc = args.acc;
  const Norm &nx = args.nx, &nr = args.nr;
  const StatGrads& sg = args.sg;
  const bool have_pre_act = args.have_pre_act;
  const c10::cuda::CUDAGuard guard(x_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const auto x2d = rows_of(x_in);
  const auto r2d = res_in.has_value() ? rows_of(*res_in) : at::Tensor();
  const auto w2d = weight.reshape({g.Cout, g.Cin});
  const auto bias = bias_in.has_value() ? *bias_in : at::Tensor();
  const auto go2d = rows_of(grad_out);
  const std::vector<int64_t> in_sizes = args.in_sizes();
  auto grad_bias = at::empty({g.Cout}, weight.options());
  at::Tensor grad_x, grad_res = empty_output(x_in, x_in.scalar_type()), grad_w;
  at::Tensor sum_du = at::empty({g.Cin}, x_in.options().dtype(acc));
  at::Tensor sum_du_xc = nx.defined() ? at::empty({g.Cin}, x_in.options().dtype(acc)) : at::Tensor();
  at::Tensor sum_du_rc = nr.defined() ? at::empty({g.Cin}, x_in.options().dtype(acc)) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_in.scalar_type(), "pw_stage_backward_cuda", [&] {
    using T = typename KernelType<scalar_t>::type;
    using AccT = acc_t<T>;
    const auto u = prologue<T>(op, x2d, nx, r2d, nr, stream);
    const auto p2d = have_pre_act ? rows_of(*pre_act_in) : gemm_pre_act(u, w2d, bias);
    auto dp2d = at::empty({g.rows(), g.Cout}, x_in.options());
    {
      const pw::Plan plan = plan_for<T>(op, g.rows(), g.Cout, aligned16({&go2d, &p2d, &dp2d}));
      const at::Tensor ws = workspace(x_in, pw::backward_epilogue_workspace_bytes<T>(plan));
      pw::EpilogueBackwardArgs<T> a{ptr_or_null<T>(go2d),         ptr_or_null<T>(p2d),
                                    ptr_or_null<AccT>(sg.grad_mean), ptr_or_null<AccT>(sg.grad_var),
                                    ptr_or_null<AccT>(sg.mean),      static_cast<T*>(dp2d.data_ptr()),
                                    nullptr};
      check_launch(pw::launch_epilogue_backward<T>(plan, a, act,
                                                   static_cast<T*>(grad_bias.data_ptr()),
                                                   ws.numel() > 0 ? ws.data_ptr() : nullptr, stream),
                   op);
    }
    grad_w = dp2d.t().mm(u).view(weight.sizes());
    const auto du = dp2d.mm(w2d);
    // Outputs may not alias: dU itself is returned at most once (as docs/OPS.md's CPU kernels do).
    at::Tensor gx2d = nx.defined() ? at::empty_like(du) : du;
    at::Tensor gr2d;
    if (r2d.defined()) gr2d = (nr.defined() || !nx.defined()) ? at::empty_like(du) : du;
    const bool write_res = r2d.defined() && gr2d.data_ptr() != du.data_ptr();
    const pw::Plan plan = plan_for<T>(op, g.rows(), g.Cin,
                                      aligned16({&du, &x2d, &r2d, &gx2d, &gr2d}));
    const at::Tensor ws = workspace(x_in, pw::through_norms_workspace_bytes<T>(plan));
    pw::ThroughNormsArgs<T> a{};
    a.grad_u = ptr_or_null<T>(du);
    a.x = ptr_or_null<T>(x2d);
    a.x_mean = ptr_or_null<AccT>(nx.mean);
    a.x_scale = ptr_or_null<AccT>(nx.scale);
    a.res = ptr_or_null<T>(r2d);
    a.res_mean = ptr_or_null<AccT>(nr.mean);
    a.res_scale = ptr_or_null<AccT>(nr.scale);
    a.grad_x = nx.defined() ? static_cast<T*>(gx2d.data_ptr()) : nullptr;
    a.grad_res = write_res ? static_cast<T*>(gr2d.data_ptr()) : nullptr;
    check_launch(pw::launch_through_norms<T>(
                     plan, a, static_cast<AccT*>(sum_du.data_ptr()),
                     nx.defined() ? static_cast<AccT*>(sum_du_xc.data_ptr()) : nullptr,
                     nr.defined() ? static_cast<AccT*>(sum_du_rc.data_ptr()) : nullptr,
                     ws.numel() > 0 ? ws.data_ptr() : nullptr, stream),
                 op);
    grad_x = nchw_of(gx2d, in_sizes);
    if (r2d.defined()) grad_res = nchw_of(gr2d, in_sizes);
  });

  auto empty = [&] { return empty_output(x_in, acc); };
  at::Tensor gx_mean = empty(), gx_scale = empty(), gx_shift = empty();
  at::Tensor gr_mean = empty(), gr_scale = empty(), gr_shift = empty();
  if (nx.defined()) {
    gx_mean = -sum_du * nx.scale;
    gx_scale = sum_du_xc;
    gx_shift = sum_du.clone();
  }
  if (nr.defined()) {
    gr_mean = -sum_du * nr.scale;
    gr_scale = sum_du_rc;
    gr_shift = sum_du.clone();
  }
  return {grad_x, gx_mean, gx_scale, gx_shift, grad_res, gr_mean, gr_scale, gr_shift, grad_w,
          grad_bias};
}

}  // namespace
}  // namespace cuda_ops
}  // namespace convmixer_kernels

TORCH_LIBRARY_IMPL(convmixer_kernels, CUDA, m) {
  m.impl("pw_stage", &convmixer_kernels::cuda_ops::pw_stage);
  m.impl("pw_stage_backward", &convmixer_kernels::cuda_ops::pw_stage_backward);
}
