"""BatchNorm2d semantics for the fused stages.

The stage ops return batch statistics; this module turns them, or the running statistics in
eval, into the Norm the next stage applies on load, and updates the running statistics exactly
as nn.BatchNorm2d does (momentum, momentum=None's cumulative average, num_batches_tracked,
unbiased running_var, track_running_stats=False). Ops cannot mutate buffers and carry an
autograd formula at once, so the update happens here, under no_grad.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import nn

from .checks import Norm


def uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    """Whether `bn` normalises with the batch's statistics (as _BatchNorm.forward decides)."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def bn_norm(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor,
            count: Union[int, torch.Tensor], dtype: torch.dtype) -> Norm:
    """The Norm that applies `bn` to the activation whose batch statistics are (mean, var).

    `count` is the number of values per channel behind the statistics (a 0-d tensor when it
    was gathered across processes, see convmixer_kernels.sync_batchnorm); `dtype` is the
    accumulation dtype of the norm vectors. Updates running statistics when training.
    """
    if uses_batch_stats(bn):
        if bn.training and bn.track_running_stats:
            _update_running_stats(bn, mean, var, count)
    else:
        mean, var = bn.running_mean.to(dtype), bn.running_var.to(dtype)
    invstd = torch.rsqrt(var + bn.eps)
    if bn.affine:
        return Norm(mean, bn.weight.to(dtype) * invstd, bn.bias.to(dtype))
    return Norm(mean, invstd, torch.zeros_like(invstd))


@torch.no_grad()
def _update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor,
                          count: Union[int, torch.Tensor]) -> None:
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


def apply_norm(h: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Materialises norm(h) in h's dtype (used once, after the last block): (h - mean) · scale +
    shift, the product and the sum in one op (addcmul), so one activation-sized pass and
    temporary fewer than three separate ops, forward and backward."""
    mean, scale, shift = (v.view(1, -1, 1, 1) for v in norm)
    return torch.addcmul(shift, h.to(scale.dtype) - mean, scale).to(h.dtype)
