// The op schemas (docs/OPS.md). The stage ops' trailing optional inputs have defaults, so
// callers written before them keep working. The bn_* inputs fold the stage output's BatchNorm in
// (bn_ops.h BnFold): the forward's scale and shift, the backward's gradients through them.
// write_out and x_act link two stages: a dw stage that writes only its pre-activation, which the
// pw stage reads through act on its load (docs/OPS.md "Act on load"). Each backend registers its
// implementations beside its kernels: csrc/cpu/register_cpu.cpp, csrc/cuda/*_stage.cu,
// csrc/cuda/bn_ops.cu.
#include <torch/library.h>

TORCH_LIBRARY(convmixer_kernels, m) {
  m.def(
      "dw_stage(Tensor x, Tensor? x_mean, Tensor? x_scale, Tensor? x_shift, Tensor weight, "
      "Tensor? bias, str act, bool stats, bool keep_pre_act=False, Tensor? bn_weight=None, "
      "Tensor? bn_bias=None, float? bn_eps=None, bool write_out=True) -> (Tensor out, "
      "Tensor pre_act, Tensor mean, Tensor var, Tensor scale, Tensor shift)");
  m.def(
      "dw_stage_backward(Tensor grad_out, Tensor? grad_mean, Tensor? grad_var, Tensor x, "
      "Tensor? x_mean, Tensor? x_scale, Tensor? x_shift, Tensor weight, Tensor? bias, "
      "Tensor? mean, str act, Tensor? grad_res=None, Tensor? saved_out=None, "
      "Tensor? pre_act=None, Tensor? grad_scale=None, Tensor? grad_shift=None, Tensor? var=None, "
      "Tensor? bn_weight=None, float? bn_eps=None, Tensor? grad_out_scale=None) -> "
      "(Tensor grad_x, Tensor grad_x_mean, Tensor grad_x_scale, Tensor grad_x_shift, "
      "Tensor grad_weight, Tensor grad_bias, Tensor grad_bn_weight, Tensor grad_bn_bias)");
  m.def(
      "pw_stage(Tensor x, Tensor? x_mean, Tensor? x_scale, Tensor? x_shift, Tensor? res, "
      "Tensor? res_mean, Tensor? res_scale, Tensor? res_shift, Tensor weight, Tensor? bias, "
      "str act, bool stats, bool keep_pre_act, bool keep_u=False, Tensor? bn_weight=None, "
      "Tensor? bn_bias=None, float? bn_eps=None, str? x_act=None) -> (Tensor out, "
      "Tensor pre_act, Tensor mean, Tensor var, Tensor u, Tensor scale, Tensor shift)");
  m.def(
      "pw_stage_backward(Tensor grad_out, Tensor? grad_mean, Tensor? grad_var, Tensor x, "
      "Tensor? x_mean, Tensor? x_scale, Tensor? x_shift, Tensor? res, Tensor? res_mean, "
      "Tensor? res_scale, Tensor? res_shift, Tensor weight, Tensor? bias, Tensor? pre_act, "
      "Tensor? mean, str act, Tensor? saved_out=None, Tensor? saved_u=None, "
      "bool grad_res_normed=False, Tensor? grad_scale=None, Tensor? grad_shift=None, "
      "Tensor? var=None, Tensor? bn_weight=None, float? bn_eps=None, "
      "bool defer_grad_x=False, str? x_act=None) -> (Tensor grad_x, "
      "Tensor grad_x_mean, Tensor grad_x_scale, Tensor grad_x_shift, Tensor grad_res, "
      "Tensor grad_res_mean, Tensor grad_res_scale, Tensor grad_res_shift, Tensor grad_weight, "
      "Tensor grad_bias, Tensor grad_bn_weight, Tensor grad_bn_bias)");
  // The BatchNorm glue (convmixer_kernels/ops/batch_norm.py): one kernel each.
  m.def(
      "bn_scale_shift(Tensor var, Tensor? weight, Tensor? bias, float eps, ScalarType dtype) -> "
      "(Tensor scale, Tensor shift)");
  m.def(
      "bn_scale_shift_backward(Tensor? grad_scale, Tensor? grad_shift, Tensor var, "
      "Tensor? weight, Tensor? bias, float eps, ScalarType dtype) -> (Tensor grad_var, "
      "Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "bn_update_running_stats(Tensor mean, Tensor var, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, float? momentum, float count, "
      "Tensor? count_tensor) -> ()");
  // bn_update_running_stats of several BatchNorms, each with all three buffers (one launch for a
  // model's BatchNorms folded into its stages, after its forward).
  m.def(
      "bn_update_running_stats_many(Tensor[] mean, Tensor[] var, Tensor(a!)[] running_mean, "
      "Tensor(b!)[] running_var, Tensor(c!)[] num_batches_tracked, float? momentum, "
      "float count) -> ()");
  // A training BatchNorm's two jobs in one kernel: bn_update_running_stats, then bn_scale_shift
  // of the batch var. No derivative of its own (it mutates); the glue gives it bn_scale_shift's.
  m.def(
      "bn_train_norm(Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps, "
      "ScalarType dtype, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor(c!)? num_batches_tracked, float? momentum, float count, Tensor? count_tensor) -> "
      "(Tensor scale, Tensor shift)");
  // The block's parameters cast as one buffer under autocast, and their gradients back
  // (convmixer_kernels/ops/cast.py): one kernel each way.
  m.def("cat_cast(Tensor[] tensors, ScalarType dtype) -> Tensor");
}
