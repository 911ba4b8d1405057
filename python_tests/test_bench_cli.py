"""The README's main command, `python -m convmixer_kernels.bench`, on a tiny configuration."""
import json

from convmixer_kernels import bench


def test_bench_runs_every_contender_and_writes_json(tmp_path, capsys):
    out = tmp_path / "results.json"
    bench.main(["--batch-size", "2", "--image-size", "8", "--steps", "1", "--warmup", "0",
                "--json", str(out)])
    table = capsys.readouterr().out
    for contender in bench.CONTENDERS:
        assert contender in table
    data = json.loads(out.read_text())
    assert [r["contender"] for r in data["results"]] == list(bench.CONTENDERS)
    assert data["environment"]["torch"]
    fused = next(r for r in data["results"] if r["contender"] == "fused")
    eager = next(r for r in data["results"] if r["contender"] == "eager-channels-last")
    assert fused["step_ms"] > 0 and fused["images_per_s"] > 0
    # the fused path saves fewer activation bytes for the backward than eager does
    assert 0 < fused["saved_mb"] < eager["saved_mb"]
