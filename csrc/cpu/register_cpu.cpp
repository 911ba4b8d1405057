// The CPU implementations of the ops (csrc/cpu/bn_fold.cpp around dw_stage.cpp and pw_stage.cpp,
// bn_ops.cpp, cat_cast.cpp), registered for the schemas of csrc/ops_schema.cpp.
#include "../bn_ops.h"
#include "../cat_cast.h"
#include "../ops.h"

#include <torch/library.h>

TORCH_LIBRARY_IMPL(convmixer_kernels, CPU, m) {
  m.impl("dw_stage", &convmixer_kernels::cpu::with_bn::dw_stage);
  m.impl("dw_stage_backward", &convmixer_kernels::cpu::with_bn::dw_stage_backward);
  m.impl("pw_stage", &convmixer_kernels::cpu::with_bn::pw_stage);
  m.impl("pw_stage_backward", &convmixer_kernels::cpu::with_bn::pw_stage_backward);
  m.impl("bn_scale_shift", &convmixer_kernels::cpu::bn_scale_shift);
  m.impl("bn_scale_shift_backward", &convmixer_kernels::cpu::bn_scale_shift_backward);
  m.impl("bn_update_running_stats", &convmixer_kernels::cpu::bn_update_running_stats);
  m.impl("bn_update_running_stats_many", &convmixer_kernels::cpu::bn_update_running_stats_many);
  m.impl("bn_train_norm", &convmixer_kernels::cpu::bn_train_norm);
  m.impl("cat_cast", &convmixer_kernels::cpu::cat_cast);
}
