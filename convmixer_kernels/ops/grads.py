"""What the stages' autograd formulas share: gradient layout for parameters, saved outputs."""
from typing import Optional

import torch

from ..activations import ACTIVATIONS


def in_param_layout(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`grad` with `param`'s strides. The kernels write weight gradients contiguous; a
    channels_last model's weights are not, and DDP's gradient buckets (and the optimizer's
    foreach kernels) expect a gradient laid out like its parameter.

    A ConvMixer weight's channels_last strides differ from contiguous ones only in dimensions of
    size 1 ([C, C, 1, 1] and [C, 1, k, k]), which place no element: the memory is the same, and
    a view with the parameter's strides replaces the copy."""
    if grad.stride() == param.stride():
        return grad
    if grad.shape == param.shape and all(
            g == p for n, g, p in zip(grad.shape, grad.stride(), param.stride()) if n != 1):
        return grad.as_strided(param.shape, param.stride())
    return torch.empty_like(param).copy_(grad)


def saved_output(act: str, out: torch.Tensor) -> Optional[torch.Tensor]:
    """What a stage's autograd saves of its output for the backward op's saved_out: the output
    where act' follows from it (relu; the backward then recomputes nothing to get act'), else
    nothing (saving it would keep it alive for no use), or where the stage wrote none
    (write_out=False: the kept pre-activation serves)."""
    return None if ACTIVATIONS[act].needs_pre_activation or not out.numel() else out
