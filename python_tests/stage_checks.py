"""One fused stage against the eager reference, on any backend: the inputs and the checks that
test_ops.py runs over every backend (backends.py).

A *case* is the inputs of one dw_stage or pw_stage call (leaves to differentiate, named by
kind), its activation and whether it computes batch statistics. `check_case` runs it on a
backend and checks, per docs/OPS.md and docs/DESIGN.md §6:

* forward: `out` (dtype, channels_last) against the float64 reference, directly in float32 and
  float64, by the §6 rule in bfloat16/float16; `mean`/`var` against the exact statistics of the
  stored `out` (accumulation dtype), and against the reference in float32/float64; empty when
  not `stats`;
* backward (unless `grads=False`): the gradient of sum(out·c0 + mean·c1 + var·c2) with respect
  to every leaf (x, norm vectors, residual, weight, bias), so the terms that flow back through
  the statistics are tested too; the same tolerances.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from convmixer_kernels.ops import Norm
from reference import (LOW_PRECISION, acc_dtype, act_as_decided, assert_close_direct,
                       assert_close_rule, has_decisions, ref_dw_stage, ref_pw_stage,
                       stats_of_stored, to64)

# Which optional inputs a pw case passes. "norm_residual" is block 0 of the model (BN1 applied
# to x, the stem output added as is); "both_norms_bias" every later block.
PW_PARTS = {
    "plain": (),
    "bias": ("bias",),
    "norm_bias": ("x_norm", "bias"),
    "residual": ("residual",),
    "norm_residual": ("x_norm", "residual"),
    "residual_norm": ("residual", "residual_norm"),
    "both_norms_bias": ("x_norm", "residual", "residual_norm", "bias"),
}
# Which optional inputs a dw case passes.
DW_PARTS = {"plain": (), "bias": ("bias",), "norm": ("x_norm",), "norm_bias": ("x_norm", "bias")}
LAYOUTS = ["nchw", "channels_last", "channel_slice", "transposed"]


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


def make_norm(c, dtype, gen) -> Norm:
    """A BatchNorm-like norm for `dtype` activations (in its accumulation dtype): mean O(0.5),
    scale in [0.5, 1.5], shift O(0.5)."""
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
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], *t.shape[2:], dtype=t.dtype,
                           device=t.device)
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


def dw_case(shape, k, dtype, *, device, act="gelu", stats=True, parts="norm_bias",
            layout="nchw", seed=0) -> Case:
    n, c, h, w = shape
    return _case("dw", DW_PARTS[parts], shape, (c, 1, k, k), 1.0 / k, dtype, device, act, stats,
                 {"x": layout}, seed)


def pw_case(shape, dtype, *, device, act="gelu", stats=True, parts="both_norms_bias",
            layout="nchw", res_layout=None, seed=0) -> Case:
    """`res_layout` is the residual's layout (default: `layout`)."""
    n, cin, cout, h, w = shape
    return _case("pw", PW_PARTS[parts], (n, cin, h, w), (cout, cin, 1, 1), cin ** -0.5, dtype,
                 device, act, stats, {"x": layout, "residual": res_layout or layout}, seed)


def _case(stage, parts, x_shape, weight_shape, weight_scale, dtype, device, act, stats, layouts,
          seed) -> Case:
    """The leaves in the order the stages take them (x, x_norm, residual, residual_norm,
    weight, bias), drawn from one generator; x and the residual in `layouts`."""
    gen = torch.Generator().manual_seed(seed)
    cin, cout = x_shape[1], weight_shape[0]
    leaves, kinds = [randn(*x_shape, dtype=dtype, gen=gen)], ["x"]
    for part in ("x_norm", "residual", "residual_norm"):
        if part not in parts:
            continue
        if part == "residual":
            leaves.append(randn(*x_shape, dtype=dtype, gen=gen))
            kinds.append("residual")
        else:
            leaves += make_norm(cin, dtype, gen)
            kinds += [f"{part}.mean", f"{part}.scale", f"{part}.shift"]
    leaves.append(randn(*weight_shape, dtype=dtype, gen=gen, scale=weight_scale))
    kinds.append("weight")
    if "bias" in parts:
        leaves.append(randn(cout, dtype=dtype, gen=gen, scale=0.5))
        kinds.append("bias")
    leaves = [relayout(t.to(device), layouts[kind]) if kind in layouts else t.to(device)
              for t, kind in zip(leaves, kinds)]
    return Case(stage, leaves, kinds, act, stats, cout)


def stage_args(case: Case, leaves=None):
    """(x, weight, bias) and the keyword inputs (norms, residual) of `case`, from `leaves`
    (default: the case's own)."""
    named = dict(zip(case.kinds, case.leaves if leaves is None else leaves))
    kw = {}
    for prefix in ("x_norm", "residual_norm"):
        if f"{prefix}.mean" in named:
            kw[prefix] = Norm(*(named[f"{prefix}.{p}"] for p in ("mean", "scale", "shift")))
    if "residual" in named:
        kw["residual"] = named["residual"]
    return (named["x"], named["weight"], named.get("bias")), kw


def call(case: Case, backend, act=None, stats=None):
    """fn(*leaves) -> (out, mean, var): the fused stage on `backend` (a backends.Backend), or
    the eager reference (backend "ref"), with `act` overriding the case's (a callable, see
    reference.relu_with_mask) and `stats` the case's."""
    act = case.act if act is None else act
    stats = case.stats if stats is None else stats
    if backend == "ref":
        stage = ref_dw_stage if case.stage == "dw" else ref_pw_stage
    else:
        stage = backend.stage(case.stage)

    def fn(*leaves):
        args, kw = stage_args(case, leaves)
        return stage(*args, act=act, stats=stats, **kw)
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


def cast_cotangents(cots64, dtype):
    """The cotangents as a `dtype` stage receives them: out's in `dtype`, the statistics' in its
    accumulation dtype."""
    return [c.to(dtype if i == 0 else acc_dtype(dtype)) for i, c in enumerate(cots64)]


def run(fn, leaves, cots):
    """Outputs of fn(*leaves) and the gradients of sum(outputs · cots) w.r.t. every leaf."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    outs = fn(*leaves)
    loss = sum((o.to(c.dtype) * c).sum() for o, c in zip(outs, cots))
    return [o.detach() for o in outs], list(torch.autograd.grad(loss, leaves))


def check_case(case: Case, backend, grads: bool = True) -> None:
    """Outputs, statistics and (with `grads`) all gradients of `case` on `backend` against the
    reference. Without `grads` the stage runs on the leaves as they are (views included)."""
    dtype = case.leaves[0].dtype
    acc = acc_dtype(dtype)
    cots64 = cotangents(case) if grads else None

    def outputs(fn, leaves, cots, with_grads=grads):
        if with_grads:
            return run(fn, leaves, cots)
        with torch.no_grad():
            return list(fn(*leaves)), []

    low = dtype in LOW_PRECISION
    got, got_grads = outputs(call(case, backend), case.leaves,
                             cast_cotangents(cots64, dtype) if grads else None)
    out, mean, var = got

    # Forms per docs/OPS.md: out in the input dtype, channels_last; statistics in acc.
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last), (
        out.dtype, out.stride())
    n_stats = case.out_channels if case.stats else 0
    assert mean.shape == (n_stats,) and var.shape == (n_stats,)
    assert mean.dtype == acc and var.dtype == acc
    for g, leaf, kind in zip(got_grads, case.leaves, case.kinds):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, kind

    leaves64 = to64(case.leaves)

    def reference(act=None, with_grads=grads):
        return outputs(call(case, "ref", act), leaves64, cots64, with_grads)

    # Where the gradients are compared under decisions (below), the plain reference's are
    # needed only for the backend's own bound.
    ref, ref_grads = reference(with_grads=grads and not (
        low and has_decisions(case.act) and backend.max_error is None))
    if not low:
        assert_close_direct(out, ref[0], dtype, name="out")
        if case.stats:
            assert_close_direct(mean, ref[1], dtype, name="mean")
            assert_close_direct(var, ref[2], dtype, name="var")
        for g, r, kind in zip(got_grads, ref_grads, case.kinds):
            assert_close_direct(g, r, dtype, name=f"grad of {kind}")
    else:
        eager, eager_grads = outputs(call(case, "ref"), case.leaves,
                                     cast_cotangents(cots64, dtype) if grads else None)
        assert_close_rule(out, eager[0], ref[0], name="out")
        if has_decisions(case.act):
            # Each implementation against float64 under its own on/off decisions (see
            # reference.relu_with_mask), so a flip at the kink does not count as rounding error
            # in the gradients. `out` is held to both comparisons: near the kink neither bound
            # contains the other.
            ref_f, ref_grads_f = reference(act_as_decided(case.act, out))
            ref_e, ref_grads_e = reference(act_as_decided(case.act, eager[0]))
            assert_close_rule(out, eager[0], ref_f[0], name="out (under its decisions)",
                              eager_ref64=ref_e[0])
        else:
            ref_grads_f = ref_grads_e = ref_grads
        for g, e, r, r_e, kind in zip(got_grads, eager_grads, ref_grads_f, ref_grads_e,
                                      case.kinds):
            assert_close_rule(g, e, r, name=f"grad of {kind}", eager_ref64=r_e)
    if case.stats:
        # The statistics are those of `out` as stored (docs/OPS.md), accumulated in `acc`. In low
        # precision their error against float64 *is* the rounding error of the stored `out`,
        # which `out` itself is held to by the rule above; a §6 ratio on the statistics would
        # compare two rounding patterns, not two accuracies: with k=1, out is an affine map of
        # the float16 input grid and its correctly rounded values can bias a channel's variance
        # by 1e-4 relative where eager's double rounding happens not to (measured: 27x eager's
        # error, yet 10x below one float16 ulp).
        stored_mean, stored_var = stats_of_stored(out)
        assert_close_direct(mean, stored_mean, acc, name="mean (of stored out)")
        assert_close_direct(var, stored_var, acc, name="var (of stored out)")
    if backend.max_error is not None:
        bound = backend.max_error[dtype]
        pairs = [("out", out, ref[0])]
        if case.stats:
            pairs += [("mean", mean, ref[1]), ("var", var, ref[2])]
        pairs += [(f"grad of {kind}", g, r)
                  for kind, g, r in zip(case.kinds, got_grads, ref_grads)]
        for name, a, r in pairs:
            assert_max_error(a, r, bound, name)


def assert_max_error(actual, ref64, bound, name):
    """|actual - ref64| <= bound · max|ref64| everywhere (NaN fails)."""
    limit = bound * (float(ref64.double().abs().max()) + 1e-30)
    err = (actual.double() - ref64.double()).abs()
    bad = ~(err <= limit)
    assert not bad.any(), (f"{name}: {int(bad.sum())}/{err.numel()} off, max error "
                           f"{float(err.max()):.3g} > {limit:.3g}")


def gradcheck_case(case: Case, backend) -> bool:
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
