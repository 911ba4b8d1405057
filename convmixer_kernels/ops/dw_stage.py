"""The dw stage: norm-on-load + depthwise k×k conv + bias + act + batch statistics.

The public function, the fake (meta) implementation that lets the op run under
torch.compile(fullgraph=True), and the autograd formula, which calls the backward op. The maths
is docs/OPS.md; the kernels are csrc/cpu/dw_stage.cpp (and the CUDA/Triton backends).

The Triton backend is the separate pair of ops dw_stage_triton / dw_stage_backward_triton:
the same schemas, fake implementations and autograd formula, with implementations (for CPU
and CUDA tensors) that call convmixer_kernels.triton, imported on first use.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _extension  # noqa: F401  (registers torch.ops.convmixer_kernels)
from .autograd import register_autograd
from .backend import define_triton_op, resolve
from .checks import Norm, acc_dtype, check_dw_stage
from .grads import in_param_layout, saved_output

_ops = torch.ops.convmixer_kernels

define_triton_op("dw_stage")
define_triton_op("dw_stage_backward")


def dw_stage(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
             act: str = "gelu", x_norm: Optional[Norm] = None, stats: bool = True,
             backend: str = "auto"):
    """``out = act(dwconv_k(norm(x)) + bias)`` with "same" zero padding.

    Returns ``(out, mean, var)``: ``out`` is channels_last; ``mean`` and ``var`` (biased) are
    the per-channel batch statistics of ``out`` when ``stats``, empty tensors otherwise.
    """
    check_dw_stage(x, weight, bias, act, x_norm, stats)
    op = _ops.dw_stage_triton if resolve(backend, x.device) == "triton" else _ops.dw_stage
    m, s, t = x_norm if x_norm is not None else (None, None, None)
    return op(x, m, s, t, weight, bias, act, stats)


@torch.library.register_fake("convmixer_kernels::dw_stage")
@torch.library.register_fake("convmixer_kernels::dw_stage_triton")
def _dw_stage_fake(x, x_mean, x_scale, x_shift, weight, bias, act, stats):
    n = x.shape[1] if stats else 0
    acc = acc_dtype(x.dtype)
    return (torch.empty_like(x, memory_format=torch.channels_last),
            x.new_empty((n,), dtype=acc), x.new_empty((n,), dtype=acc))


@torch.library.register_fake("convmixer_kernels::dw_stage_backward")
@torch.library.register_fake("convmixer_kernels::dw_stage_backward_triton")
def _dw_stage_backward_fake(grad_out, grad_mean, grad_var, x, x_mean, x_scale, x_shift, weight,
                            bias, mean, act, grad_res=None, saved_out=None):
    n = x.shape[1] if x_mean is not None else 0
    acc = acc_dtype(x.dtype)
    return (torch.empty_like(x, memory_format=torch.channels_last),
            *(x.new_empty((n,), dtype=acc) for _ in range(3)),
            weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],)))


def _setup_context(ctx, inputs, output):
    x, x_mean, x_scale, x_shift, weight, bias, act, stats = inputs
    ctx.save_for_backward(x, x_mean, x_scale, x_shift, weight, bias, output[1],
                          saved_output(act, output[0]))
    ctx.act = act


def _make_backward(backward_op):
    """The autograd formula of a dw_stage op whose backward op is `backward_op`."""
    def _backward(ctx, grad_out, grad_mean, grad_var):
        x, x_mean, x_scale, x_shift, weight, bias, mean, out = ctx.saved_tensors
        if grad_out is None:  # only the statistics were differentiated
            grad_out = torch.zeros_like(x, memory_format=torch.channels_last)
        gx, gmean, gscale, gshift, gw, gb = backward_op(
            grad_out, grad_mean, grad_var, x, x_mean, x_scale, x_shift, weight, bias, mean,
            ctx.act, None, out)
        norm_grads = (gmean, gscale, gshift) if x_mean is not None else (None, None, None)
        return (gx, *norm_grads, in_param_layout(gw, weight), (gb if bias is not None else None),
                None, None)
    return _backward


register_autograd("convmixer_kernels::dw_stage", _make_backward(_ops.dw_stage_backward),
                  _setup_context)
register_autograd("convmixer_kernels::dw_stage_triton", _make_backward(_ops.dw_stage_backward_triton),
                  _setup_context)
