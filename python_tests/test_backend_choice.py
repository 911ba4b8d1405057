"""How a backend is chosen, reported and refused: "auto", the optional triton package, and
Triton's interpreter on CPU tensors.

(The backends' results are test_ops.py's and test_model.py's, over every backend.)
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from backends import TRITON, TRITON_DEVICE

import convmixer_kernels
from convmixer_kernels import ConvMixer, available_backends
from convmixer_kernels.ops import backend, dw_stage

needs_kernels = pytest.mark.skipif(TRITON is None, reason=str(TRITON_DEVICE))
# Subprocesses start in the directory the package under test was imported from, so they import
# that same copy (the installed one in CI), not a source tree without the built extension.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(convmixer_kernels.__file__))


@needs_kernels
def test_triton_is_available_here():
    assert "triton" in available_backends()
    assert backend.resolve("triton", torch.device(TRITON_DEVICE)) == "triton"


def test_auto_prefers_native_kernels():
    assert backend.resolve("auto", torch.device("cpu")) == "cpu"
    # On CUDA tensors: the native CUDA kernels when built, else Triton (device not needed).
    want = "cuda" if "cuda" in backend._AVAILABLE else "triton"
    if want == "triton" and not backend._triton_importable()[0]:
        pytest.skip("triton is not installed")
    assert backend.resolve("auto", torch.device("cuda")) == want


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setattr(backend, "_triton_interpreting", lambda: False)
    if not backend._triton_importable()[0]:
        pytest.skip("triton is not installed")
    x, w = torch.randn(1, 2, 3, 3), torch.randn(2, 1, 3, 3)
    with pytest.raises(RuntimeError, match=r"backend 'triton' runs CPU tensors only under "
                                           r"Triton's interpreter.*TRITON_INTERPRET=1"):
        dw_stage(x, w, backend="triton")
    assert "triton" not in available_backends() or torch.cuda.is_available()


@needs_kernels
def test_raw_triton_op_on_cpu_without_interpreter_is_an_error(monkeypatch):
    from convmixer_kernels.triton import _common
    monkeypatch.setattr(_common, "INTERPRET", False)
    x, w = torch.randn(1, 2, 3, 3), torch.randn(2, 1, 3, 3)
    with pytest.raises(RuntimeError, match="runs CPU tensors only under Triton's interpreter"):
        torch.ops.convmixer_kernels.dw_stage_triton(x, None, None, None, w, None, "gelu", False)


def test_missing_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(backend, "_triton_importable", lambda: (False, "it is not installed"))
    with pytest.raises(RuntimeError, match=r"backend 'triton' needs the triton package.*"
                                           r"pip install triton"):
        ConvMixer(dim=8, depth=1, kernel_size=3, fused=True, backend="triton")
    assert "triton" not in available_backends()


def test_package_imports_without_triton():
    """triton is optional: with it unimportable the package imports, lists no "triton"
    backend, runs the native one, and refuses backend "triton" saying why."""
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # makes `import triton` fail, as when not installed
        import torch
        import convmixer_kernels
        from convmixer_kernels import ConvMixer
        assert "triton" not in convmixer_kernels.available_backends()
        ConvMixer(dim=8, depth=1, kernel_size=3, patch_size=2, fused=True)(torch.randn(2, 3, 8, 8))
        try:
            ConvMixer(dim=8, depth=1, kernel_size=3, fused=True, backend="triton")
        except RuntimeError as exc:
            assert "needs the triton package" in str(exc), exc
        else:
            raise AssertionError("backend='triton' accepted without triton")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, cwd=PACKAGE_PARENT)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr
