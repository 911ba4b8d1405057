"""Triton kernels for the fused ConvMixer stages: the "triton" backend of docs/OPS.md's ops.

Importing this package imports triton and defines the kernels; whether they are compiled for a
GPU or run by Triton's CPU interpreter is decided at that moment by TRITON_INTERPRET (see
``INTERPRET``). The package convmixer_kernels never imports it eagerly: the op layer imports it
on the first use of the "triton" backend, so triton stays an optional dependency.

The four functions take and return exactly what torch.ops.convmixer_kernels.dw_stage,
dw_stage_backward, pw_stage and pw_stage_backward do; they are registered as the ops
``convmixer_kernels::*_triton`` by convmixer_kernels.ops.

warmup(model, input_shape, dtype) compiles and autotunes every kernel a model's step needs
before timing it; compile_plan(model, input_shape, dtype) lists, without a GPU, the
compilations that step makes triton do for an H200 (recording() and compilations() underneath,
which tools/triton_compile_check.py uses too).
"""
from ._common import INTERPRET, recording
from ._plan import compilations, compile_plan, warmup
from .dw import dw_stage, dw_stage_backward
from .pw import pw_stage, pw_stage_backward

__all__ = ["INTERPRET", "compilations", "compile_plan", "dw_stage", "dw_stage_backward",
           "pw_stage", "pw_stage_backward", "recording", "warmup"]
