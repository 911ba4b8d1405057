"""The autograd kernels of the fused ops: what torch.library.register_autograd registers, leaner.

register_autograd wraps an op's formula in a generated autograd.Function whose forward, on every
call, rebuilds the argument list from the schema in Python (utils.fill_defaults walks every
schema argument through pybind) and allocates a metadata dataclass; for ops with a dozen
arguments that is tens of microseconds per call, paid twice per stage and step. Our schemas have
no keyword-only arguments and their defaults are read once here, so none of that is needed:
`register_autograd` below registers the same kind of kernel (an Autograd-key kernel that applies
an autograd.Function, which redispatches below autograd) without it. torch.compile and opcheck see exactly what they
see with torch.library's (the same dispatch key, the same Function structure).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import _C
from torch.autograd.function import once_differentiable

_libs: list = []  # keeps the Library fragments (and so the registrations) alive


def _below_autograd(op, keyset, args):
    """The op's kernel below the Autograd key (the backend's)."""
    with _C._AutoDispatchBelowAutograd():
        return op.redispatch(keyset & _C._after_autograd_keyset, *args)


def _register_autograd_kernel(qualname: str, kernel: Callable) -> None:
    namespace, name = qualname.split("::")
    lib = torch.library.Library(namespace, "FRAGMENT")
    lib.impl(name, kernel, "Autograd", with_keyset=True)
    _libs.append(lib)


def schema_defaults(schema) -> tuple:
    """Each argument's default (None where it has none), read from the schema once: what a call
    that leaves trailing arguments out passes, without walking the schema per call."""
    return tuple(a.default_value if a.has_default_value() else None for a in schema.arguments)


def register_autograd(qualname: str, backward: Callable, setup_context: Callable) -> None:
    """Autograd for the op `qualname` ("namespace::name", overload default): `setup_context(ctx,
    inputs, output)` saves what `backward(ctx, *grads)` needs, which returns one gradient (or
    None) per input, as for torch.library.register_autograd; unlike there, the gradient of an
    output that was not differentiated arrives as None."""
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    schema = op._schema
    if any(a.kwarg_only for a in schema.arguments):
        raise ValueError(f"{qualname}: keyword-only arguments are not supported here")

    # The trailing arguments a call may leave out take their defaults (the formulas see every
    # input); the gradients returned are as many as the call gave.
    defaults = schema_defaults(schema)

    def forward(ctx, keyset, *args):
        # Outputs nobody differentiates (pw_stage's pre_act, statistics that feed no norm) reach
        # the backward as None instead of materialised zeros: pre_act alone would cost an
        # activation-sized fill per call. The formulas treat None as zero.
        ctx.set_materialize_grads(False)
        output = _below_autograd(op, keyset, args)
        ctx.num_args = len(args)
        setup_context(ctx, args + defaults[len(args):], output)
        return output

    # The backward ops have no derivative of their own: without this a create_graph backward
    # would give their outputs PyTorch's warn-only fallback node, and a second-order gradient
    # would silently be zero instead of an error.
    @once_differentiable
    def backward_with_keyset(ctx, *grads):
        return (None, *backward(ctx, *grads)[:ctx.num_args])

    # Named as torch.library names its generated Functions, so profiles read the same.
    function = type(f"GeneratedBackwardFor_{namespace}_{name}_default", (torch.autograd.Function,),
                    {"forward": staticmethod(forward),
                     "backward": staticmethod(backward_with_keyset)})

    def kernel(keyset, *args):
        if _C.is_grad_enabled() and _C._any_requires_grad(*args):
            return function.apply(keyset, *args)
        return _below_autograd(op, keyset, args)

    _register_autograd_kernel(qualname, kernel)


def register_no_derivative(qualname: str, use_instead: str) -> None:
    """An Autograd kernel for the op `qualname` that has no derivative of its own (an op that
    mutates cannot carry one; a list-taking op's gradient lives in the autograd.Function that
    calls it): with grad mode on and an input that requires grad it raises, naming
    `use_instead`, where PyTorch's fallback would warn and leave the gradients silently None;
    otherwise it runs the op (as it does inside that Function's forward, where grad mode is off)."""
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default

    def requires_grad(a) -> bool:
        if isinstance(a, torch.Tensor):
            return a.requires_grad
        return isinstance(a, (list, tuple)) and any(requires_grad(t) for t in a)

    def kernel(keyset, *args):
        if _C.is_grad_enabled() and any(requires_grad(a) for a in args):
            raise RuntimeError(f"{qualname} has no derivative of its own and an input requires "
                               f"grad: use {use_instead}, which differentiates it")
        return _below_autograd(op, keyset, args)

    _register_autograd_kernel(qualname, kernel)
