"""Runs the torch-free CUDA kernels (csrc/cuda/kernels/*.cuh) on the CPU, for CI without a GPU.

EMULATION, not CUDA: see cuda_emu.h for what it checks (arithmetic, indexing, every thread of every
CTA with real __syncthreads ordering, reads of unwritten shared memory, misaligned vector loads and
out-of-range array indices) and what it cannot (races, concurrency between CTAs, performance,
bit-exact agreement with a GPU where the kernel does not use explicitly rounded intrinsics).

A kernel becomes testable here through a check TU in csrc/cuda/check/ (what nvcc compile-checks
anyway) with an extern "C" entry that takes raw pointers, calls the kernel's launch entry (the one
the torch launcher calls, csrc/cuda/kernels/*_launch.cuh) and returns a cudaError_t as int, like
convmixer_dw_forward in dw_stage_check.cu. Usage from a test:

    lib = load_check_library("dw_stage_check.cu")     # compiled once, cached by content hash
    fn = bind(lib, "convmixer_dw_forward", ctypes.c_int, [ctypes.c_int, ...])
    out = Guarded((rows, channels), torch.float32)    # poisoned bands catch out-of-bounds writes
    assert fn(ptr(x), ptr(out.tensor), ...) == 0
    out.check()

The check TU's extern "C" entry sees host pointers, so CPU tensors' data_ptr() are passed directly.
"""
from __future__ import annotations

import ctypes

import torch

from .build import compiler, load_check_library

__all__ = ["Guarded", "bind", "compiler", "launch_log", "load_check_library", "ptr",
           "reverse_cta_order"]


def bind(lib: ctypes.CDLL, name: str, restype, argtypes: list) -> ctypes._CFuncPtr:
    """lib.name with its C signature declared (ctypes would otherwise pass doubles and 64-bit
    integers wrongly)."""
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = argtypes
    return fn


def ptr(t: torch.Tensor | None) -> ctypes.c_void_p | None:
    """The address of a CPU tensor's first element (None for None, a null pointer)."""
    if t is None:
        return None
    if t.device.type != "cpu":
        raise ValueError(f"the emulation runs on host memory, got a tensor on {t.device}")
    return ctypes.c_void_p(t.data_ptr())


class Guarded:
    """A CPU tensor between two guard bands of 0xFF bytes, which is NaN in every floating dtype.

    A kernel that reads past either end of the tensor then gets NaNs into its results, and one that
    writes there is caught by check(). The tensor itself starts poisoned the same way, so outputs
    the kernel forgets to write stay NaN. `offset` shifts the start by that many elements, to
    place the tensor off a 16-byte boundary (the guard keeps torch's 64-byte allocation alignment).
    """

    GUARD_BYTES = 256

    def __init__(self, shape, dtype: torch.dtype, offset: int = 0):
        itemsize = torch.empty((), dtype=dtype).element_size()
        numel = 1
        for s in shape:
            numel *= s
        self._start = self.GUARD_BYTES + offset * itemsize
        self._end = self._start + numel * itemsize
        self._raw = torch.full((self._end + self.GUARD_BYTES,), 0xFF, dtype=torch.uint8)
        self.tensor = self._raw[self._start:self._end].view(dtype).view(shape)

    @classmethod
    def like(cls, src: torch.Tensor, offset: int = 0) -> "Guarded":
        g = cls(tuple(src.shape), src.dtype, offset)
        g.tensor.copy_(src)
        return g

    def check(self) -> None:
        for name, band in (("before", self._raw[:self._start]), ("after", self._raw[self._end:])):
            bad = (band != 0xFF).nonzero()
            if len(bad):
                raise AssertionError(f"kernel wrote {len(bad)} bytes {name} the buffer "
                                     f"(first at band offset {int(bad[0])})")


def launch_log(lib: ctypes.CDLL, clear: bool = True) -> list[str]:
    """The launches since the last clear, one 'demangled kernel name grid=... block=... smem=...'
    line each (the first call of a library may also see earlier tests' launches: clear first)."""
    lines = lib.convmixer_emu_launch_log().decode().splitlines()
    if clear:
        lib.convmixer_emu_clear_launch_log()
    return lines


class reverse_cta_order:
    """Context manager: run CTAs last-to-first (results must not depend on CTA order)."""

    def __init__(self, lib: ctypes.CDLL):
        self._lib = lib

    def __enter__(self):
        self._lib.convmixer_emu_set_reverse_cta_order(1)

    def __exit__(self, *exc):
        self._lib.convmixer_emu_set_reverse_cta_order(0)
