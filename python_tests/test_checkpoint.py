"""Checkpoints lose nothing: an interrupted and resumed run ends bit-identical to a straight one.

Two epochs straight, against one epoch, a stop, and a resumed second epoch: every parameter and
buffer (BatchNorm running statistics, num_batches_tracked), the optimizer and scheduler state
must be *equal* (torch.equal, not close). Dropout, RandAugment and random erasing are on, so the
RNG states and the (seed, epoch)-derived data order and augmentation all have to be restored.
"""
import json
import random

import numpy as np
import pytest
import torch

from convmixer_kernels.train.checkpoint import (load_checkpoint, rng_state, save_checkpoint,
                                                set_rng_state)
from convmixer_kernels.train.loop import TrainConfig, train


def config(out, **kwargs):
    base = dict(dataset="synthetic", synthetic_size=192, image_size=16, dim=16, depth=2,
                kernel_size=3, patch_size=2, drop_rate=0.3, randaugment=(2, 9), reprob=0.5,
                epochs=2, batch_size=32, workers=0, progress=False, out=str(out))
    base.update(kwargs)
    return TrainConfig(**base)


def assert_states_equal(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_states_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_states_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "epoch_time_s")}
            for r in records]


@pytest.mark.parametrize("fused", [True, False])
def test_interrupted_and_resumed_equals_straight(tmp_path, fused):
    straight = train(config(tmp_path / "straight", fused=fused))
    first = train(config(tmp_path / "resumed", fused=fused, stop_after=1))
    assert len(first) == 1
    second = train(config(tmp_path / "resumed", fused=fused, resume="auto"))
    assert [r["epoch"] for r in second] == [2]

    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for key in ("optimizer", "scheduler", "scaler", "epoch", "step", "rng"):
        assert_states_equal(a[key], b[key], key)
    assert a["model"]["blocks.1.3.num_batches_tracked"].item() == a["step"] == 12
    assert without_timing(straight) == without_timing(first + second)
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert without_timing(json.loads(ln) for ln in lines) == without_timing(straight)


def test_resume_drops_metrics_of_unsaved_epochs_and_finished_run_is_a_no_op(tmp_path):
    train(config(tmp_path, epochs=2, stop_after=1))
    metrics = tmp_path / "metrics.jsonl"
    # As if the run had died after logging epoch 2 (and halfway through another line) but
    # before its checkpoint was written.
    metrics.write_text(metrics.read_text() + json.dumps({"epoch": 2, "stale": True}) + "\n"
                       + '{"epoch": 3, "tor')
    train(config(tmp_path, epochs=2, resume="auto"))
    records = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and "stale" not in records[1]
    before = (tmp_path / "checkpoint.pt").read_bytes()
    assert train(config(tmp_path, epochs=2, resume="auto")) == []
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_resume_refuses_another_runs_checkpoint(tmp_path):
    train(config(tmp_path, epochs=2, stop_after=1))
    with pytest.raises(ValueError, match=r"--epochs 2 \(now 3\); --seed 0 \(now 1\)"):
        train(config(tmp_path, epochs=3, seed=1, resume="auto"))
    with pytest.raises(ValueError, match=r"batch size × processes 32 \(now 64\)"):
        train(config(tmp_path, batch_size=64, resume="auto"))


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        train(config(tmp_path, resume="auto"))
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(RuntimeError, match="cannot be read"):
        load_checkpoint(path)
    torch.save({"something": "else"}, path)
    with pytest.raises(RuntimeError, match="not a convmixer_kernels.train checkpoint"):
        load_checkpoint(path)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.arange(4)})
    good = path.read_bytes()

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 2, "w": torch.arange(8)})
    monkeypatch.undo()
    assert path.read_bytes() == good  # the old checkpoint, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temp left
    assert load_checkpoint(path)["epoch"] == 1


def test_rng_states_round_trip(tmp_path):
    device = torch.device("cpu")
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    save_checkpoint(tmp_path / "c.pt", {"rng": rng_state(device)})
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(9)
    random.seed(9)
    np.random.seed(9)
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"], device)
    t, py, npy = torch.rand(3), random.random(), np.random.rand()
    assert torch.equal(t, expected[0]) and (py, npy) == expected[1:]
