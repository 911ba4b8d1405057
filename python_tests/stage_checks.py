"""One fused stage against the eager reference, on any device and backend.

A *case* is the inputs of one dw_stage or pw_stage call (leaves to differentiate, named by
kind), its activation and whether it computes batch statistics. `check_case` runs it on a
backend and checks, per docs/OPS.md and docs/DESIGN.md §6:

* forward: `out` (dtype, channels_last) against the float64 reference, directly in float32 and
  float64, by the §6 rule in bfloat16/float16; `mean`/`var` against the exact statistics of the
  stored `out` (accumulation dtype), and against the reference in float32; empty when not
  `stats`;
* backward: the gradient of sum(out·c0 + mean·c1 + var·c2) with respect to every leaf (x, norm
  vectors, residual, weight, bias), so the terms that flow back through the statistics are
  tested too; the same tolerances.

Device-agnostic on purpose: the GPU test modules use it for backend "cuda", and it runs the
same on CPU tensors with backend "cpu" (how it was checked on a machine without a GPU).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from convmixer_kernels.ops import Norm, dw_stage, pw_stage
from reference import (LOW_PRECISION, acc_dtype, act_as_decided, assert_close_direct,
                       assert_close_rule, ref_dw_stage, ref_pw_stage, stats_of_stored)

# Optional inputs of the pw stage, as in test_ops.PW_PARTS: "block" is every block after the
# first (BN1 on x, BN2 of the previous block on the residual, bias).
PW_BLOCK = ("x_norm", "residual", "residual_norm", "bias")


@dataclass
class Case:
    stage: str            # "dw" or "pw"
    leaves: list          # the differentiable inputs, in the order of `kinds`
    kinds: list           # one name per leaf: x, x_norm.{mean,scale,shift}, residual, ...
    act: str
    stats: bool
    out_channels: int


def randn(*shape, dtype=torch.float32, gen=None, scale=1.0):
    """Drawn in float64 and rounded once, so every dtype sees the same values up to rounding."""
    return (torch.randn(*shape, dtype=torch.float64, generator=gen) * scale).to(dtype)


def _norm_leaves(prefix, c, dtype, gen):
    """A BatchNorm-like norm: mean O(0.5), scale in [0.5, 1.5], shift O(0.5)."""
    acc = acc_dtype(dtype)
    return ([randn(c, dtype=acc, gen=gen, scale=0.5),
             (torch.rand(c, dtype=torch.float64, generator=gen) + 0.5).to(acc),
             randn(c, dtype=acc, gen=gen, scale=0.5)],
            [f"{prefix}.mean", f"{prefix}.scale", f"{prefix}.shift"])


def _layout(t, layout):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


def dw_case(shape, k, dtype, *, device, act="gelu", stats=True, norm=True, bias=True,
            layout="nchw", seed=0) -> Case:
    n, c, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    leaves, kinds = [_layout(randn(n, c, h, w, dtype=dtype, gen=gen), layout)], ["x"]
    if norm:
        more, names = _norm_leaves("x_norm", c, dtype, gen)
        leaves, kinds = leaves + more, kinds + names
    leaves.append(randn(c, 1, k, k, dtype=dtype, gen=gen, scale=1.0 / k))
    kinds.append("weight")
    if bias:
        leaves.append(randn(c, dtype=dtype, gen=gen, scale=0.5))
        kinds.append("bias")
    return Case("dw", [t.to(device) for t in leaves], kinds, act, stats, c)


def pw_case(shape, dtype, *, device, act="gelu", stats=True, parts=PW_BLOCK, layout="nchw",
            seed=0) -> Case:
    n, cin, cout, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    leaves, kinds = [_layout(randn(n, cin, h, w, dtype=dtype, gen=gen), layout)], ["x"]
    for part in ("x_norm", "residual", "residual_norm"):
        if part not in parts:
            continue
        if part == "residual":
            more = [_layout(randn(n, cin, h, w, dtype=dtype, gen=gen), layout)]
            names = ["residual"]
        else:
            more, names = _norm_leaves(part, cin, dtype, gen)
        leaves, kinds = leaves + more, kinds + names
    leaves.append(randn(cout, cin, 1, 1, dtype=dtype, gen=gen, scale=cin ** -0.5))
    kinds.append("weight")
    if "bias" in parts:
        leaves.append(randn(cout, dtype=dtype, gen=gen, scale=0.5))
        kinds.append("bias")
    return Case("pw", [t.to(device) for t in leaves], kinds, act, stats, cout)


def call(case: Case, backend: str, act=None):
    """fn(*leaves) -> (out, mean, var): the fused stage on `backend`, or the eager reference
    (backend "ref"), with `act` overriding the case's (a callable, see relu_with_mask)."""
    act = case.act if act is None else act

    def fn(*leaves):
        named = dict(zip(case.kinds, leaves))
        kw = dict(act=act, stats=case.stats)
        for prefix in ("x_norm", "residual_norm"):
            if f"{prefix}.mean" in named:
                kw[prefix] = Norm(*(named[f"{prefix}.{p}"] for p in ("mean", "scale", "shift")))
        if "residual" in named:
            kw["residual"] = named["residual"]
        args = (named["x"], named["weight"], named.get("bias"))
        if case.stage == "dw":
            return (ref_dw_stage(*args, **kw) if backend == "ref"
                    else dw_stage(*args, backend=backend, **kw))
        return (ref_pw_stage(*args, **kw) if backend == "ref"
                else pw_stage(*args, backend=backend, **kw))
    return fn


def cotangents(case: Case, seed=7):
    """float64 cotangents of out (and of mean and var when the case computes statistics)."""
    gen = torch.Generator().manual_seed(seed)
    x = case.leaves[0]
    shape = (x.shape[0], case.out_channels, *x.shape[2:])
    cots = [randn(*shape, dtype=torch.float64, gen=gen)]
    if case.stats:
        cots += [randn(case.out_channels, dtype=torch.float64, gen=gen) for _ in range(2)]
    return [c.to(x.device) for c in cots]


def run(fn, leaves, cots):
    """Outputs of fn(*leaves) and the gradients of sum(outputs · cots) w.r.t. every leaf."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    outs = fn(*leaves)
    loss = sum((o.to(c.dtype) * c).sum() for o, c in zip(outs, cots))
    return [o.detach() for o in outs], list(torch.autograd.grad(loss, leaves))


def _cast_cots(cots64, dtype):
    return [c.to(dtype if i == 0 else acc_dtype(dtype)) for i, c in enumerate(cots64)]


def check_case(case: Case, backend: str) -> None:
    """Outputs, statistics and all gradients of `case` on `backend` against the reference."""
    dtype = case.leaves[0].dtype
    acc = acc_dtype(dtype)
    cots64 = cotangents(case)
    got, grads = run(call(case, backend), case.leaves, _cast_cots(cots64, dtype))
    out, mean, var = got

    # Forms per docs/OPS.md: out in the input dtype, channels_last; statistics in acc.
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last), (
        out.dtype, out.stride())
    n_stats = case.out_channels if case.stats else 0
    assert mean.shape == (n_stats,) and var.shape == (n_stats,)
    assert mean.dtype == acc and var.dtype == acc
    for g, leaf, kind in zip(grads, case.leaves, case.kinds):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, kind

    leaves64 = [t.detach().double() for t in case.leaves]
    if dtype not in LOW_PRECISION:
        ref, ref_grads = run(call(case, "ref"), leaves64, cots64)
        assert_close_direct(out, ref[0], dtype, name="out")
        if case.stats:
            assert_close_direct(mean, ref[1], dtype, name="mean")
            assert_close_direct(var, ref[2], dtype, name="var")
        for g, r, kind in zip(grads, ref_grads, case.kinds):
            assert_close_direct(g, r, dtype, name=f"grad of {kind}")
    else:
        eager, eager_grads = run(call(case, "ref"), case.leaves, _cast_cots(cots64, dtype))
        # ReLU: each implementation against float64 under its own on/off decisions (see
        # reference.relu_with_mask), so a flip at 0 does not count as rounding error.
        act64 = act_as_decided(case.act, out)
        act64_e = act_as_decided(case.act, eager[0])
        ref, ref_grads = run(call(case, "ref", act64), leaves64, cots64)
        ref_e, ref_grads_e = run(call(case, "ref", act64_e), leaves64, cots64)
        assert_close_rule(out, eager[0], ref[0], name="out", eager_ref64=ref_e[0])
        for g, e, r, r_e, kind in zip(grads, eager_grads, ref_grads, ref_grads_e, case.kinds):
            assert_close_rule(g, e, r, name=f"grad of {kind}", eager_ref64=r_e)
    if case.stats:
        # The statistics are those of `out` as stored; only their accumulation error remains.
        # (In low precision their error against float64 is the rounding of `out` itself, held
        # to the rule above; see test_ops.check_outputs.)
        stored_mean, stored_var = stats_of_stored(out)
        assert_close_direct(mean, stored_mean, acc, name="mean (of stored out)")
        assert_close_direct(var, stored_var, acc, name="var (of stored out)")


def gradcheck_case(case: Case, backend: str) -> bool:
    """float64 gradcheck of every leaf (the case's dtype must be float64)."""
    assert case.leaves[0].dtype == torch.float64
    fn = call(case, backend)

    def outputs(*leaves):
        out, mean, var = fn(*leaves)
        return (out, mean, var) if case.stats else out

    leaves = [t.detach().clone().requires_grad_() for t in case.leaves]
    return torch.autograd.gradcheck(outputs, leaves)


def assert_bitwise(a, b) -> None:
    """Same dtype, shape and bits (torch.equal alone treats -0.0 == 0.0)."""
    for ta, tb in zip(a, b, strict=True):
        assert ta.dtype == tb.dtype and ta.shape == tb.shape
        assert torch.equal(ta.reshape(-1).view(torch.uint8), tb.reshape(-1).view(torch.uint8))
