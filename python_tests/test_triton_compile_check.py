"""tools/triton_compile_check.py, the ahead-of-time compile check of the Triton kernels for an
H200 (sm_90a), run the way CI runs it but on a small slice, so that a change that breaks the
check (the launch recording, the keying of compilations, reading ptxas' report) fails here.

The check needs the compiled (not interpreted) kernels, and this test session runs Triton's
interpreter, so it runs in a subprocess with TRITON_INTERPRET unset. CI runs the whole sample
as its own step (.ci/run).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

import convmixer_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "triton_compile_check.py")
# The kernels every launcher path reaches; the tool itself also fails when a module-level
# autotuned kernel is never recorded.
KERNELS = {"_dw_conv_kernel", "_dw_wgrad_kernel", "_pw_fwd_kernel", "_pw_dp_kernel",
           "_pw_wgrad_kernel", "_pw_dgrad_kernel"}

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")


def _run(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # The package under test, wherever this session imported it from (source tree or install).
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(convmixer_kernels.__file__)),
         env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def test_lists_every_kernel():
    proc = _run("--list")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listed = {line.split()[0] for line in proc.stdout.splitlines()[1:] if line.strip()}
    assert listed == KERNELS


def test_compiles_and_reads_ptxas(tmp_path):
    """A few real compilations for sm_90a: compiled, ptxas' report read, checked."""
    out = tmp_path / "result.json"
    proc = _run("--kernel", "_pw_dp_kernel", "--dtype", "float32", "--jobs", "1",
                "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results and all(r["arch"] == "sm_90a" and r["ptxas_seen"] for r in results)
    assert all(r["regs"] > 0 and r["spill_stores"] == 0 and r["smem"] <= 232448
               for r in results)
