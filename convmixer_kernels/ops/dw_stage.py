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
from ..activations import ACTIVATIONS
from .autograd import register_autograd
from .backend import define_triton_op, resolve
from .checks import Norm, acc_dtype, check_dw_stage, check_write_out
from .bn_fold import FoldedBn, folded_grads_fake, folded_norm_fake
from .grads import in_param_layout, saved_output

_ops = torch.ops.convmixer_kernels

define_triton_op("dw_stage")
define_triton_op("dw_stage_backward")


def dw_stage(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
             act: str = "gelu", x_norm: Optional[Norm] = None, stats: bool = True,
             backend: str = "auto"):
    """``out = act(dwconv_k(norm(x)) + bias)`` with "same" zero padding.

    Returns ``(out, mean, var)``: ``out`` is channels_last; ``mean`` and ``var`` (biased) are
    the per-channel batch statistics of ``out`` when ``stats``, empty tensors otherwise. When
    gradients are being recorded the pre-activation is kept for the backward where
    :func:`keeps_pre_act` says that beats recomputing the conv.
    """
    check_dw_stage(x, weight, bias, act, x_norm, stats)
    name = resolve(backend, x.device)
    op = _ops.dw_stage_triton if name == "triton" else _ops.dw_stage
    m, s, t = x_norm if x_norm is not None else (None, None, None)
    keep = torch.is_grad_enabled() and keeps_pre_act(act, weight.shape[-1], x.dtype, name)
    out, _, mean, var, _, _ = op(x, m, s, t, weight, bias, act, stats, keep)
    return out, mean, var


# The dw backward needs act'(a), a = dwconv(norm(x)) + b. Without a saved, the backward recomputes
# the conv: k*k FMAs (2 k^2 FLOPs) per element, compute-bound. Saved, a costs one write in the
# forward and one read in the backward (2 x the storage dtype's size in bytes per element) and one
# activation of memory per block until the backward. The count (docs/CUDA.md, "Backward:
# recompute or save"), on the H200's datasheet figures: saving wins when
# 2 k^2 / FMA rate + extra passes x size / bandwidth > 2 size / bandwidth.
# Triton (no extra passes): in 16-bit storage from k = 7 (at k = 5 recomputing wins by 10%), in
# float32 from k = 9, in float64 (half the FMA rate, 8 bytes) from k = 9. Its conv (a global load
# per tap) reaches the peak FMA rate at best, so the count leans towards recomputing; the copy
# rate the project measures (~4.3 TB/s, docs/DESIGN.md §5) gives the same thresholds.
# CUDA: a saved a also lets the backward run as one kernel (csrc/cuda/kernels/
# dw_backward_fused.cuh) that forms dA on load; recomputing takes two kernels, with dA written and
# read back between them and x and the residual's gradient (in a block the same dU as grad_out)
# read by both: 4 extra passes (2 for a stage alone, which already suffice), so saving wins at
# every k and dtype. The CPU backend recomputes at every k: measured (tools/cpu_dw_pre_act.py,
# docs/CUDA.md), keeping a was 0-23% slower at k <= 5 and between 11% faster and 9% slower at
# k = 7 and 9 from run to run on a shared machine: no clear win for an activation of memory.
_H200_BYTES_PER_S = 4.8e12  # HBM3e
_H200_FMA_FLOPS = {torch.float64: 34e12}  # non-tensor; every other dtype accumulates in fp32:
_H200_FP32_FMA_FLOPS = 67e12
_CUDA_TWO_KERNEL_PASSES = 4  # what the recompute's two-kernel backward adds on CUDA (see above)


def keeps_pre_act(act: str, k: int, dtype: torch.dtype, backend: str) -> bool:
    """Whether a dw forward whose backward will run keeps its pre-activation on `backend`
    ("cpu", "cuda" or "triton"), for activations stored as `dtype`: when act' needs it (gelu;
    relu's comes from the saved output) and the count above says reading it back is cheaper
    than recomputing the k x k conv."""
    if not ACTIVATIONS[act].needs_pre_activation:
        return False
    if backend == "cpu":
        return False
    size = dtype.itemsize
    two_kernel_passes = _CUDA_TWO_KERNEL_PASSES if backend == "cuda" else 0
    recompute_s = (2 * k * k / _H200_FMA_FLOPS.get(dtype, _H200_FP32_FMA_FLOPS)
                   + two_kernel_passes * size / _H200_BYTES_PER_S)
    save_s = 2 * size / _H200_BYTES_PER_S
    return recompute_s > save_s


@torch.library.register_fake("convmixer_kernels::dw_stage")
@torch.library.register_fake("convmixer_kernels::dw_stage_triton")
def _dw_stage_fake(x, x_mean, x_scale, x_shift, weight, bias, act, stats, keep_pre_act=False,
                   bn_weight=None, bn_bias=None, bn_eps=None, write_out=True):
    check_write_out("dw_stage", write_out, keep_pre_act)
    n = x.shape[1] if stats else 0
    acc = acc_dtype(x.dtype)
    like_x = torch.empty_like(x, memory_format=torch.channels_last)
    out = like_x if write_out else x.new_empty((0,))
    pre_act = torch.empty_like(like_x) if keep_pre_act else x.new_empty((0,))
    return (out, pre_act, x.new_empty((n,), dtype=acc), x.new_empty((n,), dtype=acc),
            *folded_norm_fake(x, n, acc, bn_eps))


@torch.library.register_fake("convmixer_kernels::dw_stage_backward")
@torch.library.register_fake("convmixer_kernels::dw_stage_backward_triton")
def _dw_stage_backward_fake(grad_out, grad_mean, grad_var, x, x_mean, x_scale, x_shift, weight,
                            bias, mean, act, grad_res=None, saved_out=None, pre_act=None,
                            grad_scale=None, grad_shift=None, var=None, bn_weight=None,
                            bn_eps=None, grad_out_scale=None):
    n = x.shape[1] if x_mean is not None else 0
    acc = acc_dtype(x.dtype)
    return (torch.empty_like(x, memory_format=torch.channels_last),
            *(x.new_empty((n,), dtype=acc) for _ in range(3)),
            weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],)),
            *folded_grads_fake(x, acc, bn_weight, bn_eps))


_BN_INPUTS = slice(9, 12)  # bn_weight, bn_bias, bn_eps among the op's inputs
_WRITE_OUT = 12


def _setup_context(ctx, inputs, output):
    x, x_mean, x_scale, x_shift, weight, bias, act, *_ = inputs
    out, pre_act, mean, var, *_ = output
    # pre_act exists to be saved for this backward, not to be differentiated through; with
    # write_out=False out is an empty stand-in, and the op is differentiable through its
    # statistics only (the block's node differentiates through a, ops/block.py). One call:
    # each replaces the set the last one marked.
    ctx.mark_non_differentiable(pre_act, *(() if inputs[_WRITE_OUT] else (out,)))
    ctx.save_for_backward(x, x_mean, x_scale, x_shift, weight, bias, mean,
                          saved_output(act, out), pre_act if pre_act.numel() else None,
                          *FoldedBn.save(ctx, inputs[_BN_INPUTS], var))
    ctx.act = act


def _make_backward(backward_op):
    """The autograd formula of a dw_stage op whose backward op is `backward_op`."""
    def _backward(ctx, grad_out, grad_pre_act, grad_mean, grad_var, grad_scale, grad_shift):
        x, x_mean, x_scale, x_shift, weight, bias, mean, out, pre_act, *bn = ctx.saved_tensors
        if grad_out is None:  # only the statistics were differentiated
            grad_out = torch.zeros_like(x, memory_format=torch.channels_last)
        gx, gmean, gscale, gshift, gw, gb, gbw, gbb = backward_op(
            grad_out, grad_mean, grad_var, x, x_mean, x_scale, x_shift, weight, bias, mean,
            ctx.act, None, out, pre_act, *FoldedBn.backward_args(ctx, bn, grad_scale, grad_shift))
        norm_grads = (gmean, gscale, gshift) if x_mean is not None else (None, None, None)
        return (gx, *norm_grads, in_param_layout(gw, weight), (gb if bias is not None else None),
                None, None, None, *FoldedBn.grads(ctx, gbw, gbb), None)
    return _backward


register_autograd("convmixer_kernels::dw_stage", _make_backward(_ops.dw_stage_backward),
                  _setup_context)
register_autograd("convmixer_kernels::dw_stage_triton", _make_backward(_ops.dw_stage_backward_triton),
                  _setup_context)
