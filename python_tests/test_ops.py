"""The fused ops against the eager reference (python_tests/reference.py), docs/OPS.md.

Forward values in float64/float32 (direct tolerances) and bfloat16/float16 (the docs/DESIGN.md §6
rule), float64 gradcheck of every differentiable input, float32 gradients, opcheck of the four
raw ops, determinism, NaN propagation and empty batches.
"""
from __future__ import annotations

import pytest
import torch

from convmixer_kernels.activations import NAMES
from convmixer_kernels.ops import Norm, dw_stage, pw_stage
from reference import (LOW_PRECISION, acc_dtype, act_as_decided, assert_close,
                       assert_close_direct, assert_close_rule, has_decisions, ref_dw_stage,
                       ref_pw_stage, stats_of_stored, to64)

_ops = torch.ops.convmixer_kernels

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
KERNELS = [1, 3, 5, 7, 9, 15]
ACTS = list(NAMES)
# (N, C, H, W): odd, non-square spatial sizes; C not a multiple of 8 or 32 (and 40 > one
# 32-lane channel block of the CPU dw kernel); the last has H and W smaller than most kernels.
DW_SHAPES = [(2, 5, 7, 11), (3, 12, 9, 5), (2, 40, 3, 5)]
# (N, Cin, Cout, H, W)
PW_SHAPES = [(2, 5, 12, 7, 11), (3, 40, 12, 5, 3), (2, 12, 40, 9, 1)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float32, gen=None, scale=1.0):
    """Random values drawn in float64 and rounded once to `dtype`, so every dtype sees the same
    data up to rounding."""
    return (torch.randn(*shape, dtype=torch.float64, generator=gen) * scale).to(dtype)


def make_norm(c: int, dtype: torch.dtype, gen) -> Norm:
    """A BatchNorm-like norm: mean O(0.5), scale in [0.5, 1.5], shift O(0.5)."""
    acc = acc_dtype(dtype)
    return Norm(randn(c, dtype=acc, gen=gen, scale=0.5),
                (torch.rand(c, dtype=torch.float64, generator=gen) + 0.5).to(acc),
                randn(c, dtype=acc, gen=gen, scale=0.5))


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout (values equal, strides differ)."""
    if layout == "nchw":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "channel_slice":  # every other channel of a twice-as-wide tensor
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], *t.shape[2:], dtype=t.dtype)
        wide[:, ::2] = t
        view = wide[:, ::2]
        assert not view.is_contiguous() and not view.is_contiguous(
            memory_format=torch.channels_last)
        return view
    if layout == "transposed":  # an [N, C, W, H] tensor transposed to [N, C, H, W]
        view = t.transpose(2, 3).contiguous().transpose(2, 3)
        assert not view.is_contiguous() or t.shape[2] == 1 or t.shape[3] == 1
        return view
    raise ValueError(layout)


def check_outputs(got, ref64, eager, x_dtype, c_out):
    """Dtypes/layout per docs/OPS.md, then the values of out, mean, var."""
    out, mean, var = got
    acc = acc_dtype(x_dtype)
    assert out.dtype == x_dtype
    assert out.is_contiguous(memory_format=torch.channels_last), out.stride()
    assert mean.dtype == acc and var.dtype == acc
    assert mean.shape == (c_out,) and var.shape == (c_out,)
    # The output: directly (float64/float32) or by the §6 rule (bfloat16/float16).
    assert_close(out, ref64[0], x_dtype, eager=None if eager is None else eager[0], name="out")
    # The statistics are those of `out` as stored (docs/OPS.md), accumulated in `acc`: compare
    # them with the exact statistics of the stored values, with `acc`'s direct tolerance.
    stored_mean, stored_var = stats_of_stored(out)
    assert_close_direct(mean, stored_mean, acc, name="mean (of stored out)")
    assert_close_direct(var, stored_var, acc, name="var (of stored out)")
    if x_dtype not in LOW_PRECISION:
        assert_close_direct(mean, ref64[1], x_dtype, name="mean")
        assert_close_direct(var, ref64[2], x_dtype, name="var")
    # In low precision the statistics' error against float64 *is* the rounding error of the
    # stored `out`, which the contract requires (statistics of `out` as stored); `out` itself is
    # held to the §6 rule above, and the statistics to the exact ones of the stored values. A
    # §6 ratio on the statistics would compare two rounding patterns, not two accuracies: with
    # k=1, out is an affine map of the float16 input grid and its correctly rounded values can
    # bias a channel's variance by 1e-4 relative where eager's double rounding happens not to
    # (measured: 27x eager's error, yet 10x below one float16 ulp).


# ---------------------------------------------------------------------------------------------
# Forward values


def _dw_case(shape, k, dtype, *, with_norm, with_bias, seed=0):
    n, c, h, w = shape
    gen = _gen(seed)
    x = randn(n, c, h, w, dtype=dtype, gen=gen)
    weight = randn(c, 1, k, k, dtype=dtype, gen=gen, scale=1.0 / k)
    bias = randn(c, dtype=dtype, gen=gen, scale=0.5) if with_bias else None
    norm = make_norm(c, dtype, gen) if with_norm else None
    return x, weight, bias, norm


@pytest.mark.parametrize("shape", DW_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", ["plain", "bias", "norm", "norm_bias"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("k", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dw_stage_forward(dtype, k, act, variant, shape):
    x, weight, bias, norm = _dw_case(shape, k, dtype, with_norm="norm" in variant,
                                     with_bias="bias" in variant, seed=k)
    got = dw_stage(x, weight, bias, act=act, x_norm=norm)
    ref64 = ref_dw_stage(*to64((x, weight, bias)), act=act, x_norm=to64(norm))
    eager = ref_dw_stage(x, weight, bias, act=act, x_norm=norm) if dtype in LOW_PRECISION else None
    check_outputs(got, ref64, eager, dtype, shape[1])


# Which optional inputs each pw variant passes. "norm_residual" is block 0 of the model
# (BN1 applied to x, the stem output added as is); "both_norms_bias" every later block.
PW_PARTS = {
    "plain": (),
    "bias": ("bias",),
    "norm_bias": ("x_norm", "bias"),
    "residual": ("residual",),
    "norm_residual": ("x_norm", "residual"),
    "residual_norm": ("residual", "residual_norm"),
    "both_norms_bias": ("x_norm", "residual", "residual_norm", "bias"),
}
PW_VARIANTS = list(PW_PARTS)


def _pw_case(shape, dtype, variant, seed=0):
    n, cin, cout, h, w = shape
    parts = PW_PARTS[variant]
    gen = _gen(seed)
    x = randn(n, cin, h, w, dtype=dtype, gen=gen)
    weight = randn(cout, cin, 1, 1, dtype=dtype, gen=gen, scale=cin ** -0.5)
    bias = randn(cout, dtype=dtype, gen=gen, scale=0.5) if "bias" in parts else None
    kw = {}
    if "x_norm" in parts:
        kw["x_norm"] = make_norm(cin, dtype, gen)
    if "residual" in parts:
        kw["residual"] = randn(n, cin, h, w, dtype=dtype, gen=gen)
    if "residual_norm" in parts:
        kw["residual_norm"] = make_norm(cin, dtype, gen)
    return x, weight, bias, kw


@pytest.mark.parametrize("shape", PW_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", PW_VARIANTS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pw_stage_forward(dtype, act, variant, shape):
    x, weight, bias, kw = _pw_case(shape, dtype, variant, seed=len(variant))
    got = pw_stage(x, weight, bias, act=act, **kw)
    ref64 = ref_pw_stage(*to64((x, weight, bias)), act=act, **to64(kw))
    eager = ref_pw_stage(x, weight, bias, act=act, **kw) if dtype in LOW_PRECISION else None
    check_outputs(got, ref64, eager, dtype, shape[2])


LAYOUTS = ["nchw", "channels_last", "channel_slice", "transposed"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k", [3, 7])
def test_dw_stage_layouts(k, dtype, layout):
    x, weight, bias, norm = _dw_case((3, 12, 7, 5), k, dtype, with_norm=True, with_bias=True,
                                     seed=11)
    xl = relayout(x, layout)
    got = dw_stage(xl, weight, bias, act="gelu", x_norm=norm)
    # The layout changes nothing but speed: bitwise what the NCHW-contiguous input gives...
    base = dw_stage(x.contiguous(), weight, bias, act="gelu", x_norm=norm)
    for g, b in zip(got, base):
        assert torch.equal(g, b)
    # ...and that is the reference (evaluated on the very same view).
    ref64 = ref_dw_stage(*to64((xl, weight, bias)), act="gelu", x_norm=to64(norm))
    eager = (ref_dw_stage(xl, weight, bias, act="gelu", x_norm=norm)
             if dtype in LOW_PRECISION else None)
    check_outputs(got, ref64, eager, dtype, 12)


@pytest.mark.parametrize("res_layout", LAYOUTS)
@pytest.mark.parametrize("x_layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_pw_stage_layouts(dtype, x_layout, res_layout):
    x, weight, bias, kw = _pw_case((2, 12, 5, 7, 5), dtype, "both_norms_bias", seed=3)
    xl, rl = relayout(x, x_layout), relayout(kw["residual"], res_layout)
    kw_l = dict(kw, residual=rl)
    got = pw_stage(xl, weight, bias, act="relu", **kw_l)
    base = pw_stage(x.contiguous(), weight, bias, act="relu", **kw)
    for g, b in zip(got, base):
        assert torch.equal(g, b)
    ref64 = ref_pw_stage(*to64((xl, weight, bias)), act="relu", **to64(kw_l))
    eager = ref_pw_stage(xl, weight, bias, act="relu", **kw_l) if dtype in LOW_PRECISION else None
    check_outputs(got, ref64, eager, dtype, 5)


def test_noncontiguous_weight_and_norm():
    """Strided weights and norm vectors (views of bigger tensors) read the right elements."""
    gen = _gen(5)
    x = randn(2, 6, 5, 7, gen=gen)
    big_w = randn(6, 2, 5, 5, gen=gen, scale=0.2)
    weight = big_w[:, 1:2]  # [6, 1, 5, 5], not contiguous
    assert not weight.is_contiguous()
    big = randn(3, 12, gen=gen).abs() + 0.5
    norm = Norm(big[0, ::2], big[1, ::2], big[2, 1::2])
    bias = randn(12, gen=gen)[::2]
    got = dw_stage(x, weight, bias, x_norm=norm)
    ref64 = ref_dw_stage(*to64((x, weight, bias)), x_norm=to64(norm))
    check_outputs(got, ref64, None, torch.float32, 6)

    pw_w = randn(4, 12, 1, 1, gen=gen).transpose(0, 1)  # [12, 4, 1, 1] strided
    assert not pw_w.is_contiguous()
    x = randn(2, 4, 3, 5, gen=gen)
    residual = x.flip(3)  # a copy, but a different tensor from x
    pw_b = randn(24, gen=gen)[::2]
    got = pw_stage(x, pw_w, pw_b, residual=residual)
    ref64 = ref_pw_stage(*to64((x, pw_w, pw_b)), residual=to64(residual))
    check_outputs(got, ref64, None, torch.float32, 12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_stats_false_gives_empty_statistics(dtype):
    x, weight, bias, norm = _dw_case((2, 5, 7, 11), 5, dtype, with_norm=True, with_bias=True)
    with_stats = dw_stage(x, weight, bias, x_norm=norm, stats=True)
    out, mean, var = dw_stage(x, weight, bias, x_norm=norm, stats=False)
    assert mean.shape == (0,) and var.shape == (0,)
    assert mean.dtype == acc_dtype(dtype) and var.dtype == acc_dtype(dtype)
    assert torch.equal(out, with_stats[0])

    x, weight, bias, kw = _pw_case((2, 5, 12, 7, 11), dtype, "both_norms_bias")
    with_stats = pw_stage(x, weight, bias, **kw, stats=True)
    out, mean, var = pw_stage(x, weight, bias, **kw, stats=False)
    assert mean.shape == (0,) and var.shape == (0,)
    assert mean.dtype == acc_dtype(dtype) and var.dtype == acc_dtype(dtype)
    assert torch.equal(out, with_stats[0])


def test_pw_stage_same_under_no_grad():
    """pw_stage keeps the pre-activation only when recording gradients; values are the same."""
    x, weight, bias, kw = _pw_case((2, 12, 5, 7, 5), torch.float32, "both_norms_bias", seed=4)
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    recorded = pw_stage(*leaves, **kw)
    with torch.no_grad():
        plain = pw_stage(x, weight, bias, **kw)
    for r, p in zip(recorded, plain):
        assert torch.equal(r.detach(), p)


def test_stats_of_large_offset():
    """Statistics of an activation with |mean| >> std are not destroyed by cancellation
    (docs/DESIGN.md §6: shifted sums, never a naive Σx² − (Σx)²/n in fp32)."""
    gen = _gen(6)
    n, c, h, w = 3, 5, 15, 17
    x = randn(n, c, h, w, gen=gen, scale=1e-2)
    weight = torch.zeros(c, 1, 3, 3)
    weight[:, :, 1, 1] = 1.0
    bias = torch.full((c,), 1000.0)
    out, mean, var = dw_stage(x, weight, bias, act="relu")
    _, mean64, var64 = ref_dw_stage(*to64((x, weight, bias)), act="relu")
    # var ≈ 1e-4 under a mean of 1000: out itself is stored in fp32 (ulp(1000) = 6e-5), so the
    # reference is taken of the stored values, and the variance must hold to ~1e-3 relative.
    var_stored = torch.var_mean(out.double(), dim=(0, 2, 3), unbiased=False)[0]
    torch.testing.assert_close(var.double(), var_stored, rtol=1e-3, atol=0)
    torch.testing.assert_close(var.double(), var64, rtol=5e-2, atol=0)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# Gradients


def _dw_fn(act, stats, with_norm, with_bias, stage=dw_stage):
    """fn(*leaves) for gradcheck: leaves are x, [mean, scale, shift], weight, [bias]."""
    def fn(*leaves):
        leaves = list(leaves)
        x = leaves.pop(0)
        norm = Norm(*(leaves.pop(0) for _ in range(3))) if with_norm else None
        weight = leaves.pop(0)
        bias = leaves.pop(0) if with_bias else None
        out, mean, var = stage(x, weight, bias, act=act, x_norm=norm, stats=stats)
        return (out, mean, var) if stats else out
    return fn


def _dw_leaves(shape, k, dtype, with_norm, with_bias, seed):
    x, weight, bias, norm = _dw_case(shape, k, dtype, with_norm=with_norm, with_bias=with_bias,
                                     seed=seed)
    leaves = [x, *(norm if with_norm else ()), weight, *((bias,) if with_bias else ())]
    return [t.detach().clone().requires_grad_() for t in leaves]


DW_GRAD_CASES = [
    # (shape, k, act, with_norm, with_bias)
    ((2, 3, 4, 5), 3, "gelu", True, True),
    ((2, 3, 4, 5), 3, "relu", True, True),
    ((2, 3, 4, 5), 3, "gelu", False, False),
    ((2, 3, 4, 5), 3, "relu", False, True),
    ((3, 2, 3, 5), 5, "gelu", True, False),  # H < k
    ((2, 4, 5, 3), 1, "gelu", True, True),
    ((2, 2, 6, 5), 7, "relu", True, True),  # k larger than both H and W
]


@pytest.mark.parametrize("stats", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", DW_GRAD_CASES, ids=str)
def test_dw_stage_gradcheck(case, stats):
    shape, k, act, with_norm, with_bias = case
    leaves = _dw_leaves(shape, k, torch.float64, with_norm, with_bias, seed=k)
    assert torch.autograd.gradcheck(_dw_fn(act, stats, with_norm, with_bias), leaves)


def _pw_fn(act, stats, kinds, stage=pw_stage):
    """fn(*leaves) for gradcheck; `kinds` names each leaf (x, x_norm, residual, ...)."""
    def fn(*leaves):
        it = iter(leaves)
        kw, bias = {}, None
        x = next(it)
        if "x_norm" in kinds:
            kw["x_norm"] = Norm(next(it), next(it), next(it))
        if "residual" in kinds:
            kw["residual"] = next(it)
        if "residual_norm" in kinds:
            kw["residual_norm"] = Norm(next(it), next(it), next(it))
        weight = next(it)
        if "bias" in kinds:
            bias = next(it)
        out, mean, var = stage(x, weight, bias, act=act, stats=stats, **kw)
        return (out, mean, var) if stats else out
    return fn


def _pw_leaves(shape, dtype, variant, seed):
    x, weight, bias, kw = _pw_case(shape, dtype, variant, seed=seed)
    leaves, kinds = [x], ["x"]
    if "x_norm" in kw:
        leaves += list(kw["x_norm"])
        kinds.append("x_norm")
    if "residual" in kw:
        leaves.append(kw["residual"])
        kinds.append("residual")
    if "residual_norm" in kw:
        leaves += list(kw["residual_norm"])
        kinds.append("residual_norm")
    leaves.append(weight)
    if bias is not None:
        leaves.append(bias)
        kinds.append("bias")
    return [t.detach().clone().requires_grad_() for t in leaves], kinds


@pytest.mark.parametrize("stats", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("variant", PW_VARIANTS)
def test_pw_stage_gradcheck(variant, act, stats):
    leaves, kinds = _pw_leaves((2, 4, 3, 3, 4), torch.float64, variant, seed=len(variant))
    assert torch.autograd.gradcheck(_pw_fn(act, stats, kinds), leaves)


def _grads(fn, leaves, cotangents):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.to(c.dtype) * c).sum() for o, c in zip(outs, cotangents))
    return torch.autograd.grad(loss, leaves)


def _ref_dw_fn(act, stats, with_norm, with_bias):
    return _dw_fn(act, stats, with_norm, with_bias, stage=ref_dw_stage)


def _ref_pw_fn(act, stats, kinds):
    return _pw_fn(act, stats, kinds, stage=ref_pw_stage)


def _cotangents(out_shape, c, stats, gen):
    cots = [randn(*out_shape, dtype=torch.float64, gen=gen)]
    if stats:
        cots += [randn(c, dtype=torch.float64, gen=gen), randn(c, dtype=torch.float64, gen=gen)]
    return cots


def _compare_grads(dtype, act, fused_fn, ref_fn, leaves, cots64):
    """Gradients of sum(outputs · cotangents) w.r.t. every leaf: the fused ops (fused_fn(act))
    against the reference (ref_fn(act)); direct in float32, the §6 rule in low precision."""
    cots = [c.to(dtype if i == 0 else acc_dtype(dtype)) for i, c in enumerate(cots64)]
    fused = _grads(fused_fn(act), leaves, cots)
    for f, leaf in zip(fused, leaves):
        assert f.dtype == leaf.dtype and f.shape == leaf.shape
    if dtype not in LOW_PRECISION:
        ref64 = _grads(ref_fn(act), to64(leaves), cots64)
        for i, (f, r) in enumerate(zip(fused, ref64)):
            assert_close_direct(f, r, dtype, name=f"grad[{i}]")
        return
    eager = _grads(ref_fn(act), leaves, cots)
    if has_decisions(act):
        # Each implementation against float64 under its own ReLU decisions (relu_with_mask).
        with torch.no_grad():
            fused_out = _first(fused_fn(act)(*leaves))
            eager_out = _first(ref_fn(act)(*leaves))
        ref64 = _grads(ref_fn(act_as_decided(act, fused_out)), to64(leaves), cots64)
        eager_ref64 = _grads(ref_fn(act_as_decided(act, eager_out)), to64(leaves), cots64)
    else:
        ref64 = eager_ref64 = _grads(ref_fn(act), to64(leaves), cots64)
    for i, (f, e, r, r_e) in enumerate(zip(fused, eager, ref64, eager_ref64)):
        assert_close_rule(f, e, r, name=f"grad[{i}]", eager_ref64=r_e)


def _first(outs):
    return outs[0] if isinstance(outs, tuple) else outs


@pytest.mark.parametrize("stats", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("k", [1, 3, 9, 15])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dw_stage_grads_vs_reference(dtype, k, act, stats):
    shape = (3, 40, 7, 11)
    leaves = _dw_leaves(shape, k, dtype, True, True, seed=k + 100)
    cots64 = _cotangents(shape, shape[1], stats, _gen(k))
    _compare_grads(dtype, act, lambda a: _dw_fn(a, stats, True, True),
                   lambda a: _ref_dw_fn(a, stats, True, True), leaves, cots64)


@pytest.mark.parametrize("stats", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("variant", ["plain", "both_norms_bias", "norm_residual", "residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_pw_stage_grads_vs_reference(dtype, variant, act, stats):
    shape = (3, 40, 36, 7, 5)
    leaves, kinds = _pw_leaves(shape, dtype, variant, seed=7)
    out_shape = (shape[0], shape[2], shape[3], shape[4])
    cots64 = _cotangents(out_shape, shape[2], stats, _gen(8))
    _compare_grads(dtype, act, lambda a: _pw_fn(a, stats, kinds),
                   lambda a: _ref_pw_fn(a, stats, kinds), leaves, cots64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_pw_stage_grads_vs_reference_several_chunks(dtype):
    """Enough rows (4·32·32) for several row chunks of the CPU pw stage's fused pipeline, run on
    at least two threads: its chunk GEMMs are called from the pool's threads, with a weight that
    requires grad, and its weight gradient adds up several row groups."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        shape = (4, 24, 20, 32, 32)
        leaves, kinds = _pw_leaves(shape, dtype, "both_norms_bias", seed=17)
        cots64 = _cotangents((4, 20, 32, 32), 20, True, _gen(18))
        _compare_grads(dtype, "gelu", lambda a: _pw_fn(a, True, kinds),
                       lambda a: _ref_pw_fn(a, True, kinds), leaves, cots64)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("stage", ["dw", "pw"])
def test_gradcheck_of_statistics_alone(stage):
    """Only the statistics are differentiated: the output's gradient reaches the formula as None
    (gradients are not materialised) and counts as zero; pw's pre_act never gets one."""
    gen = _gen(14)
    x = randn(2, 3, 4, 5, dtype=torch.float64, gen=gen).requires_grad_()
    if stage == "dw":
        w = randn(3, 1, 3, 3, dtype=torch.float64, gen=gen, scale=0.3).requires_grad_()
        fn = lambda x, w: dw_stage(x, w, None)[1:]  # noqa: E731
    else:
        w = randn(4, 3, 1, 1, dtype=torch.float64, gen=gen, scale=0.5).requires_grad_()
        fn = lambda x, w: pw_stage(x, w, None, residual=x.flip(3))[1:]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w))


def test_block_chain_gradcheck():
    """dw -> BN1 norm from its batch stats -> pw with residual, as the model chains them:
    the consumer's norm-mean gradient flows back into the producer's statistics."""
    gen = _gen(12)
    n, c, h, w = 2, 3, 4, 5
    x = randn(n, c, h, w, dtype=torch.float64, gen=gen).requires_grad_()
    dw_w = randn(c, 1, 3, 3, dtype=torch.float64, gen=gen, scale=0.3).requires_grad_()
    dw_b = randn(c, dtype=torch.float64, gen=gen).requires_grad_()
    pw_w = randn(c, c, 1, 1, dtype=torch.float64, gen=gen, scale=0.5).requires_grad_()
    gamma = (torch.rand(c, dtype=torch.float64, generator=gen) + 0.5).requires_grad_()
    beta = randn(c, dtype=torch.float64, gen=gen).requires_grad_()

    def block(fn, x, dw_w, dw_b, pw_w, gamma, beta):
        dw, pw = fn
        g, mean, var = dw(x, dw_w, dw_b, act="gelu")
        norm1 = Norm(mean, gamma * torch.rsqrt(var + 1e-5), beta)
        out, m2, v2 = pw(g, pw_w, None, act="gelu", x_norm=norm1, residual=x)
        return out, m2, v2

    args = (x, dw_w, dw_b, pw_w, gamma, beta)
    assert torch.autograd.gradcheck(lambda *a: block((dw_stage, pw_stage), *a), args)
    # And it is the eager block's gradient.
    outs = block((dw_stage, pw_stage), *args)
    cots = [randn(*t.shape, dtype=torch.float64, gen=gen) for t in outs]
    fused = _grads(lambda *a: block((dw_stage, pw_stage), *a), args, cots)
    ref = _grads(lambda *a: block((ref_dw_stage, ref_pw_stage), *a), args, cots)
    for f, r in zip(fused, ref):
        assert_close_direct(f, r, torch.float64)


def test_raw_pw_stage_pre_act_is_not_differentiable():
    """pre_act is saved for the backward only: autograd must refuse to differentiate through
    it rather than return a silently wrong (zero) gradient."""
    gen = _gen(13)
    x = randn(2, 3, 2, 3, dtype=torch.float64, gen=gen).requires_grad_()
    w = randn(2, 3, 1, 1, dtype=torch.float64, gen=gen).requires_grad_()
    out, pre_act, mean, var = _ops.pw_stage(x, None, None, None, None, None, None, None, w,
                                            None, "gelu", True, True)
    assert out.requires_grad and mean.requires_grad and var.requires_grad
    assert not pre_act.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad(pre_act.sum(), (x, w))


# ---------------------------------------------------------------------------------------------
# opcheck of the raw ops


def _raw_dw_args(with_norm, with_bias, requires_grad, stats=True):
    x, weight, bias, norm = _dw_case((2, 5, 6, 7), 3, torch.float32, with_norm=with_norm,
                                     with_bias=with_bias, seed=21)
    m, s, t = norm if norm is not None else (None, None, None)
    args = [x, m, s, t, weight, bias]
    if requires_grad:
        args = [a.requires_grad_() if a is not None else None for a in args]
    return (*args, "gelu", stats)


def _raw_pw_args(variant, requires_grad, keep_pre_act, stats=True):
    x, weight, bias, kw = _pw_case((2, 5, 4, 6, 7), torch.float32, variant, seed=22)
    xm, xs, xt = kw.get("x_norm") or (None, None, None)
    rm, rs, rt = kw.get("residual_norm") or (None, None, None)
    args = [x, xm, xs, xt, kw.get("residual"), rm, rs, rt, weight, bias]
    if requires_grad:
        args = [a.requires_grad_() if a is not None else None for a in args]
    return (*args, "relu", stats, keep_pre_act)


@pytest.mark.parametrize("stats", [True, False])
@pytest.mark.parametrize("with_norm,with_bias", [(True, True), (False, False), (True, False)])
def test_opcheck_dw_stage(with_norm, with_bias, stats):
    torch.library.opcheck(_ops.dw_stage.default,
                          _raw_dw_args(with_norm, with_bias, requires_grad=True, stats=stats))


@pytest.mark.parametrize("keep_pre_act", [True, False])
@pytest.mark.parametrize("variant", PW_VARIANTS)
def test_opcheck_pw_stage(variant, keep_pre_act):
    torch.library.opcheck(_ops.pw_stage.default,
                          _raw_pw_args(variant, requires_grad=True, keep_pre_act=keep_pre_act))


@pytest.mark.parametrize("grads", ["all", "out_only", "empty_stats_grads"])
@pytest.mark.parametrize("with_norm,with_bias", [(True, True), (False, False)])
def test_opcheck_dw_stage_backward(with_norm, with_bias, grads):
    x, m, s, t, weight, bias, act, _ = _raw_dw_args(with_norm, with_bias, requires_grad=False)
    out, mean, _ = _ops.dw_stage(x, m, s, t, weight, bias, act, True)
    gen = _gen(23)
    grad_out = randn(*out.shape, gen=gen).contiguous(memory_format=torch.channels_last)
    if grads == "all":
        gm, gv = randn(5, gen=gen), randn(5, gen=gen)
    elif grads == "out_only":
        gm, gv, mean = None, None, None
    else:
        gm, gv = torch.empty(0), torch.empty(0)
    torch.library.opcheck(_ops.dw_stage_backward.default,
                          (grad_out, gm, gv, x, m, s, t, weight, bias, mean, act))


@pytest.mark.parametrize("pre_act", [True, False])
@pytest.mark.parametrize("grads", ["all", "out_only"])
@pytest.mark.parametrize("variant", PW_VARIANTS)
def test_opcheck_pw_stage_backward(variant, grads, pre_act):
    args = _raw_pw_args(variant, requires_grad=False, keep_pre_act=pre_act)
    x, xm, xs, xt, res, rm, rs, rt, weight, bias, act, _, _ = args
    out, p, mean, _ = _ops.pw_stage(*args)
    gen = _gen(24)
    grad_out = randn(*out.shape, gen=gen)
    gm, gv = (randn(4, gen=gen), randn(4, gen=gen)) if grads == "all" else (None, None)
    if grads != "all":
        mean = None
    torch.library.opcheck(
        _ops.pw_stage_backward.default,
        (grad_out, gm, gv, x, xm, xs, xt, res, rm, rs, rt, weight, bias,
         p if pre_act else None, mean, act))


def test_meta_tensors_match_real_outputs():
    """The fake implementations give the shapes, dtypes and strides the kernels produce."""
    x, weight, bias, norm = _dw_case((2, 5, 6, 7), 3, torch.bfloat16, with_norm=True,
                                     with_bias=True)
    real = dw_stage(x, weight, bias, x_norm=norm)
    meta = dw_stage(*(t.to("meta") for t in (x, weight, bias)),
                    x_norm=Norm(*(t.to("meta") for t in norm)))
    for r, m in zip(real, meta):
        assert m.device.type == "meta"
        assert (m.shape, m.dtype, m.stride()) == (r.shape, r.dtype, r.stride())
    x, weight, bias, kw = _pw_case((2, 5, 4, 6, 7), torch.bfloat16, "both_norms_bias")
    real = pw_stage(x, weight, bias, **kw)
    meta_kw = {"x_norm": Norm(*(t.to("meta") for t in kw["x_norm"])),
               "residual": kw["residual"].to("meta"),
               "residual_norm": Norm(*(t.to("meta") for t in kw["residual_norm"]))}
    meta = pw_stage(*(t.to("meta") for t in (x, weight, bias)), **meta_kw)
    for r, m in zip(real, meta):
        assert (m.shape, m.dtype, m.stride()) == (r.shape, r.dtype, r.stride())


# ---------------------------------------------------------------------------------------------
# Determinism


def _dw_run(dtype, seed=31):
    leaves = _dw_leaves((3, 40, 9, 13), 7, dtype, True, True, seed=seed)
    fn = _dw_fn("gelu", True, True, True)
    outs = fn(*leaves)
    cots = [torch.ones_like(o) for o in outs]
    grads = torch.autograd.grad(outs, leaves, cots)
    return [o.detach() for o in outs], list(grads)


def _pw_run(dtype, seed=32):
    # N·H·W = 3·9·13 = 351 rows: more than one 128-row chunk of the CPU reductions.
    leaves, kinds = _pw_leaves((3, 40, 36, 9, 13), dtype, "both_norms_bias", seed=seed)
    fn = _pw_fn("gelu", True, kinds)
    outs = fn(*leaves)
    cots = [torch.ones_like(o) for o in outs]
    grads = torch.autograd.grad(outs, leaves, cots)
    return [o.detach() for o in outs], list(grads)


def _pw_run_chunked(dtype, seed=33):
    # 4·32·32 = 4096 rows: several row chunks of the CPU pw stage's fused pipeline (float), so
    # its chunk GEMMs run on the pool's threads and its weight gradient sums several groups.
    leaves, kinds = _pw_leaves((4, 24, 20, 32, 32), dtype, "both_norms_bias", seed=seed)
    fn = _pw_fn("gelu", True, kinds)
    outs = fn(*leaves)
    cots = [torch.ones_like(o) for o in outs]
    grads = torch.autograd.grad(outs, leaves, cots)
    return [o.detach() for o in outs], list(grads)


def _assert_bitwise(a, b):
    for ta, tb in zip(a, b):
        assert ta.dtype == tb.dtype and ta.shape == tb.shape
        assert torch.equal(ta, tb)
        # torch.equal treats -0.0 == 0.0; compare the bits too.
        assert torch.equal(ta.reshape(-1).view(torch.uint8), tb.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("run", [_dw_run, _pw_run, _pw_run_chunked], ids=["dw", "pw", "pw-chunks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic(run, dtype):
    outs1, grads1 = run(dtype)
    outs2, grads2 = run(dtype)
    _assert_bitwise(outs1, outs2)
    _assert_bitwise(grads1, grads2)


@pytest.mark.parametrize("run", [_dw_run, _pw_run, _pw_run_chunked], ids=["dw", "pw", "pw-chunks"])
def test_deterministic_across_thread_counts(run):
    """The CPU reductions are cut into fixed chunks, so the thread count changes nothing."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(torch.float32)
        torch.set_num_threads(max(2, threads))
        many = run(torch.float32)
    finally:
        torch.set_num_threads(threads)
    _assert_bitwise(one[0], many[0])
    _assert_bitwise(one[1], many[1])


# ---------------------------------------------------------------------------------------------
# NaN and empty inputs


def _poison(x):
    x = x.clone()
    x[0, 1, 2, 3] = float("nan")
    x[-1, -1, 0, 0] = float("nan")
    return x


def _assert_nan_like(got, ref, what, dtype):
    """Same NaN positions as the reference, and the same values elsewhere."""
    assert len(got) == len(ref)
    assert any(bool(torch.isnan(r).any()) for r in ref), f"no NaN reached the reference {what}"
    for i, (g, r) in enumerate(zip(got, ref)):
        g, r = g.detach(), r.detach()
        assert torch.equal(torch.isnan(g), torch.isnan(r)), f"{what}[{i}] NaN positions differ"
        keep = ~torch.isnan(r)
        assert_close_direct(g[keep], r[keep], dtype, name=f"{what}[{i}] (not NaN)")


@pytest.mark.parametrize("stats", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_dw_stage_nan_propagates(dtype, act, stats):
    leaves = _dw_leaves((2, 5, 7, 6), 3, dtype, True, True, seed=41)
    leaves[0] = _poison(leaves[0].detach()).requires_grad_()
    fn, ref_fn = _dw_fn(act, stats, True, True), _ref_dw_fn(act, stats, True, True)
    got, ref = fn(*leaves), ref_fn(*leaves)
    got, ref = (got, ref) if stats else ((got,), (ref,))
    _assert_nan_like(got, ref, "out", dtype)
    cots = [torch.ones_like(o) for o in ref]
    _assert_nan_like(torch.autograd.grad(got, leaves, cots),
                     torch.autograd.grad(ref, leaves, cots), "grad", dtype)


@pytest.mark.parametrize("stats", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("where", ["x", "residual"])
def test_pw_stage_nan_propagates(where, act, stats):
    leaves, kinds = _pw_leaves((2, 5, 4, 3, 5), torch.float32, "both_norms_bias", seed=42)
    i = 0 if where == "x" else kinds.index("residual") + 2  # x, 3 norm vectors, residual
    leaves[i] = _poison(leaves[i].detach()).requires_grad_()
    fn, ref_fn = _pw_fn(act, stats, kinds), _ref_pw_fn(act, stats, kinds)
    got, ref = fn(*leaves), ref_fn(*leaves)
    got, ref = (got, ref) if stats else ((got,), (ref,))
    _assert_nan_like(got, ref, "out", torch.float32)
    cots = [torch.ones_like(o) for o in ref]
    _assert_nan_like(torch.autograd.grad(got, leaves, cots),
                     torch.autograd.grad(ref, leaves, cots), "grad", torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_empty_batch_eval(dtype):
    x, weight, bias, norm = _dw_case((2, 5, 7, 6), 5, dtype, with_norm=True, with_bias=True)
    x0 = x[:0]
    leaves = [t.detach().clone().requires_grad_() for t in (x0, weight, bias)]
    got = dw_stage(*leaves, x_norm=norm, stats=False)
    ref = ref_dw_stage(*leaves, x_norm=norm, stats=False)
    for g, r in zip(got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype
    assert got[0].shape == (0, 5, 7, 6)
    grads = torch.autograd.grad(got[0].sum(), leaves)
    ref_grads = torch.autograd.grad(ref[0].sum(), leaves)
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape
        assert torch.equal(g, r)  # zeros (and empty for x)

    x, weight, bias, kw = _pw_case((2, 5, 4, 6, 7), dtype, "both_norms_bias")
    kw["residual"] = kw["residual"][:0]
    leaves = [t.detach().clone().requires_grad_() for t in (x[:0], weight, bias)]
    got = pw_stage(*leaves, **kw, stats=False)
    ref = ref_pw_stage(*leaves, **kw, stats=False)
    for g, r in zip(got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype
    assert got[0].shape == (0, 4, 6, 7)
    grads = torch.autograd.grad(got[0].sum(), leaves)
    ref_grads = torch.autograd.grad(ref[0].sum(), leaves)
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape
        assert torch.equal(g, r)
