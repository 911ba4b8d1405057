"""compute-sanitizer over tools/gpu/sanitize.py's small fused step on the CUDA backend: memcheck (no
out-of-bounds or misaligned access, no device-side fault), racecheck (no shared-memory hazard
between the threads of a CTA: the kernels' __syncthreads placement) and synccheck. (initcheck and
the Triton backend: bash tools/gpu/run_sanitizers.sh OUT_DIR.)

Skips without a CUDA GPU, without the CUDA kernels built, without compute-sanitizer on PATH,
or without the source tree's bench/ directory (the driver script lives there).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import convmixer_kernels
from convmixer_kernels import available_backends

SANITIZER = shutil.which("compute-sanitizer")
SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "gpu" / "sanitize.py"
# The subprocess imports the package under test (the installed one in CI), as the other
# subprocess tests do, not whatever the script's directory would resolve to.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(convmixer_kernels.__file__))


def _skip_reason():
    if not torch.cuda.is_available() or "cuda" not in available_backends():
        return "needs a CUDA GPU and the extension built with CUDA"
    if SANITIZER is None:
        return "compute-sanitizer is not on PATH (it ships with the CUDA toolkit)"
    if not SCRIPT.is_file():
        return f"{SCRIPT} not found (run from a source checkout)"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_sanitizer_reports_no_errors_on_cuda_step(tmp_path, tool):
    log = tmp_path / f"{tool}.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p))
    result = subprocess.run(
        [SANITIZER, "--tool", tool, "--log-file", str(log), "--error-exitcode", "1",
         sys.executable, str(SCRIPT), "--backend", "cuda"],
        capture_output=True, text=True, timeout=1200, env=env)
    report = log.read_text() if log.exists() else ""
    assert result.returncode == 0 and "ERROR SUMMARY: 0 errors" in report, (
        f"exit {result.returncode}\n--- sanitizer report ---\n{report[-6000:]}\n"
        f"--- program output ---\n{result.stdout[-2000:]}{result.stderr[-4000:]}")
