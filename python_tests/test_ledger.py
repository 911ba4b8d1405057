"""The CUDA traffic ledger (convmixer_kernels.benchmarking.ledger) against the code it describes:
the model glue's launches counted by running blocks under a dispatch counter, every kernel it
names present in csrc/cuda, and the CLI's last two lines."""
from __future__ import annotations

import collections
import pathlib
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from convmixer_kernels import ConvMixer
from convmixer_kernels.benchmarking import ledger, roofline
from convmixer_kernels.roofline import main as roofline_main

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The stage ops, whose launches the emulation tests below count; everything else is glue (the
# BatchNorm ops and the cast, ops of our own, included: one kernel each, named by GLUE_KERNELS).
STAGE_OPS = ("convmixer_kernels.dw_stage", "convmixer_kernels.pw_stage")
GLUE_KERNELS = {"convmixer_kernels.bn_scale_shift.default": "bn_scale_shift_kernel",
              "convmixer_kernels.bn_scale_shift_backward.default": "bn_scale_shift_backward_kernel",
              "convmixer_kernels.bn_update_running_stats.default": "bn_running_stats_kernel",
              "convmixer_kernels.bn_update_running_stats_many.default":
                  "bn_running_stats_many_kernel",
              "convmixer_kernels.bn_train_norm.default": "bn_train_norm_kernel",
              "convmixer_kernels.cat_cast.default": "cat_cast_kernel"}


# Ops that allocate and launch nothing.
_ALLOCATIONS = ("aten.empty.", "aten.new_empty.", "aten.empty_strided.", "aten.empty_like.")


class _Launches(TorchDispatchMode):
    """Counts the ops that reach a backend kernel outside the stage ops: a view, a detach or an
    allocation launches nothing, every other op is at least one launch on a GPU."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if not (func.is_view or name.startswith(STAGE_OPS) or name.startswith(_ALLOCATIONS)):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def _glue_ops(depth: int, autocast: bool) -> collections.Counter:
    torch.manual_seed(0)
    model = ConvMixer(dim=16, depth=depth, kernel_size=5, patch_size=2, num_classes=10,
                      fused=True).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 16, 16)
    with _Launches() as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(x).float().sum()
        loss.backward()
    return counter.ops


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast"])
def test_glue_launches_per_block_match_the_ledger(autocast):
    """One block more adds exactly the ledger's glue launches (its "block" entries): the glue is
    Python, the same on every backend, so the CPU run counts what a GPU would launch."""
    two, three = _glue_ops(2, autocast), _glue_ops(3, autocast)
    per_block = {op: three[op] - two[op] for op in three if three[op] != two[op]}
    glue = [e for e in ledger.block_step("gelu", autocast) if e.stage == "block"]
    assert sum(per_block.values()) == sum(e.launches for e in glue), per_block
    # the glue ops of our own (BatchNorm, the cast), kernel by kernel
    ours = collections.Counter({GLUE_KERNELS[op]: n for op, n in per_block.items()
                                if op.startswith("convmixer_kernels.")})
    assert ours == collections.Counter({e.kernel: e.launches for e in glue
                                        if e.kernel.endswith("_kernel")}), per_block


@pytest.mark.parametrize("depth", [2, 3])
def test_step_launches_match_the_ledger(depth):
    """The glue of a step that no block owns: the running statistics of all the folded
    BatchNorms in the ledger's launches, after the forward (none per block, above)."""
    ops = _glue_ops(depth, autocast=False)
    for entry in ledger.step_launches(depth):
        op = next(op for op, kernel in GLUE_KERNELS.items() if kernel == entry.kernel)
        assert ops[op] == entry.launches, ops
    assert ledger.step_launches(16)[0].launches == 1 and ledger.step_launches(20)[0].launches == 2
    header = (ROOT / "csrc" / "cuda" / "kernels" / "bn_ops.cuh").read_text()
    assert int(re.search(r"kManyItems = (\d+);", header).group(1)) == ledger.MANY_ITEMS


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_every_kernel_named_exists(act):
    source = "\n".join(p.read_text() for p in (ROOT / "csrc" / "cuda").rglob("*.cu*"))
    for entry in ledger.block_step(act) + ledger.step_launches(20):
        if entry.kernel.endswith("_kernel"):
            assert re.search(rf"\b{entry.kernel}\s*[<(]", source), entry.kernel


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_passes_add_up(act):
    step = ledger.block_step(act)
    fwd = sum(e.passes for e in step if e.phase == "fwd")
    assert ledger.passes_per_block(act) == fwd + sum(e.passes for e in step if e.phase != "fwd")
    # the implementation cannot move less than the fused data flow's floor
    assert ledger.passes_per_block(act) >= roofline.FUSED_PASSES_PER_BLOCK


def test_step_cost_takes_the_ledgers_bytes():
    cost = roofline.step_cost(dim=768, depth=32, kernel_size=7, patch_size=7, batch=128,
                              image_size=224, dtype=torch.bfloat16)
    activation = 128 * 32 * 32 * 768 * 2
    assert cost.cuda_bytes == 32 * ledger.passes_per_block("gelu", kernel_size=7) * activation
    assert cost.fused_bytes == 32 * roofline.FUSED_PASSES_PER_BLOCK * activation


@pytest.mark.parametrize("model,act,k,rows", [("convmixer_1536_20", "gelu", 9, 64 * 32 * 32),
                                              ("convmixer_768_32", "relu", 7, 128 * 32 * 32)])
def test_cli_ends_with_the_two_totals(capsys, model, act, k, rows):
    """The model's activation and kernel size, the issue's batch (64 for 1536/20, 128 for
    768/32)."""
    roofline_main(["--ledger", "--model", model])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2] == f"passes per block: {ledger.passes_per_block(act, kernel_size=k):g}"
    assert lines[-1] == f"launches per block: {ledger.launches_per_block(act, kernel_size=k)}"
    assert f"E = {rows} rows x " in lines[-3]


def test_bench_table_shows_the_own_floor_only_when_measured():
    from convmixer_kernels.benchmarking.cli import format_table
    from convmixer_kernels.benchmarking.throughput import Result

    eager = Result("eager-channels-last", step_ms=10.0, roofline=0.2)
    assert "of own" not in format_table([eager])
    cuda = Result("fused-cuda", step_ms=5.0, roofline=0.4, roofline_own=0.7)
    table = format_table([eager, cuda])
    assert "of own" in table and "70.0%" in table.splitlines()[-1]


def _kernels_launched(log: list[str]) -> collections.Counter:
    return collections.Counter(re.search(r"(\w+_kernel)\b", line).group(1) for line in log)


def _ledger_kernels(stage: str, act: str, **kw) -> collections.Counter:
    counts = collections.Counter()
    for entry in ledger.block_step(act, **kw):
        if entry.stage == stage and entry.kernel.endswith("_kernel"):
            counts[entry.kernel] += entry.launches
    return counts


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_dw_kernel_launches_match_the_ledger(act):
    """The shipped dw launch entries under emulation (python_tests/cuda_emulation): one block's
    forward with statistics and backward with a norm, the residual's gradient, (ReLU) the saved
    output and the pre-activation where the CUDA policy keeps it, launch exactly the ledger's dw
    kernels (float32 storage: the ledger without autocast)."""
    emulated_cuda = pytest.importorskip("emulated_cuda")
    from cuda_emulation import compiler, launch_log
    if compiler() is None:
        pytest.skip("the CUDA emulation needs a C++ compiler")
    kernels = emulated_cuda.dw_kernels()
    gen = torch.Generator().manual_seed(0)
    n, c, h, w, k = 2, 40, 9, 9, 9
    x = torch.randn(n, c, h, w, generator=gen)
    norm = (torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5,
            torch.randn(c, generator=gen))
    weight = torch.randn(c, 1, k, k, generator=gen) * 0.1
    bias = torch.randn(c, generator=gen)
    keep = ledger.keeps_dw_pre_act(act, k, autocast=False)
    assert keep == (act == "gelu")
    launch_log(kernels.lib)
    out, mean, _, *pre = kernels.forward(x, norm, weight, bias, act, stats=True,
                                         keep_pre_act=keep)
    kernels.backward(torch.randn_like(out), torch.randn(c), torch.randn(c), mean, x, norm, weight,
                     bias, act, out=out if act == "relu" else None, grad_res=torch.randn_like(x),
                     pre_act=pre[0] if keep else None)
    assert _kernels_launched(launch_log(kernels.lib)) == _ledger_kernels(
        "dw", act, autocast=False, kernel_size=k)


def test_pw_kernel_launches_match_the_ledger():
    """The shipped pw launch entries under emulation, in the order the launcher runs them for one
    block (forward with statistics; backward on the forward's u (keep_u), the bias's and the norms'
    gradients finalized by the kernels' last CTAs), launch exactly the ledger's pw kernels (the
    GEMMs are cuBLAS's, not emulated)."""
    pytest.importorskip("emulated_cuda")
    from cuda_emulation import compiler, launch_log
    if compiler() is None:
        pytest.skip("the CUDA emulation needs a C++ compiler")
    from test_cuda_emulation_pw import PwKernels
    kernels = PwKernels()
    gen = torch.Generator().manual_seed(1)
    rows, c = 130, 40

    def vec():
        return torch.rand(c, generator=gen) + 0.5

    x, res = torch.randn(rows, c, generator=gen), torch.randn(rows, c, generator=gen)
    nx, nr = (vec(), vec(), vec()), (vec(), vec(), vec())
    pre = torch.randn(rows, c, generator=gen)
    launch_log(kernels.lib)
    kernels.prologue(x, nx, res, nr)
    _, mean, _ = kernels.epilogue_forward(pre, "gelu", stats=True)
    forward = _kernels_launched(launch_log(kernels.lib))
    kernels.epilogue_backward(torch.randn_like(pre), pre, vec(), vec(), mean, "gelu")
    kernels.through_norms(torch.randn_like(x), x, nx, res, nr, True, True)
    backward = _kernels_launched(launch_log(kernels.lib))
    ledger_fwd, ledger_bwd = collections.Counter(), collections.Counter()
    for entry in ledger.block_step("gelu"):
        if entry.stage == "pw" and entry.kernel.endswith("_kernel"):
            (ledger_fwd if entry.phase == "fwd" else ledger_bwd)[entry.kernel] += entry.launches
    assert forward == ledger_fwd
    assert backward == ledger_bwd
