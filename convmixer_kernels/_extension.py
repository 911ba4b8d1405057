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

# The CPU capabilities (as torch names them) that run kernels built for each ISA.
_RUNS_ISA = {"avx2": ("AVX2", "AVX512"), "avx512": ("AVX512",)}
if _C.cpu_isa in _RUNS_ISA and torch.backends.cpu.get_cpu_capability() not in _RUNS_ISA[_C.cpu_isa]:
    raise ImportError(
        f"convmixer_kernels was built with {_C.cpu_isa.upper()} CPU kernels but this CPU lacks "
        f"{_C.cpu_isa.upper()}; rebuild with CONVMIXER_CPU_ISA=avx2 (or default, portable) "
        "pip install --no-build-isolation .")

built_with_cuda: bool = _C.built_with_cuda
cpu_isa: str = _C.cpu_isa
