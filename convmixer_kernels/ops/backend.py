"""Which implementation runs an op: the backend names and their availability."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import torch

from .. import _extension  # noqa: F401  (the registrations _native_has looks for)

# The C++ extension registers its kernels under torch.ops.convmixer_kernels, per dispatch key:
# "cpu" and "cuda" are the same ops, their implementations chosen by the tensors' device.
# "triton" is the Triton kernels (convmixer_kernels/triton), registered as the separate ops
# convmixer_kernels::*_triton: CUDA tensors, or CPU tensors under Triton's interpreter.
BACKENDS = ("auto", "cpu", "cuda", "triton")
_NATIVE_OPS = ("dw_stage", "dw_stage_backward", "pw_stage", "pw_stage_backward")
_TRITON_MODULE = "convmixer_kernels.triton"


def _native_has(dispatch_key: str, ops=_NATIVE_OPS) -> bool:
    return all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"convmixer_kernels::{op}", dispatch_key)
        for op in ops)


def native_devices(ops) -> dict:
    """Device type -> whether the extension has kernels for every op of `ops` there ("meta":
    the fake implementations), for the glue ops that fall back to ATen elsewhere. Fixed once the
    extension is loaded: a constant, so torch.compile traces the lookups for free."""
    return {"cpu": _native_has("CPU", ops), "cuda": _native_has("CUDA", ops), "meta": True}


# Fixed once the extension is loaded; a constant, so torch.compile traces the checks for free.
_AVAILABLE = tuple(name for name, key in (("cpu", "CPU"), ("cuda", "CUDA")) if _native_has(key))


def _triton_importable() -> tuple[bool, str]:
    """Whether the triton package is there: (ok, why not). Found without importing it, so that
    importing convmixer_kernels or asking for the available backends never imports triton (an
    optional dependency, and one whose interpreter mode is fixed by the environment at import)."""
    if sys.modules.get("triton") is not None or importlib.util.find_spec("triton") is not None:
        return True, ""
    return False, "it is not installed"


def _triton_interpreting() -> bool:
    """Whether the Triton kernels run (or, once imported, will run) under the interpreter.

    triton.jit reads TRITON_INTERPRET when a kernel is defined, so once convmixer_kernels.triton
    is imported its mode is fixed and is the answer; before that, the environment is.
    """
    module = sys.modules.get(_TRITON_MODULE)
    if module is not None:
        return module.INTERPRET
    if sys.modules.get("triton") is not None:  # its own jit functions fixed the mode at import
        return type(sys.modules["triton"].language.cdiv).__name__ == "InterpretedFunction"
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")


def triton_kernels():
    """The Triton kernels module, imported on first use (this defines the kernels)."""
    ok, why = _triton_importable()
    if not ok:
        raise RuntimeError(_triton_missing(why))
    try:
        return importlib.import_module(_TRITON_MODULE)
    except ImportError as exc:
        raise RuntimeError(_triton_missing(f"{type(exc).__name__}: {exc}")) from exc


def _triton_missing(why: str) -> str:
    return (f"backend 'triton' needs the triton package, which could not be used ({why}); "
            "install it with pip install triton (or convmixer-kernels[triton])")


def available_backends() -> list[str]:
    """The concrete backends this build and environment can run."""
    names = list(_AVAILABLE)
    if _triton_importable()[0] and (torch.cuda.is_available() or _triton_interpreting()):
        names.append("triton")
    return names


def check_backend(backend: str) -> None:
    """Raises ValueError for an unknown backend, RuntimeError for one this build lacks."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "triton":
        # Under torch.compile this was checked when the model was built, and the op checks it
        # again when it runs; the traced code stays free of module lookups.
        if not torch.compiler.is_compiling():
            ok, why = _triton_importable()
            if not ok:
                raise RuntimeError(_triton_missing(why))
        return
    if backend != "auto" and backend not in _AVAILABLE:
        # Lists the build's native backends only: whether "triton" also runs depends on the
        # environment, not on the build, and is reported by available_backends().
        raise RuntimeError(
            f"backend {backend!r} is not available in this build of convmixer_kernels "
            f"(available: {list(_AVAILABLE)}); the CUDA kernels are compiled only when "
            "torch has CUDA and nvcc is found at install time")


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend that runs tensors on `device`."""
    check_backend(backend)
    if device.type == "meta":
        return backend if backend != "auto" else "cpu"
    if backend == "auto":
        if device.type in _AVAILABLE:
            return device.type
        # On CUDA the native kernels are the default when built and Triton's the fallback;
        # which of the two is faster per stage and shape is for bench/test_stages.py to
        # measure, and this order is to follow those measurements.
        if device.type == "cuda" and (torch.compiler.is_compiling() or _triton_importable()[0]):
            return "triton"
        raise RuntimeError(
            f"no convmixer_kernels backend runs tensors on {device}; available: "
            f"{available_backends()}")
    if backend == "triton":
        return _resolve_triton(device)
    if backend != device.type:
        raise ValueError(f"backend {backend!r} cannot run tensors on {device}")
    return backend


def _triton_recording() -> bool:
    """convmixer_kernels.triton.recording() is on: the launchers record CPU tensors' launches
    for a GPU instead of running anything (compile_plan, tools/triton_compile_check.py)."""
    common = sys.modules.get(_TRITON_MODULE + "._common")
    return common is not None and common._RECORDING is not None


def _resolve_triton(device: torch.device) -> str:
    if device.type == "cuda":
        return "triton"
    if device.type != "cpu":
        raise ValueError(f"backend 'triton' cannot run tensors on {device}")
    # Under torch.compile, as in check_backend: the kernels' launcher checks at run time.
    if torch.compiler.is_compiling() or _triton_interpreting() or _triton_recording():
        return "triton"
    raise RuntimeError(
        "backend 'triton' runs CPU tensors only under Triton's interpreter: set "
        "TRITON_INTERPRET=1 before triton is first imported (e.g. before starting Python), "
        "move the tensors to a CUDA device, or use backend 'cpu'")


def define_triton_op(name: str) -> None:
    """Defines convmixer_kernels::{name}_triton with the schema of the native op `name` (so the
    two cannot drift apart), implemented for CPU and CUDA tensors by the function of the same
    name in convmixer_kernels.triton, with the output's BatchNorm fold composed around it
    (bn_fold.py)."""
    schema = str(getattr(torch.ops.convmixer_kernels, name).default._schema)
    qualname = f"convmixer_kernels::{name}_triton"
    torch.library.define(qualname, schema[schema.index("("):])
    from .bn_fold import composed  # the stage's BatchNorm fold, which the Triton functions lack

    run = composed(name, lambda *args: getattr(triton_kernels(), name)(*args))
    torch.library.impl(qualname, ("cpu", "cuda"), run)
