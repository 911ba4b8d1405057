"""The traffic ledger of the CUDA backend: every launch of one ConvMixer block's training step
(forward and backward, batch statistics, the paper's data flow of docs/DESIGN.md §4), with the
bytes it reads and writes and its FLOPs.

It is written from the code (csrc/cuda/*_stage.cu and their launch entries, the model's glue in
convmixer_kernels/model.py, ops/block.py, ops/batch_norm.py, ops/cast.py, csrc/cuda/bn_ops.cu and
csrc/cuda/cat_cast.cu; the BatchNorms' norms and gradients are folded into the stage kernels,
kernels/bn_math.cuh) and kept honest by python_tests/test_ledger.py: the glue's launches (ATen
ops, the BatchNorm ops and the cast) are counted by running blocks under a dispatch counter, the
dw and pw kernels' launches by running the shipped launch entries under the CUDA emulation, and
every kernel the ledger names must exist in csrc/cuda. `roofline.step_cost` takes the
implementation's bytes per block from here (StepCost.cuda_bytes); the ideal floor stays
roofline.STAGE_PASSES.

Units. E is one activation tensor, [N·H·W, dim] in the storage dtype: the block is square, so
every activation-sized read or write is one E. Per-channel vectors ([dim] norms, statistics,
per-CTA partials) are counted as launches, not bytes: at the paper sizes they are under 0.1% of
an E. FLOPs are the convolutions' multiply-adds (2 per tap or per GEMM term); elementwise maths
is left out. Passes are reads plus writes of E.

    python -m convmixer_kernels.roofline --ledger --model convmixer_1536_20
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Launch:
    """One entry: `launches` launches of `kernel` in `phase` ("fwd" or "bwd") of `stage`."""
    stage: str           # "dw", "pw" or "block" (the model's glue around the two stages)
    phase: str
    kernel: str          # the kernel's name in csrc/cuda, or the library call
    launches: int
    reads: float = 0     # in E
    writes: float = 0    # in E
    dw_taps: int = 0     # k*k-tap convolutions over E (forward, dgrad, wgrad or recompute)
    gemms: int = 0       # dim x dim GEMMs over the rows
    note: str = ""

    @property
    def passes(self) -> float:
        return self.reads + self.writes


def keeps_dw_pre_act(act: str, kernel_size: int, autocast: bool) -> bool:
    """Whether the CUDA dw stage keeps its pre-activation in this step: ops.dw_stage.keeps_pre_act
    for the storage dtype (bfloat16 under autocast, else float32)."""
    from ..ops.dw_stage import keeps_pre_act
    return keeps_pre_act(act, kernel_size, torch.bfloat16 if autocast else torch.float32, "cuda")


def block_step(act: str = "gelu", autocast: bool = True, kernel_size: int = 9) -> list[Launch]:
    """The CUDA backend's block step as the code runs it today: batch statistics; the block's dw
    input carries the previous block's BN2 norm, its pw stage BN1 and the residual with that same
    norm (ops.mixer_block); a pw bias; under autocast the weight casts too. The dw stage keeps
    its pre-activation a where keeps_dw_pre_act says (GELU, every k), read in the backward;
    with it (or ReLU's out) the dw backward is one kernel. With a kept, the stages are linked by
    act on load (ops.block.reads_act_on_load): the dw stage writes a alone, and the pw stage's
    prologue and through-norms read gelu(a) where they read g."""
    from ..ops.block import reads_act_on_load
    relu = act == "relu"
    keep = keeps_dw_pre_act(act, kernel_size, autocast)
    on_load = reads_act_on_load(True, keep, "cuda")
    g = "gelu(a) on load" if on_load else "g"
    if relu or keep:
        # dA elementwise in saved tensors: one kernel forms it on load, halo included
        # (csrc/cuda/kernels/dw_backward_fused.cuh).
        dw_backward = [Launch(
            "dw", "bwd", "dw_backward_fused_kernel", 1, reads=3, writes=1, dw_taps=2,
            note="dA = act'(" + ("the saved out" if relu else "the kept a")
                 + ")·(dU·BN1's scale + BN1's gradients) on load over tile and halo (from L2), "
                   "dW, db, dX = transposed conv of dA + dU through BN2_prev; the last CTAs sum "
                   "dW, db and the norm's gradients")]
    else:
        dw_backward = [
            Launch("dw", "bwd", "dw_backward_data_kernel", 1, reads=2, writes=1, dw_taps=2,
                   note="conv recomputed for act', dA, dW partials, dU·BN1's scale on load "
                        "(grad_out_scale), BN1's gradients folded in"),
            Launch("dw", "bwd", "dw_backward_input_kernel", 1, reads=3, writes=1, dw_taps=1,
                   note="dX = transposed conv of dA + dU, through BN2_prev; the last CTAs sum "
                        "dW, db and the norm's gradients"),
        ]
    step = [
        # ---- forward
        Launch("dw", "fwd", "dw_forward_kernel", 1, reads=1,
               writes=2 if keep and not on_load else 1, dw_taps=1,
               note="norm on load, conv, bias, act, per-CTA statistics, BN1's statistics and "
                    "scale, shift by the last CTAs"
                    + ("; a kept for the backward and written alone (act on load)" if on_load
                       else "; a kept for the backward" if keep else "")),
        Launch("pw", "fwd", "pw_prologue_kernel", 1, reads=2, writes=1,
               note=f"u = BN1({g}) + BN2_prev(h), kept for the backward (keep_u)"),
        Launch("pw", "fwd", "cuBLAS addmm", 1, reads=1, writes=1, gemms=1,
               note="pre = u Wᵀ + b"),
        Launch("pw", "fwd", "pw_epilogue_forward_kernel", 1, reads=1, writes=1,
               note="act, per-tile statistics, BN2's statistics and scale, shift by the last "
                    "CTAs; " + (
                   "pre dropped (the backward takes act' from out)" if relu
                   else "pre kept for the backward")),
        # ---- backward, pw stage first
        Launch("pw", "bwd", "pw_epilogue_backward_kernel", 1, reads=2, writes=1,
               note="dP from grad_out, " + ("out" if relu else "pre")
               + " and the statistics' gradients, BN2's folded in; grad_bias by the last CTAs"),
        Launch("pw", "bwd", "cuBLAS mm", 1, reads=2, gemms=1, note="dW = dPᵀ u"),
        Launch("pw", "bwd", "cuBLAS mm", 1, reads=1, writes=1, gemms=1, note="dU = dP W"),
        Launch("pw", "bwd", "pw_through_norms_kernel", 1, reads=2,
               note=f"BN1's Norm gradients (from dU and {g}) by the last CTAs; dU is the "
                    "residual's gradient as it is, and g's (dU·scale) is left to the dw "
                    "backward's load (defer_grad_x)"),
        # ---- backward, dw stage
        *dw_backward,
        # ---- the model's glue (python_tests/test_ledger.py counts it); the BatchNorms' norm
        # and gradients are folded into the stages, their running statistics are step_launches'
    ]
    if autocast:
        step.append(Launch("block", "fwd+bwd", "cat_cast_kernel", 2,
                           note="autocast: the block's weights and biases cast as one buffer, "
                                "the gradients back (ops.cast.cast_params)"))
    return step


# One launch of the running statistics' kernel takes this many BatchNorms (bn_ops.cuh kManyItems).
MANY_ITEMS = 32


def step_launches(depth: int) -> list[Launch]:
    """The launches of a step that belong to no one block: the running statistics of the model's
    2·depth BatchNorms, folded into the stages, updated together after the forward
    (ops.PendingUpdates; one momentum, as the model's BatchNorms have by default)."""
    return [Launch("model", "fwd", "bn_running_stats_many_kernel", -(-2 * depth // MANY_ITEMS),
                   note=f"the running statistics of all {2 * depth} BatchNorms "
                        "(bn_update_running_stats_many)")]


def passes_per_block(act: str = "gelu", autocast: bool = True, kernel_size: int = 9) -> float:
    return sum(entry.passes for entry in block_step(act, autocast, kernel_size))


def launches_per_block(act: str = "gelu", autocast: bool = True, kernel_size: int = 9) -> int:
    return sum(entry.launches for entry in block_step(act, autocast, kernel_size))


def _fmt_number(v: float) -> str:
    return f"{v:g}"


def table(dim: int, rows: int, kernel_size: int, dtype: torch.dtype, act: str = "gelu",
          autocast: bool = True, depth: int = 0) -> str:
    """The ledger at one size, one line per entry, then totals and, for a model `depth` blocks
    deep, the step's own launches; the last two lines are exactly `passes per block: N` and
    `launches per block: N`."""
    elem = torch.empty((), dtype=dtype).element_size()
    e = rows * dim * elem
    taps = 2 * rows * dim * kernel_size ** 2
    gemm = 2 * rows * dim * dim
    head = (f"{'stage':<6}{'phase':<8}{'kernel':<31}{'launches':>9}{'read MB':>10}"
            f"{'write MB':>10}{'GFLOP':>9}  note")
    lines = [head, "-" * len(head)]
    total_r = total_w = total_f = 0.0
    for entry in block_step(act, autocast, kernel_size):
        r, w = entry.reads * e, entry.writes * e
        f = entry.dw_taps * taps + entry.gemms * gemm
        total_r, total_w, total_f = total_r + r, total_w + w, total_f + f
        lines.append(f"{entry.stage:<6}{entry.phase:<8}{entry.kernel:<31}{entry.launches:>9}"
                     f"{r / 1e6:>10.0f}{w / 1e6:>10.0f}{f / 1e9:>9.1f}  {entry.note}")
    lines.append("-" * len(head))
    lines.append(f"{'total per block':<45}{launches_per_block(act, autocast, kernel_size):>9}"
                 f"{total_r / 1e6:>10.0f}{total_w / 1e6:>10.0f}{total_f / 1e9:>9.1f}")
    for entry in step_launches(depth) if depth else ():
        lines.append(f"{'per step, not per block:':<25}{entry.kernel:<29}{entry.launches:>2}  "
                     f"{entry.note}")
    lines.append(f"E = {rows} rows x {dim} channels x {elem} B = {e / 1e6:.0f} MB")
    lines.append(f"passes per block: {_fmt_number(passes_per_block(act, autocast, kernel_size))}")
    lines.append(f"launches per block: {launches_per_block(act, autocast, kernel_size)}")
    return "\n".join(lines)
