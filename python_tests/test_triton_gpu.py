"""GPU-only checks of the Triton backend: every autotuning configuration compiled and correct,
bfloat16/float16 under the docs/DESIGN.md §6 rule, larger shapes, run-to-run determinism, and
torch.compile (inductor) over ConvMixer(fused=True, backend="triton").

They skip without a CUDA device (the interpreter cannot run bfloat16, compiles nothing, and
cannot expose races between a program's threads, which is what the larger shapes and every
tiling configuration are for).
"""
from __future__ import annotations

import copy

import pytest
import torch

from triton_setup import load_kernels

KERNELS, DEVICE = load_kernels()
pytestmark = pytest.mark.skipif(
    KERNELS is None or DEVICE != "cuda",
    reason=str(DEVICE) if KERNELS is None else "needs a CUDA GPU (compiled Triton kernels)")

from convmixer_kernels import ConvMixer  # noqa: E402
from convmixer_kernels.activations import NAMES  # noqa: E402
from convmixer_kernels.ops import Norm, dw_stage, pw_stage  # noqa: E402
from reference import (LOW_PRECISION, acc_dtype, act_as_decided,  # noqa: E402
                       assert_close_direct, assert_close_rule, ref_dw_stage, ref_pw_stage,
                       stats_of_stored)


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, dtype=torch.float64, generator=gen) * scale).to(dtype)


def make_norm(c, dtype, seed):
    acc = acc_dtype(dtype)
    gen = torch.Generator().manual_seed(seed)
    return Norm((torch.randn(c, dtype=torch.float64, generator=gen) * 0.5).to(acc),
                (torch.rand(c, dtype=torch.float64, generator=gen) + 0.5).to(acc),
                (torch.randn(c, dtype=torch.float64, generator=gen) * 0.5).to(acc))


def dw_inputs(shape, k, dtype, seed=0):
    n, c, h, w = shape
    leaves = [randn(n, c, h, w, dtype=dtype, seed=seed),
              *make_norm(c, dtype, seed + 1),
              randn(c, 1, k, k, dtype=dtype, seed=seed + 2, scale=1.0 / k),
              randn(c, dtype=dtype, seed=seed + 3, scale=0.5)]
    return [t.cuda() for t in leaves]


def dw_call(act, stats, impl):
    def fn(x, m, s, t, w, b):
        if impl == "ref":
            return ref_dw_stage(x, w, b, act=act, x_norm=Norm(m, s, t), stats=stats)
        return dw_stage(x, w, b, act=act, x_norm=Norm(m, s, t), stats=stats, backend="triton")
    return fn


def pw_inputs(shape, dtype, seed=0):
    n, cin, cout, h, w = shape
    leaves = [randn(n, cin, h, w, dtype=dtype, seed=seed), *make_norm(cin, dtype, seed + 1),
              randn(n, cin, h, w, dtype=dtype, seed=seed + 2), *make_norm(cin, dtype, seed + 3),
              randn(cout, cin, 1, 1, dtype=dtype, seed=seed + 4, scale=cin ** -0.5),
              randn(cout, dtype=dtype, seed=seed + 5, scale=0.5)]
    return [t.cuda() for t in leaves]


def pw_call(act, stats, impl):
    def fn(x, xm, xs, xt, r, rm, rs, rt, w, b):
        kw = dict(act=act, stats=stats, x_norm=Norm(xm, xs, xt), residual=r,
                  residual_norm=Norm(rm, rs, rt))
        if impl == "ref":
            return ref_pw_stage(x, w, b, **kw)
        return pw_stage(x, w, b, backend="triton", **kw)
    return fn


def grads_of(fn, leaves, cots):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    outs = fn(*leaves)
    loss = sum((o.to(c.dtype) * c).sum() for o, c in zip(outs, cots))
    return [o.detach() for o in outs], list(torch.autograd.grad(loss, leaves))


def cotangents(out_shape, c, seed=7):
    return [randn(*out_shape, dtype=torch.float64, seed=seed).cuda(),
            randn(c, dtype=torch.float64, seed=seed + 1).cuda(),
            randn(c, dtype=torch.float64, seed=seed + 2).cuda()]


def compare(call, leaves, out_shape, c_out, dtype, act):
    """Outputs and gradients: direct tolerances in float32, the §6 rule in low precision."""
    cots64 = cotangents(out_shape, c_out)
    cots = [c.to(dtype if i == 0 else acc_dtype(dtype)) for i, c in enumerate(cots64)]
    got, grads = grads_of(call(act, True, "triton"), leaves, cots)
    leaves64 = [t.double() for t in leaves]
    if dtype not in LOW_PRECISION:
        ref, ref_grads = grads_of(call(act, True, "ref"), leaves64, cots64)
        assert_close_direct(got[0], ref[0], dtype, name="out")
        for i, (g, r) in enumerate(zip(grads, ref_grads)):
            assert_close_direct(g, r, dtype, name=f"grad[{i}]")
    else:
        eager, eager_grads = grads_of(call(act, True, "ref"), leaves, cots)
        # ReLU: each implementation against float64 under its own on/off decisions (see
        # reference.relu_with_mask), so a flip at 0 does not count as rounding error.
        act64 = act_as_decided(act, got[0])
        act64_e = act_as_decided(act, eager[0])
        ref, ref_grads = grads_of(call(act64, True, "ref"), leaves64, cots64)
        ref_e, ref_grads_e = grads_of(call(act64_e, True, "ref"), leaves64, cots64)
        assert_close_rule(got[0], eager[0], ref[0], name="out", eager_ref64=ref_e[0])
        for i, (g, e, r, r_e) in enumerate(zip(grads, eager_grads, ref_grads, ref_grads_e)):
            assert_close_rule(g, e, r, name=f"grad[{i}]", eager_ref64=r_e)
    acc = acc_dtype(dtype)
    stored_mean, stored_var = stats_of_stored(got[0])
    assert_close_direct(got[1], stored_mean, acc, name="mean (of stored out)")
    assert_close_direct(got[2], stored_var, acc, name="var (of stored out)")


# ---------------------------------------------------------------------------------------------
# Every configuration the autotuner may pick, forced one at a time


def _single_config(monkeypatch, autotuner, config):
    monkeypatch.setattr(autotuner, "configs", [config])
    monkeypatch.setattr(autotuner, "early_config_prune", None)  # the per-dtype tables
    monkeypatch.setattr(autotuner, "cache", {})


@pytest.mark.parametrize("k", [3, 7, 9])
@pytest.mark.parametrize("cls", sorted(KERNELS.dw._TILES) if KERNELS else [32])
def test_every_dw_config(monkeypatch, cls, k):
    bh, bw, bc, nw, maxnreg = KERNELS.dw._TILES[cls]
    monkeypatch.setattr(KERNELS.dw, "CONFIG_OVERRIDE",
                        dict(BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=bc, num_warps=nw, maxnreg=maxnreg))
    shape = (3, 80, 19, 23)  # odd sizes: partial tiles and a partial channel block
    compare(dw_call, dw_inputs(shape, k, torch.float32, seed=k), shape, 80, torch.float32,
            "gelu" if k != 7 else "relu")


@pytest.mark.parametrize("index", range(3))
def test_every_pw_config(monkeypatch, index):
    pw = KERNELS.pw
    for tuner in (pw._fwd, pw._dp, pw._wgrad, pw._dgrad):
        _single_config(monkeypatch, tuner, tuner.configs[min(index, len(tuner.configs) - 1)])
    shape = (3, 200, 136, 13, 11)  # M, Cin, Cout not multiples of any tile
    n, _, cout, h, w = shape
    compare(pw_call, pw_inputs(shape, torch.float32), (n, cout, h, w), cout, torch.float32,
            "gelu")


# ---------------------------------------------------------------------------------------------
# Low precision, larger shapes, determinism


@pytest.mark.parametrize("act", NAMES)
@pytest.mark.parametrize("k", [3, 9])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_dw_stage_low_precision(dtype, k, act):
    shape = (4, 96, 17, 21)
    compare(dw_call, dw_inputs(shape, k, dtype, seed=k), shape, 96, dtype, act)


@pytest.mark.parametrize("act", NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_pw_stage_low_precision(dtype, act):
    shape = (4, 192, 160, 15, 13)
    n, _, cout, h, w = shape
    compare(pw_call, pw_inputs(shape, dtype), (n, cout, h, w), cout, dtype, act)


def test_paper_like_shapes_float32():
    """The CIFAR model's stage shapes at a small batch: ConvMixer-256/8, k5, 16×16 tokens."""
    shape = (8, 256, 16, 16)
    compare(dw_call, dw_inputs(shape, 5, torch.float32), shape, 256, torch.float32, "gelu")
    compare(pw_call, pw_inputs((8, 256, 256, 16, 16), torch.float32), shape, 256,
            torch.float32, "gelu")


def test_deterministic_on_gpu():
    shape = (8, 192, 32, 32)
    leaves = dw_inputs(shape, 9, torch.bfloat16)
    cots = [c.to(torch.bfloat16 if i == 0 else torch.float32)
            for i, c in enumerate(cotangents(shape, 192))]
    first = grads_of(dw_call("gelu", True, "triton"), leaves, cots)
    second = grads_of(dw_call("gelu", True, "triton"), leaves, cots)
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b)
    pw_leaves = pw_inputs((8, 192, 192, 32, 32), torch.bfloat16)
    first = grads_of(pw_call("relu", True, "triton"), pw_leaves, cots)
    second = grads_of(pw_call("relu", True, "triton"), pw_leaves, cots)
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# The model


def _pair(**kwargs):
    cfg = dict(dim=64, depth=2, kernel_size=7, patch_size=4, num_classes=10, act="gelu")
    cfg.update(kwargs)
    eager = ConvMixer(**cfg).cuda()
    fused = ConvMixer(**cfg, fused=True, backend="triton").cuda()
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def _assert_close(a, b, tol, what):
    scale = max(a.detach().abs().max().item(), 1.0)
    err = (a.detach().double() - b.detach().double()).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("act", NAMES)
def test_compiled_fused_model_inductor(act):
    """torch.compile(inductor, fullgraph) over the fused model: the Triton ops stay opaque
    custom ops in the graph; outputs and gradients match eager float32."""
    torch._dynamo.reset()
    eager, fused = _pair(act=act)
    compiled = torch.compile(fused, backend="inductor", fullgraph=True)
    x = randn(8, 3, 64, 64).cuda()
    out_e, out_c = eager(x), compiled(x)
    _assert_close(out_e, out_c, 1e-4, "logits")
    out_e.square().sum().backward()
    out_c.square().sum().backward()
    for (name, p), q in zip(eager.named_parameters(), fused.parameters()):
        _assert_close(p.grad, q.grad, 1e-4, f"grad of {name}")
    for (name, a), b in zip(eager.named_buffers(), fused.buffers()):
        _assert_close(a.double(), b.double(), 1e-4, f"buffer {name}")


def test_bf16_autocast_training_close_to_eager():
    """bf16 autocast: the fused error against a float64 model is at most ~2× eager's (§6),
    and the backward gives finite gradients for every parameter."""
    eager, fused = _pair()
    ref = copy.deepcopy(eager).double()
    x = randn(8, 3, 64, 64).cuda()
    with torch.no_grad():
        truth = ref(x.double())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out_e, out_f = eager(x), fused(x)
    err_e = (out_e.double() - truth).abs().max().item()
    err_f = (out_f.double() - truth).abs().max().item()
    assert err_f <= 2 * err_e + 1e-3, (err_f, err_e)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused(x).float().square().mean().backward()
    for name, p in fused.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
