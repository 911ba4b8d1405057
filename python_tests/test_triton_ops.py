"""The Triton backend's ops against the eager reference (python_tests/reference.py), docs/OPS.md.

Without a GPU these run under Triton's interpreter on CPU tensors (see triton_setup.py); on a
GPU they run the compiled kernels on CUDA tensors. The interpreter pays per operation, so the
shapes are tiny (C <= 16 for the dw stage, H, W <= 11) and each case checks everything at once:
the outputs, the statistics, and the gradients of every input through sum(outputs ·
cotangents), which routes grad_mean and grad_var through the backward ops.

float32 and float64 compare directly with the float64 reference (reference.DIRECT_TOL);
float16 follows the docs/DESIGN.md §6 rule against eager float16. bfloat16 is GPU-only
(test_triton_gpu.py): the interpreter cannot compute it.
"""
from __future__ import annotations

import re

import pytest
import torch

from triton_setup import load_kernels

KERNELS, DEVICE = load_kernels()
pytestmark = pytest.mark.skipif(KERNELS is None, reason=str(DEVICE))

from convmixer_kernels.activations import NAMES  # noqa: E402
from convmixer_kernels.ops import Norm, dw_stage, pw_stage  # noqa: E402
from reference import (acc_dtype, assert_close_direct, assert_close_rule,  # noqa: E402
                       ref_dw_stage, ref_pw_stage, stats_of_stored, to64)

_ops = torch.ops.convmixer_kernels

# Tilings that cross tile, channel-block and chunk borders on the small test images (the
# interpreter's default tile covers a whole test image): 4×8 tiles, 8-channel blocks, halo'd
# regions processed 32 or 64 pixels at a time (so the last chunk overhangs), G = 3 programs
# per channel block, each walking several tiles.
SMALL_TILES = {"BLOCK_H": 4, "BLOCK_W": 8, "BLOCK_C": 8, "BLOCK_E": 32, "num_warps": 1,
               "groups": 3}


@pytest.fixture
def dw_tiling():
    """Pins the dw kernels' tiling for one test."""
    from convmixer_kernels.triton import dw

    def pin(cfg):
        dw.CONFIG_OVERRIDE = cfg

    yield pin
    dw.CONFIG_OVERRIDE = None


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float32, gen=None, scale=1.0):
    """Drawn in float64 on the CPU and rounded once to `dtype`."""
    return (torch.randn(*shape, dtype=torch.float64, generator=gen) * scale).to(dtype)


def make_norm(c, dtype, gen):
    acc = acc_dtype(dtype)
    return Norm(randn(c, dtype=acc, gen=gen, scale=0.5),
                (torch.rand(c, dtype=torch.float64, generator=gen) + 0.5).to(acc),
                randn(c, dtype=acc, gen=gen, scale=0.5))


def on_device(obj):
    if isinstance(obj, torch.Tensor):
        return obj.to(DEVICE)
    if obj is None:
        return None
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(on_device(v) for v in obj))
    if isinstance(obj, dict):
        return {k: on_device(v) for k, v in obj.items()}
    return type(obj)(on_device(v) for v in obj)


# ---------------------------------------------------------------------------------------------
# Leaves, functions and the comparison


def dw_leaves(shape, k, dtype, seed, with_norm=True, with_bias=True):
    n, c, h, w = shape
    gen = _gen(seed)
    leaves = {"x": randn(n, c, h, w, dtype=dtype, gen=gen),
              "weight": randn(c, 1, k, k, dtype=dtype, gen=gen, scale=1.0 / k)}
    if with_bias:
        leaves["bias"] = randn(c, dtype=dtype, gen=gen, scale=0.5)
    if with_norm:
        leaves.update(zip(("x_mean", "x_scale", "x_shift"), make_norm(c, dtype, gen)))
    return leaves


def dw_fn(act, stats, impl):
    def fn(x, weight, bias=None, x_mean=None, x_scale=None, x_shift=None):
        norm = Norm(x_mean, x_scale, x_shift) if x_mean is not None else None
        if impl == "ref":
            outs = ref_dw_stage(x, weight, bias, act=act, x_norm=norm, stats=stats)
        else:
            outs = dw_stage(x, weight, bias, act=act, x_norm=norm, stats=stats, backend="triton")
        return outs if stats else outs[:1]
    return fn


PW_PARTS = {
    "plain": (),
    "bias": ("bias",),
    "norm_bias": ("x_norm", "bias"),
    "residual": ("residual",),
    "norm_residual": ("x_norm", "residual"),
    "residual_norm": ("residual", "residual_norm"),
    "both_norms_bias": ("x_norm", "residual", "residual_norm", "bias"),
}


def pw_leaves(shape, dtype, variant, seed):
    n, cin, cout, h, w = shape
    parts = PW_PARTS[variant]
    gen = _gen(seed)
    leaves = {"x": randn(n, cin, h, w, dtype=dtype, gen=gen),
              "weight": randn(cout, cin, 1, 1, dtype=dtype, gen=gen, scale=cin ** -0.5)}
    if "bias" in parts:
        leaves["bias"] = randn(cout, dtype=dtype, gen=gen, scale=0.5)
    if "x_norm" in parts:
        leaves.update(zip(("x_mean", "x_scale", "x_shift"), make_norm(cin, dtype, gen)))
    if "residual" in parts:
        leaves["residual"] = randn(n, cin, h, w, dtype=dtype, gen=gen)
    if "residual_norm" in parts:
        leaves.update(zip(("r_mean", "r_scale", "r_shift"), make_norm(cin, dtype, gen)))
    return leaves


def pw_fn(act, stats, impl):
    def fn(x, weight, bias=None, x_mean=None, x_scale=None, x_shift=None, residual=None,
           r_mean=None, r_scale=None, r_shift=None):
        kw = dict(act=act, stats=stats, residual=residual,
                  x_norm=Norm(x_mean, x_scale, x_shift) if x_mean is not None else None,
                  residual_norm=Norm(r_mean, r_scale, r_shift) if r_mean is not None else None)
        if impl == "ref":
            outs = ref_pw_stage(x, weight, bias, **kw)
        else:
            outs = pw_stage(x, weight, bias, backend="triton", **kw)
        return outs if stats else outs[:1]
    return fn


def run_with_grads(fn, leaves, cotangents):
    """Outputs of fn(**leaves) and the gradients of Σ outputs · cotangents w.r.t. each leaf."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    outs = fn(**leaves)
    loss = sum((o.to(c.dtype) * c).sum() for o, c in zip(outs, cotangents))
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return [o.detach() for o in outs], dict(zip(leaves, grads))


def cotangents(out_shape, c, stats, seed, device):
    gen = _gen(seed)
    cots = [randn(*out_shape, dtype=torch.float64, gen=gen)]
    if stats:
        cots += [randn(c, dtype=torch.float64, gen=gen), randn(c, dtype=torch.float64, gen=gen)]
    return [t.to(device) for t in cots]


def check_against_reference(fn, leaves, out_shape, c_out, stats, dtype, seed=0):
    """The Triton op's outputs, statistics and gradients against the float64 reference."""
    got, grads = run_with_grads(fn("triton"), on_device(leaves),
                                cotangents(out_shape, c_out, stats, seed, DEVICE))
    ref, ref_grads = run_with_grads(fn("ref"), to64(leaves),
                                    cotangents(out_shape, c_out, stats, seed, "cpu"))
    out = got[0].cpu()
    assert out.dtype == dtype and out.shape == out_shape
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    if dtype == torch.float16:  # docs/DESIGN.md §6: at most 2x eager float16's error
        eager, eager_grads = run_with_grads(fn("ref"), leaves,
                                            cotangents(out_shape, c_out, stats, seed, "cpu"))
        assert_close_rule(out, eager[0], ref[0], name="out")
        for name, g in grads.items():
            assert_close_rule(g.cpu(), eager_grads[name], ref_grads[name], name=f"grad {name}")
    else:
        assert_close_direct(out, ref[0], dtype, name="out")
        for name, g in grads.items():
            assert g.dtype == leaves[name].dtype and g.shape == leaves[name].shape, name
            assert_close_direct(g.cpu(), ref_grads[name], dtype, name=f"grad {name}")
    if stats:
        acc = acc_dtype(dtype)
        mean, var = got[1].cpu(), got[2].cpu()
        assert mean.dtype == acc and var.dtype == acc and mean.shape == (c_out,)
        # docs/OPS.md: the statistics of `out` as stored, accumulated in `acc`.
        stored_mean, stored_var = stats_of_stored(out)
        assert_close_direct(mean, stored_mean, acc, name="mean (of stored out)")
        assert_close_direct(var, stored_var, acc, name="var (of stored out)")
    else:
        assert len(got) == 1


# ---------------------------------------------------------------------------------------------
# dw stage


# (shape, k, act, stats): k in {3, 7, 9}, both activations, training and eval; odd,
# non-square images; C = 12 or 6 leaves lanes of the 16-channel block masked; H = 9 crosses the
# interpreter's 8-row tile.
DW_CASES = [
    ((3, 12, 9, 5), 3, "gelu", True),
    ((3, 12, 9, 5), 3, "relu", False),
    ((2, 6, 7, 11), 7, "relu", True),
    ((2, 6, 7, 11), 7, "gelu", False),
    ((2, 6, 9, 7), 9, "gelu", True),
    ((4, 6, 5, 3), 9, "relu", True),  # k larger than H and W: every tap a border tap
]


@pytest.mark.parametrize("case", DW_CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-k{c[1]}-"
                         f"{c[2]}-{'train' if c[3] else 'eval'}")
def test_dw_stage_matches_reference(case):
    shape, k, act, stats = case
    leaves = dw_leaves(shape, k, torch.float32, seed=k)
    check_against_reference(lambda impl: dw_fn(act, stats, impl), leaves, shape, shape[1],
                            stats, torch.float32, seed=k)


@pytest.mark.parametrize("k,act,block_e", [(3, "gelu", 32), (5, "relu", 64)])
def test_dw_stage_across_tiles(dw_tiling, k, act, block_e):
    """Halos crossing tile borders, channel blocks, persistent programs walking several tiles,
    Chan merges across tiles and programs, dW partials accumulated over tiles."""
    dw_tiling(dict(SMALL_TILES, BLOCK_E=block_e))
    shape = (2, 12, 6, 11)
    leaves = dw_leaves(shape, k, torch.float32, seed=20 + k)
    check_against_reference(lambda impl: dw_fn(act, True, impl), leaves, shape, 12, True,
                            torch.float32, seed=k)


@pytest.mark.parametrize("with_norm,with_bias", [(False, False), (False, True), (True, False)])
def test_dw_stage_optional_inputs(with_norm, with_bias):
    shape = (2, 5, 4, 6)
    leaves = dw_leaves(shape, 3, torch.float32, seed=3, with_norm=with_norm, with_bias=with_bias)
    check_against_reference(lambda impl: dw_fn("gelu", True, impl), leaves, shape, 5, True,
                            torch.float32)


def test_dw_stage_float64():
    shape = (2, 5, 6, 7)
    leaves = dw_leaves(shape, 5, torch.float64, seed=4)
    check_against_reference(lambda impl: dw_fn("gelu", True, impl), leaves, shape, 5, True,
                            torch.float64)


def test_dw_stage_float16():
    shape = (2, 12, 7, 9)
    leaves = dw_leaves(shape, 3, torch.float16, seed=5)
    check_against_reference(lambda impl: dw_fn("gelu", True, impl), leaves, shape, 12, True,
                            torch.float16)


# ---------------------------------------------------------------------------------------------
# pw stage

# (N, Cin, Cout, H, W): Cin = 40 takes three 16-wide K blocks, Cout = 36 three N blocks, and
# M = 105 rows four 32-row M-tiles and two wgrad splits under the interpreter.
PW_SHAPE = (3, 40, 36, 5, 7)


@pytest.mark.parametrize("stats", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", NAMES)
@pytest.mark.parametrize("variant", ["both_norms_bias", "norm_residual"])
def test_pw_stage_matches_reference(variant, act, stats):
    leaves = pw_leaves(PW_SHAPE, torch.float32, variant, seed=len(variant))
    n, _, cout, h, w = PW_SHAPE
    check_against_reference(lambda impl: pw_fn(act, stats, impl), leaves, (n, cout, h, w), cout,
                            stats, torch.float32, seed=1)


@pytest.mark.parametrize("variant", ["plain", "bias", "norm_bias", "residual", "residual_norm"])
def test_pw_stage_variants(variant):
    shape = (2, 12, 10, 3, 5)
    leaves = pw_leaves(shape, torch.float32, variant, seed=2)
    check_against_reference(lambda impl: pw_fn("gelu", True, impl), leaves, (2, 10, 3, 5), 10,
                            True, torch.float32)


def test_pw_stage_float64():
    shape = (2, 12, 10, 5, 7)
    leaves = pw_leaves(shape, torch.float64, "both_norms_bias", seed=3)
    check_against_reference(lambda impl: pw_fn("relu", True, impl), leaves, (2, 10, 5, 7), 10,
                            True, torch.float64)


def test_pw_stage_float16():
    leaves = pw_leaves(PW_SHAPE, torch.float16, "both_norms_bias", seed=4)
    n, _, cout, h, w = PW_SHAPE
    check_against_reference(lambda impl: pw_fn("gelu", True, impl), leaves, (n, cout, h, w), cout,
                            True, torch.float16)


def test_pw_stage_backward_recomputes_pre_act():
    """Without pre_act the backward recomputes p with the forward GEMM: bitwise the same."""
    lv = on_device(pw_leaves(PW_SHAPE, torch.float32, "both_norms_bias", seed=5))
    args = (lv["x"], lv["x_mean"], lv["x_scale"], lv["x_shift"], lv["residual"], lv["r_mean"],
            lv["r_scale"], lv["r_shift"], lv["weight"], lv["bias"])
    out, pre, mean, _ = _ops.pw_stage_triton(*args, "gelu", True, True)
    gen = _gen(6)
    go = on_device(randn(*out.shape, gen=gen))
    gm, gv = on_device((randn(36, gen=gen), randn(36, gen=gen)))
    kept = _ops.pw_stage_backward_triton(go, gm, gv, *args, pre, mean, "gelu")
    recomputed = _ops.pw_stage_backward_triton(go, gm, gv, *args, None, mean, "gelu")
    for a, b in zip(kept, recomputed):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Numerics, determinism, edge cases


def test_statistics_of_large_offset():
    """|mean| >> std: the shifted two-level moments keep the variance (docs/DESIGN.md §6)."""
    gen = _gen(7)
    n, c, h, w = 3, 5, 9, 11
    x = randn(n, c, h, w, gen=gen, scale=1e-2)
    weight = torch.zeros(c, 1, 3, 3)
    weight[:, :, 1, 1] = 1.0
    bias = torch.full((c,), 1000.0)
    out, mean, var = dw_stage(*on_device((x, weight, bias)), act="relu", backend="triton")
    stored_mean, stored_var = stats_of_stored(out.cpu())
    torch.testing.assert_close(var.cpu().double(), stored_var, rtol=1e-3, atol=0)
    torch.testing.assert_close(mean.cpu().double(), stored_mean, rtol=1e-6, atol=0)
    # and the pw stage's epilogue: a 1×1 identity plus the same offset
    pw_w = torch.eye(c).view(c, c, 1, 1)
    out, mean, var = pw_stage(*on_device((x, pw_w, bias)), act="relu", backend="triton")
    stored_mean, stored_var = stats_of_stored(out.cpu())
    torch.testing.assert_close(var.cpu().double(), stored_var, rtol=1e-3, atol=0)


def test_deterministic(dw_tiling):
    """No float atomics: two runs give bitwise the same outputs, statistics and gradients."""
    dw_tiling(SMALL_TILES)
    shape = (2, 12, 5, 9)
    leaves = on_device(dw_leaves(shape, 3, torch.float32, seed=8))
    cots = cotangents(shape, 12, True, 0, DEVICE)
    first = run_with_grads(dw_fn("gelu", True, "triton"), leaves, cots)
    second = run_with_grads(dw_fn("gelu", True, "triton"), leaves, cots)
    for a, b in zip(first[0], second[0]):
        assert torch.equal(a, b)
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name]), name


def test_nan_propagates():
    gen = _gen(9)
    x = randn(2, 4, 5, 6, gen=gen)
    x[0, 1, 2, 3] = float("nan")
    weight = randn(4, 1, 3, 3, gen=gen, scale=0.3)
    out, mean, var = dw_stage(*on_device((x, weight)), act="relu", backend="triton")
    ref, ref_mean, ref_var = ref_dw_stage(x.double(), weight.double(), act="relu")
    assert torch.equal(torch.isnan(out.cpu()), torch.isnan(ref))
    assert torch.equal(torch.isnan(mean.cpu()), torch.isnan(ref_mean))
    assert torch.equal(torch.isnan(var.cpu()), torch.isnan(ref_var))


def test_empty_batch():
    x = torch.zeros(0, 4, 5, 6, device=DEVICE)
    weight = torch.ones(4, 1, 3, 3, device=DEVICE, requires_grad=True)
    out, mean, var = dw_stage(x, weight, act="gelu", stats=True, backend="triton")
    assert out.shape == x.shape and torch.isnan(mean).all() and torch.isnan(var).all()
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    pw_w = torch.ones(3, 4, 1, 1, device=DEVICE, requires_grad=True)
    out, mean, var = pw_stage(x, pw_w, act="relu", stats=False, backend="triton")
    assert out.shape == (0, 3, 5, 6) and mean.shape == (0,)
    out.sum().backward()
    assert torch.equal(pw_w.grad, torch.zeros_like(pw_w))


# ---------------------------------------------------------------------------------------------
# The registered ops: opcheck (schema, fake, autograd registration, AOT dispatch), strides


def _raw_dw_args(stats):
    lv = on_device(dw_leaves((2, 5, 4, 6), 3, torch.float32, seed=10))
    return (lv["x"].requires_grad_(), lv["x_mean"], lv["x_scale"], lv["x_shift"],
            lv["weight"].requires_grad_(), lv["bias"], "gelu", stats)


def _raw_pw_args(keep_pre_act):
    lv = on_device(pw_leaves((2, 5, 4, 3, 6), torch.float32, "both_norms_bias", seed=11))
    return (lv["x"].requires_grad_(), lv["x_mean"], lv["x_scale"], lv["x_shift"],
            lv["residual"], lv["r_mean"], lv["r_scale"], lv["r_shift"],
            lv["weight"].requires_grad_(), lv["bias"], "relu", True, keep_pre_act)


@pytest.mark.parametrize("stats", [True, False])
def test_opcheck_dw_stage_triton(stats):
    torch.library.opcheck(_ops.dw_stage_triton.default, _raw_dw_args(stats))


@pytest.mark.parametrize("keep_pre_act", [True, False])
def test_opcheck_pw_stage_triton(keep_pre_act):
    torch.library.opcheck(_ops.pw_stage_triton.default, _raw_pw_args(keep_pre_act))


def test_opcheck_backward_ops_triton():
    x, m, s, t, w, b, act, _ = (a.detach() if isinstance(a, torch.Tensor) else a
                                for a in _raw_dw_args(True))
    out, mean, _ = _ops.dw_stage_triton(x, m, s, t, w, b, act, True)
    gen = _gen(12)
    go = on_device(randn(*out.shape, gen=gen))
    gm, gv = on_device((randn(5, gen=gen), randn(5, gen=gen)))
    torch.library.opcheck(_ops.dw_stage_backward_triton.default,
                          (go, gm, gv, x, m, s, t, w, b, mean, act))
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in _raw_pw_args(True)]
    out, pre, mean, _ = _ops.pw_stage_triton(*args)
    go = on_device(randn(*out.shape, gen=gen))
    gm, gv = on_device((randn(4, gen=gen), randn(4, gen=gen)))
    torch.library.opcheck(_ops.pw_stage_backward_triton.default,
                          (go, gm, gv, *args[:10], pre, mean, args[10]))


@pytest.mark.parametrize("act", ["swish", "GELU", ""])
def test_raw_ops_refuse_an_unknown_act(act):
    """An `act` the table lacks is a ValueError naming the op, the value and the activations in
    every raw op, before any kernel runs: never another activation's kernels."""
    def refused(op):
        return pytest.raises(ValueError,
                             match=rf"^{op}: act must be one of {re.escape(str(NAMES))}, got "
                                   rf"{re.escape(repr(act))}$")

    x, m, s, t, w, b, good, _ = (a.detach() if isinstance(a, torch.Tensor) else a
                                 for a in _raw_dw_args(True))
    out, mean, _ = _ops.dw_stage_triton(x, m, s, t, w, b, good, True)
    with refused("dw_stage"):
        _ops.dw_stage_triton(x, m, s, t, w, b, act, True)
    with refused("dw_stage_backward"):
        _ops.dw_stage_backward_triton(torch.ones_like(out), None, None, x, m, s, t, w, b, mean,
                                      act)
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in _raw_pw_args(True)]
    out, pre, mean, _ = _ops.pw_stage_triton(*args)
    with refused("pw_stage"):
        _ops.pw_stage_triton(*args[:10], act, *args[11:])
    with refused("pw_stage_backward"):
        _ops.pw_stage_backward_triton(torch.ones_like(out), None, None, *args[:10], pre, mean,
                                      act)


def test_meta_outputs_match_real():
    """The shared fake implementations give the shapes, dtypes and strides the kernels give."""
    lv = dw_leaves((2, 5, 6, 7), 3, torch.float32, seed=13)
    norm = Norm(lv["x_mean"], lv["x_scale"], lv["x_shift"])
    real = dw_stage(*on_device((lv["x"], lv["weight"], lv["bias"])), x_norm=on_device(norm),
                    backend="triton")
    meta = dw_stage(*(t.to("meta") for t in (lv["x"], lv["weight"], lv["bias"])),
                    x_norm=Norm(*(t.to("meta") for t in norm)), backend="triton")
    for r, m in zip(real, meta):
        assert m.device.type == "meta"
        assert (m.shape, m.dtype, m.stride()) == (r.shape, r.dtype, r.stride())


def test_layouts_give_the_same_result():
    """NCHW, channels_last and strided views of x: the kernels read NHWC; values identical."""
    lv = on_device(pw_leaves((2, 12, 5, 7, 5), torch.float32, "both_norms_bias", seed=14))
    x, res = lv["x"], lv["residual"]
    kw = dict(x_norm=Norm(lv["x_mean"], lv["x_scale"], lv["x_shift"]),
              residual_norm=Norm(lv["r_mean"], lv["r_scale"], lv["r_shift"]), backend="triton")
    base = pw_stage(x.contiguous(), lv["weight"], lv["bias"], residual=res, **kw)
    views = [(x.contiguous(memory_format=torch.channels_last), res),
             (x.transpose(2, 3).contiguous().transpose(2, 3),
              res.contiguous(memory_format=torch.channels_last))]
    for xv, rv in views:
        got = pw_stage(xv, lv["weight"], lv["bias"], residual=rv, **kw)
        for g, b in zip(got, base):
            assert torch.equal(g, b)
    w = on_device(randn(12, 1, 3, 3, gen=_gen(15), scale=0.3))
    base = dw_stage(x.contiguous(), w, backend="triton")
    got = dw_stage(x.contiguous(memory_format=torch.channels_last), w, backend="triton")
    for g, b in zip(got, base):
        assert torch.equal(g, b)


def test_raw_ops_reject_bad_shapes():
    """Direct torch.ops calls are checked before any kernel touches memory."""
    x = torch.zeros(2, 4, 5, 5, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight must be \[4, 1, k, k\]"):
        _ops.dw_stage_triton(x, None, None, None, torch.zeros(3, 1, 3, 3, device=DEVICE), None,
                             "gelu", True)
    with pytest.raises(ValueError, match="kernel size must be odd"):
        _ops.dw_stage_triton(x, None, None, None, torch.zeros(4, 1, 4, 4, device=DEVICE), None,
                             "gelu", True)
    with pytest.raises(ValueError, match="must be given together"):
        _ops.dw_stage_triton(x, torch.zeros(4, device=DEVICE), None, None,
                             torch.zeros(4, 1, 3, 3, device=DEVICE), None, "gelu", True)
    with pytest.raises(ValueError, match="res must have shape"):
        _ops.pw_stage_triton(x, None, None, None, torch.zeros(2, 4, 5, 4, device=DEVICE), None,
                             None, None, torch.zeros(3, 4, 1, 1, device=DEVICE), None, "relu",
                             True, False)
    with pytest.raises(ValueError, match="grad_var needs the forward's mean"):
        _ops.dw_stage_backward_triton(x, None, torch.zeros(4, device=DEVICE), x, None, None,
                                      None, torch.zeros(4, 1, 3, 3, device=DEVICE), None, None,
                                      "gelu")
    with pytest.raises(ValueError, match="act must be one of"):
        _ops.pw_stage_triton(x, None, None, None, None, None, None, None,
                             torch.zeros(3, 4, 1, 1, device=DEVICE), None, "tanh", True, False)
