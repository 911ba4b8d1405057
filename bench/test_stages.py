"""The fused stages against eager PyTorch (NCHW, and channels_last/cuDNN) and torch.compile of
the same eager code, per stage (dw, pw) and pass (fwd, fwd+bwd).

    pytest bench/test_stages.py --benchmark-only --benchmark-json=bench/results/stages.json

On a GPU: the paper models' stage shapes in bfloat16, with one fused contender per backend that
runs CUDA tensors (triton, cuda) plus torch.compile. On a CPU: a small suite, the CIFAR-10
model's stage shape at batch 32 and issue 16's small model's (dim 64) at batch 64, in float32,
fused `cpu` against eager (torch.compile is left out there: Inductor's CPU compile takes minutes
on a small machine).

One pytest-benchmark group per (stage, pass, shape), so each table compares the contenders head
to head, and bench/conftest.py states each row's speed-up over the group's best eager row; every
row records the device, torch (and triton) versions and the shape in extra_info.
"fwd" is a training forward (with batch statistics); "fwd+bwd" adds the backward of a loss on
the output and the statistics. The eager contenders compute exactly what the fused stage does,
one op at a time (norm applied as a separate elementwise pass, as BatchNorm2d would, then the
conv, the activation and var_mean). For the pw stage, "matmul" is the bare GEMMs of the same
shape and nothing else, the yardstick a fused GEMM stage is read against: [N·H·W, C] x [C, C]ᵀ
forward, plus the dgrad and wgrad GEMMs for fwd+bwd.

Every row also records the stage's unavoidable work (convmixer_kernels.benchmarking.roofline.stage_cost:
bytes moved and FLOPs, the same for every contender of a group) and the device's ceilings
measured once per session, so achieved bandwidth and the fraction of the roofline floor can be
read off the JSON:

    python -m convmixer_kernels.benchmarking.stages_report bench/results/stages.json
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from convmixer_kernels.benchmarking import roofline
from convmixer_kernels.activations import ACTIVATIONS
from convmixer_kernels.benchmarking.cli import environment
from convmixer_kernels.ops import Norm, available_backends, dw_stage, pw_stage

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"

# (name, batch, dim, tokens per side, kernel size, act): the stage shapes of the paper's models
# at 224² input (and CIFAR-10's 32², patch 2), at their training batch sizes.
GPU_MODELS = [
    ("convmixer_1536_20", 64, 1536, 32, 9, "gelu"),
    ("convmixer_768_32", 128, 768, 32, 7, "relu"),
    ("convmixer_1024_20_ks9_p14", 128, 1024, 16, 9, "gelu"),
    ("convmixer_256_8", 512, 256, 16, 5, "gelu"),
]
CPU_MODELS = [("convmixer_256_8", 32, 256, 16, 5, "gelu"),
              ("dim64-depth4-k5-p2", 64, 64, 16, 5, "gelu")]  # issue 16's small model
MODELS = GPU_MODELS if GPU else CPU_MODELS
FUSED = [f"fused-{b}" for b in available_backends()
         if b == DEVICE.type or (GPU and b == "triton")]
CONTENDERS = [*FUSED, "eager-nchw", "eager-channels_last", *(["compile"] if GPU else [])]
# The CUDA dw stage's other backward, for GELU: a not kept, the conv recomputed in two kernels
# with dA written between them. ops.dw_stage.keeps_pre_act keeps a at every k on CUDA (one
# kernel, 4 passes fewer) by a count no GPU has checked, while by FMAs the one kernel may be up
# to ~10% slower at k = 9 (docs/CUDA.md "One backward kernel or two"): this row decides.
RECOMPUTE = "fused-cuda-recompute"
# (stage, contender): the bare GEMMs only where the stage is a GEMM.
CASES = [(stage, c) for stage in ("dw", "pw")
         for c in CONTENDERS + (["matmul"] if stage == "pw" else [])
         + ([RECOMPUTE] if stage == "dw" and "fused-cuda" in FUSED else [])]
PASSES = ["fwd", "fwd+bwd"]
DTYPE = torch.bfloat16 if GPU else torch.float32


def _norm_eager(v, norm):
    mean, scale, shift = (t.view(1, -1, 1, 1) for t in norm)
    return ((v.float() - mean) * scale + shift).to(v.dtype)


def eager_dw(x, weight, bias, norm, act):
    out = ACTIVATIONS[act].functional(F.conv2d(_norm_eager(x, norm), weight, bias,
                                               padding=weight.shape[-1] // 2, groups=x.shape[1]))
    var, mean = torch.var_mean(out.float(), dim=(0, 2, 3), unbiased=False)
    return out, mean, var


def eager_pw(x, weight, bias, norm, res, res_norm, act):
    u = _norm_eager(x, norm) + _norm_eager(res, res_norm)
    out = ACTIVATIONS[act].functional(F.conv2d(u, weight, bias))
    var, mean = torch.var_mean(out.float(), dim=(0, 2, 3), unbiased=False)
    return out, mean, var


def _norm(c, device):
    return Norm(torch.randn(c, device=device) * 0.1, torch.rand(c, device=device) + 0.5,
                torch.randn(c, device=device) * 0.1)


def _inputs(stage, batch, dim, side, k, layout):
    fmt = torch.contiguous_format if layout == "nchw" else torch.channels_last
    x = torch.randn(batch, dim, side, side, device=DEVICE, dtype=DTYPE).contiguous(
        memory_format=fmt)
    if stage == "dw":
        weight = torch.randn(dim, 1, k, k, device=DEVICE, dtype=DTYPE) / k
    else:
        weight = torch.randn(dim, dim, 1, 1, device=DEVICE, dtype=DTYPE) * dim ** -0.5
    bias = torch.randn(dim, device=DEVICE, dtype=DTYPE) * 0.1
    extra = {}
    if stage == "pw":
        extra["res"] = torch.randn_like(x)
        extra["res_norm"] = _norm(dim, DEVICE)
    return x, weight, bias, _norm(dim, DEVICE), extra


def bare_gemms(x, weight, grad_out, mode):
    """The pw stage's GEMMs alone, on the same channels_last operands viewed as matrices (no
    copies): forward [M, Cin] x [Cout, Cin]ᵀ; for fwd+bwd also dgrad [M, Cout] x [Cout, Cin]
    and wgrad [M, Cout]ᵀ x [M, Cin]."""
    a = x.detach().permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    w = weight.detach().view(weight.shape[0], weight.shape[1])
    torch.matmul(a, w.t())
    if mode == "fwd+bwd":
        g = grad_out.permute(0, 2, 3, 1).reshape(-1, grad_out.shape[1])
        torch.matmul(g, w)
        torch.matmul(g.t(), a)


@functools.lru_cache(maxsize=None)
def ceilings() -> roofline.Ceilings:
    """This device's bandwidth and FLOP rates, measured once per session."""
    return roofline.measure_ceilings(DEVICE, DTYPE)


def _stage_fn(stage, contender, act):
    if contender == RECOMPUTE:
        def recompute(x, w, b, n):
            out, _, mean, var, *_ = torch.ops.convmixer_kernels.dw_stage(x, *n, w, b, act, True,
                                                                         False)
            return out, mean, var
        return recompute
    if contender.startswith("fused-"):
        backend = contender.split("-", 1)[1]
        if stage == "dw":
            return lambda x, w, b, n: dw_stage(x, w, b, act=act, x_norm=n, backend=backend)
        return lambda x, w, b, n, res, res_norm: pw_stage(
            x, w, b, act=act, x_norm=n, residual=res, residual_norm=res_norm, backend=backend)
    if stage == "dw":
        def fn(x, w, b, n):
            return eager_dw(x, w, b, n, act)
    else:
        def fn(x, w, b, n, res, res_norm):
            return eager_pw(x, w, b, n, res, res_norm, act)
    return torch.compile(fn) if contender == "compile" else fn


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m[0])
@pytest.mark.parametrize("mode", PASSES)
@pytest.mark.parametrize("stage,contender", CASES, ids=lambda v: v)
def test_stage(benchmark, stage, contender, mode, model):
    name, batch, dim, side, k, act = model
    if contender == RECOMPUTE and (mode == "fwd" or act != "gelu"):
        pytest.skip("the recompute differs only in a GELU backward (a forward keeps nothing "
                    "without gradients; ReLU's backward reads its saved out)")
    layout = "nchw" if contender == "eager-nchw" else "channels_last"
    x, weight, bias, norm, extra = _inputs(stage, batch, dim, side, k, layout)
    leaves = [x, weight, bias]
    if mode == "fwd+bwd":
        for t in leaves:
            t.requires_grad_()
        grad_out = torch.randn_like(x)

    if contender == "matmul":
        def run():
            bare_gemms(x, weight, grad_out if mode == "fwd+bwd" else None, mode)
    else:
        fn = _stage_fn(stage, contender, act)

        def run():
            if mode == "fwd":
                with torch.no_grad():
                    fn(*leaves, norm, **extra)
            else:
                out, mean, var = fn(*leaves, norm, **extra)
                torch.autograd.grad((out, mean.sum() + var.sum()), leaves, (grad_out, None))

    def step():
        run()
        if GPU:
            torch.cuda.synchronize()

    step()  # compile, autotune, warm the allocator
    cost = roofline.stage_cost(stage, mode, batch * side * side, dim, dim, k, DTYPE)
    benchmark.group = f"{stage} stage {mode}, {name} ({batch}x{dim}x{side}x{side}, k{k}, {act})"
    benchmark.extra_info.update(environment(DEVICE))
    benchmark.extra_info.update({"stage": stage, "pass": mode, "model": name, "batch": batch,
                                 "dim": dim, "tokens": side, "kernel_size": k, "act": act,
                                 "dtype": str(DTYPE), "contender": contender,
                                 "layout": layout, "stage_cost": cost.as_dict(),
                                 "ceilings": ceilings().as_dict()})
    benchmark.pedantic(step, rounds=20 if GPU else 5, iterations=1, warmup_rounds=3 if GPU else 1)
