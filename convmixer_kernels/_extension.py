"""Loads the native extension, which registers the ops under torch.ops.convmixer_kernels."""
import os

import torch


def _missing_extension_message() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    msg = ("convmixer_kernels: the native extension _C is missing. Build it against the torch "
           "you use: 'pip install --no-build-isolation -e .' in the repository root builds it in "
           "place, so the package works from the checkout and from anywhere else.")
    if os.path.exists(os.path.join(root, "setup.py")):
        # Python puts the working directory first on sys.path: run from a checkout, it imports
        # the source tree even when a built copy is installed elsewhere.
        msg += (f" This import came from the source tree {here}, which has no build of its own "
                "(a non-editable 'pip install .' builds only the installed copy).")
    return msg


try:
    from . import _C
except ImportError as exc:  # depends on how the package was installed
    raise ImportError(_missing_extension_message()) from exc

if _C.cpu_isa == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
    raise ImportError(
        "convmixer_kernels was built with AVX2 CPU kernels but this CPU lacks AVX2; rebuild "
        "with CONVMIXER_CPU_ISA=default pip install --no-build-isolation .")

built_with_cuda: bool = _C.built_with_cuda
cpu_isa: str = _C.cpu_isa
