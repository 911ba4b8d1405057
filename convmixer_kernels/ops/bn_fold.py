"""A stage's output BatchNorm folded into the stage op, composed for the backends that do not fuse
it (docs/OPS.md § BatchNorm in the stages).

The stage ops' trailing bn_* arguments make the forward also return the Norm's scale and shift of
its batch statistics (what bn_scale_shift returns) and the backward take their gradients (doing
bn_scale_shift_backward's work: the var gradient joins grad_var, and the BatchNorm's weight and
bias gradients come out). The CUDA kernels fuse this into the stage's own launches; the CPU
composes it in C++ (csrc/cpu/bn_fold.cpp); the Triton backend's functions know nothing of it, and
`composed` adds it around them here.
"""
from __future__ import annotations

import torch

from .. import _extension  # noqa: F401  (registers torch.ops.convmixer_kernels)
from .batch_norm import scale_shift, scale_shift_backward
from .checks import acc_dtype

_FORWARD_BN = 3   # bn_weight, bn_bias, bn_eps
_BACKWARD_BN = 5  # grad_scale, grad_shift, var, bn_weight, bn_eps
_GRAD_VAR = 2     # the backward ops' grad_var argument


def _normalized(schema, args, kwargs) -> list:
    """The op's arguments in schema order, defaults filled in."""
    values = list(args)
    for a in schema.arguments[len(args):]:
        if a.name in kwargs:
            values.append(kwargs[a.name])
        else:
            values.append(a.default_value if a.has_default_value() else None)
    return values


def composed(name: str, stage):
    """The implementation of op `name` (a stage op or its backward) from `stage`, which takes the
    op's arguments without the bn_* ones and returns its outputs without the fold's."""
    schema = getattr(torch.ops.convmixer_kernels, name).default._schema
    backward = name.endswith("_backward")
    stats_at = [a.name for a in schema.arguments].index("stats") if not backward else None

    def run(*args, **kwargs):
        values = _normalized(schema, args, kwargs)
        if backward:
            head, (grad_scale, grad_shift, var, weight, eps) = (values[:-_BACKWARD_BN],
                                                                values[-_BACKWARD_BN:])
            x = head[3]
            acc = acc_dtype(x.dtype)
            if eps is None:
                if any(t is not None for t in (grad_scale, grad_shift, var, weight)):
                    raise ValueError(f"{name}: grad_scale, grad_shift, var and bn_weight need "
                                     "bn_eps (the folded BatchNorm's eps)")
                empty = x.new_empty((0,), dtype=acc)
                return (*stage(*head), empty, empty.clone())
            if var is None:
                raise ValueError(f"{name}: a folded BatchNorm's gradients need the forward's var")
            grad_var, grad_weight, grad_bias = scale_shift_backward(
                grad_scale, grad_shift, var, weight, eps, acc)
            own = head[_GRAD_VAR]
            if own is not None and own.numel():
                grad_var = own + grad_var
            head[_GRAD_VAR] = grad_var
            return (*stage(*head), grad_weight, grad_bias)
        head, (weight, bias, eps) = values[:-_FORWARD_BN], values[-_FORWARD_BN:]
        outputs = stage(*head)
        var = outputs[3]
        if eps is None:
            if weight is not None or bias is not None:
                raise ValueError(f"{name}: bn_weight and bn_bias need bn_eps (the folded "
                                 "BatchNorm's eps)")
            return (*outputs, var.new_empty((0,)), var.new_empty((0,)))
        if not head[stats_at]:
            raise ValueError(f"{name}: a folded BatchNorm (bn_eps) needs stats=True")
        return (*outputs, *scale_shift(var, weight, bias, eps, var.dtype))

    return run


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
