"""A stage's output BatchNorm folded into the stage op, composed for the backends that do not fuse
it (docs/OPS.md § BatchNorm in the stages), and the two stages' link (docs/OPS.md § Act on load)
composed likewise.

The stage ops' trailing bn_* arguments make the forward also return the Norm's scale and shift of
its batch statistics (what bn_scale_shift returns) and the backward take their gradients (doing
bn_scale_shift_backward's work: the var gradient joins grad_var, and the BatchNorm's weight and
bias gradients come out). The CUDA kernels fuse this into the stage's own launches; the CPU
composes it in C++ (csrc/cpu/bn_fold.cpp); the Triton backend's functions know nothing of it, and
`composed` adds it around them here, with the arguments after it: dw_stage's write_out (out
dropped), pw_stage's x_act (x read through act first, a pass of its own) and the backward's
grad_out_scale, defer_grad_x and x_act.
"""
from __future__ import annotations

import torch

from .. import _extension  # noqa: F401  (registers torch.ops.convmixer_kernels)
from ..activations import check_act
from .autograd import schema_defaults
from .batch_norm import scale_shift, scale_shift_backward
from .checks import acc_dtype, check_write_out

_FORWARD_BN = 3   # bn_weight, bn_bias, bn_eps
_BACKWARD_BN = 5  # grad_scale, grad_shift, var, bn_weight, bn_eps
_GRAD_OUT, _GRAD_VAR, _X = 0, 2, 3  # the backward ops' grad_out, grad_var and x arguments


_STORAGE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def read_x(name: str, x, x_act):
    """The x a pw stage reads: act(x), rounded to x's dtype as a stored output is, with an
    x_act; x itself without (csrc/cpu/act_in.cpp is the CPU's). An x the stage refuses passes
    through untouched, for the stage's checks to name the problem."""
    if x_act is None:
        return x
    act = check_act(name, x_act, "x_act")
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.dtype not in _STORAGE:
        return x
    return act.functional(x)


def composed(name: str, stage):
    """The implementation of op `name` (a stage op or its backward) from `stage`, which takes the
    op's arguments before the bn_* ones and returns its outputs without the fold's."""
    schema = getattr(torch.ops.convmixer_kernels, name).default._schema
    backward = name.endswith("_backward")
    names = tuple(a.name for a in schema.arguments)
    defaults = schema_defaults(schema)
    stats_at = names.index("stats") if not backward else None
    bn_at = names.index("grad_scale" if backward else "bn_weight")
    bn_end = bn_at + (_BACKWARD_BN if backward else _FORWARD_BN)
    normed_at = names.index("grad_res_normed") if name == "pw_stage_backward" else None

    def run(*args, **kwargs):
        # The op's arguments in schema order, the ones the call left out at their defaults.
        n = len(args)
        values = [*args, *(kwargs.get(k, d) for k, d in zip(names[n:], defaults[n:]))]
        head, link = values[:bn_at], dict(zip(names[bn_end:], values[bn_end:]))
        if backward:
            grad_scale, grad_shift, var, weight, eps = values[bn_at:bn_end]
            x = head[_X]
            acc = acc_dtype(x.dtype)
            extra = link.get("grad_out_scale")
            if extra is not None and extra.numel():
                if extra.shape != (x.shape[1],):
                    raise ValueError(f"{name}: grad_out_scale must be [{x.shape[1]}], got "
                                     f"{tuple(extra.shape)}")
                # grad_out is dU: the stage's own gradient, dU times the next norm's scale
                head[_GRAD_OUT] = (head[_GRAD_OUT] * extra.view(1, -1, 1, 1)).to(x.dtype)
            deferred = link.get("defer_grad_x", False)
            if deferred and not (values[normed_at] and head[7] is not None):
                raise ValueError(f"{name}: defer_grad_x needs grad_res_normed and a residual: "
                                 "grad_x is then grad_res times x_scale, which the caller forms")
            # With x_act, grad_x is act(x)'s gradient: act' is the caller's.
            head[_X] = read_x(name, x, link.get("x_act"))
            if eps is None:
                if any(t is not None for t in (grad_scale, grad_shift, var, weight)):
                    raise ValueError(f"{name}: grad_scale, grad_shift, var and bn_weight need "
                                     "bn_eps (the folded BatchNorm's eps)")
                empty = x.new_empty((0,), dtype=acc)
                grads = (empty, empty.clone())
            else:
                if var is None:
                    raise ValueError(f"{name}: a folded BatchNorm's gradients need the "
                                     "forward's var")
                grad_var, *grads = scale_shift_backward(grad_scale, grad_shift, var, weight,
                                                        eps, acc)
                own = head[_GRAD_VAR]
                if own is not None and own.numel() and own.shape != var.shape:
                    raise ValueError(f"{name}: grad_var must be [{var.shape[0]}], got "
                                     f"{tuple(own.shape)}")
                head[_GRAD_VAR] = own + grad_var if own is not None and own.numel() else grad_var
            outputs = stage(*head)
            if deferred:
                outputs = (x.new_empty((0,)), *outputs[1:])
            return (*outputs, *grads)
        weight, bias, eps = values[bn_at:bn_end]
        if eps is None:
            if weight is not None or bias is not None:
                raise ValueError(f"{name}: bn_weight and bn_bias need bn_eps (the folded "
                                 "BatchNorm's eps)")
        else:
            _check_fold(name, head, weight, bias, head[stats_at])
        write_out = link.get("write_out", True)
        check_write_out(name, write_out, head[names.index("keep_pre_act")])
        x, x_act = head[0], link.get("x_act")
        head[0] = read_x(name, x, x_act)
        outputs = list(stage(*head))
        if not write_out:
            outputs[0] = x.new_empty((0,))
        if (x_act is not None and head[names.index("keep_u")]
                and head[names.index("x_mean")] is None and head[names.index("res")] is None):
            # The stage keeps no u that would be its x, which is act(x) here: kept as u (in
            # channels_last, as u is)
            outputs[4] = head[0].contiguous(memory_format=torch.channels_last)
        var = outputs[3]
        if eps is None:
            return (*outputs, var.new_empty((0,)), var.new_empty((0,)))
        return (*outputs, *scale_shift(var, weight, bias, eps, var.dtype))

    return run


def _check_fold(name, head, weight, bias, stats) -> None:
    """check_bn_fold's checks (csrc/bn_checks.cpp), for the composed ops: the C++ ones never see
    these arguments."""
    if not stats:
        raise ValueError(f"{name}: a folded BatchNorm (bn_eps) needs stats=True")
    if (weight is None) != (bias is None):
        raise ValueError(f"{name}: bn_weight and bn_bias must be given together (affine) or both "
                         "be None")
    x, w = head[0], head[8 if name.startswith("pw") else 4]
    channels = w.shape[0] if w.dim() else 0
    for what, t in (("bn_weight", weight), ("bn_bias", bias)):
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] != channels:
            raise ValueError(f"{name}: {what} must be [{channels}], got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: {what} must be floating, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: {what} is on {t.device}, expected {x.device}")


def folded_norm_fake(x, channels: int, acc, bn_eps):
    """The fake (meta) scale and shift of a stage forward: [channels] with the fold, else empty."""
    n = channels if bn_eps is not None else 0
    return x.new_empty((n,), dtype=acc), x.new_empty((n,), dtype=acc)


def folded_grads_fake(x, acc, bn_weight, bn_eps):
    """The fake grad_bn_weight and grad_bias of a stage backward: like the weight, else empty."""
    if bn_eps is None or bn_weight is None:
        return x.new_empty((0,), dtype=acc), x.new_empty((0,), dtype=acc)
    return bn_weight.new_empty(bn_weight.shape), bn_weight.new_empty(bn_weight.shape)


class FoldedBn:
    """The fold's part of the stage ops' registered autograd formulas: what the forward saves
    (the batch var and the BatchNorm's weight), the backward op's trailing arguments, and the
    gradients of the forward's bn_weight, bn_bias and bn_eps."""

    @staticmethod
    def save(ctx, bn_inputs, var) -> tuple:
        weight, _, eps = bn_inputs
        ctx.bn_eps, ctx.bn_affine = eps, weight is not None
        return (var, weight) if eps is not None else ()

    @staticmethod
    def backward_args(ctx, saved, grad_scale, grad_shift) -> tuple:
        if ctx.bn_eps is None:
            return ()
        var, weight = saved
        return (grad_scale, grad_shift, var, weight, ctx.bn_eps)

    @staticmethod
    def grads(ctx, grad_weight, grad_bias) -> tuple:
        if ctx.bn_eps is None or not ctx.bn_affine:
            return (None, None, None)
        return (grad_weight, grad_bias, None)
