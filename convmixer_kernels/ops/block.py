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
says reading it back beats recomputing the conv. Where it keeps it on CUDA, the dw stage writes a
alone and the pw stage reads gelu(a) on its loads (reads_act_on_load, docs/OPS.md "Act on
load"): g = gelu(a) is never written nor held.

A training BatchNorm that normalises with its own batch's statistics (BN1 after the dw stage,
BN2 after the pw stage) can be folded into the stage whose output it normalises (FoldedNorm): the
stage op then returns the Norm's scale and shift with the statistics and takes their gradients in
its backward, which spares a glue launch each way per BatchNorm (docs/CUDA.md, "BatchNorm in the
stages"); the running statistics are the FoldedNorm's `update`.

The two nodes are torch.autograd.Function subclasses around the registered ops: torch.compile
traces them (the ops have fake implementations), checkpointing replays them, and without
gradients they run the ops' forwards alone.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch.autograd.function import once_differentiable

from .. import _extension  # noqa: F401  (registers torch.ops.convmixer_kernels)
from .backend import resolve
from .bn_fold import FoldedBn
from .checks import FoldedNorm, Norm, check_dw_stage, check_pw_stage
from .dw_stage import keeps_pre_act
from .grads import in_param_layout, saved_output
from .pw_stage import keeps_pre_act as pw_keeps_pre_act
from .pw_stage import keeps_u

_ops = torch.ops.convmixer_kernels


def _triple(norm: Optional[Norm]):
    return tuple(norm) if norm is not None else (None, None, None)


def _bn_args(fold: Optional[FoldedNorm]) -> tuple:
    return (fold.weight, fold.bias, fold.eps) if fold is not None else (None, None, None)


class _DwNode(torch.autograd.Function):
    """dw_stage, plus the carrier output through which h's residual gradient comes back."""

    @staticmethod
    def forward(ctx, x, x_mean, x_scale, x_shift, weight, bias, act, stats, triton, keep,
                linked, act_on_load, bn_weight, bn_bias, bn_eps):
        op = _ops.dw_stage_triton if triton else _ops.dw_stage
        out, pre_act, mean, var, scale, shift = op(x, x_mean, x_scale, x_shift, weight, bias, act,
                                                   stats, keep, bn_weight, bn_bias, bn_eps,
                                                   not act_on_load)
        # Only its gradient is ever used, never its value: an allocation, no kernel.
        carrier = x.new_empty(()).expand(x.shape)
        # An output nothing differentiates (var, once a folded norm's scale carries its
        # gradient) comes back as None, not as a zeros launch.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, x_mean, x_scale, x_shift, weight, bias, mean,
                              saved_output(act, out), pre_act if keep else None,
                              *FoldedBn.save(ctx, (bn_weight, bn_bias, bn_eps), var),
                              scale if linked else None)
        ctx.act, ctx.triton, ctx.act_on_load = act, triton, act_on_load
        # With act on load the pw stage reads act(a) itself: a, not out, is what it takes (its
        # gradient, g's, still arrives here as the linked dU below, never as grad_out).
        return pre_act if act_on_load else out, mean, var, scale, shift, carrier

    @staticmethod
    @once_differentiable  # the backward ops have no derivative: a second order is an error
    def backward(ctx, grad_out, grad_mean, grad_var, grad_scale, grad_shift, grad_res):
        (x, x_mean, x_scale, x_shift, weight, bias, mean, out, pre_act, *bn,
         link_scale) = ctx.saved_tensors
        op = _ops.dw_stage_backward_triton if ctx.triton else _ops.dw_stage_backward
        if ctx.act_on_load:
            # a's one reader is the linked pw node, which returns no gradient for it (g's comes
            # as grad_res): what arrives here can only be zeros a compiler materialised, and as
            # a's gradient it must not join g's below.
            grad_out = None
        scaled = {}
        if link_scale is not None and grad_res is not None:
            # Linked (mixer_block): the pw node left g's gradient, dU times BN1's scale, to this
            # op's load of dU (grad_out_scale): no pass writes it.
            if grad_out is None:
                grad_out, scaled = grad_res, {"grad_out_scale": link_scale}
            else:  # g was differentiated elsewhere too: the pw branch's share added here
                grad_out = grad_out + (grad_res * link_scale.view(1, -1, 1, 1)).to(x.dtype)
        if grad_out is None:  # only the statistics were differentiated (out has x's shape)
            grad_out = torch.zeros_like(x, memory_format=torch.channels_last)
        gx, gmean, gscale, gshift, gw, gb, gbw, gbb = op(
            grad_out, grad_mean, grad_var, x, x_mean, x_scale, x_shift, weight, bias, mean,
            ctx.act, grad_res, out, pre_act,
            *FoldedBn.backward_args(ctx, bn, grad_scale, grad_shift), **scaled)
        norm_grads = (gmean, gscale, gshift) if x_mean is not None else (None, None, None)
        return (gx, *norm_grads, in_param_layout(gw, weight), gb if bias is not None else None,
                None, None, None, None, None, None, *FoldedBn.grads(ctx, gbw, gbb))


class _PwNode(torch.autograd.Function):
    """pw_stage whose residual's gradient goes to `carrier` (the residual itself, passed as
    `res`, gets none: its gradient is the carrier's)."""

    @staticmethod
    def forward(ctx, x, x_mean, x_scale, x_shift, carrier, res, res_mean, res_scale, res_shift,
                weight, bias, act, stats, triton, keep_pre_act, keep_u, linked, x_act, bn_weight,
                bn_bias, bn_eps):
        op = _ops.pw_stage_triton if triton else _ops.pw_stage
        out, pre_act, mean, var, u, scale, shift = op(
            x, x_mean, x_scale, x_shift, res, res_mean, res_scale, res_shift, weight, bias, act,
            stats, keep_pre_act, keep_u, bn_weight, bn_bias, bn_eps, x_act)
        ctx.save_for_backward(x, x_mean, x_scale, x_shift, res, res_mean, res_scale, res_shift,
                              weight, bias, pre_act if keep_pre_act else None, mean,
                              saved_output(act, out), u,
                              *FoldedBn.save(ctx, (bn_weight, bn_bias, bn_eps), var))
        ctx.act, ctx.triton, ctx.linked, ctx.x_act = act, triton, linked, x_act
        ctx.set_materialize_grads(False)  # as _DwNode's
        return out, mean, var, scale, shift

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_mean, grad_var, grad_scale, grad_shift):
        (x, x_mean, x_scale, x_shift, res, res_mean, res_scale, res_shift, weight, bias, pre_act,
         mean, out, u, *bn) = ctx.saved_tensors
        op = _ops.pw_stage_backward_triton if ctx.triton else _ops.pw_stage_backward
        if grad_out is None:  # only the statistics were differentiated
            grad_out = x.new_zeros((x.shape[0], weight.shape[0], *x.shape[2:])).contiguous(
                memory_format=torch.channels_last)
        # grad_res_normed: the residual's gradient as dU, of the normed residual, which the dw
        # backward takes through the norm the two stages share, with its own dX.
        # Linked, x's gradient dU·x_scale is the dw node's to form on its load of dU (defer).
        gx, gxm, gxs, gxt, gr, _, _, _, gw, gb, gbw, gbb = op(
            grad_out, grad_mean, grad_var, x, x_mean, x_scale, x_shift, res, res_mean, res_scale,
            res_shift, weight, bias, pre_act, mean, ctx.act, out, u, True,
            *FoldedBn.backward_args(ctx, bn, grad_scale, grad_shift), defer_grad_x=ctx.linked,
            x_act=ctx.x_act)
        x_norm_grads = (gxm, gxs, gxt) if x_mean is not None else (None, None, None)
        return (None if ctx.linked else gx, *x_norm_grads, gr, None, None, None, None,
                in_param_layout(gw, weight), gb if bias is not None else None, None, None, None,
                None, None, None, None, *FoldedBn.grads(ctx, gbw, gbb))


def reads_act_on_load(linked: bool, keep_dw: bool, backend: str) -> bool:
    """Whether the block's dw stage writes only its pre-activation a and the pw stage reads
    act(a) on its loads (dw_stage write_out=False, pw_stage x_act; docs/OPS.md "Act on load"):
    where the dw stage keeps a for its backward anyway (gelu) and the stages are linked (the dw
    backward then forms g's gradient, so no one needs g itself), out's write is a pass and an
    activation of memory a block that nothing reads twice. Only the CUDA kernels apply act on
    their loads; the CPU and Triton compose x_act as a pass of its own, which would take back
    the pass it saves."""
    return linked and keep_dw and backend == "cuda"


def mixer_block(h: torch.Tensor, dw_weight: torch.Tensor, dw_bias: Optional[torch.Tensor],
                pw_weight: torch.Tensor, pw_bias: Optional[torch.Tensor],
                norm1: Union[Callable[[torch.Tensor, torch.Tensor], Norm], FoldedNorm], *,
                act: str = "gelu", x_norm: Optional[Norm] = None, stats: tuple = (True, True),
                backend: str = "auto", norm2: Optional[FoldedNorm] = None):
    """One block: ``g = dw_stage(h, x_norm)``, ``norm1(mean, var)`` of g's statistics (BN1, as
    the caller builds it: batch or running statistics, synchronised or not), then
    ``pw_stage(g, x_norm=norm1, residual=h, residual_norm=x_norm)``.

    Returns pw_stage's ``(out, mean, var)``; `stats` is the pair of the two stages' `stats`.
    Values and gradients are those of the two calls; the backward adds h's two gradients inside
    the dw stage's backward op instead of in a separate pass.

    norm1 may instead be a FoldedNorm, BN1 folded into the dw stage; `norm2` folds BN2, the
    BatchNorm of the block's output, into the pw stage, and the block then returns
    ``(out, norm2's Norm)``. Both need their stage's statistics.
    """
    dw_stats, pw_stats = stats
    fold1 = norm1 if isinstance(norm1, FoldedNorm) else None
    if (fold1 is not None and not dw_stats) or (norm2 is not None and not pw_stats):
        raise ValueError("mixer_block: a folded BatchNorm normalises with its stage's batch "
                         "statistics, so that stage needs stats=True")
    check_dw_stage(h, dw_weight, dw_bias, act, x_norm, dw_stats)
    name = resolve(backend, h.device)
    triton = name == "triton"
    # What each forward keeps for its backward, decided here: inside a Function's forward grad
    # mode is off, so the policies (which keep nothing for a forward without a backward) would
    # always say no there.
    keep_dw = torch.is_grad_enabled() and keeps_pre_act(act, dw_weight.shape[-1], h.dtype, name)
    keep_pw = pw_keeps_pre_act(act)
    keep_u = keeps_u(triton, h)
    # With BN1 folded, its scale is the dw node's own output: the pw backward then leaves g's
    # gradient (dU·scale) to the dw backward's load of dU, a pass fewer (the native backends;
    # Triton's functions would compose it as a pass of its own).
    linked = fold1 is not None and not triton
    act_on_load = reads_act_on_load(linked, keep_dw, name)
    xm, xs, xt = _triple(x_norm)
    g, mean, var, scale, shift, carrier = _DwNode.apply(h, xm, xs, xt, dw_weight, dw_bias, act,
                                                        dw_stats, triton, keep_dw, linked,
                                                        act_on_load, *_bn_args(fold1))
    if fold1 is not None:
        fold1.update(mean, var)
        n1 = Norm(mean, scale, shift)
    else:
        n1 = norm1(mean, var)
    check_pw_stage(g, pw_weight, pw_bias, act, n1, h, x_norm, pw_stats)
    out, mean, var, scale, shift = _PwNode.apply(g, *n1, carrier, h, xm, xs, xt, pw_weight,
                                                 pw_bias, act, pw_stats, triton, keep_pw, keep_u,
                                                 linked, act if act_on_load else None,
                                                 *_bn_args(norm2))
    if norm2 is None:
        return out, mean, var
    norm2.update(mean, var)
    return out, Norm(mean, scale, shift)
