"""A whole ConvMixer block as the two fused stages, with one backward pass for its input.

The block input h (with its norm, the previous block's BN2) feeds both stages: dw_stage reads it
as x, pw_stage as its residual. As two independent autograd nodes, each returns a gradient for h
and the autograd engine adds them: an extra pass reading two activation-sized tensors and writing
one, per block and step. Here the dw stage's autograd node also outputs a *carrier*, a zero-byte
stand-in with h's shape (a broadcast scalar, never read) that the pw stage takes in h's place on the
gradient path; pw_stage's gradient for its residual therefore arrives at the dw node, whose
backward op adds it to its own dX (dw_stage_backward's grad_res), in one store. Both stages
read h through the same norm, so the pw backward hands over dU, the gradient of the normed
residual, without that norm's backward (pw_stage_backward's grad_res_normed: no second read of
h for its sums, no scaled copy written); the dw backward adds it to its own dX before the
norm's backward, whose three [C] gradients then cover both branches (no autograd adds of
vectors either). The same nodes save each stage's output for the backward where act' follows from
it (relu), so neither stage recomputes its pre-activation for act' nor keeps one (docs/OPS.md);
for gelu the pw stage keeps its pre-activation, the dw stage where dw_stage.keeps_pre_act's count
says reading it back beats recomputing the conv.

The two nodes are torch.autograd.Function subclasses around the registered ops: torch.compile
traces them (the ops have fake implementations), checkpointing replays them, and without
gradients the block is the two plain stage calls.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.autograd.function import once_differentiable

from .. import _extension  # noqa: F401  (registers torch.ops.convmixer_kernels)
from ..activations import ACTIVATIONS
from .backend import resolve
from .checks import Norm, check_dw_stage, check_pw_stage
from .dw_stage import dw_stage, keeps_pre_act
from .grads import in_param_layout, saved_output
from .pw_stage import keeps_u, pw_stage

_ops = torch.ops.convmixer_kernels


def _triple(norm: Optional[Norm]):
    return tuple(norm) if norm is not None else (None, None, None)


class _DwNode(torch.autograd.Function):
    """dw_stage, plus the carrier output through which h's residual gradient comes back."""

    @staticmethod
    def forward(ctx, x, x_mean, x_scale, x_shift, weight, bias, act, stats, triton):
        op = _ops.dw_stage_triton if triton else _ops.dw_stage
        keep = keeps_pre_act(act, weight.shape[-1], x.dtype, "triton" if triton else x.device.type)
        out, pre_act, mean, var = op(x, x_mean, x_scale, x_shift, weight, bias, act, stats, keep)
        # Only its gradient is ever used, never its value: an allocation, no kernel.
        carrier = x.new_empty(()).expand(x.shape)
        ctx.save_for_backward(x, x_mean, x_scale, x_shift, weight, bias, mean,
                              saved_output(act, out), pre_act if keep else None)
        ctx.act, ctx.triton = act, triton
        return out, mean, var, carrier

    @staticmethod
    @once_differentiable  # the backward ops have no derivative: a second order is an error
    def backward(ctx, grad_out, grad_mean, grad_var, grad_res):
        x, x_mean, x_scale, x_shift, weight, bias, mean, out, pre_act = ctx.saved_tensors
        op = _ops.dw_stage_backward_triton if ctx.triton else _ops.dw_stage_backward
        gx, gmean, gscale, gshift, gw, gb = op(
            grad_out, grad_mean, grad_var, x, x_mean, x_scale, x_shift, weight, bias, mean,
            ctx.act, grad_res, out, pre_act)
        norm_grads = (gmean, gscale, gshift) if x_mean is not None else (None, None, None)
        return (gx, *norm_grads, in_param_layout(gw, weight), gb if bias is not None else None,
                None, None, None)


class _PwNode(torch.autograd.Function):
    """pw_stage whose residual's gradient goes to `carrier` (the residual itself, passed as
    `res`, gets none: its gradient is the carrier's)."""

    @staticmethod
    def forward(ctx, x, x_mean, x_scale, x_shift, carrier, res, res_mean, res_scale, res_shift,
                weight, bias, act, stats, triton):
        op = _ops.pw_stage_triton if triton else _ops.pw_stage
        keep_pre_act = ACTIVATIONS[act].needs_pre_activation
        out, pre_act, mean, var, u = op(x, x_mean, x_scale, x_shift, res, res_mean, res_scale,
                                        res_shift, weight, bias, act, stats, keep_pre_act,
                                        keeps_u(triton, x))
        ctx.save_for_backward(x, x_mean, x_scale, x_shift, res, res_mean, res_scale, res_shift,
                              weight, bias, pre_act if keep_pre_act else None, mean,
                              saved_output(act, out), u)
        ctx.act, ctx.triton = act, triton
        return out, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_mean, grad_var):
        (x, x_mean, x_scale, x_shift, res, res_mean, res_scale, res_shift, weight, bias, pre_act,
         mean, out, u) = ctx.saved_tensors
        op = _ops.pw_stage_backward_triton if ctx.triton else _ops.pw_stage_backward
        # grad_res_normed: the residual's gradient as dU, of the normed residual, which the dw
        # backward takes through the norm the two stages share, with its own dX.
        gx, gxm, gxs, gxt, gr, _, _, _, gw, gb = op(
            grad_out, grad_mean, grad_var, x, x_mean, x_scale, x_shift, res, res_mean, res_scale,
            res_shift, weight, bias, pre_act, mean, ctx.act, out, u, True)
        x_norm_grads = (gxm, gxs, gxt) if x_mean is not None else (None, None, None)
        return (gx, *x_norm_grads, gr, None, None, None, None, in_param_layout(gw, weight),
                gb if bias is not None else None, None, None, None)


def mixer_block(h: torch.Tensor, dw_weight: torch.Tensor, dw_bias: Optional[torch.Tensor],
                pw_weight: torch.Tensor, pw_bias: Optional[torch.Tensor],
                norm1: Callable[[torch.Tensor, torch.Tensor], Norm], *, act: str = "gelu",
                x_norm: Optional[Norm] = None, stats: tuple = (True, True),
                backend: str = "auto"):
    """One block: ``g = dw_stage(h, x_norm)``, ``norm1(mean, var)`` of g's statistics (BN1, as
    the caller builds it: batch or running statistics, synchronised or not), then
    ``pw_stage(g, x_norm=norm1, residual=h, residual_norm=x_norm)``.

    Returns pw_stage's ``(out, mean, var)``; `stats` is the pair of the two stages' `stats`.
    Values and gradients are those of the two calls; the backward adds h's two gradients inside
    the dw stage's backward op instead of in a separate pass.
    """
    dw_stats, pw_stats = stats
    if not torch.is_grad_enabled():
        g, mean, var = dw_stage(h, dw_weight, dw_bias, act=act, x_norm=x_norm, stats=dw_stats,
                                backend=backend)
        return pw_stage(g, pw_weight, pw_bias, act=act, x_norm=norm1(mean, var), residual=h,
                        residual_norm=x_norm, stats=pw_stats, backend=backend)
    check_dw_stage(h, dw_weight, dw_bias, act, x_norm, dw_stats)
    triton = resolve(backend, h.device) == "triton"
    xm, xs, xt = _triple(x_norm)
    g, mean, var, carrier = _DwNode.apply(h, xm, xs, xt, dw_weight, dw_bias, act, dw_stats,
                                          triton)
    n1 = norm1(mean, var)
    check_pw_stage(g, pw_weight, pw_bias, act, n1, h, x_norm, pw_stats)
    return _PwNode.apply(g, *n1, carrier, h, xm, xs, xt, pw_weight, pw_bias, act, pw_stats,
                         triton)
