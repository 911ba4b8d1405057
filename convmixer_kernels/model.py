"""ConvMixer ("Patches Are All You Need?", Trockman & Kolter), with a fused training path.

The module tree and state_dict keys are timm's (stem.0/2, blocks.i.0.fn.0/2, blocks.i.1/3,
head), so timm checkpoints load as they are. ``fused=False`` runs those modules eagerly: it is
the reference. ``fused=True`` keeps the very same parameters and buffers and runs each block as
two fused ops (DESIGN.md §4):

    dw_stage:  g = act(dwconv(BN2_prev(h)) + b)          + batch statistics of g
    pw_stage:  o = act((BN1(g) + BN2_prev(h)) @ Wᵀ + b)  + batch statistics of o

so a block never materialises its BatchNorm outputs or the residual sum; each BatchNorm is
applied while the next stage loads its input.
"""
from __future__ import annotations

import torch
from torch import nn

from .distributed import (SyncBatchNorm2d, convert_sync_batchnorm, merge_batch_stats,
                          revert_sync_batchnorm, sync_group)
from .ops import apply_norm, bn_norm, dw_stage, pw_stage, uses_batch_stats
from .ops.backend import check_backend
from .ops.checks import ACTIVATIONS, acc_dtype

_ACT_LAYERS = {"gelu": nn.GELU, "relu": nn.ReLU}


class Residual(nn.Module):
    """x + fn(x); its child is named `fn` as in timm, which fixes the state_dict keys."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


class ConvMixer(nn.Module):
    def __init__(self, dim: int, depth: int, kernel_size: int = 9, patch_size: int = 7,
                 in_chans: int = 3, num_classes: int = 1000, act: str = "gelu",
                 drop_rate: float = 0.0, fused: bool = False, backend: str = "auto",
                 sync_bn: bool = False):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"ConvMixer: act must be one of {ACTIVATIONS}, got {act!r}")
        if kernel_size % 2 == 0 or not 1 <= kernel_size <= 15:
            raise ValueError(f"ConvMixer: kernel_size must be odd and in [1, 15], got {kernel_size}")
        check_backend(backend)
        act_layer = _ACT_LAYERS[act]
        self.act = act
        self.fused = fused
        self.backend = backend
        self.num_classes = num_classes
        self.num_features = dim
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size),
            act_layer(),
            nn.BatchNorm2d(dim),
        )
        self.blocks = nn.Sequential(*[
            nn.Sequential(
                Residual(nn.Sequential(
                    nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"),
                    act_layer(),
                    nn.BatchNorm2d(dim),
                )),
                nn.Conv2d(dim, dim, kernel_size=1),
                act_layer(),
                nn.BatchNorm2d(dim),
            ) for _ in range(depth)
        ])
        self.pooling = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.sync_bn = sync_bn

    @property
    def sync_bn(self) -> bool:
        """Whether BatchNorm statistics are synchronised across processes in training.

        Setting it swaps every BatchNorm2d for a SyncBatchNorm2d over all processes (or back),
        sharing the same parameters and buffers; both the fused and the eager path then
        normalise with the whole distributed batch's statistics. For another process group use
        convmixer_kernels.convert_sync_batchnorm(model, group).
        """
        return any(isinstance(m, (SyncBatchNorm2d, nn.SyncBatchNorm)) for m in self.modules())

    @sync_bn.setter
    def sync_bn(self, enabled: bool) -> None:
        if enabled:
            convert_sync_batchnorm(self)
        else:
            revert_sync_batchnorm(self)

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh head for `num_classes` (0: none), on the model's device and dtype."""
        self.num_classes = num_classes
        ref = self.stem[0].weight
        self.head = (nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
                     if num_classes > 0 else nn.Identity())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if not self.fused:
            return self.blocks(x)
        return self._fused_blocks(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pooling(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _fused_blocks(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        acc = acc_dtype(dtype)
        # channels_last once, here: every stage then reads and writes NHWC.
        h = x.to(dtype).contiguous(memory_format=torch.channels_last)
        count = h.shape[0] * h.shape[2] * h.shape[3]
        norm = None  # the BN2 of the previous block, applied on load; none after the stem
        for block in self.blocks:
            dw, bn1 = block[0].fn[0], block[0].fn[2]
            pw, bn2 = block[1], block[3]
            g, mean, var = dw_stage(
                h, dw.weight.to(dtype), _cast(dw.bias, dtype), act=self.act, x_norm=norm,
                stats=uses_batch_stats(bn1), backend=self.backend)
            norm1 = bn_norm(bn1, *_global_stats(bn1, mean, var, count), acc)
            h_next, mean, var = pw_stage(
                g, pw.weight.to(dtype), _cast(pw.bias, dtype), act=self.act, x_norm=norm1,
                residual=h, residual_norm=norm, stats=uses_batch_stats(bn2),
                backend=self.backend)
            norm = bn_norm(bn2, *_global_stats(bn2, mean, var, count), acc)
            h = h_next
        return h if norm is None else apply_norm(h, norm)


def _global_stats(bn, mean, var, count):
    """The statistics `bn` normalises with: the local batch's, or the whole distributed batch's."""
    group = sync_group(bn)
    return (mean, var, count) if group is None else merge_batch_stats(mean, var, count, group)


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def convmixer_1536_20(fused: bool = False, **kwargs) -> ConvMixer:
    """ConvMixer-1536/20: kernel 9, patch 7, GELU (the paper's most accurate model)."""
    return ConvMixer(**{"dim": 1536, "depth": 20, "kernel_size": 9, "patch_size": 7, **kwargs},
                     fused=fused)


def convmixer_768_32(fused: bool = False, **kwargs) -> ConvMixer:
    """ConvMixer-768/32: kernel 7, patch 7, ReLU."""
    return ConvMixer(**{"dim": 768, "depth": 32, "kernel_size": 7, "patch_size": 7,
                        "act": "relu", **kwargs}, fused=fused)


def convmixer_1024_20_ks9_p14(fused: bool = False, **kwargs) -> ConvMixer:
    """ConvMixer-1024/20: kernel 9, patch 14, GELU (16×16 tokens at 224²)."""
    return ConvMixer(**{"dim": 1024, "depth": 20, "kernel_size": 9, "patch_size": 14, **kwargs},
                     fused=fused)


def convmixer_256_8(fused: bool = False, **kwargs) -> ConvMixer:
    """The paper's CIFAR-10 model: ConvMixer-256/8, kernel 5, patch 2, GELU, 10 classes."""
    return ConvMixer(**{"dim": 256, "depth": 8, "kernel_size": 5, "patch_size": 2,
                        "num_classes": 10, **kwargs}, fused=fused)
