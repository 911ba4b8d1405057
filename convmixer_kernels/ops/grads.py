"""Gradient layout for parameters."""
import torch


def in_param_layout(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`grad` with `param`'s strides. The kernels write weight gradients contiguous; a
    channels_last model's weights are not, and DDP's gradient buckets (and the optimizer's
    foreach kernels) expect a gradient laid out like its parameter."""
    if grad.stride() == param.stride():
        return grad
    return torch.empty_like(param).copy_(grad)
