"""Per-stage roofline counts (convmixer_kernels.benchmarking.roofline.stage_cost) and the summary of a
bench/test_stages.py run (python -m convmixer_kernels.benchmarking.stages_report)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import convmixer_kernels
from convmixer_kernels.benchmarking import roofline
from convmixer_kernels.benchmarking import stages_report

BENCH = Path(__file__).resolve().parents[1] / "bench" / "test_stages.py"
PACKAGE_PARENT = os.path.dirname(os.path.dirname(convmixer_kernels.__file__))


def test_stage_costs_add_up_to_the_block():
    """dw + pw, forward + backward, are the block's FUSED_PASSES_PER_BLOCK activation passes
    and one block's share of step_cost's FLOPs."""
    rows, c, k = 128 * 32 * 32, 768, 7
    dtype = torch.bfloat16
    dw = roofline.stage_cost("dw", "fwd+bwd", rows, c, c, k, dtype)
    pw = roofline.stage_cost("pw", "fwd+bwd", rows, c, c, k, dtype)
    weights = (c * k * k + c * c) * 2 * 3  # read forward, read + gradient written backward
    assert dw.bytes + pw.bytes == roofline.FUSED_PASSES_PER_BLOCK * rows * c * 2 + weights
    step = roofline.step_cost(dim=c, depth=1, kernel_size=k, patch_size=7, batch=128,
                              image_size=224, dtype=dtype)
    assert dw.flops == step.dw_flops and not dw.matrix
    stem = 3 * 2 * rows * c * 3 * 7 ** 2
    assert pw.flops == step.gemm_flops - stem and pw.matrix
    fwd = roofline.stage_cost("pw", "fwd", rows, c, c, k, dtype)
    assert fwd.flops == 2 * rows * c * c and fwd.bytes == (3 * rows * c + c * c) * 2


def test_stage_cost_counts_input_and_output_widths():
    cost = roofline.stage_cost("pw", "fwd", 10, 4, 6, 1, torch.float32)
    assert cost.bytes == (10 * (2 * 4 + 6) + 4 * 6) * 4  # x and residual of 4, out of 6


def _row(group, contender, median_s, cost=None, ceilings=None):
    info = {"contender": contender, "device": "test device", "dtype": "torch.bfloat16"}
    if cost is not None:
        info["stage_cost"] = cost
    if ceilings is not None:
        info["ceilings"] = ceilings
    return {"group": group, "extra_info": info, "stats": {"median": median_s}}


def test_summary_ratios_and_fractions_of_the_floor(tmp_path, capsys):
    cost = {"bytes": 4e9, "flops": 1e12, "matrix": True}
    ceilings = {"bandwidth": 4e12, "matmul_rate": 1e15, "vector_rate": 5e13}  # floor 1 ms
    pw = "pw stage fwd+bwd, test"
    rows = [_row(pw, "fused-cuda", 2e-3, cost, ceilings),
            _row(pw, "eager-nchw", 8e-3, cost, ceilings),
            _row(pw, "eager-channels_last", 5e-3, cost, ceilings),
            _row(pw, "compile", 4e-3, cost, ceilings),
            _row(pw, "matmul", 1.6e-3, cost, ceilings),
            _row("dw stage fwd, test", "fused-triton", 1e-3)]  # no counts recorded
    summary = stages_report.summarize(rows)
    fused = next(r for r in summary[pw] if r["contender"] == "fused-cuda")
    assert fused["vs_eager"] == pytest.approx(2.5)  # best eager layout: channels_last, 5 ms
    assert fused["vs_compile"] == pytest.approx(2.0)
    assert fused["vs_matmul"] == pytest.approx(0.8)
    assert fused["gb_per_s"] == pytest.approx(2000)
    assert fused["hbm_floor"] == pytest.approx(0.5)
    assert fused["roofline"] == pytest.approx(0.5)  # max(1 ms HBM, 1 ms FLOPs) / 2 ms
    assert [r["contender"] for r in summary[pw]][0] == "matmul"  # fastest first
    dw = summary["dw stage fwd, test"][0]
    assert dw["vs_eager"] is None and dw["gb_per_s"] is None

    path = tmp_path / "stages.json"
    path.write_text(json.dumps({"benchmarks": rows}))
    stages_report.main([str(path), "--out", str(tmp_path / "stages.md")])
    printed = capsys.readouterr().out
    assert "| fused-cuda | 2.000 | 2.50x | 2.00x | 0.80x | 2000.0 | 50.0% | 50.0% |" in printed
    assert "| fused-triton | 1.000 | - | - | - | - | - | - |" in printed
    assert printed.startswith("device test device, dtype torch.bfloat16")
    assert (tmp_path / "stages.md").read_text().strip() == printed.strip()


@pytest.mark.skipif(not BENCH.is_file(), reason="needs the source tree's bench/ directory")
def test_report_reads_a_real_stage_benchmark_run(tmp_path):
    """bench/test_stages.py (its pw forward group, on this machine's device) writes what the
    report needs: every contender, the bare GEMM, counts and ceilings. (No bound on the values:
    they are timings, and the ceilings are measured, not true upper bounds.)"""
    pytest.importorskip("pytest_benchmark")
    out = tmp_path / "stages.json"
    # Not as an xdist worker (pytest -n): pytest-benchmark reads PYTEST_XDIST_WORKER and would
    # then refuse --benchmark-only in the child, which is a plain pytest run.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p)
    # cwd outside the source tree, so the subprocess imports the package under test.
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(BENCH), "-q", "-p", "no:cacheprovider",
         "-k", "pw and not bwd", "--benchmark-only", f"--benchmark-json={out}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = stages_report.summarize(stages_report.load(str(out)))
    assert summary  # one group per benchmarked shape
    for group, rows in summary.items():
        assert group.startswith("pw stage fwd,")
        names = {r["contender"] for r in rows}
        assert {"matmul", "eager-nchw", "eager-channels_last"} <= names
        assert any(n.startswith("fused-") for n in names)
        for r in rows:
            for column in ("vs_eager", "vs_matmul", "gb_per_s", "hbm_floor", "roofline"):
                assert r[column] is not None and r[column] > 0, (group, r["contender"], column)
