"""The Triton kernels' activations: the maths of each entry of convmixer_kernels.activations, and
the two device functions the kernels call, selected by the ``ACT`` constexpr (an entry's
``code``).

A code with no branch here fails when the kernel is compiled (or, under the interpreter, run):
a value the table lacks never computes another activation. Adding an activation:
docs/EXTENDING.md.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..activations import ACTIVATIONS

# Module-level values a kernel reads must be constexpr.
_GELU = tl.constexpr(ACTIVATIONS["gelu"].code)
_RELU = tl.constexpr(ACTIVATIONS["relu"].code)
_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _gelu(a):
    """Exact erf GELU."""
    return 0.5 * a * (1.0 + tl.erf(a * _INV_SQRT2))


@triton.jit
def _gelu_grad(a, dy):
    """dy · GELU'(a), GELU' = Φ(a) + a·φ(a)."""
    cdf = 0.5 * (1.0 + tl.erf(a * _INV_SQRT2))
    pdf = _INV_SQRT_2PI * tl.exp(-0.5 * a * a)
    return dy * (cdf + a * pdf)


@triton.jit
def _relu(a):
    """ReLU that keeps NaN: only a < 0 becomes zero, as torch.relu."""
    return tl.where(a < 0.0, 0.0, a)


@triton.jit
def _relu_grad(a, dy):
    """dy · ReLU'(a) as threshold_backward: zero where a <= 0, so NaN passes dy as in PyTorch."""
    return tl.where(a <= 0.0, 0.0, dy)


@triton.jit
def act_fwd(a, ACT: tl.constexpr):
    """act(a) for the activation whose code is ACT."""
    if ACT == _GELU:
        return _gelu(a)
    elif ACT == _RELU:
        return _relu(a)
    else:
        tl.static_assert(False, "act_fwd: ACT is no code of convmixer_kernels.activations")


@triton.jit
def act_bwd(a, dy, ACT: tl.constexpr):
    """dy · act'(a) for the activation whose code is ACT."""
    if ACT == _GELU:
        return _gelu_grad(a, dy)
    elif ACT == _RELU:
        return _relu_grad(a, dy)
    else:
        tl.static_assert(False, "act_bwd: ACT is no code of convmixer_kernels.activations")
