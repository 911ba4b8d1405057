"""The invariants the Triton launchers' memory accesses depend on (the counterpart of the C++
TORCH_CHECKs): a direct torch.ops call with bad shapes is an error, never an out-of-bounds
access. User-facing validation with friendlier messages happens before dispatch
(convmixer_kernels/ops/checks.py)."""
from __future__ import annotations

import torch

from ..activations import check_act
from ._common import INTERPRET, acc_dtype

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_dtype(op: str, x: torch.Tensor) -> None:
    if x.dtype not in _DTYPES:
        raise TypeError(f"{op}: the Triton backend supports {_DTYPES}, got {x.dtype}")
    if INTERPRET and x.dtype == torch.bfloat16:
        raise TypeError(f"{op}: Triton's interpreter does not compute bfloat16 correctly; run "
                        "bfloat16 on a GPU, or use float32/float16 under the interpreter")


def _check_same(op: str, x: torch.Tensor, name: str, t, shape=None, dtype=None) -> None:
    if t is None:
        return
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    want = x.dtype if dtype is None else dtype
    if t.dtype != want:
        raise TypeError(f"{op}: {name} must be {want}, got {t.dtype}")


def _check_norm(op: str, name: str, norm, x: torch.Tensor, channels: int) -> bool:
    given = sum(v is not None for v in norm)
    if given not in (0, 3):
        raise ValueError(f"{op}: {name}_mean, {name}_scale and {name}_shift must be given "
                         "together")
    for part, v in zip(("mean", "scale", "shift"), norm):
        _check_same(op, x, f"{name}_{part}", v, (channels,), acc_dtype(x.dtype))
    return given == 3


def check_dw_args(op, x, norm, weight, bias, act) -> None:
    check_act(op, act)
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-d [N, C, H, W], got {tuple(x.shape)}")
    _check_dtype(op, x)
    c = x.shape[1]
    if (weight.dim() != 4 or weight.shape[0] != c or weight.shape[1] != 1
            or weight.shape[2] != weight.shape[3]):
        raise ValueError(f"{op}: weight must be [{c}, 1, k, k], got {tuple(weight.shape)}")
    k = weight.shape[2]
    if k % 2 != 1 or not 1 <= k <= 15:
        raise ValueError(f"{op}: kernel size must be odd and in [1, 15], got {k}")
    _check_same(op, x, "weight", weight)
    _check_same(op, x, "bias", bias, (c,))
    _check_norm(op, "x", norm, x, c)


def check_pw_args(op, x, x_norm, res, res_norm, weight, bias, act) -> None:
    check_act(op, act)
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-d [N, C, H, W], got {tuple(x.shape)}")
    _check_dtype(op, x)
    cin = x.shape[1]
    if weight.dim() != 4 or weight.shape[1] != cin or tuple(weight.shape[2:]) != (1, 1):
        raise ValueError(f"{op}: weight must be [Cout, {cin}, 1, 1], got {tuple(weight.shape)}")
    _check_same(op, x, "weight", weight)
    _check_same(op, x, "bias", bias, (weight.shape[0],))
    _check_same(op, x, "res", res, x.shape)
    _check_norm(op, "x", x_norm, x, cin)
    if _check_norm(op, "res", res_norm, x, cin) and res is None:
        raise ValueError(f"{op}: a res norm needs res")
