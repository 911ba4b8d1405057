"""The classifier's global pooling, with timm's pool types, so that timm is never required.

timm's ConvMixer pools with `SelectAdaptivePool2d(pool_type, flatten=bool(pool_type))`. The types
below are the ones it accepts, computed with the same torch ops (adaptive pooling for the plain
names, `mean`/`amax` for the "fast" ones), so a head trained under timm sees the same numbers:

    ''            no pooling, no flatten (the feature map goes to the head as it is)
    'avg', 'max'  adaptive average / max pooling to 1×1
    'avgmax'      the mean of avg and max
    'catavgmax'   [avg, max] concatenated on the channels: twice the features
    'fast…'       the same four computed with mean/amax over H and W
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

POOL_TYPES = ("", "avg", "max", "avgmax", "catavgmax",
              "fast", "fastavg", "fastmax", "fastavgmax", "fastcatavgmax")


def _avg(x, fast):
    return x.mean((2, 3), keepdim=True) if fast else F.adaptive_avg_pool2d(x, 1)


def _max(x, fast):
    return x.amax((2, 3), keepdim=True) if fast else F.adaptive_max_pool2d(x, 1)


class GlobalPool(nn.Module):
    """Global pooling of an NCHW map to [N, C·feat_mult()] (or the map itself for '')."""

    def __init__(self, pool_type: str = "avg"):
        super().__init__()
        pool_type = pool_type or ""
        if not isinstance(pool_type, str) or pool_type.lower() not in POOL_TYPES:
            raise ValueError(f"global_pool must be one of {POOL_TYPES}, got {pool_type!r}")
        self.pool_type = pool_type
        kind = pool_type.lower()
        self._fast = kind.startswith("fast")
        self._kind = kind.removeprefix("fast") or ("avg" if self._fast else "")
        self.flatten = bool(pool_type)

    def is_identity(self) -> bool:
        return not self.pool_type

    def feat_mult(self) -> int:
        return 2 if self._kind == "catavgmax" else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._kind:
            return x
        if self._kind == "avg":
            x = _avg(x, self._fast)
        elif self._kind == "max":
            x = _max(x, self._fast)
        elif self._kind == "avgmax":  # timm rounds the two forms differently; so do we
            avg, mx = _avg(x, self._fast), _max(x, self._fast)
            x = 0.5 * avg + 0.5 * mx if self._fast else 0.5 * (avg + mx)
        else:  # catavgmax
            x = torch.cat((_avg(x, self._fast), _max(x, self._fast)), 1)
        return x.flatten(1)

    def extra_repr(self) -> str:
        return f"pool_type={self.pool_type!r}, flatten={self.flatten}"
