"""The activations the fused ops implement: the one table of the Python side.

What names, checks, builds or computes an activation in Python reads ``ACTIVATIONS``: the ops'
argument checks (``check_act``), the training CLI's choices, the Triton kernels (whose ``ACT``
constexpr is an entry's ``code``), the eager layers (``Activation.layer``,
``activation_of_layer``) and the tests' references (``Activation.functional``). The C++ side
has its own list, csrc/activation.h, whose enum values are the codes here;
python_tests/test_activations.py checks that the two agree. Adding an activation:
docs/EXTENDING.md.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Activation:
    """One activation, as every layer of the package spells it."""

    name: str
    """The ``act`` string of the ops, the model and the CLI."""
    code: int
    """Its value in csrc/activation.h's ``enum class Act``: what the CUDA check TUs' entry
    points and the Triton kernels' ``ACT`` constexpr take."""
    module: type
    """The eager ``nn.Module`` layer computing it (built by :meth:`layer`)."""
    functional: Callable[[torch.Tensor], torch.Tensor]
    """The eager function computing it: the maths the kernels must match (docs/OPS.md)."""
    description: str
    """How messages name it, e.g. "the exact (erf) nn.GELU"."""
    derivative: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """``derivative(grad, v)``: grad · act'(v), ATen's own backward of ``functional`` (what a
    stage's autograd applies where act' is the caller's: pw_stage's x_act, docs/OPS.md)."""
    needs_pre_activation: bool
    """Whether act'(v) needs v itself, not only act(v). False means the backward ops read act'
    and act from the stage's saved output instead (docs/OPS.md saved_out: the dw stage skips
    its conv recompute, the pw stage keeps no pre-activation), which is exact only when
    act(o) = o and act'(o) = act'(v) for o = act(v), as for relu; csrc/activation.h's
    derivative_from_output must agree."""
    module_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)
    """The layer arguments that select this maths (a layer with other values computes
    something else, e.g. GELU's tanh approximation)."""

    def __post_init__(self):
        object.__setattr__(self, "module_kwargs", types.MappingProxyType(dict(self.module_kwargs)))

    def layer(self) -> nn.Module:
        """A new eager layer computing this activation."""
        return self.module(**self.module_kwargs)

    def is_layer(self, layer) -> bool:
        """Whether `layer` (a module, or a module class as timm's ``act_layer``) computes this
        activation: a class counts when its default instance does."""
        if isinstance(layer, type):
            if not issubclass(layer, self.module):
                return False
            layer = layer()
        return isinstance(layer, self.module) and all(
            getattr(layer, k, None) == v for k, v in self.module_kwargs.items())


def _table(*entries: Activation) -> Mapping[str, Activation]:
    codes = [a.code for a in entries]
    if len(set(codes)) != len(codes):
        raise AssertionError(f"activation codes must be distinct, got {codes}")
    return types.MappingProxyType({a.name: a for a in entries})


ACTIVATIONS: Mapping[str, Activation] = _table(
    Activation(name="gelu", code=0, module=nn.GELU, module_kwargs={"approximate": "none"},
               functional=F.gelu, description="the exact (erf) nn.GELU",
               derivative=lambda g, v: torch.ops.aten.gelu_backward(g, v),
               needs_pre_activation=True),
    # act'(v) = [act(v) > 0], NaN included (torch's own relu backward reads its output).
    Activation(name="relu", code=1, module=nn.ReLU, functional=F.relu, description="nn.ReLU",
               derivative=lambda g, v: torch.ops.aten.threshold_backward(g, v, 0),
               needs_pre_activation=False),
)

NAMES: tuple[str, ...] = tuple(ACTIVATIONS)
"""The activations' names, in table order."""


def check_act(op: str, act, arg: str = "act") -> Activation:
    """The table entry `act` names; a ValueError naming `op`, the argument `arg`, the value and
    the valid names otherwise (the C++ ops raise the same message)."""
    spec = ACTIVATIONS.get(act) if isinstance(act, str) else None
    if spec is None:
        raise ValueError(f"{op}: {arg} must be one of {NAMES}, got {act!r}")
    return spec


def activation_of_layer(layer) -> Optional[Activation]:
    """The entry whose eager layer `layer` is (a module or a module class), None if none is."""
    return next((a for a in ACTIVATIONS.values() if a.is_layer(layer)), None)
