"""BatchNorm statistics synchronised across processes, for both paths of ConvMixer.

A synchronised BatchNorm must normalise every process's slice of the batch with the statistics
of the whole (concatenated) batch. Each process already has its local per-channel mean and
biased variance (the fused stages return them; the eager path computes them) and knows how many
values stand behind them. Those (count, mean, var) triples are gathered from every process with
a *differentiable* collective and merged with Chan's parallel formula,

    n = Σ n_i,   mean = Σ n_i·mean_i / n,   var = Σ n_i·(var_i + (mean_i - mean)²) / n,

which only ever adds centred quantities, so it keeps the precision of the local statistics
(docs/DESIGN.md §6) where a merge of raw Σx and Σx² would cancel catastrophically in fp32. The
merged statistics feed the Norm and the running-statistics update alike (with the global count
for the unbiased correction). Because the gather is differentiable, autograd routes each process's
gradient with respect to the global statistics back to the processes that contributed to them
(a sum over ranks), which is exactly SyncBatchNorm's backward: no hand-written formula.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .ops.batch_norm import apply_norm, bn_norm
from .ops.checks import acc_dtype

__all__ = ["SyncBatchNorm2d", "convert_sync_batchnorm", "merge_batch_stats",
           "revert_sync_batchnorm", "sync_group"]


def _gather_rows(row: torch.Tensor, group) -> torch.Tensor:
    """[K] on every process -> [world, K], differentiable (the backward sums over processes)."""
    try:  # the functional collectives: autograd-aware and traceable by torch.compile
        from torch.distributed._functional_collectives import all_gather_single_autograd
    except ImportError:  # older torch: the autograd-aware (but eager-only) collective
        from torch.distributed.nn.functional import all_gather
        return torch.stack(all_gather(row, group=group))
    return all_gather_single_autograd(row.unsqueeze(0).contiguous(), 0, group)


def merge_batch_stats(mean: torch.Tensor, var: torch.Tensor, count, group=None):
    """The statistics of the batch split across the processes of `group` (None: all of them).

    `mean` and `var` are this process's per-channel mean and *biased* variance over `count`
    values per channel. Returns ``(mean, var, count)`` of the concatenation: mean and biased
    variance in the dtype of `mean`, and the total count as a 0-d tensor. Every process of the
    group must call this, in the same order, with the same number of channels.
    """
    group = dist.group.WORLD if group is None else group
    n = torch.as_tensor(count, dtype=mean.dtype, device=mean.device).reshape(1)
    rows = _gather_rows(torch.cat([n, mean, var]), group)
    channels = mean.shape[0]
    counts, means, variances = rows[:, :1], rows[:, 1:1 + channels], rows[:, 1 + channels:]
    total = counts.sum()
    # A process with an empty slice has NaN statistics; weight zero must not turn them into NaN.
    present = counts > 0
    means = torch.where(present, means, torch.zeros_like(means))
    variances = torch.where(present, variances, torch.zeros_like(variances))
    weights = counts / total
    global_mean = (weights * means).sum(0)
    global_var = (weights * (variances + (means - global_mean) ** 2)).sum(0)
    return global_mean, global_var, total


def sync_group(bn: nn.Module):
    """The process group `bn` must synchronise its batch statistics over now, or None.

    As torch.nn.SyncBatchNorm decides: only in training, only for a synchronising module, and
    only when that group has more than one process. Accepts torch's SyncBatchNorm too, so a
    model converted with torch.nn.SyncBatchNorm.convert_sync_batchnorm syncs in the fused path.
    """
    if not bn.training or not isinstance(bn, (SyncBatchNorm2d, nn.SyncBatchNorm)):
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if bn.process_group is None else bn.process_group
    return group if dist.get_world_size(group) > 1 else None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training statistics span every process of `process_group`.

    Unlike torch.nn.SyncBatchNorm it runs on any device (CPU and gloo included) and is a
    BatchNorm2d, so the fused ConvMixer path reads it like any other BatchNorm. Outside
    distributed training (or in a group of one) it *is* nn.BatchNorm2d.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = sync_group(self)
        if group is None:
            return super().forward(x)
        self._check_input_dim(x)
        acc = acc_dtype(x.dtype)
        var, mean = torch.var_mean(x.to(acc), dim=(0, 2, 3), correction=0)
        count = x.shape[0] * x.shape[2] * x.shape[3]
        mean, var, count = merge_batch_stats(mean, var, count, group)
        return apply_norm(x, bn_norm(self, mean, var, count, acc))


def _swap_batchnorms(module: nn.Module, convert) -> nn.Module:
    new = convert(module)
    if new is not None:
        return new
    for name, child in module.named_children():
        replaced = _swap_batchnorms(child, convert)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def _transfer(src: nn.BatchNorm2d, dst: nn.BatchNorm2d) -> nn.BatchNorm2d:
    # The very same Parameter and buffer objects: an optimizer built before the conversion
    # keeps updating what the model uses, and nothing is copied.
    if src.affine:
        dst.weight, dst.bias = src.weight, src.bias
    if src.track_running_stats:
        dst.running_mean, dst.running_var = src.running_mean, src.running_var
        dst.num_batches_tracked = src.num_batches_tracked
    dst.train(src.training)
    return dst


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Every nn.BatchNorm2d in `module` becomes a SyncBatchNorm2d over `process_group`.

    In place for children (the returned module is `module`, unless `module` is itself a
    BatchNorm2d); parameters and buffers are shared, not copied, so state_dict keys and values
    are unchanged.
    """
    def convert(m):
        if isinstance(m, SyncBatchNorm2d):
            m.process_group = process_group
            return m
        if isinstance(m, nn.BatchNorm2d):
            return _transfer(m, SyncBatchNorm2d(
                m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                process_group=process_group, device="meta"))
        return None
    return _swap_batchnorms(module, convert)


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """The inverse of convert_sync_batchnorm: plain nn.BatchNorm2d, sharing the same tensors."""
    def convert(m):
        if isinstance(m, SyncBatchNorm2d):
            return _transfer(m, nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine,
                                               m.track_running_stats, device="meta"))
        return None
    return _swap_batchnorms(module, convert)
