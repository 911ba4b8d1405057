"""ConvMixer ("Patches Are All You Need?", Trockman & Kolter), with a fused training path.

The module tree and state_dict keys are timm's (stem.0/2, blocks.i.0.fn.0/2, blocks.i.1/3,
head), so timm checkpoints load as they are. ``fused=False`` runs those modules eagerly: it is
the reference. ``fused=True`` keeps the very same parameters and buffers and runs each block as
two fused ops (docs/DESIGN.md §4):

    dw_stage:  g = act(dwconv(BN2_prev(h)) + b)          + batch statistics of g
    pw_stage:  o = act((BN1(g) + BN2_prev(h)) @ Wᵀ + b)  + batch statistics of o

so a block never materialises its BatchNorm outputs or the residual sum; each BatchNorm is
applied while the next stage loads its input. In the backward (ops.mixer_block) the gradient
the residual gives h is added inside the dw stage's backward store, not in a pass of its own,
and with relu both stages take act' from their saved outputs (no pre-activation kept, no conv
recomputed for it).
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .sync_batchnorm import (SyncBatchNorm2d, convert_sync_batchnorm, merge_batch_stats,
                          revert_sync_batchnorm, sync_group)
from .ops import (Norm, PendingUpdates, apply_norm, bn_norm, folded_norm, mixer_block,
                  uses_batch_stats)
from .ops.backend import check_backend
from .ops.cast import cast_params
from .activations import ACTIVATIONS, NAMES, activation_of_layer, check_act
from .ops.checks import acc_dtype
from .pooling import GlobalPool
from .pretrained import pretrained_cfg


def resolve_act(act: Optional[str], act_layer=None) -> str:
    """The activation's name from ours (`act="relu"`) or timm's spelling (`act_layer=nn.ReLU`)."""
    names = []
    if act is not None:
        names.append(check_act("ConvMixer", act).name)
    if act_layer is not None:
        spec = (ACTIVATIONS.get(act_layer.lower()) if isinstance(act_layer, str)
                else activation_of_layer(act_layer))
        if spec is None:
            layers = ", ".join(a.description for a in ACTIVATIONS.values())
            raise ValueError(f"ConvMixer: act_layer must be one of {layers} (what the fused ops "
                             f"implement) or their names {NAMES}, got {act_layer!r}")
        names.append(spec.name)
    if len(set(names)) > 1:
        raise ValueError(f"ConvMixer: act={act!r} and act_layer={act_layer!r} disagree")
    return names[0] if names else "gelu"  # timm's default, nn.GELU


def take_indices(num_blocks: int, indices: Union[None, int, Sequence[int]]) -> Tuple[List[int], int]:
    """timm's feature_take_indices: None takes every block, an int the last n, a sequence those
    (negative counting from the end). Returns the absolute indices and the largest."""
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"last-n ({indices}) is out of range (1 to {num_blocks})")
        taken = list(range(num_blocks - indices, num_blocks))
    else:
        taken = []
        for i in indices:
            idx = num_blocks + i if i < 0 else i
            if not 0 <= idx < num_blocks:
                raise ValueError(f"feature index {i} is out of range (0 to {num_blocks - 1})")
            taken.append(idx)
        if not taken:
            raise ValueError("indices must name at least one block")
    return taken, max(taken)


class Residual(nn.Module):
    """x + fn(x); its child is named `fn` as in timm, which fixes the state_dict keys."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


class _BuffersOnce:
    """Calls `fn`; on every later call (activation checkpointing's recompute) puts `module`'s
    buffers back as the first call left them, so BatchNorm running statistics and
    num_batches_tracked are updated exactly once per step, as without checkpointing."""

    def __init__(self, fn, module: nn.Module):
        self.fn, self.module, self.calls = fn, module, 0

    def __call__(self, *args):
        self.calls += 1
        if self.calls == 1:
            return self.fn(*args)
        saved = [(b, b.clone()) for b in self.module.buffers()]
        try:
            return self.fn(*args)
        finally:
            with torch.no_grad():
                for b, s in saved:
                    b.copy_(s)


class ConvMixer(nn.Module):
    """ConvMixer with timm's constructor, module tree and model API, plus the fused path.

    Arguments as timm's ConvMixer (`act_layer` nn.GELU or nn.ReLU, `global_pool` one of
    convmixer_kernels.pooling.POOL_TYPES), then ours: `act` ("gelu"/"relu", the same choice by
    name), `fused` (run the blocks on the fused ops), `backend` and `sync_bn`.
    """

    def __init__(self, dim: int, depth: int, kernel_size: int = 9, patch_size: int = 7,
                 in_chans: int = 3, num_classes: int = 1000, global_pool: str = "avg",
                 drop_rate: float = 0.0, act_layer=None, *, act: Optional[str] = None,
                 fused: bool = False, backend: str = "auto", sync_bn: bool = False,
                 device=None, dtype=None):
        super().__init__()
        act = resolve_act(act, act_layer)
        if kernel_size % 2 == 0 or not 1 <= kernel_size <= 15:
            raise ValueError(f"ConvMixer: kernel_size must be odd and in [1, 15], got {kernel_size}")
        check_backend(backend)
        dd = dict(device=device, dtype=dtype)
        act_layer = ACTIVATIONS[act].layer
        self.act = act
        self.fused = fused
        self.backend = backend
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = dim
        self.grad_checkpointing = False
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size, **dd),
            act_layer(),
            nn.BatchNorm2d(dim, **dd),
        )
        self.blocks = nn.Sequential(*[
            nn.Sequential(
                Residual(nn.Sequential(
                    nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same", **dd),
                    act_layer(),
                    nn.BatchNorm2d(dim, **dd),
                )),
                nn.Conv2d(dim, dim, kernel_size=1, **dd),
                act_layer(),
                nn.BatchNorm2d(dim, **dd),
            ) for _ in range(depth)
        ])
        self.global_pool = GlobalPool(global_pool)
        self.head_drop = nn.Dropout(drop_rate)
        self.head_hidden_size = dim * self.global_pool.feat_mult()
        self.head = (nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes > 0
                     else nn.Identity())
        self.refresh_feature_info()
        self.pretrained_cfg = self.default_cfg = pretrained_cfg()
        self.sync_bn = sync_bn

    def refresh_feature_info(self) -> None:
        """timm's feature_info (one entry per block) for the blocks the model has now."""
        reduction = self.stem[0].stride[0]
        self.feature_info = [dict(num_chs=self.num_features, reduction=reduction,
                                  module=f"blocks.{i}") for i in range(len(self.blocks))]

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

    # ---- timm's model API -------------------------------------------------------------------

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise LR decay: the stem, then one layer per block."""
        return dict(stem=r"^stem", blocks=r"^blocks\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward instead of keeping its activations (both paths).

        BatchNorm running statistics are still updated once per step: outputs, gradients and
        buffers are identical to a run without checkpointing.
        """
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A fresh head for `num_classes` (0: none) on the model's device and dtype; a new
        global pooling when `global_pool` is given ('' keeps the feature map unpooled)."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = GlobalPool(global_pool)
            self.global_pool.train(self.training)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        ref = self.stem[0].weight
        self.head = (nn.Linear(self.head_hidden_size, num_classes, device=ref.device,
                               dtype=ref.dtype) if num_classes > 0 else nn.Identity())
        self.head.train(self.training)

    def forward_intermediates(self, x: torch.Tensor,
                              indices: Union[None, int, Sequence[int]] = None,
                              norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's contract: the outputs of the chosen blocks (`indices`: None for all, n for the
        last n, or a list), in block order, and unless `intermediates_only` the final features
        too (those of the last block run: with `stop_early`, the last one asked for). There is
        no final norm, so `norm` changes nothing."""
        if output_fmt != "NCHW":
            raise ValueError(f"ConvMixer: output_fmt must be 'NCHW', got {output_fmt!r}")
        taken, last = take_indices(len(self.blocks), indices)
        x, intermediates = self._run_blocks(self.stem(x), set(taken),
                                            stop=last + 1 if stop_early else None)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1,
                                  prune_norm: bool = False, prune_head: bool = True) -> List[int]:
        """Drops the blocks after the last of `indices` (and the head); returns the indices."""
        taken, last = take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:last + 1]
        self.refresh_feature_info()
        if prune_head:
            self.reset_classifier(0, "")
        return taken

    # ---- forward ----------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._run_blocks(self.stem(x))[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _run_blocks(self, x: torch.Tensor, take: Iterable[int] = (),
                    stop: Optional[int] = None) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Runs blocks [0, stop); returns the last output and those of the blocks in `take`."""
        blocks = list(self.blocks)[:stop]
        recompute = (self.grad_checkpointing and torch.is_grad_enabled()
                     and not torch.jit.is_scripting())
        if self.fused:
            return self._fused_blocks(x, blocks, take, recompute)
        intermediates = []
        for i, block in enumerate(blocks):
            if recompute:
                x = checkpoint(_BuffersOnce(block, block), x, use_reentrant=False)
            else:
                x = block(x)
            if i in take:
                intermediates.append(x)
        return x, intermediates

    def _fused_blocks(self, x, blocks, take, recompute):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        acc = acc_dtype(dtype)
        # channels_last once, here: every stage then reads and writes NHWC.
        h = x.to(dtype).contiguous(memory_format=torch.channels_last)
        count = h.shape[0] * h.shape[2] * h.shape[3]
        norm = None  # the BN2 of the previous block, applied on load; none after the stem
        intermediates = []
        # The folded BatchNorms' running statistics, updated together after the last block (a
        # checkpointed block's recompute, later, adds nothing).
        pending = PendingUpdates(count)
        for i, block in enumerate(blocks):
            if recompute:
                # Norm vectors go through as tensors so that checkpoint saves and replays them.
                def step(h, *prev, block=block):
                    out, n = self._fused_block(block, h, Norm(*prev) if prev else None,
                                               dtype, acc, count, pending)
                    return (out, *n)

                h, *parts = checkpoint(_BuffersOnce(step, block), h, *(norm or ()),
                                       use_reentrant=False)
                norm = Norm(*parts)
            else:
                h, norm = self._fused_block(block, h, norm, dtype, acc, count, pending)
            if i in take:
                intermediates.append(apply_norm(h, norm))
        pending.flush()
        return (h if norm is None else apply_norm(h, norm)), intermediates

    def _fused_block(self, block, h, norm, dtype, acc, count, pending):
        """One block as its two fused stages; returns its pre-BN2 output and BN2 as a Norm."""
        dw, bn1 = block[0].fn[0], block[0].fn[2]
        pw, bn2 = block[1], block[3]
        dw_w, dw_b, pw_w, pw_b = cast_params((dw.weight, dw.bias, pw.weight, pw.bias), dtype)
        # A BatchNorm on its own batch's statistics folds into its stage (one launch fewer each
        # way); one on running or synchronised statistics is a Norm built between the stages.
        fold1, fold2 = (_folded(bn, count, pending) for bn in (bn1, bn2))
        stats = (uses_batch_stats(bn1), uses_batch_stats(bn2))
        norm1 = fold1 or (lambda mean, var: bn_norm(bn1, *_global_stats(bn1, mean, var, count),
                                                    acc))
        result = mixer_block(h, dw_w, dw_b, pw_w, pw_b, norm1, act=self.act, x_norm=norm,
                             stats=stats, backend=self.backend, norm2=fold2)
        if fold2 is not None:
            return result
        h_next, mean, var = result
        return h_next, bn_norm(bn2, *_global_stats(bn2, mean, var, count), acc)


def _folded(bn, count, pending):
    """`bn` folded into its stage (ops.folded_norm), unless it is synchronised."""
    return folded_norm(bn, count, pending) if sync_group(bn) is None else None


def _global_stats(bn, mean, var, count):
    """The statistics `bn` normalises with: the local batch's, or the whole distributed batch's."""
    group = sync_group(bn)
    return (mean, var, count) if group is None else merge_batch_stats(mean, var, count, group)


# The paper's models, by timm's names (the CIFAR-10 one is the paper's too, not in timm).
ARCHITECTURES = {
    "convmixer_1536_20": dict(dim=1536, depth=20, kernel_size=9, patch_size=7, act="gelu"),
    "convmixer_768_32": dict(dim=768, depth=32, kernel_size=7, patch_size=7, act="relu"),
    "convmixer_1024_20_ks9_p14": dict(dim=1024, depth=20, kernel_size=9, patch_size=14,
                                      act="gelu"),
    "convmixer_256_8": dict(dim=256, depth=8, kernel_size=5, patch_size=2, act="gelu",
                            num_classes=10),
}


def architecture_args(name: str, **overrides) -> dict:
    """ConvMixer's arguments for the paper model `name`, with `overrides` on top; an activation
    given either way (`act` or timm's `act_layer`) replaces the model's."""
    args = dict(ARCHITECTURES[name])
    if "act_layer" in overrides:
        args.pop("act")
    args.update(overrides)
    return args


def _paper_model(name: str, fused: bool, kwargs: dict) -> ConvMixer:
    model = ConvMixer(**architecture_args(name, **kwargs), fused=fused)
    model.pretrained_cfg = model.default_cfg = pretrained_cfg(name)
    return model


def convmixer_1536_20(fused: bool = False, **kwargs) -> ConvMixer:
    """ConvMixer-1536/20: kernel 9, patch 7, GELU (the paper's most accurate model)."""
    return _paper_model("convmixer_1536_20", fused, kwargs)


def convmixer_768_32(fused: bool = False, **kwargs) -> ConvMixer:
    """ConvMixer-768/32: kernel 7, patch 7, ReLU."""
    return _paper_model("convmixer_768_32", fused, kwargs)


def convmixer_1024_20_ks9_p14(fused: bool = False, **kwargs) -> ConvMixer:
    """ConvMixer-1024/20: kernel 9, patch 14, GELU (16×16 tokens at 224²)."""
    return _paper_model("convmixer_1024_20_ks9_p14", fused, kwargs)


def convmixer_256_8(fused: bool = False, **kwargs) -> ConvMixer:
    """The paper's CIFAR-10 model: ConvMixer-256/8, kernel 5, patch 2, GELU, 10 classes."""
    return _paper_model("convmixer_256_8", fused, kwargs)
