"""The trainer under torchrun's environment: 2 gloo processes × batch B against 1 process × 2B.

Each spawned process gets the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) and runs the command line, so the trainer sets up the process group,
DDP and synchronised BatchNorm itself. Global batches, augmentation and BatchNorm statistics do
not depend on the number of processes, so the two runs compute the same training up to float32
summation order: after a dozen AdamW steps the parameters agree to ~1e-6 relative (measured
6.6e-7; the tolerance is 1e-4), the metrics to ~1e-7. With BatchNorm statistics kept local
(--no-sync-bn) they differ by ~4e-2.
"""
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from convmixer_kernels.train.checkpoint import load_checkpoint
from convmixer_kernels.train.cli import main

ARGS = ["--dataset", "synthetic", "--synthetic-size", "192", "--image-size", "16", "--dim", "16",
        "--depth", "2", "--kernel-size", "3", "--epochs", "2", "--workers", "0", "--no-progress",
        "--randaugment", "1,5"]
BATCH = 16  # per process
TOL = 1e-4


def _worker(rank, port, out, extra):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    main([*ARGS, "--batch-size", str(BATCH), "--out", out, "--device", "cpu", *extra])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(out):
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    for name, extra in (("sync", []), ("nosync", ["--no-sync-bn"])):
        mp.spawn(_worker, args=(_free_port(), str(root / name), extra), nprocs=2, join=True)
    main([*ARGS, "--batch-size", str(2 * BATCH), "--out", str(root / "single"), "--device", "cpu"])
    return root


def _max_rel_err(a, b):
    errs = {}
    for k, v in a.items():
        if v.is_floating_point():
            scale = max(b[k].abs().max().item(), 1.0)
            errs[k] = (v - b[k]).abs().max().item() / scale
        else:
            assert torch.equal(v, b[k]), k
    return errs


def test_two_processes_train_like_one_with_the_global_batch(runs):
    two = load_checkpoint(runs / "sync" / "checkpoint.pt")
    one = load_checkpoint(runs / "single" / "checkpoint.pt")
    assert two["step"] == one["step"] == 12 and two["config"]["batch_size"] == BATCH
    assert len(two["rng"]) == 2  # each process's RNG state is kept
    errs = _max_rel_err(two["model"], one["model"])
    worst = max(errs, key=errs.get)
    assert errs[worst] < TOL, f"{worst} differs by {errs[worst]:.3g}"
    for a, b in zip(_records(runs / "sync"), _records(runs / "single")):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_local_batchnorm_statistics_train_differently(runs):
    errs = _max_rel_err(load_checkpoint(runs / "nosync" / "checkpoint.pt")["model"],
                        load_checkpoint(runs / "single" / "checkpoint.pt")["model"])
    assert max(errs.values()) > 100 * TOL
