"""BatchNorm2d semantics for the fused stages.

The stage ops return batch statistics; this module turns them, or the running statistics in
eval, into the Norm the next stage applies on load, and updates the running statistics exactly
as nn.BatchNorm2d does (momentum, momentum=None's cumulative average, num_batches_tracked,
unbiased running_var, track_running_stats=False).

Both jobs are one op each (docs/OPS.md § BatchNorm ops), one kernel launch on a GPU instead of
the dozen ATen ops on [C] vectors their formulas take: ``bn_scale_shift`` (with one backward op,
``bn_scale_shift_backward``) and ``bn_update_running_stats``, which mutates the buffers and so
carries no autograd formula; it runs under no_grad. A training BatchNorm that tracks running
statistics needs both: ``bn_train_norm`` does them in one launch (the update, then the norm of
the batch var), with bn_scale_shift's gradients through an autograd.Function, since an op that
mutates cannot carry a registered formula. On a device the extension has no kernels for (a build
without CUDA while the Triton backend runs on a GPU) the ATen formulas below do the same.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from torch.autograd.function import once_differentiable

from .. import _extension  # noqa: F401  (registers torch.ops.convmixer_kernels)
from .autograd import register_autograd, register_no_derivative
from .backend import native_devices
from .checks import FoldedNorm, Norm

_ops = torch.ops.convmixer_kernels
_BN_OPS = ("bn_scale_shift", "bn_scale_shift_backward", "bn_update_running_stats",
           "bn_update_running_stats_many", "bn_train_norm")

_NATIVE = native_devices(_BN_OPS)  # device type -> whether the bn ops have kernels there


def _has_kernels(device: torch.device) -> bool:
    return _NATIVE.get(device.type, False)


def uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    """Whether `bn` normalises with the batch's statistics (as _BatchNorm.forward decides)."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _check_stats(bn: nn.BatchNorm2d, mean, var, dtype: torch.dtype) -> None:
    for name, t in (("mean", mean), ("var", var)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"bn_norm: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 1 or t.shape[0] != bn.num_features:
            raise ValueError(f"bn_norm: {name} must have shape [{bn.num_features}] (the "
                             f"BatchNorm's num_features), got {tuple(t.shape)}")
        if t.dtype != dtype:
            raise TypeError(f"bn_norm: {name} must be {dtype}, the accumulation dtype, got "
                            f"{t.dtype}")
    if var.device != mean.device:
        raise ValueError(f"bn_norm: var is on {var.device} but mean is on {mean.device}")
    for name in ("weight", "running_mean"):
        t = getattr(bn, name, None)
        if t is not None and t.device != mean.device:
            raise ValueError(f"bn_norm: the statistics are on {mean.device} but the BatchNorm's "
                             f"{name} is on {t.device}")


def bn_norm(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor,
            count: Union[int, torch.Tensor], dtype: torch.dtype) -> Norm:
    """The Norm that applies `bn` to the activation whose batch statistics are (mean, var).

    `count` is the number of values per channel behind the statistics (a 0-d tensor when it
    was gathered across processes, see convmixer_kernels.sync_batchnorm); `dtype` is the
    accumulation dtype of the norm vectors. Updates running statistics when training.
    """
    weight, bias = (bn.weight, bn.bias) if bn.affine else (None, None)
    if uses_batch_stats(bn):
        _check_stats(bn, mean, var, dtype)
        if _updates_running_stats(bn):
            if _has_kernels(var.device):
                return Norm(mean, *_TrainNorm.apply(var, weight, bias, mean, *_running(bn, count),
                                                    bn.eps, dtype))
            _aten_update(bn, mean, var, count)
    else:
        # The kernel reads running_var in its own dtype; the mean is the Norm's own vector.
        mean, var = bn.running_mean.to(dtype), bn.running_var
    if not _has_kernels(var.device):
        return _aten_norm(mean, var, weight, bias, bn.eps, dtype)
    scale, shift = _ops.bn_scale_shift(var, weight, bias, bn.eps, dtype)
    return Norm(mean, scale, shift)


def folded_norm(bn: nn.BatchNorm2d, count: int,
                pending: Optional["PendingUpdates"] = None) -> Optional[FoldedNorm]:
    """`bn` as a FoldedNorm, to be folded into the stage whose output it normalises, when it
    normalises with that stage's batch statistics (training, or no running statistics); None
    when it uses its running statistics. `count` is the values per channel behind the statistics.
    The caller keeps synchronised BatchNorms, whose statistics are the whole distributed batch's,
    on bn_norm.

    With `pending` the running statistics' update of a BatchNorm that keeps all three buffers
    waits there until its flush(), which does a model's in one launch once its forward has run
    (nn.BatchNorm2d's update, at the end of the forward instead of in it)."""
    if not uses_batch_stats(bn):
        return None
    weight, bias = (bn.weight, bn.bias) if bn.affine else (None, None)

    def update(mean: torch.Tensor, var: torch.Tensor) -> None:
        if not _updates_running_stats(bn):
            return
        if pending is not None and _keeps_all_buffers(bn):
            pending.add(bn, mean, var)
            return
        _update_now(bn, mean, var, count)

    return FoldedNorm(weight, bias, bn.eps, update)


class PendingUpdates:
    """The running statistics of a forward's folded BatchNorms (folded_norm), `count` values per
    channel behind each one's statistics, updated together by flush(): one
    bn_update_running_stats_many launch for every 32 of one momentum where the device has the
    kernels. What is added after the flush (a checkpointed block's recompute, in the backward) is
    dropped: that forward's updates are done, and its buffers must change once."""

    def __init__(self, count: int):
        self.count, self.items, self.flushed = count, [], False

    def add(self, bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor) -> None:
        if not self.flushed:
            self.items.append((bn, mean, var))

    def flush(self) -> None:
        self.flushed = True
        items, self.items = self.items, []
        # The items of one call update in parallel: buffers met twice (one module used in two
        # places, or modules sharing buffers) go to a later call, after their first update.
        while items:
            calls: dict = {}
            later = []
            for bn, mean, var in items:
                key = (bn.momentum, mean.device, mean.dtype)
                batch = calls.setdefault(key, [])
                shared = any(_share_buffers(b, bn) for b, _, _ in batch)
                (later if shared else batch).append((bn, mean, var))
            for (momentum, device, _), batch in calls.items():
                self._update(batch, momentum, device)
            items = later

    def _update(self, batch: list, momentum, device) -> None:
        if not _has_kernels(device):
            for bn, mean, var in batch:
                _aten_update(bn, mean, var, self.count)
            return
        with torch.no_grad():
            _ops.bn_update_running_stats_many(
                [m for _, m, _ in batch], [v for _, _, v in batch],
                [bn.running_mean for bn, _, _ in batch], [bn.running_var for bn, _, _ in batch],
                [bn.num_batches_tracked for bn, _, _ in batch],
                None if momentum is None else float(momentum), float(self.count))


def _share_buffers(a: nn.BatchNorm2d, b: nn.BatchNorm2d) -> bool:
    """Whether one update of `a` and one of `b` write a tensor in common (the same module, or a
    shallow copy). By identity, which torch.compile traces; buffers that are distinct views of
    one storage are left to the op's own check, which refuses them."""
    mine = (a.running_mean, a.running_var, a.num_batches_tracked)
    return any(t is u for t in mine for u in (b.running_mean, b.running_var,
                                                b.num_batches_tracked))


def _keeps_all_buffers(bn: nn.BatchNorm2d) -> bool:
    return (bn.running_mean is not None and bn.running_var is not None
            and bn.num_batches_tracked is not None)


def _update_now(bn: nn.BatchNorm2d, mean, var, count) -> None:
    with torch.no_grad():  # the buffers stay out of the graph
        if _has_kernels(mean.device):
            _ops.bn_update_running_stats(mean, var, *_running(bn, count))
        else:
            _aten_update(bn, mean, var, count)


def _updates_running_stats(bn: nn.BatchNorm2d) -> bool:
    """Whether a forward of `bn` updates running statistics (as _BatchNorm.forward decides)."""
    return bn.training and bn.track_running_stats and not (
        bn.num_batches_tracked is None and bn.running_mean is None and bn.running_var is None)


def _running(bn: nn.BatchNorm2d, count: Union[int, torch.Tensor]) -> tuple:
    """bn_update_running_stats' arguments after (mean, var): the buffers, momentum (None: a
    cumulative average), and the count as a number or a 0-d tensor (a gathered count)."""
    momentum = None if bn.momentum is None else float(bn.momentum)
    count_tensor = count if isinstance(count, torch.Tensor) else None
    return (bn.running_mean, bn.running_var, bn.num_batches_tracked, momentum,
            0.0 if count_tensor is not None else float(count), count_tensor)


class _TrainNorm(torch.autograd.Function):
    """bn_train_norm's (scale, shift), with bn_scale_shift's gradients for var, weight and bias
    (the running statistics' update, its other job, has none)."""

    @staticmethod
    def forward(ctx, var, weight, bias, mean, running_mean, running_var, num_batches_tracked,
                momentum, count, count_tensor, eps, dtype):
        scale, shift = _ops.bn_train_norm(mean, var, weight, bias, eps, dtype, running_mean,
                                          running_var, num_batches_tracked, momentum, count,
                                          count_tensor)
        ctx.save_for_backward(var, weight, bias)
        ctx.eps, ctx.dtype = eps, dtype
        return scale, shift

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_scale, grad_shift):
        grads = _backward(ctx, grad_scale, grad_shift)[:3]
        return (*grads, *(None,) * 9)


def scale_shift(var, weight, bias, eps, dtype) -> tuple:
    """bn_scale_shift's (scale, shift), by the op where the device has its kernel."""
    if _has_kernels(var.device):
        return _ops.bn_scale_shift(var, weight, bias, eps, dtype)
    return _aten_scale_shift(var, weight, bias, eps, dtype)


def scale_shift_backward(grad_scale, grad_shift, var, weight, eps, dtype) -> tuple:
    """bn_scale_shift_backward's (grad_var, grad_weight, grad_bias) of a BatchNorm whose bias has
    the weight's dtype, as a model's parameters do (empty gradients without a weight)."""
    if _has_kernels(var.device):
        return _ops.bn_scale_shift_backward(grad_scale, grad_shift, var, weight, weight, eps,
                                            dtype)
    invstd = torch.rsqrt(var.to(dtype) + eps)
    gs = grad_scale if grad_scale is not None else torch.zeros_like(invstd)
    w = weight.to(dtype) if weight is not None else torch.ones_like(invstd)
    grad_var = gs * w * -0.5 * invstd * invstd * invstd
    if weight is None:
        empty = var.new_empty((0,), dtype=dtype)
        return grad_var, empty, empty.clone()
    gt = grad_shift if grad_shift is not None else torch.zeros_like(invstd)
    return grad_var, (gs * invstd).to(weight.dtype), gt.to(weight.dtype)


# ---- the ATen formulas, for devices without the ops' kernels

def _aten_norm(mean, var, weight, bias, eps, dtype) -> Norm:
    return Norm(mean, *_aten_scale_shift(var, weight, bias, eps, dtype))


def _aten_scale_shift(var, weight, bias, eps, dtype) -> tuple:
    invstd = torch.rsqrt(var.to(dtype) + eps)
    if weight is not None:
        return weight.to(dtype) * invstd, bias.to(dtype)
    return invstd, torch.zeros_like(invstd)


@torch.no_grad()
def _aten_update(bn: nn.BatchNorm2d, mean, var, count) -> None:
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    if bn.running_mean is None:
        return
    if bn.momentum is None:  # cumulative moving average, kept as a tensor: no host sync
        factor = 1.0 / bn.num_batches_tracked.to(bn.running_mean.dtype)
    else:
        factor = bn.momentum
    unbiased = var * (count / (count - 1))
    bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype) * factor)
    bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype) * factor)


# ---- fake implementations and the autograd formula

@torch.library.register_fake("convmixer_kernels::bn_scale_shift")
def _bn_scale_shift_fake(var, weight, bias, eps, dtype):
    return var.new_empty(var.shape, dtype=dtype), var.new_empty(var.shape, dtype=dtype)


@torch.library.register_fake("convmixer_kernels::bn_scale_shift_backward")
def _bn_scale_shift_backward_fake(grad_scale, grad_shift, var, weight, bias, eps, dtype):
    def like(t):
        return var.new_empty((0,), dtype=dtype) if t is None else t.new_empty(t.shape)
    return var.new_empty(var.shape), like(weight), like(bias)


@torch.library.register_fake("convmixer_kernels::bn_train_norm")
def _bn_train_norm_fake(mean, var, weight, bias, eps, dtype, running_mean, running_var,
                        num_batches_tracked, momentum, count, count_tensor):
    return var.new_empty(var.shape, dtype=dtype), var.new_empty(var.shape, dtype=dtype)


@torch.library.register_fake("convmixer_kernels::bn_update_running_stats_many")
def _bn_update_running_stats_many_fake(mean, var, running_mean, running_var, num_batches_tracked,
                                       momentum, count):
    return None


@torch.library.register_fake("convmixer_kernels::bn_update_running_stats")
def _bn_update_running_stats_fake(mean, var, running_mean, running_var, num_batches_tracked,
                                  momentum, count, count_tensor):
    return None


def _setup_context(ctx, inputs, output):
    var, weight, bias, eps, dtype = inputs
    ctx.save_for_backward(var, weight, bias)
    ctx.eps, ctx.dtype = eps, dtype


def _backward(ctx, grad_scale, grad_shift):
    var, weight, bias = ctx.saved_tensors
    grad_var, grad_weight, grad_bias = _ops.bn_scale_shift_backward(
        grad_scale, grad_shift, var, weight, bias, ctx.eps, ctx.dtype)
    affine = weight is not None
    return (grad_var, grad_weight if affine else None, grad_bias if affine else None, None, None)


register_autograd("convmixer_kernels::bn_scale_shift", _backward, _setup_context)
register_no_derivative("convmixer_kernels::bn_train_norm", "convmixer_kernels.ops.bn_norm")


def apply_norm(h: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Materialises norm(h) in h's dtype (used once, after the last block): (h - mean) · scale +
    shift, the product and the sum in one op (addcmul), so one activation-sized pass and
    temporary fewer than three separate ops, forward and backward."""
    mean, scale, shift = (v.view(1, -1, 1, 1) for v in norm)
    return torch.addcmul(shift, h.to(scale.dtype) - mean, scale).to(h.dtype)
