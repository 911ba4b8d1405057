"""The backends the stage and model tests run on, and how one check runs over all of them.

A check is written once (test_ops.py for the stages, test_model.py for the model) and takes a
`Backend`; `over_backends` parametrizes it with each backend's own cases, so a backend that is
slow here (Triton's interpreter, the CUDA emulation) runs a few small ones and a GPU the big ones,
all through the same assertions. A backend that cannot run on this machine is still collected,
and skips saying why:

| backend    | what runs                                                 | needs               |
|------------|-----------------------------------------------------------|---------------------|
| cpu        | the C++ kernels                                           | -                   |
| triton     | the Triton kernels: under Triton's interpreter on CPU     | triton              |
|            | tensors without a GPU, compiled on CUDA tensors with one  |                     |
| triton-gpu | the Triton kernels compiled for a GPU: what the           | triton and a GPU    |
|            | interpreter cannot do (bfloat16, autotuner configs,       |                     |
|            | races, inductor) and shapes too big for it                |                     |
| cuda       | the CUDA kernels                                          | a GPU, a CUDA build |
| cuda-emu   | the CUDA dw-stage kernels under emulation on the CPU      | a C++ compiler      |
|            | (emulated_cuda.py); dw stage only                         |                     |
"""
from __future__ import annotations

import contextlib
import functools
import re
from typing import Callable, Optional

import pytest
import torch

import emulated_cuda
from convmixer_kernels.ops import available_backends, dw_stage, pw_stage
from cuda_emulation import compiler
from triton_setup import load_kernels

# Before anything imports triton (see triton_setup.py): this module is imported at collection.
TRITON, TRITON_DEVICE = load_kernels()

_ops = torch.ops.convmixer_kernels


def _cuda_skip() -> Optional[str]:
    missing = []
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible")
    if "cuda" not in available_backends():
        missing.append("convmixer_kernels was built without its CUDA kernels")
    if not missing:
        return None
    return ("needs a CUDA GPU and the extension built with CUDA (pip install "
            "--no-build-isolation . on a machine with nvcc and a CUDA torch): "
            + "; ".join(missing))


def _triton_gpu_skip() -> Optional[str]:
    if TRITON is None:
        return str(TRITON_DEVICE)
    return None if TRITON_DEVICE == "cuda" else "needs a CUDA GPU (compiled Triton kernels)"


class Backend:
    """One implementation of the stage ops, with the device its tensors live on."""

    def __init__(self, name: str, device: str, skip: Optional[str], op_backend: Optional[str],
                 dw: Optional[Callable] = None, pw: Optional[Callable] = None,
                 max_error: Optional[dict] = None, raw_suffix: str = "",
                 second_run: Callable = contextlib.nullcontext):
        self.name = name
        self.device = device
        self.skip = skip
        # The ops' and the model's `backend=` (None: not reachable through them).
        self.op_backend = op_backend
        self._stages = {"dw": dw or functools.partial(dw_stage, backend=op_backend),
                        "pw": pw or functools.partial(pw_stage, backend=op_backend)}
        if op_backend is None:  # only the stages it is given
            self._stages = {k: v for k, v in (("dw", dw), ("pw", pw)) if v is not None}
        # An extra bound the backend's results must meet, per dtype: the max error against the
        # float64 reference relative to its largest magnitude (see emulated_cuda.DW_MAX_ERROR).
        self.max_error = max_error
        self._raw_suffix = raw_suffix
        # What the second of two runs that must agree bitwise runs under.
        self.second_run = second_run

    def __repr__(self):
        return self.name

    def stage(self, name: str) -> Callable:
        """dw_stage or pw_stage on this backend: fn(x, weight, bias, **kw) -> (out, mean, var)."""
        if name not in self._stages:
            raise ValueError(f"backend {self.name} has no {name} stage")
        return self._stages[name]

    def raw(self, op: str):
        """The registered op `op` ("dw_stage", "pw_stage_backward", ...) of this backend."""
        if self.op_backend is None:
            raise ValueError(f"backend {self.name} has no registered ops")
        return getattr(_ops, op + self._raw_suffix)


BACKENDS = {b.name: b for b in [
    Backend("cpu", "cpu", None, "cpu"),
    Backend("triton", TRITON_DEVICE if TRITON is not None else "cpu",
            None if TRITON is not None else str(TRITON_DEVICE), "triton", raw_suffix="_triton"),
    Backend("triton-gpu", "cuda", _triton_gpu_skip(), "triton", raw_suffix="_triton"),
    Backend("cuda", "cuda", _cuda_skip(), "cuda"),
    Backend("cuda-emu", "cpu",
            None if compiler() else ("CUDA emulation needs a C++ compiler (g++, or "
                                     "CONVMIXER_EMU_CXX); none found"),
            None, dw=emulated_cuda.dw_stage, pw=None, max_error=emulated_cuda.DW_MAX_ERROR,
            second_run=emulated_cuda.dw_reversed_ctas),
]}


def _id(name: str, value) -> str:
    if value is None:  # no kernel size (a pw case), no pinned tuning: left out
        return "" if name in ("k", "tuning") else "None"
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if name == "k":
        return f"k{value}"
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):
        return "x".join(map(str, value))
    return str(value)


def over_backends(argnames: str = "", **cases):
    """pytest.mark.parametrize("backend," + argnames) with each backend's own cases.

    `cases` maps a backend name (with "_" for "-": cpu, triton, triton_gpu, cuda, cuda_emu) to
    its list of cases, each a tuple of values for `argnames` (a bare value for one name). The
    test receives the Backend; a backend that cannot run here skips its cases, saying why. Ids
    are "<backend>-<values>", without the k or the tuning of a case that has none.
    """
    names = [n.strip() for n in argnames.split(",") if n.strip()]
    params = []
    for key, values in cases.items():
        backend = BACKENDS[key.replace("_", "-")]
        marks = [pytest.mark.skipif(backend.skip is not None, reason=str(backend.skip))]
        for value in values:
            value = tuple(value) if len(names) != 1 else (value,)
            assert len(value) == len(names), (argnames, value)
            parts = [backend.name] + [_id(n, v) for n, v in zip(names, value)]
            params.append(pytest.param(backend, *value, marks=marks,
                                       id="-".join(p for p in parts if p)))
    return pytest.mark.parametrize(",".join(["backend", *names]), params)


ONCE = [()]  # the case list of a check that takes no parameters besides the backend


# Triton dw tilings that cross tile and channel-block borders on the small test images (the
# interpreter's default tile covers a whole test image): 4×8 or 8×8 tiles, 8-channel blocks,
# G = 3 programs per channel block, each walking several tiles.
SMALL_TILES = {"BLOCK_H": 4, "BLOCK_W": 8, "BLOCK_C": 8, "num_warps": 1, "groups": 3}


@contextlib.contextmanager
def tuned(tuning: Optional[str]):
    """Runs the block with the kernels' tuning pinned, by name:

    * "tiles4", "tiles8": the Triton dw kernels on SMALL_TILES with that BLOCK_H;
    * "dw_config<c>": the Triton dw kernels on the table's configuration for dtype class c
      (16, 32 or 64 bits), whatever the tensors' dtype;
    * "pw_config<i>": one Triton autotuner configuration (the i-th, the last one where a kernel
      has fewer, the per-dtype pruning off) for every kernel of the stage, as on a GPU the
      autotuner may pick any of them;
    * "ctas<n>": the emulated CUDA dw plan sized for n CTAs (emulated_cuda.dw_target_ctas);
    * "recompute": the emulated CUDA dw stage keeping neither a nor handing its out to the
      backward, which then recomputes a in two kernels (emulated_cuda.dw_recompute).
    """
    if tuning is None:
        yield
        return
    if tuning == "recompute":
        with emulated_cuda.dw_recompute():
            yield
        return
    kind, n = re.fullmatch(r"([a-z_]+?)(\d+)", tuning).groups()
    n = int(n)
    if kind == "ctas":
        with emulated_cuda.dw_target_ctas(n):
            yield
    elif kind in ("tiles", "dw_config"):
        dw = TRITON.dw
        if kind == "tiles":
            dw.CONFIG_OVERRIDE = dict(SMALL_TILES, BLOCK_H=n)
        else:
            bh, bw, bc, nw, maxnreg = dw._TILES[n]
            dw.CONFIG_OVERRIDE = dict(BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=bc, num_warps=nw,
                                      maxnreg=maxnreg)
        try:
            yield
        finally:
            dw.CONFIG_OVERRIDE = None
    elif kind == "pw_config":
        tuners = (TRITON.pw._fwd, TRITON.pw._dp, TRITON.pw._wgrad, TRITON.pw._dgrad)
        saved = [(t, t.configs, t.cache, t.early_config_prune) for t in tuners]
        try:
            for t in tuners:
                t.configs, t.cache = [t.configs[min(n, len(t.configs) - 1)]], {}
                t.early_config_prune = None  # the per-dtype tables would drop a pinned config
            yield
        finally:
            for t, configs, cache, prune in saved:
                t.configs, t.cache, t.early_config_prune = configs, cache, prune
    else:
        raise ValueError(tuning)
