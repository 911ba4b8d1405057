"""Loads the native extension, which registers the ops under torch.ops.convmixer_kernels."""
import torch

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - depends on how the package was installed
    raise ImportError(
        "convmixer_kernels: the native extension _C is missing. Build it with "
        "'pip install --no-build-isolation .' in the source tree, against the torch you use."
    ) from exc

if _C.cpu_isa == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
    raise ImportError(
        "convmixer_kernels was built with AVX2 CPU kernels but this CPU lacks AVX2; rebuild "
        "with CONVMIXER_CPU_ISA=default pip install --no-build-isolation .")

built_with_cuda: bool = _C.built_with_cuda
cpu_isa: str = _C.cpu_isa
