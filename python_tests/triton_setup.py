"""Loads convmixer_kernels' Triton kernels for the test_triton_* modules.

triton.jit decides whether a kernel is compiled for a GPU or run by Triton's CPU interpreter
when the kernel is *defined*, reading TRITON_INTERPRET then; triton.language's own helpers
(tl.sum, tl.cdiv, ...) are defined when triton is imported, and triton reads the variable again
at the first launch. So on a machine without a GPU it must be set before triton's first import
and stay set. convmixer_kernels never imports triton on its own (only on the first use of
backend "triton"; availability is probed with find_spec), so the test modules call
load_kernels() at collection time, before any test runs: it sets TRITON_INTERPRET=1 for the
process when there is no GPU and the variable is unset (an explicit value is respected), then
imports the kernels. That works whatever order pytest imports test modules in and whether or
not the variable is exported; the rest of the session is unaffected (inductor's CPU backend
does not use Triton). It fails, and the tests skip saying why, only if something imported
triton earlier in the process without the variable.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import torch

_MODULE = "convmixer_kernels.triton"


def load_kernels():
    """(convmixer_kernels.triton, device to test on) or (None, reason to skip)."""
    if importlib.util.find_spec("triton") is None:
        return None, "triton is not installed (pip install triton)"
    if ("triton" not in sys.modules and not torch.cuda.is_available()
            and "TRITON_INTERPRET" not in os.environ):
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        module = importlib.import_module(_MODULE)
    except ImportError as exc:
        return None, f"convmixer_kernels.triton does not import: {exc}"
    if module.INTERPRET:
        return module, "cpu"
    if torch.cuda.is_available():
        return module, "cuda"
    return None, ("no GPU, and triton was imported without TRITON_INTERPRET=1 (it is set to a "
                  "false value, or triton was imported earlier in this process without it)")
