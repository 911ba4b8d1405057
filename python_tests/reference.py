"""Pure-PyTorch eager reference of the fused stages (docs/OPS.md), and the tolerance rules.

The reference is written the way eager PyTorch computes a ConvMixer block, one op at a time:
the norm is materialised in the activation dtype (as BatchNorm2d's output is), the depthwise
conv is ``F.conv2d(groups=C)``, the pointwise conv ``F.conv2d`` with a 1×1 weight, the
activation its table entry's ``functional`` (convmixer_kernels.activations: ``F.gelu``, exact erf,
or ``F.relu``), the statistics ``torch.var_mean(unbiased=False)``
of the stored output in the accumulation dtype. Run on float64 copies of the inputs it is the
ground truth; run in the inputs' own dtype it is "eager in the same dtype", the yardstick of the
low-precision rule (docs/DESIGN.md §6).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from convmixer_kernels.activations import ACTIVATIONS

LOW_PRECISION = (torch.bfloat16, torch.float16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norm vectors and statistics are kept in (docs/OPS.md)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def ref_norm(v: torch.Tensor, norm: Optional[Sequence[torch.Tensor]]) -> torch.Tensor:
    """(v - mean) * scale + shift per channel (dim 1: [N, C, H, W] or [rows, C]), computed in
    the norm's dtype and stored in v's."""
    if norm is None:
        return v
    mean, scale, shift = (t.view(1, -1, *[1] * (v.dim() - 2)) for t in norm)
    return ((v.to(scale.dtype) - mean) * scale + shift).to(v.dtype)


def _stats(out: torch.Tensor, stats: bool):
    acc = acc_dtype(out.dtype)
    if not stats:
        empty = out.new_empty((0,), dtype=acc)
        return empty, empty
    var, mean = torch.var_mean(out.to(acc), dim=(0, 2, 3), unbiased=False)
    return mean, var


def _act(act):
    """An activation by name, or a callable (e.g. a ReLU with a given mask, see relu_with_mask)."""
    return act if callable(act) else ACTIVATIONS[act].functional


def relu_with_mask(mask: torch.Tensor):
    """ReLU whose on/off decisions are those of `mask` (True where the input counts as > 0).

    In low precision a pre-activation within rounding of 0 may switch sides between two
    implementations; ReLU's gradient there jumps by the whole upstream gradient, so comparing
    gradients across such a flip measures the coin toss, not the arithmetic. Giving the float64
    reference the tested implementation's own decisions (read off its output: relu(p) > 0
    exactly when p > 0) isolates the rounding error, which is what the §6 rule is about.
    """
    def act(a):
        return a * mask.to(a.dtype)
    return act


# The activations whose derivative jumps, each with its maths under given on/off decisions, read
# off an implementation's output (see relu_with_mask).
_UNDER_DECISIONS = {"relu": lambda out: relu_with_mask(out > 0)}


def has_decisions(act: str) -> bool:
    """Whether low-precision comparisons of `act` need act_as_decided."""
    return act in _UNDER_DECISIONS


def act_as_decided(act: str, out: torch.Tensor):
    """What the float64 reference computes `act` as when judging the implementation whose output
    is `out`: `act` itself, or, where its derivative jumps, the same maths under `out`'s
    decisions."""
    return _UNDER_DECISIONS[act](out) if has_decisions(act) else act


def ref_dw_stage(x, weight, bias=None, *, act="gelu", x_norm=None, stats=True):
    """act(depthwise_conv2d(norm(x), weight, padding=k//2) + bias), and its batch statistics."""
    k = weight.shape[-1]
    a = F.conv2d(ref_norm(x, x_norm), weight, bias, padding=k // 2, groups=x.shape[1])
    out = _act(act)(a)
    return (out, *_stats(out, stats))


def ref_pw_stage(x, weight, bias=None, *, act="gelu", x_norm=None, residual=None,
                 residual_norm=None, stats=True):
    """act(conv1x1(norm_x(x) + norm_res(residual), weight) + bias), and its batch statistics."""
    u = ref_norm(x, x_norm)
    if residual is not None:
        u = u + ref_norm(residual, residual_norm)
    out = _act(act)(F.conv2d(u, weight, bias))
    return (out, *_stats(out, stats))


def to64(obj):
    """A float64 copy of a tensor, or of every tensor in a (nested) tuple/list/dict."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(torch.float64)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # NamedTuple (Norm)
        return type(obj)(*(to64(v) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(to64(v) for v in obj)
    if isinstance(obj, dict):
        return {k: to64(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------------------------
# Tolerances.
#
# float64 and float32 are compared directly against the float64 reference, elementwise, with
# |actual - ref| <= atol * scale + rtol * |ref|, where scale = max(1, max|ref|) so that a
# tensor of large values (a gradient summed over a batch) is judged relative to its magnitude.
#
# * float64: unit roundoff 1.1e-16. The longest sums in these tests have ~10^3 terms (k² <= 225
#   taps; N·H·W <= a few hundred for the reductions; Cin <= 40), whose worst-case rounding is
#   ~10^3 · 1.1e-16 ≈ 1e-13 of the summed magnitudes; 1e-10 leaves three orders of margin for
#   cancellation and still catches any real bug (a wrong term is O(1)).
# * float32: unit roundoff 6e-8; the same ~10^3-term sums give a typical (random-walk) error of
#   ~sqrt(10^3) · 6e-8 ≈ 2e-6 of the summed magnitudes (the linear worst case, 6e-5, needs
#   every rounding to go the same way); the vectorised erf/exp of the GELU are accurate to a few
#   ulp. atol 1e-5 (relative to scale) with rtol 1e-5 is 5x the typical error; a missing or
#   wrong term is orders of magnitude larger.
DIRECT_TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
}

# Low precision (docs/DESIGN.md §6, as FlashAttention's tests): the fused result's error against the
# float64 reference may be at most RULE_FACTOR × the error of eager PyTorch in the same dtype
# against that reference, plus a tiny absolute floor (relative to the reference's magnitude)
# that only matters when eager happens to be exact.
#
# The error is the max abs error for activation-shaped tensors (thousands of elements), as
# FlashAttention measures it. For per-channel vectors (norm and bias gradients: a few dozen
# sums over the batch) it is the RMS error: there both implementations sum values rounded to
# the storage dtype in the same way, so their errors are draws of the same noise, and the max
# of a few dozen such draws fluctuates by more than 2x from seed to seed (measured: up to 2.2x
# over 10 seeds in float16), while their RMS stays within 1.6x; a real bug (a wrong or missing
# term) moves either far beyond 2x.
RULE_FACTOR = 2.0
RULE_FLOOR = 1e-6


def _check_layout(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert not actual.is_complex()


def _nan_mask_equal(actual, ref, name):
    a_nan, r_nan = torch.isnan(actual), torch.isnan(ref)
    assert torch.equal(a_nan, r_nan), (
        f"{name}: NaN positions differ ({int(a_nan.sum())} NaN in actual, {int(r_nan.sum())} in "
        "reference)")
    return ~r_nan


def assert_close_direct(actual: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype,
                        name: str = "tensor") -> None:
    """float64/float32 result vs the float64 reference, with DIRECT_TOL[dtype]."""
    _check_layout(actual, ref64, name)
    tol = DIRECT_TOL[dtype]
    a, r = actual.detach().to(torch.float64), ref64.detach().to(torch.float64)
    keep = _nan_mask_equal(a, r, name)
    a, r = a[keep], r[keep]
    if r.numel() == 0:
        return
    scale = max(1.0, r.abs().max().item())
    err = (a - r).abs()
    bound = tol["atol"] * scale + tol["rtol"] * r.abs()
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (
        f"{name} ({dtype}): max error {err.max().item():.3e}, at index {worst.item()} "
        f"|{a[worst].item():.8g} - {r[worst].item():.8g}| > bound {bound[worst].item():.3e}")


def rule_errors(actual: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor,
                eager_ref64: Optional[torch.Tensor] = None):
    """(fused error, eager error, floor) against the float64 reference: max abs errors, or
    RMS errors for per-channel vectors (see RULE_FACTOR).

    `eager_ref64`, when given, is the reference eager's error is measured against (the same
    computation under eager's own discrete decisions, see relu_with_mask); else `ref64`.
    """
    er = ref64 if eager_ref64 is None else eager_ref64
    a, e, r, r_e = (t.detach().to(torch.float64) for t in (actual, eager, ref64, er))
    keep = _nan_mask_equal(a, r, "fused") & _nan_mask_equal(e, r_e, "eager")
    per_channel = actual.dim() <= 1
    a, e, r, r_e = a[keep], e[keep], r[keep], r_e[keep]
    if r.numel() == 0:
        return 0.0, 0.0, 0.0
    floor = RULE_FLOOR * max(1.0, r.abs().max().item())
    if per_channel:
        return ((a - r).pow(2).mean().sqrt().item(), (e - r_e).pow(2).mean().sqrt().item(),
                floor)
    return (a - r).abs().max().item(), (e - r_e).abs().max().item(), floor


def assert_close_rule(actual: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor,
                      name: str = "tensor", factor: float = RULE_FACTOR,
                      eager_ref64: Optional[torch.Tensor] = None) -> None:
    """docs/DESIGN.md §6: err(fused) <= factor · err(eager same dtype) + floor, vs float64.

    `actual` and `eager` may be of any dtype (statistics come in float32 for low-precision
    activations); both are measured in float64.
    """
    _check_layout(actual, ref64, name)
    _check_layout(eager, ref64, name)
    fused_err, eager_err, floor = rule_errors(actual, eager, ref64, eager_ref64)
    kind = "RMS" if actual.dim() <= 1 else "max"
    assert fused_err <= factor * eager_err + floor, (
        f"{name}: fused {kind} error {fused_err:.3e} > {factor} x eager error {eager_err:.3e} "
        f"+ {floor:.1e}")


def stats_of_stored(out: torch.Tensor):
    """(mean, biased var) per channel of `out` exactly as stored, computed in float64.

    docs/OPS.md defines the ops' statistics as those of the output *after* rounding to the
    output dtype, so this is their exact value; only the op's accumulation error remains.
    """
    var, mean = torch.var_mean(out.detach().to(torch.float64), dim=(0, 2, 3), unbiased=False)
    return mean, var


def assert_close(actual: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype,
                 eager: Optional[torch.Tensor] = None, name: str = "tensor") -> None:
    """Dispatches on the activation dtype: direct comparison, or the §6 rule (needs `eager`)."""
    if dtype in LOW_PRECISION:
        assert eager is not None, "the low-precision rule needs the eager same-dtype result"
        assert_close_rule(actual, eager, ref64, name)
    else:
        assert_close_direct(actual, ref64, dtype, name)
