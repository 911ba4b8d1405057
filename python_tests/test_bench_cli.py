"""The README's main command, `python -m convmixer_kernels.bench`, on tiny configurations."""
import json

import pytest

from convmixer_kernels.benchmarking import cli
from convmixer_kernels.benchmarking import roofline


def test_bench_runs_every_default_contender_and_writes_results(tmp_path, capsys):
    cli.main(["--batch-size", "2", "--image-size", "8", "--steps", "1", "--warmup", "0",
              "--out", str(tmp_path)])
    table = capsys.readouterr().out
    data = json.loads((tmp_path / "results.json").read_text())
    names = [r["contender"] for r in data["results"]]
    assert names == ["eager-nchw", "eager-channels-last", "fused-cpu"]
    for name in names:
        assert name in table
    assert data["environment"]["torch"] and data["environment"]["git_commit"]
    by_name = {r["contender"]: r for r in data["results"]}
    fused, eager = by_name["fused-cpu"], by_name["eager-channels-last"]
    assert not fused["error"] and fused["step_ms"] > 0 and fused["images_per_s"] > 0
    assert 0 < fused["roofline"] < 1, "a measured step cannot beat its roofline floor"
    assert fused["peak_mb"] > 0
    # the fused path saves fewer activation bytes for the backward than eager does
    assert 0 < fused["saved_mb"] < eager["saved_mb"]
    pytest.importorskip("matplotlib")
    assert (tmp_path / "throughput.png").stat().st_size > 0


def test_bench_reports_a_failing_contender_and_runs_the_others(monkeypatch, capsys):
    real_setup = cli.cont.setup

    def broken(contender, *args, **kwargs):
        if contender == "eager-nchw":
            raise RuntimeError("simulated backend failure")
        return real_setup(contender, *args, **kwargs)

    monkeypatch.setattr("convmixer_kernels.benchmarking.throughput.setup", broken)
    cli.main(["--batch-size", "2", "--image-size", "8", "--steps", "1", "--warmup", "0",
              "--no-memory"])
    table = capsys.readouterr().out
    assert "failed: RuntimeError: simulated backend failure" in table
    assert "fused-cpu" in table


def test_grad_checkpointing_twins_report_the_memory_drop(tmp_path, capsys):
    cli.main(["--batch-size", "2", "--image-size", "16", "--steps", "1", "--warmup", "0",
              "--contenders", "eager-channels-last", "fused-cpu", "--grad-checkpointing",
              "--no-memory", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "results.json").read_text())
    assert [r["contender"] for r in data["results"]] == [
        "eager-channels-last", "eager-channels-last+ckpt", "fused-cpu", "fused-cpu+ckpt"]
    rows = {r["contender"]: r for r in data["grad_checkpointing"]}
    assert set(rows) == {"eager-channels-last", "fused-cpu"}
    for name, row in rows.items():
        plain, ckpt = row["saved_mb"]
        assert 0 < ckpt < plain, name  # only the blocks' inputs are kept
        assert f"grad checkpointing, {name}: peak" in out
    # the speed-up is over plain eager, never over a checkpointed twin
    by_name = {r["contender"]: r for r in data["results"]}
    assert by_name["eager-channels-last"]["speedup"] == 1.0


def test_unknown_contender_is_a_usage_error():
    with pytest.raises(SystemExit):
        cli.main(["--contenders", "fused-nope"])
    with pytest.raises(SystemExit):
        cli.main(["--contenders", "compile+ckpt"])


def test_convergence_curves_agree(tmp_path, capsys):
    cli.main(["--convergence", "--convergence-steps", "40", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "convergence.json").read_text())
    assert len(data["eager"]) == len(data["fused"]) == 40
    assert data["eager"][-1] < data["eager"][0], "the synthetic task must be learnable"
    assert data["agree"], (data["smoothed_gap"], data["noise"])


def test_roofline_counts():
    cost = roofline.step_cost(dim=768, depth=32, kernel_size=7, patch_size=7, batch=128,
                              image_size=224, dtype=roofline.torch.bfloat16)
    m = 128 * 32 * 32
    # docs/DESIGN.md §5: ConvMixer-768/32 batch 128 is ~464 GFLOP of GEMM and ~30 GFLOP of dw
    # per block
    assert cost.gemm_flops / 32 == pytest.approx(3 * 2 * m * 768 * 768, rel=0.01)
    assert 460e9 < 3 * 2 * m * 768 * 768 < 470e9
    assert cost.dw_flops / 32 == pytest.approx(3 * 2 * m * 768 * 49)
    assert cost.fused_bytes / 32 == pytest.approx(13 * m * 768 * 2)


def test_bench_records_how_loaded_the_machine_was(tmp_path, capsys):
    cli.main(["--dim", "16", "--depth", "1", "--batch-size", "2", "--image-size", "8",
              "--steps", "2", "--warmup", "0", "--optimizer", "adamw", "--no-memory",
              "--contenders", "eager-channels-last", "fused-cpu", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "machine load while timing" in out
    assert "dim 16" in out and "adamw" in out
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["config"]["optimizer"] == "adamw" and data["config"]["dim"] == 16
    load = data["load"]
    assert load["cores"] >= 1 and load["threads"] >= 1
    assert set(load["per_contender"]) == {"eager-channels-last", "fused-cpu"}
    assert isinstance(load["trustworthy"], bool) and load["trustworthy"] == (not load["warnings"])
    for r in data["results"]:
        assert len(r["step_cpu_ms"]) == len(r["step_times_ms"]) == 2
        assert r["load"]["wall_s"] > 0 and r["load"]["cpu_s"] > 0
        assert r["step_min_ms"] <= r["step_ms"] <= r["step_max_ms"]


def test_load_assessment_flags_competing_work():
    from convmixer_kernels.benchmarking import load
    cores = load.cores()
    quiet = load.Meter(threads=1, wall_s=1.0, cpu_s=0.95, others_s=0.01 * cores, steal_s=0.0)
    assert load.assess({"fused": quiet}, 1, [0.0, 0.0, 0.0]) == []
    busy = load.Meter(threads=1, wall_s=1.0, cpu_s=0.3, others_s=0.5 * cores, steal_s=0.0)
    warnings = load.assess({"fused": busy}, 1, [cores + 1.0, 0.0, 0.0])
    assert any("other processes used 50%" in w for w in warnings)
    assert any("waited for cores" in w for w in warnings)
    # /proc/stat measured the steps themselves: the load average (which counts the bench's own
    # set-up) is then no warning; without /proc/stat it is.
    assert not any("load average" in w for w in warnings)
    blind = load.Meter(threads=1, wall_s=1.0, cpu_s=0.95, others_s=None, steal_s=None)
    assert load.assess({"fused": blind}, 1, [0.0, 0.0, 0.0]) == []
    assert any("load average" in w for w in load.assess({"fused": blind}, 1, [cores + 1.0, 0, 0]))
