"""The pw stage: BN-apply + residual prologue, 1×1 conv GEMM, bias + act + batch statistics.

The public function, the fake (meta) implementation and the autograd formula, which calls the
backward op. The maths is docs/OPS.md; the kernels are csrc/cpu/pw_stage.cpp (and the
CUDA/Triton backends).

The Triton backend is the separate pair of ops pw_stage_triton / pw_stage_backward_triton,
sharing the schemas, fake implementations and autograd formula (see dw_stage.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _extension  # noqa: F401  (registers torch.ops.convmixer_kernels)
from ..activations import ACTIVATIONS, check_act
from .autograd import register_autograd
from .backend import define_triton_op, resolve
from .checks import Norm, acc_dtype, check_pw_stage
from .bn_fold import FoldedBn, folded_grads_fake, folded_norm_fake
from .grads import in_param_layout, saved_output

_ops = torch.ops.convmixer_kernels

define_triton_op("pw_stage")
define_triton_op("pw_stage_backward")


def pw_stage(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
             act: str = "gelu", x_norm: Optional[Norm] = None,
             residual: Optional[torch.Tensor] = None, residual_norm: Optional[Norm] = None,
             stats: bool = True, backend: str = "auto"):
    """``out = act((norm(x) + residual_norm(residual)) @ Wᵀ + bias)`` over channels.

    Returns ``(out, mean, var)`` as :func:`dw_stage` does. When gradients are being recorded
    the pre-activation is kept for the backward instead of recomputing the GEMM, unless act'
    follows from the output (relu), which the backward then reads instead.
    """
    check_pw_stage(x, weight, bias, act, x_norm, residual, residual_norm, stats)
    op = _ops.pw_stage_triton if resolve(backend, x.device) == "triton" else _ops.pw_stage
    xm, xs, xt = x_norm if x_norm is not None else (None, None, None)
    rm, rs, rt = residual_norm if residual_norm is not None else (None, None, None)
    keep_pre_act = keeps_pre_act(act)
    out, _, mean, var, *_ = op(x, xm, xs, xt, residual, rm, rs, rt, weight, bias, act, stats,
                               keep_pre_act, keeps_u(op is _ops.pw_stage_triton, x))
    return out, mean, var


def keeps_pre_act(act: str) -> bool:
    """The forward's keep_pre_act: when gradients are recorded and act' needs the
    pre-activation (gelu); for relu the saved output serves the backward (saved_out)."""
    return torch.is_grad_enabled() and ACTIVATIONS[act].needs_pre_activation


def keeps_u(triton: bool, x: torch.Tensor) -> bool:
    """The forward's keep_u, by counting (docs/CUDA.md "pw stage"): where the forward writes the
    GEMM input u = norm(x) + res_norm(res) whole anyway, keeping it costs memory and no pass,
    and spares the backward re-forming it (read x and res, write u: three passes). That is the
    CUDA kernels (u feeds cuBLAS) and the CPU's 16-bit path (u feeds oneDNN whole; float32 and
    float64 take the row-chunk pipeline, csrc/cpu/pw_stage.cpp fused_pipeline). The Triton
    GEMMs and the CPU pipeline form u per tile or chunk and re-form it in the backward on the
    reads of x and res they make anyway for the norms' gradients: keeping it would add a pass."""
    if triton or not torch.is_grad_enabled():
        return False
    return x.device.type == "cuda" or x.dtype in (torch.bfloat16, torch.float16)


@torch.library.register_fake("convmixer_kernels::pw_stage")
@torch.library.register_fake("convmixer_kernels::pw_stage_triton")
def _pw_stage_fake(x, x_mean, x_scale, x_shift, res, res_mean, res_scale, res_shift, weight, bias,
                   act, stats, keep_pre_act, keep_u=False, bn_weight=None, bn_bias=None,
                   bn_eps=None, x_act=None):
    if x_act is not None:
        check_act("pw_stage", x_act, "x_act")
    n, _, h, w = x.shape
    shape = (n, weight.shape[0], h, w)
    stat = weight.shape[0] if stats else 0
    acc = acc_dtype(x.dtype)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    pre_act = torch.empty_like(out) if keep_pre_act else x.new_empty((0,))
    # u is x without a norm, residual or x_act: then nothing is kept.
    u = (torch.empty_like(x, memory_format=torch.channels_last)
         if keep_u and (x_mean is not None or res is not None or x_act is not None)
         else x.new_empty((0,)))
    return (out, pre_act, x.new_empty((stat,), dtype=acc), x.new_empty((stat,), dtype=acc), u,
            *folded_norm_fake(x, weight.shape[0], acc, bn_eps))


@torch.library.register_fake("convmixer_kernels::pw_stage_backward")
@torch.library.register_fake("convmixer_kernels::pw_stage_backward_triton")
def _pw_stage_backward_fake(grad_out, grad_mean, grad_var, x, x_mean, x_scale, x_shift, res,
                            res_mean, res_scale, res_shift, weight, bias, pre_act, mean, act,
                            saved_out=None, saved_u=None, grad_res_normed=False, grad_scale=None,
                            grad_shift=None, var=None, bn_weight=None, bn_eps=None,
                            defer_grad_x=False, x_act=None):
    if x_act is not None:
        check_act("pw_stage_backward", x_act, "x_act")
    acc = acc_dtype(x.dtype)
    c = x.shape[1]

    def norm_grads(given):
        return tuple(x.new_empty((c if given else 0,), dtype=acc) for _ in range(3))

    grad_res = torch.empty_like(x, memory_format=torch.channels_last) if res is not None else x.new_empty((0,))
    grad_x = (x.new_empty((0,)) if defer_grad_x
              else torch.empty_like(x, memory_format=torch.channels_last))
    return (grad_x, *norm_grads(x_mean is not None),
            grad_res, *norm_grads(res_mean is not None and not grad_res_normed),
            weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],)),
            *folded_grads_fake(x, acc, bn_weight, bn_eps))


_BN_INPUTS = slice(14, 17)  # bn_weight, bn_bias, bn_eps among the op's inputs
_X_ACT = 17


def _setup_context(ctx, inputs, output):
    x, x_mean, x_scale, x_shift, res, res_mean, res_scale, res_shift, weight, bias, act, *_ = inputs
    out, pre_act, mean, var, u, *_ = output
    # pre_act and u exist to be saved for this backward, not to be differentiated through.
    ctx.mark_non_differentiable(pre_act, u)
    ctx.save_for_backward(x, x_mean, x_scale, x_shift, res, res_mean, res_scale, res_shift, weight,
                          bias, pre_act, mean, saved_output(act, out), u,
                          *FoldedBn.save(ctx, inputs[_BN_INPUTS], var))
    ctx.act, ctx.x_act = act, inputs[_X_ACT]


def _make_backward(backward_op):
    """The autograd formula of a pw_stage op whose backward op is `backward_op`."""
    def _backward(ctx, grad_out, grad_pre_act, grad_mean, grad_var, grad_u, grad_scale,
                  grad_shift):
        (x, x_mean, x_scale, x_shift, res, res_mean, res_scale, res_shift, weight, bias, pre_act,
         mean, out, u, *bn) = ctx.saved_tensors
        if grad_out is None:  # only the statistics were differentiated
            grad_out = x.new_zeros((x.shape[0], weight.shape[0], *x.shape[2:])).contiguous(
                memory_format=torch.channels_last)
        grads = backward_op(grad_out, grad_mean, grad_var, x, x_mean, x_scale, x_shift, res,
                            res_mean, res_scale, res_shift, weight, bias, pre_act, mean, ctx.act,
                            out, u, False, *FoldedBn.backward_args(ctx, bn, grad_scale, grad_shift),
                            x_act=ctx.x_act)
        gx, gxm, gxs, gxt, gr, grm, grs, grt, gw, gb, gbw, gbb = grads
        if ctx.x_act is not None:  # the op's grad_x is act(x)'s; x's takes act' (one pass)
            gx = ACTIVATIONS[ctx.x_act].derivative(gx, x)
        x_norm_grads = (gxm, gxs, gxt) if x_mean is not None else (None, None, None)
        res_norm_grads = (grm, grs, grt) if res_mean is not None else (None, None, None)
        return (gx, *x_norm_grads, (gr if res is not None else None), *res_norm_grads,
                in_param_layout(gw, weight),
                (gb if bias is not None else None), None, None, None, None,
                *FoldedBn.grads(ctx, gbw, gbb), None)
    return _backward


register_autograd("convmixer_kernels::pw_stage", _make_backward(_ops.pw_stage_backward),
                  _setup_context)
register_autograd("convmixer_kernels::pw_stage_triton", _make_backward(_ops.pw_stage_backward_triton),
                  _setup_context)
