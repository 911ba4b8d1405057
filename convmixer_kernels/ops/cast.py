"""A block's parameters in the compute dtype under autocast, one launch each way.

Autocast casts a weight at every use, a launch each, and its gradient back, another. The fused
block casts its four parameters (the weights and biases of both stages) as one buffer instead:
``cat_cast`` (docs/OPS.md § Parameter casts) flattens them one after another into one tensor of
the compute dtype, converting as it copies, and the stages take views of it; the backward casts
the four gradients back into one float32 buffer with the same op, whose views become the
parameters' gradients (as autograd's own cat/cast pair left them). One kernel each way where a
concatenation and a cast were two. On a device the extension has no kernel for (the Triton
backend with a build without CUDA), the same buffer comes from ATen's cat and cast.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.autograd.function import once_differentiable

from .. import _extension  # noqa: F401  (registers torch.ops.convmixer_kernels)
from .autograd import register_no_derivative
from .backend import native_devices

_ops = torch.ops.convmixer_kernels
_NATIVE = native_devices(("cat_cast",))  # device type -> whether cat_cast has a kernel there


def _cat_cast(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    if _NATIVE.get(tensors[0].device.type, False):
        return _ops.cat_cast(list(tensors), dtype)
    return torch.cat([t.reshape(-1) for t in tensors]).to(dtype)


def _views(flat: torch.Tensor, shapes: Sequence[torch.Size]) -> tuple:
    pieces = flat.split_with_sizes([shape.numel() for shape in shapes])
    return tuple(piece.view(shape) for piece, shape in zip(pieces, shapes))


class _CastParams(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dtype, *params):
        ctx.shapes = [p.shape for p in params]
        ctx.dtypes = [p.dtype for p in params]
        return _views(_cat_cast(params, dtype), ctx.shapes)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        device = next(g.device for g in grads if g is not None)
        grads = [torch.zeros(shape, dtype=dtype, device=device) if g is None else g
                 for g, shape, dtype in zip(grads, ctx.shapes, ctx.dtypes)]
        if len(set(ctx.dtypes)) != 1:  # parameters of several dtypes: one cast each
            return (None, *(g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)))
        return (None, *_views(_cat_cast(grads, ctx.dtypes[0]), ctx.shapes))


def cast_params(params: Sequence[Optional[torch.Tensor]], dtype: torch.dtype) -> tuple:
    """`params` (None for an absent bias) in `dtype`, as views of one buffer: one launch forward
    and one backward. The GEMM operand, the largest, goes first: its view starts the buffer,
    aligned as any allocation is. Nothing to do, and no copy, when they are in `dtype` already."""
    given = [p for p in params if p is not None]
    if all(p.dtype == dtype for p in given):
        return tuple(params)
    order = sorted(range(len(given)), key=lambda i: -given[i].numel())
    cast = _CastParams.apply(dtype, *(given[i] for i in order))
    views = [None] * len(given)
    for i, view in zip(order, cast):
        views[i] = view
    it = iter(views)
    return tuple(None if p is None else next(it) for p in params)


register_no_derivative("convmixer_kernels::cat_cast", "convmixer_kernels.ops.cast.cast_params")


@torch.library.register_fake("convmixer_kernels::cat_cast")
def _cat_cast_fake(tensors, dtype):
    # Mixed devices with meta among them dispatch here, not to the C++ check.
    for j, t in enumerate(tensors):
        if t.device != tensors[0].device:
            raise ValueError(f"cat_cast: tensor {j} is on {t.device}, expected {tensors[0].device}")
    return tensors[0].new_empty((sum(t.numel() for t in tensors),), dtype=dtype)
