// CUDA implementation of dw_stage and dw_stage_backward (docs/OPS.md): checks, allocation and
// the launch of the kernels in kernels/dw_stage.cuh on the current stream.
#include "cuda_common.h"
#include "kernels/dw_stage.cuh"

#include <torch/library.h>

namespace convmixer_kernels {
namespace cuda_ops {
namespace {

namespace dw = ::convmixer_kernels::cuda::dw;
using ::convmixer_kernels::cuda::acc_t;

template <typename T>
dw::Plan plan_for(const char* op, const DwGeometry& g, const at::Tensor& x) {
  const dw::Plan plan = dw::make_plan<T>(g.N, g.C, g.H, g.W, int(g.k));
  TORCH_CHECK_VALUE(plan.valid, op, ": the CUDA kernels cannot run input ", x.sizes(), " of dtype ",
                    x.scalar_type(), " with kernel size ", g.k, ": ", plan.error);
  return plan;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dw_stage(
    const at::Tensor& x_in, const std::optional<at::Tensor>& x_mean,
    const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& x_shift,
    const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
    c10::string_view act_name, bool stats) {
  const char* op = "dw_stage";
  const DwArgs a = check_dw_stage(op, x_in, x_mean, x_scale, x_shift, weight_in, bias_in, act_name,
                                  stats);
  const DwGeometry& g = a.g;
  const auto acc = a.acc;
  const Norm& norm = a.norm;
  const c10::cuda::CUDAGuard guard(x_in.device());

  const auto x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const auto weight = weight_in.contiguous();
  const auto bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  auto out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor mean = stats ? at::empty({g.C}, x.options().dtype(acc)) : empty_output(x, acc);
  at::Tensor var = stats ? at::empty({g.C}, x.options().dtype(acc)) : empty_output(x, acc);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dw_stage_cuda", [&] {
    using T = typename KernelType<scalar_t>::type;
    using AccT = acc_t<T>;
    const dw::Plan plan = plan_for<T>(op, g, x);
    const at::Tensor ws = workspace(x, stats ? plan.ws_forward : 0);
    dw::ForwardArgs<T> args{};
    args.x = ptr_or_null<T>(x);
    args.norm_mean = ptr_or_null<AccT>(norm.mean);
    args.norm_scale = ptr_or_null<AccT>(norm.scale);
    args.norm_shift = ptr_or_null<AccT>(norm.shift);
    args.weight = ptr_or_null<T>(weight);
    args.bias = ptr_or_null<T>(bias);
    args.out = static_cast<T*>(out.data_ptr());
    args.vectorized = dw::can_vectorize<T>(x.data_ptr(), g.C);
    check_launch(dw::launch_forward<T>(plan, args, a.act,
                                       stats ? static_cast<AccT*>(mean.data_ptr()) : nullptr,
                                       stats ? static_cast<AccT*>(var.data_ptr()) : nullptr,
                                       ws.numel() > 0 ? ws.data_ptr() : nullptr, stream),
                 op);
  });
  return {out, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dw_stage_backward(const at::Tensor& grad_out_in, const std::optional<at::Tensor>& grad_mean_in,
                  const std::optional<at::Tensor>& grad_var_in, const at::Tensor& x_in,
                  const std::optional<at::Tensor>& x_mean,
                  const std::optional<at::Tensor>& x_scale,
                  const std::optional<at::Tensor>& x_shift, const at::Tensor& weight_in,
                  const std::optional<at::Tensor>& bias_in,
                  const std::optional<at::Tensor>& mean_in, c10::string_view act_name) {
  const char* op = "dw_stage_backward";
  const DwArgs a = check_dw_stage_backward(op, grad_out_in, grad_mean_in, grad_var_in, x_in, x_mean,
                                           x_scale, x_shift, weight_in, bias_in, mean_in, act_name);
  const DwGeometry& g = a.g;
  const auto acc = a.acc;
  const Norm& norm = a.norm;
  const StatGrads& sg = a.sg;
  const c10::cuda::CUDAGuard guard(x_in.device());

  const auto x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const auto grad_out = grad_out_in.contiguous(at::MemoryFormat::ChannelsLast);
  const auto weight = weight_in.contiguous();
  const auto bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const auto cl = x.options().memory_format(at::MemoryFormat::ChannelsLast);
  auto grad_x = at::empty(x.sizes(), cl);
  auto grad_pre = at::empty(x.sizes(), cl);  // dA, between the two kernels
  auto grad_weight = at::empty(weight_in.sizes(), weight.options());
  auto grad_bias = at::empty({g.C}, weight.options());
  at::Tensor sum_dx, sum_dx_xc;
  if (norm.defined()) {
    sum_dx = at::empty({g.C}, x.options().dtype(acc));
    sum_dx_xc = at::empty({g.C}, x.options().dtype(acc));
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dw_stage_backward_cuda", [&] {
    using T = typename KernelType<scalar_t>::type;
    using AccT = acc_t<T>;
    const dw::Plan plan = plan_for<T>(op, g, x);
    const at::Tensor ws = workspace(x, plan.ws_backward);
    dw::BackwardArgs<T> args{};
    args.grad_out = ptr_or_null<T>(grad_out);
    args.grad_mean = ptr_or_null<AccT>(sg.grad_mean);
    args.grad_var = ptr_or_null<AccT>(sg.grad_var);
    args.mean = ptr_or_null<AccT>(sg.mean);
    args.x = ptr_or_null<T>(x);
    args.norm_mean = ptr_or_null<AccT>(norm.mean);
    args.norm_scale = ptr_or_null<AccT>(norm.scale);
    args.norm_shift = ptr_or_null<AccT>(norm.shift);
    args.weight = ptr_or_null<T>(weight);
    args.bias = ptr_or_null<T>(bias);
    args.grad_pre = static_cast<T*>(grad_pre.data_ptr());
    args.grad_x = static_cast<T*>(grad_x.data_ptr());
    args.vectorized_x = dw::can_vectorize<T>(x.data_ptr(), g.C) &&
                        dw::can_vectorize<T>(grad_pre.data_ptr(), g.C);
    check_launch(
        dw::launch_backward<T>(plan, args, a.act, static_cast<T*>(grad_weight.data_ptr()),
                               static_cast<T*>(grad_bias.data_ptr()),
                               norm.defined() ? static_cast<AccT*>(sum_dx.data_ptr()) : nullptr,
                               norm.defined() ? static_cast<AccT*>(sum_dx_xc.data_ptr()) : nullptr,
                               ws.numel() > 0 ? ws.data_ptr() : nullptr, stream),
        op);
  });

  at::Tensor g_mean = empty_output(x, acc), g_scale = empty_output(x, acc),
             g_shift = empty_output(x, acc);
  if (norm.defined()) {
    g_mean = -sum_dx * norm.scale;
    g_scale = sum_dx_xc;
    g_shift = sum_dx;
  }
  return {grad_x, g_mean, g_scale, g_shift, grad_weight, grad_bias};
}

}  // namespace
}  // namespace cuda_ops
}  // namespace convmixer_kernels

TORCH_LIBRARY_IMPL(convmixer_kernels, CUDA, m) {
  m.impl("dw_stage", &convmixer_kernels::cuda_ops::dw_stage);
  m.impl("dw_stage_backward", &convmixer_kernels::cuda_ops::dw_stage_backward);
}
