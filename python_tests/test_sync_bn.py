"""Synchronised BatchNorm: 2 gloo processes must equal 1 process on the whole batch.

Two CPU processes (torch.multiprocessing spawn, gloo, a free localhost port) each train a copy
of the model on half the batch under DistributedDataParallel; one process trains the same model
on the whole batch. In float64 the outputs (each rank's rows), the gradients (DDP-averaged), the
parameters after the optimizer steps and every BatchNorm buffer must agree to ~1e-10: the merged
statistics differ from the whole-batch ones only in summation order. Without synchronisation the
same comparison must fail, which shows the test can tell the difference.

One spawn runs every case (starting processes and importing torch dominates the cost).
"""
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from convmixer_kernels import ConvMixer
from convmixer_kernels.sync_batchnorm import SyncBatchNorm2d, merge_batch_stats

WORLD = 2
CFG = dict(dim=8, depth=2, kernel_size=3, patch_size=2, num_classes=4, act="gelu")
BATCH = 4  # 2 per rank
STEPS = 2
UNEVEN = (3, 2)  # rows per rank for the uneven-split case
TOL = 1e-10


def _data(n):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 10, 6, generator=g, dtype=torch.float64)  # 5×3 tokens
    y = torch.randint(0, CFG["num_classes"], (n,), generator=g)
    w = torch.randn(n, CFG["num_classes"], generator=g, dtype=torch.float64)
    return x, y, w


def _model(fused, sync):
    torch.manual_seed(0)
    model = ConvMixer(**CFG, fused=fused).double()
    model.sync_bn = sync
    return model


def _train(model, x, y, wrapped=None):
    """STEPS of SGD; records outputs and (averaged) gradients per step, then the final state."""
    net = wrapped if wrapped is not None else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    record = {"out": [], "grad": []}
    for _ in range(STEPS):
        opt.zero_grad()
        out = net(x)
        F.cross_entropy(out, y).backward()
        record["out"].append(out.detach().clone())
        record["grad"].append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    record["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    return record


def _sum_loss_grads(model, x, w):
    """Gradients of Σ out·w: a loss that adds up over processes whatever their batch sizes."""
    out = model(x)
    (out * w).sum().backward()
    return out.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        results = {}
        x, y, _ = _data(BATCH)
        rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        for name, fused, sync in (("fused_sync", True, True), ("eager_sync", False, True),
                                  ("fused_nosync", True, False)):
            model = _model(fused, sync)
            results[name] = _train(model, x[rows], y[rows], DDP(model))

        # Uneven slices, no DDP: the summed loss makes the all-reduced gradient the full one.
        x, _, w = _data(sum(UNEVEN))
        start = sum(UNEVEN[:rank])
        rows = slice(start, start + UNEVEN[rank])
        model = _model(True, True)
        out, grads = _sum_loss_grads(model, x[rows], w[rows])
        for g in grads.values():
            dist.all_reduce(g)
        results["uneven"] = {"out": out, "grad": grads,
                             "state": {k: v.clone() for k, v in model.state_dict().items()}}

        # fp32 statistics of data far from zero: the merge must keep fp32 precision.
        g = torch.Generator().manual_seed(2)
        values = 1e4 + torch.randn(WORLD, 3, 5000, generator=g, dtype=torch.float64)
        var, mean = torch.var_mean(values[rank].float(), dim=1, correction=0)
        gm, gv, n = merge_batch_stats(mean, var, values.shape[2])
        results["fp32_merge"] = {"mean": gm, "var": gv, "count": n, "values": values}

        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("sync_bn")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def _max_rel_err(a, b):
    scale = max(b.abs().max().item(), 1.0)
    return (a - b).abs().max().item() / scale


def _compare(rank_records, ref, rows_per_rank):
    """Largest relative error of outputs, gradients, parameters and buffers against `ref`."""
    errs = {}
    for r, rec in enumerate(rank_records):
        for step, out in enumerate(rec["out"]):
            ref_rows = ref["out"][step][rows_per_rank[r]]
            errs[f"rank{r} output step {step}"] = _max_rel_err(out, ref_rows)
        for step, grads in enumerate(rec["grad"]):
            for name, g in grads.items():
                errs[f"rank{r} grad {name} step {step}"] = _max_rel_err(g, ref["grad"][step][name])
        for name, v in rec["state"].items():
            errs[f"rank{r} {name}"] = _max_rel_err(v.double(), ref["state"][name].double())
    return errs


def _halves():
    return [slice(r * BATCH // WORLD, (r + 1) * BATCH // WORLD) for r in range(WORLD)]


@pytest.mark.parametrize("name,fused", [("fused_sync", True), ("eager_sync", False)])
def test_two_processes_equal_one_on_whole_batch(ranks, name, fused):
    x, y, _ = _data(BATCH)
    ref = _train(_model(fused, sync=False), x, y)
    errs = _compare([rk[name] for rk in ranks], ref, _halves())
    worst = max(errs, key=errs.get)
    assert errs[worst] <= TOL, f"{name}: {worst} differs by {errs[worst]:.3g}"
    # The running statistics were really updated, from the whole batch's statistics.
    assert ref["state"]["blocks.1.3.num_batches_tracked"].item() == STEPS
    assert errs["rank0 blocks.1.3.running_var"] <= TOL


def test_without_sync_the_processes_differ_from_one(ranks):
    x, y, _ = _data(BATCH)
    ref = _train(_model(True, sync=False), x, y)
    errs = _compare([rk["fused_nosync"] for rk in ranks], ref, _halves())
    # Local statistics of 2 samples are far from those of 4: outputs and buffers move by O(1).
    assert errs["rank0 output step 0"] > 1e-3
    assert errs["rank0 stem.2.running_var"] > 1e-3


def test_uneven_split_statistics_and_backward(ranks):
    x, _, w = _data(sum(UNEVEN))
    model = _model(True, sync=False)
    out, grads = _sum_loss_grads(model, x, w)
    ref = {"out": [out], "grad": [grads], "state": model.state_dict()}
    starts = [sum(UNEVEN[:r]) for r in range(WORLD)]
    rows = [slice(s, s + n) for s, n in zip(starts, UNEVEN)]
    records = [{"out": [rk["uneven"]["out"]], "grad": [rk["uneven"]["grad"]],
                "state": rk["uneven"]["state"]} for rk in ranks]
    errs = _compare(records, ref, rows)
    worst = max(errs, key=errs.get)
    assert errs[worst] <= TOL, f"uneven split: {worst} differs by {errs[worst]:.3g}"


def test_fp32_merge_keeps_precision(ranks):
    rec = ranks[0]["fp32_merge"]
    values = rec["values"].transpose(0, 1).reshape(3, -1)  # channels × all ranks' values
    var, mean = torch.var_mean(values, dim=1, correction=0)
    assert rec["count"].item() == values.shape[1]
    assert torch.allclose(rec["mean"].double(), mean, rtol=1e-6, atol=0)
    # var ≈ 1 at mean 1e4: a raw E[x²]-E[x]² in fp32 would be off by ~1e8·6e-8 ≈ 6 (600%).
    assert torch.allclose(rec["var"].double(), var, rtol=1e-4, atol=0)
    assert torch.equal(ranks[1]["fp32_merge"]["var"], rec["var"])


def test_sync_bn_flag_swaps_modules_and_keeps_tensors():
    model = ConvMixer(**CFG)
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    model.sync_bn = True
    assert model.sync_bn
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 1 + 2 * CFG["depth"] and all(isinstance(m, SyncBatchNorm2d) for m in bns)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
    model.sync_bn = False
    assert not model.sync_bn
    assert not any(isinstance(m, SyncBatchNorm2d) for m in model.modules())
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
    assert ConvMixer(**CFG, sync_bn=True).sync_bn


def test_sync_bn_outside_distributed_is_plain_batchnorm():
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    for fused in (False, True):
        plain = _model(fused, sync=False)
        synced = _model(fused, sync=True)
        assert torch.equal(plain(x), synced(x))
        for (name, a), b in zip(plain.state_dict().items(), synced.state_dict().values()):
            assert torch.equal(a, b), name
