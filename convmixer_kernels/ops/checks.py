"""User-facing input validation for the fused ops.

Runs before dispatch (and inside the fake implementations, so torch.compile traces see the same
errors): bad input becomes a ValueError or TypeError that names the argument and the problem,
never a crash or a silent wrong answer. The C++ kernels re-check what their memory accesses
depend on.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch

from ..activations import check_act

MAX_KERNEL_SIZE = 15


class Norm(NamedTuple):
    """A per-channel normalisation applied on load: ``(v - mean) * scale + shift``."""

    mean: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor


class FoldedNorm(NamedTuple):
    """A training BatchNorm on its own batch's statistics, folded into the stage it follows:
    weight and bias (None: not affine) and eps as the stage op's bn_* arguments, and `update`,
    called with the batch (mean, var) once the stage has run, for the running statistics."""
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    eps: float
    update: Callable[[torch.Tensor, torch.Tensor], None]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and norm vectors are kept in for activations of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_activation(op: str, name: str, t, channels: Optional[int] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{op}: {name} must be 4-d [N, C, H, W], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if channels is not None and t.shape[1] != channels:
        raise ValueError(
            f"{op}: {name} has {t.shape[1]} channels but the weights expect {channels}")


def check_like(op: str, ref_name: str, ref: torch.Tensor, **others) -> None:
    """Every given tensor must share `ref`'s device and dtype."""
    for name, t in others.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor or None, got {type(t).__name__}")
        if t.device != ref.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; "
                "all tensors must be on one device")
        if t.dtype != ref.dtype:
            raise TypeError(
                f"{op}: {name} is {t.dtype} but {ref_name} is {ref.dtype}; cast them to one "
                "dtype (under autocast the model does this for you)")


def check_vector(op: str, name: str, t, size: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != size:
        raise ValueError(f"{op}: {name} must have shape [{size}], got {tuple(t.shape)}")


def check_norm(op: str, name: str, norm: Optional[Sequence[torch.Tensor]], x: torch.Tensor) -> None:
    if norm is None:
        return
    if len(norm) != 3:
        raise ValueError(f"{op}: {name} must be a (mean, scale, shift) triple")
    want = acc_dtype(x.dtype)
    for part, t in zip(Norm._fields, norm):
        check_vector(op, f"{name}.{part}", t, x.shape[1])
        if t.device != x.device:
            raise ValueError(f"{op}: {name}.{part} is on {t.device} but x is on {x.device}")
        if t.dtype != want:
            raise TypeError(f"{op}: {name}.{part} must be {want} for {x.dtype} activations, "
                            f"got {t.dtype}")


def check_batch_stats(op: str, x: torch.Tensor, stats: bool) -> None:
    """As nn.BatchNorm2d: training statistics need more than one value per channel."""
    if stats and x.shape[0] * x.shape[2] * x.shape[3] == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.shape}")


def check_dw_stage(x, weight, bias, act, x_norm, stats) -> None:
    op = "dw_stage"
    check_act(op, act)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[1] != 1:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{op}: weight must be a depthwise [C, 1, k, k] tensor, got {shape}")
    channels, _, kh, kw = weight.shape
    if kh != kw:
        raise ValueError(f"{op}: kernel must be square, got {kh}x{kw}")
    if kh % 2 == 0:
        raise ValueError(f"{op}: kernel size must be odd for 'same' padding, got {kh}")
    if not 1 <= kh <= MAX_KERNEL_SIZE:
        raise ValueError(f"{op}: kernel size must be in [1, {MAX_KERNEL_SIZE}], got {kh}")
    check_activation(op, "x", x, channels)
    check_like(op, "x", x, weight=weight, bias=bias)
    if bias is not None:
        check_vector(op, "bias", bias, channels)
    check_norm(op, "x_norm", x_norm, x)
    check_batch_stats(op, x, stats)


def check_pw_stage(x, weight, bias, act, x_norm, residual, residual_norm, stats) -> None:
    op = "pw_stage"
    check_act(op, act)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[2:] != (1, 1):
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{op}: weight must be a pointwise [Cout, Cin, 1, 1] tensor, got {shape}")
    check_activation(op, "x", x, weight.shape[1])
    check_like(op, "x", x, weight=weight, bias=bias, residual=residual)
    if bias is not None:
        check_vector(op, "bias", bias, weight.shape[0])
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"{op}: residual has shape {tuple(residual.shape)} but x has "
                         f"{tuple(x.shape)}")
    if residual is None and residual_norm is not None:
        raise ValueError(f"{op}: residual_norm given without a residual")
    check_norm(op, "x_norm", x_norm, x)
    check_norm(op, "residual_norm", residual_norm, x)
    check_batch_stats(op, x, stats)


def check_write_out(op: str, write_out: bool, keep_pre_act: bool) -> None:
    """dw_stage's write_out=False needs keep_pre_act (csrc/stage_checks.cpp check_write_out, for
    the fake and composed implementations)."""
    if not write_out and not keep_pre_act:
        raise ValueError(f"{op}: write_out=False needs keep_pre_act=True: the pre-activation is "
                         "then the stage's output, which its consumer reads through act "
                         "(pw_stage's x_act)")
