"""Bytes and FLOPs of a ConvMixer training step, and the time floor they set on a device.

The floor of a step is what the device's ceilings allow for the work it cannot avoid:

    floor = max(bytes / bandwidth,  gemm_flops / matmul_rate + dw_flops / vector_rate)

GEMM FLOPs (the 1×1 convs and the stem, forward, dgrad and wgrad) run on the matrix units; the
depthwise conv's FLOPs (forward, and the two backward convolutions) run on the vector/CUDA
cores. Activation bytes count full passes over an N·H·W·C tensor: ~13 per block for the fused
data flow of docs/DESIGN.md §4 (forward 5, backward 8, as §5 counts them) and ~40 for eager
PyTorch's separate kernels.
Ceilings are measured on the device (a large copy, a large matmul), not read off a datasheet.
The same counts split per stage and pass (stage_cost, stage_floor_seconds) give each row of
bench/test_stages.py its floor. What the CUDA backend moves today, launch by launch, is the ledger
(convmixer_kernels.benchmarking.ledger); StepCost.cuda_bytes is its sum, so the bench can report a
step against both the floor and the implementation's own byte count.

    python -m convmixer_kernels.roofline --model convmixer_1536_20            # work and floor
    python -m convmixer_kernels.roofline --ledger --model convmixer_1536_20   # the CUDA ledger
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass

import torch

from . import ledger

EAGER_PASSES_PER_BLOCK = 40

_DTYPE_BYTES = {torch.float32: 4, torch.float64: 8, torch.bfloat16: 2, torch.float16: 2}


@dataclass
class StepCost:
    gemm_flops: float
    dw_flops: float
    fused_bytes: float   # the fused data flow's floor: FUSED_PASSES_PER_BLOCK per block
    eager_bytes: float
    cuda_bytes: float    # what the CUDA backend moves today (the ledger's passes per block)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Ceilings:
    bandwidth: float    # bytes/s, a large device copy (read + write)
    matmul_rate: float  # FLOP/s, a large matmul in the step's dtype
    vector_rate: float  # FLOP/s, a large float32 matmul with TF32 off: the FMA-unit rate

    def as_dict(self) -> dict:
        return asdict(self)


def step_cost(dim: int, depth: int, kernel_size: int, patch_size: int, batch: int,
              image_size: int, dtype: torch.dtype, in_chans: int = 3,
              act: str = "gelu") -> StepCost:
    """Work of one training step (forward + backward) of a ConvMixer."""
    tokens = (image_size // patch_size) ** 2
    m = batch * tokens                      # rows of the pointwise GEMM
    elem = _DTYPE_BYTES[dtype]
    gemm_per_block = 3 * 2 * m * dim * dim  # forward, dgrad, wgrad
    stem = 3 * 2 * m * dim * in_chans * patch_size ** 2
    dw_per_block = 3 * 2 * m * dim * kernel_size ** 2
    activation = m * dim * elem
    return StepCost(gemm_flops=depth * gemm_per_block + stem,
                    dw_flops=depth * dw_per_block,
                    fused_bytes=depth * FUSED_PASSES_PER_BLOCK * activation,
                    eager_bytes=depth * EAGER_PASSES_PER_BLOCK * activation,
                    cuda_bytes=depth * ledger.passes_per_block(act, dtype != torch.float32,
                                                               kernel_size) * activation)


def kernel_and_patch(model) -> tuple[int, int]:
    """A ConvMixer's depthwise kernel size and patch size."""
    kernel = model.blocks[0][0].fn[0].kernel_size[0] if len(model.blocks) else 1
    return kernel, model.stem[0].kernel_size[0]


def model_cost(model, batch: int, image_size: int, dtype: torch.dtype) -> StepCost:
    kernel, patch = kernel_and_patch(model)
    return step_cost(model.num_features, len(model.blocks), kernel, patch, batch, image_size,
                     dtype, model.stem[0].in_channels, model.act)


# Per stage and pass (bench/test_stages.py): the bytes a fused stage cannot avoid moving, as
# full reads or writes of an activation-sized tensor, [N·H·W, C] rows, plus its weights:
#
#   dw fwd   read x, write out                                              2 passes of C
#   dw bwd   read grad_out and x (a = dwconv(norm(x)) is recomputed), write grad_x      3
#   pw fwd   read x and the residual, write out                  2 of Cin, 1 of Cout
#   pw bwd   read grad_out, x and the residual (u is recomputed), write grad_x and
#            grad_res                                            4 of Cin, 1 of Cout
#
# Square, the two stages add up to FUSED_PASSES_PER_BLOCK (forward 2 + 3, backward 3 + 5).
# The pw stage's saved pre-activation (written by a training forward, read by the backward) is
# an implementation's choice, trading two passes for a GEMM, so it is not part of the floor;
# nor are the per-channel vectors (norms, statistics, bias: O(C) bytes). FLOPs count the
# multiply-adds of the convolutions (2 per tap): forward 1x, backward 2x (dgrad and wgrad),
# on the matrix units for pw, on the vector/CUDA cores for dw, as step_cost does.
STAGE_PASSES = {("dw", "fwd"): (2, 0), ("dw", "bwd"): (3, 0),
                ("pw", "fwd"): (2, 1), ("pw", "bwd"): (4, 1)}  # (passes of Cin, of Cout)
FUSED_PASSES_PER_BLOCK = sum(n_in + n_out for n_in, n_out in STAGE_PASSES.values())


@dataclass
class StageCost:
    bytes: float
    flops: float
    matrix: bool  # whether the FLOPs run on the matrix units (pw) or the vector units (dw)

    def as_dict(self) -> dict:
        return asdict(self)


def stage_cost(stage: str, mode: str, rows: int, cin: int, cout: int, kernel_size: int,
               dtype: torch.dtype) -> StageCost:
    """Unavoidable work of one stage call: `mode` "fwd" or "fwd+bwd", `rows` = N·H·W; for the
    dw stage cout == cin."""
    elem = _DTYPE_BYTES[dtype]
    passes = ("fwd", "bwd") if mode == "fwd+bwd" else (mode,)
    if stage == "dw":
        weight, macs = cin * kernel_size ** 2, rows * cin * kernel_size ** 2
    else:
        weight, macs = cin * cout, rows * cin * cout
    moved, flops = 0.0, 0.0
    for p in passes:
        n_in, n_out = STAGE_PASSES[(stage, p)]
        moved += rows * (n_in * cin + n_out * cout) * elem
        # the weight is read; the backward also writes its gradient
        moved += weight * elem * (1 if p == "fwd" else 2)
        flops += 2 * macs * (1 if p == "fwd" else 2)
    return StageCost(bytes=moved, flops=flops, matrix=stage == "pw")


def stage_floor_seconds(cost: StageCost, ceilings: Ceilings) -> float:
    rate = ceilings.matmul_rate if cost.matrix else ceilings.vector_rate
    return max(cost.bytes / ceilings.bandwidth, cost.flops / rate)


def floor_seconds(cost: StepCost, ceilings: Ceilings, fused: bool = True,
                  moved: float | None = None) -> float:
    """The step's floor: the fused (or eager) data flow's bytes, or `moved` bytes, against the
    compute it cannot avoid."""
    if moved is None:
        moved = cost.fused_bytes if fused else cost.eager_bytes
    compute = cost.gemm_flops / ceilings.matmul_rate + cost.dw_flops / ceilings.vector_rate
    return max(moved / ceilings.bandwidth, compute)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device: torch.device, repeats: int) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_ceilings(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> Ceilings:
    """Bandwidth from a large copy, matrix and vector rates from large matmuls, on `device`."""
    big = device.type == "cuda"
    n_copy = (1 << 28) if big else (1 << 24)          # 1 GiB / 64 MiB of float32
    src = torch.empty(n_copy, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * src.element_size() / _best_time(lambda: dst.copy_(src), device,
                                                                     repeats)
    n = 8192 if big else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    matmul_rate = 2 * n ** 3 / _best_time(lambda: a @ b, device, repeats)
    a32, b32 = a.float(), b.float()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        vector_rate = 2 * n ** 3 / _best_time(lambda: a32 @ b32, device, repeats)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return Ceilings(bandwidth, matmul_rate, vector_rate)


# The sizes the ledger is quoted at (docs/CUDA.md): the paper's ImageNet models at the batch a
# GPU trains them with.
LEDGER_BATCH = {"convmixer_1536_20": 64, "convmixer_768_32": 128}


def main(argv=None) -> None:
    from .. import model as models
    from .cli import DTYPES, MODELS

    p = argparse.ArgumentParser(prog="python -m convmixer_kernels.roofline",
                                description="A ConvMixer training step's work and floor; with "
                                            "--ledger, the CUDA backend's launches per block.")
    p.add_argument("--model", choices=MODELS, default="convmixer_1536_20")
    p.add_argument("--batch-size", type=int,
                   help="default: 64 for convmixer_1536_20, 128 for convmixer_768_32, else 64")
    p.add_argument("--image-size", type=int, help="default: 32 for convmixer_256_8, else 224")
    p.add_argument("--dtype", choices=DTYPES, default="bf16",
                   help="storage dtype (bf16 or fp16: under autocast, as the GPU bench runs)")
    p.add_argument("--ledger", action="store_true",
                   help="print the CUDA ledger of one block; the last two lines are "
                        "'passes per block: N' and 'launches per block: N'")
    args = p.parse_args(argv)
    batch = args.batch_size or LEDGER_BATCH.get(args.model, 64)
    image = args.image_size or (32 if args.model == "convmixer_256_8" else 224)
    dtype = DTYPES[args.dtype]
    with torch.device("meta"):
        shape = getattr(models, args.model)()
    kernel, patch = kernel_and_patch(shape)
    rows = batch * (image // patch) ** 2
    print(f"{args.model} ({shape.act}), batch {batch}, {image}x{image}, {args.dtype}")
    if args.ledger:
        print(ledger.table(shape.num_features, rows, kernel, dtype, shape.act,
                           autocast=dtype != torch.float32, depth=len(shape.blocks)))
        return
    cost = model_cost(shape, batch, image, dtype)
    for name, value in cost.as_dict().items():
        unit = "GFLOP" if name.endswith("flops") else "GB"
        print(f"{name:<12} {value / 1e9:10.1f} {unit}")
