"""Which implementation runs an op: the backend names and their availability."""
from __future__ import annotations

import torch

from .. import _extension  # noqa: F401  (the registrations _native_has looks for)

# The C++ extension registers its kernels under torch.ops.convmixer_kernels, per dispatch key:
# "cpu" and "cuda" are the same ops, their implementations chosen by the tensors' device.
BACKENDS = ("auto", "cpu", "cuda")
_NATIVE_OPS = ("dw_stage", "dw_stage_backward", "pw_stage", "pw_stage_backward")


def _native_has(dispatch_key: str) -> bool:
    return all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"convmixer_kernels::{op}", dispatch_key)
        for op in _NATIVE_OPS)


# Fixed once the extension is loaded; a constant, so torch.compile traces the checks for free.
_AVAILABLE = tuple(name for name, key in (("cpu", "CPU"), ("cuda", "CUDA")) if _native_has(key))


def available_backends() -> list[str]:
    """The concrete backends this build can run."""
    return list(_AVAILABLE)


def check_backend(backend: str) -> None:
    """Raises ValueError for an unknown backend, RuntimeError for one this build lacks."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto" and backend not in _AVAILABLE:
        raise RuntimeError(
            f"backend {backend!r} is not available in this build of convmixer_kernels "
            f"(available: {available_backends()}); the CUDA kernels are compiled only when "
            "torch has CUDA and nvcc is found at install time")


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend that runs tensors on `device`."""
    check_backend(backend)
    if device.type == "meta":
        return backend if backend != "auto" else "cpu"
    if backend == "auto":
        if device.type in _AVAILABLE:
            return device.type
        raise RuntimeError(
            f"no convmixer_kernels backend runs tensors on {device}; available: "
            f"{available_backends()}")
    if backend != device.type:
        raise ValueError(f"backend {backend!r} cannot run tensors on {device}")
    return backend
