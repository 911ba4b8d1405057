"""The stages' folded BatchNorm (csrc/cuda/kernels/bn_math.cuh) run on the CPU under EMULATION.

A stage that folds its output's BatchNorm in must give, bitwise, what the stage without it and the
BatchNorm glue kernels it replaces give one after the other: the forward's last CTAs write the
Norm's scale and shift as bn_scale_shift_kernel does from the same var, and the backward's
per-channel loads form bn_scale_shift_backward_kernel's var gradient (added to the statistics'
own, as autograd adds the two) and its weight and bias gradients. Every storage dtype, affine or
not, BatchNorm parameters in another dtype than the accumulation's, the CTAs in either order, and
the stages without rows (no CTA runs, the fold's own kernels do).
"""
from __future__ import annotations

import pytest
import torch

from cuda_emulation import reverse_cta_order
from emulated_cuda import dw_kernels, dw_reversed_ctas, dw_target_ctas
from reference import acc_dtype
from stage_checks import assert_bitwise, dw_case, make_norm, randn
from test_cuda_emulation_bn import BnKernels
from test_cuda_emulation_pw import PwKernels

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
EPS = 1e-5


@pytest.fixture(scope="module")
def bn():
    return BnKernels()


@pytest.fixture(scope="module")
def pw():
    return PwKernels()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _params(c, dtype, affine, seed):
    """The BatchNorm's (weight, bias): a model's parameters are float32 under autocast, the
    model's dtype otherwise; None, None when not affine."""
    if not affine:
        return None, None
    gen = _gen(seed)
    weight = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    return weight, randn(c, dtype=torch.float64, gen=gen).to(dtype)


def _param_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _grads(c, acc, seed, shift=True):
    gen = _gen(seed)
    return (randn(c, dtype=acc, gen=gen), randn(c, dtype=acc, gen=gen) if shift else None)


def _glue_backward(bn, grad_scale, grad_shift, var, weight, bias, acc):
    """The glue's (grad_var, grad_weight, grad_bias) of the folded BatchNorm."""
    return bn.scale_shift_backward(grad_scale, grad_shift, var, weight, bias, EPS, acc)


# ---- pw: the epilogue kernels

@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [300, 0])
def test_pw_forward_fold_is_the_glue(pw, bn, dtype, affine, rows):
    c, acc = 264, acc_dtype(dtype)
    pre = randn(rows, c, dtype=torch.float64, gen=_gen(1)).to(dtype)
    weight, bias = _params(c, _param_dtype(dtype), affine, 2)
    out, mean, var = pw.epilogue_forward(pre, "gelu")
    scale, shift = bn.scale_shift(var, weight, bias, EPS, acc)
    folded = pw.epilogue_forward(pre, "gelu", bn=(weight, bias, EPS))
    assert_bitwise(folded, (out, mean, var, scale, shift))
    if rows == 0:
        assert torch.isnan(folded[3]).all()  # the norm of no rows' NaN var


@pytest.mark.parametrize("own_grad_var", [False, True], ids=["bn_only", "with_own"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [300, 0])
def test_pw_backward_fold_is_the_glue(pw, bn, dtype, affine, own_grad_var, rows):
    c, acc = 264, acc_dtype(dtype)
    pre = randn(rows, c, dtype=torch.float64, gen=_gen(3)).to(dtype)
    grad_out = randn(rows, c, dtype=torch.float64, gen=_gen(4)).to(dtype)
    _, mean, var = pw.epilogue_forward(pre, "gelu")
    weight, bias = _params(c, _param_dtype(dtype), affine, 5)
    grad_scale, grad_shift = _grads(c, acc, 6)
    gm, own = _grads(c, acc, 7)
    own = own if own_grad_var else None
    gv_bn, gw, gb = _glue_backward(bn, grad_scale, grad_shift, var, weight, bias, acc)
    expected = pw.epilogue_backward(grad_out, pre, gm, gv_bn if own is None else own + gv_bn,
                                    mean, "gelu")
    folded = pw.epilogue_backward(grad_out, pre, gm, own, mean, "gelu",
                                  bn=(grad_scale, grad_shift, var, weight, EPS))
    assert_bitwise(folded, (*expected, *((gw, gb) if affine else ())))


def test_pw_fold_does_not_depend_on_the_cta_order(pw):
    c, dtype = 264, torch.float32
    pre = randn(1000, c, dtype=torch.float64, gen=_gen(8)).to(dtype)
    weight, bias = _params(c, dtype, True, 9)
    grad_out = randn(1000, c, dtype=torch.float64, gen=_gen(10)).to(dtype)
    grad_scale, grad_shift = _grads(c, dtype, 11)

    def run():
        fwd = pw.epilogue_forward(pre, "relu", bn=(weight, bias, EPS))
        bwd = pw.epilogue_backward(grad_out, pre, None, None, fwd[1], "relu",
                                   bn=(grad_scale, grad_shift, fwd[2], weight, EPS))
        return (*fwd, *bwd)

    first = run()
    with reverse_cta_order(pw.lib):
        assert_bitwise(run(), first)


def test_pw_gradients_without_the_scale_are_zero(pw, bn):
    """grad_scale None (only the shift was used): no var gradient, grad_weight 0, grad_bias the
    shift's, as the glue gives."""
    c, dtype = 40, torch.float32
    pre = randn(70, c, dtype=torch.float64, gen=_gen(12)).to(dtype)
    grad_out = randn(70, c, dtype=torch.float64, gen=_gen(13)).to(dtype)
    _, mean, var = pw.epilogue_forward(pre, "gelu")
    weight, bias = _params(c, dtype, True, 14)
    _, grad_shift = _grads(c, dtype, 15)
    gv_bn, gw, gb = _glue_backward(bn, None, grad_shift, var, weight, bias, dtype)
    assert not gv_bn.any() and not gw.any()
    folded = pw.epilogue_backward(grad_out, pre, None, None, mean, "gelu",
                                  bn=(None, grad_shift, var, weight, EPS))
    assert_bitwise(folded, (*pw.epilogue_backward(grad_out, pre, None, gv_bn, mean, "gelu"),
                            gw, gb))


# ---- dw: the whole stage

def _dw_inputs(dtype, shape, k, seed):
    x, m, s, t, weight, bias = dw_case(shape, k, dtype, device="cpu", seed=seed).leaves
    return x, (m, s, t), weight, bias


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dw_fold_is_the_glue(bn, dtype, affine):
    shape, k, acc = (2, 40, 9, 10), 5, acc_dtype(dtype)
    kernels = dw_kernels()
    x, norm, weight, bias = _dw_inputs(dtype, shape, k, 16)
    c = shape[1]
    bn_weight, bn_bias = _params(c, _param_dtype(dtype), affine, 17)
    with dw_target_ctas(16):
        out, mean, var = kernels.forward(x, norm, weight, bias, "gelu", True)
        scale, shift = bn.scale_shift(var, bn_weight, bn_bias, EPS, acc)
        folded = kernels.forward(x, norm, weight, bias, "gelu", True,
                                 bn=(bn_weight, bn_bias, EPS))
        assert_bitwise(folded, (out, mean, var, scale, shift))

        grad_out = randn(*shape, dtype=torch.float64, gen=_gen(18)).to(dtype)
        grad_scale, grad_shift = _grads(c, acc, 19)
        gm, own = _grads(c, acc, 20)
        gv_bn, gw, gb = _glue_backward(bn, grad_scale, grad_shift, var, bn_weight, bn_bias, acc)
        for own_var in (None, own):
            expected = kernels.backward(grad_out, gm, gv_bn if own_var is None else own_var + gv_bn,
                                        mean, x, norm, weight, bias, "gelu", out=out)
            fold = (grad_scale, grad_shift, var, bn_weight, EPS)
            got = kernels.backward(grad_out, gm, own_var, mean, x, norm, weight, bias, "gelu",
                                   out=out, bn=fold)
            assert_bitwise(got, (*expected, *((gw, gb) if affine else ())))
            with dw_reversed_ctas():
                assert_bitwise(kernels.backward(grad_out, gm, own_var, mean, x, norm, weight,
                                                bias, "gelu", out=out, bn=fold), got)


def test_dw_fold_without_pixels(bn):
    """No pixels: no CTA runs; the statistics are NaN and so is the norm, the BatchNorm's
    gradients still come back (grad_bias the shift's)."""
    dtype, c = torch.float32, 24
    kernels = dw_kernels()
    x = torch.empty(2, c, 0, 5)
    norm = make_norm(c, dtype, _gen(21))
    weight, bias = torch.ones(c, 1, 3, 3), torch.zeros(c)
    bn_weight, bn_bias = _params(c, dtype, True, 22)
    out, mean, var, scale, shift = kernels.forward(x, norm, weight, bias, "gelu", True,
                                                   bn=(bn_weight, bn_bias, EPS))
    assert torch.isnan(var).all() and torch.isnan(scale).all()
    assert torch.equal(shift, bn_bias)
    grad_scale, grad_shift = _grads(c, dtype, 23)
    *_, gw, gb = kernels.backward(torch.empty_like(x), None, None, mean, x, norm, weight, bias,
                                  "gelu", bn=(grad_scale, grad_shift, var, bn_weight, EPS))
    _, gw_glue, gb_glue = _glue_backward(bn, grad_scale, grad_shift, var, bn_weight, bn_bias,
                                         dtype)
    assert_bitwise((gw, gb), (gw_glue, gb_glue))


# ---- the residual's dU handed to the dw backward unscaled (ops.mixer_block's link)

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dw_grad_out_scale_is_the_scaled_grad_out(dtype):
    """grad_out_scale: the backward-data kernel scales grad_out (dU) on load; in float32 and
    float64 the bits of the scaled gradient passed in, in 16-bit storage within its one rounding
    (the product is not rounded to the storage dtype first)."""
    shape, k, acc = (2, 40, 9, 10), 5, acc_dtype(dtype)
    kernels = dw_kernels()
    x, norm, weight, bias = _dw_inputs(dtype, shape, k, 24)
    c = shape[1]
    with dw_target_ctas(16):
        out, mean, _ = kernels.forward(x, norm, weight, bias, "gelu", True)
        du = randn(*shape, dtype=torch.float64, gen=_gen(25)).to(dtype)
        scale = (torch.rand(c, generator=_gen(26), dtype=torch.float64) + 0.5).to(acc)
        gm, gv = _grads(c, acc, 27)
        got = kernels.backward(du, gm, gv, mean, x, norm, weight, bias, "gelu", out=out,
                               grad_res=du, grad_out_scale=scale)
        scaled = (du.to(acc) * scale.view(1, -1, 1, 1)).to(dtype)
        want = kernels.backward(scaled, gm, gv, mean, x, norm, weight, bias, "gelu", out=out,
                                grad_res=du)
    if dtype in (torch.float32, torch.float64):
        assert_bitwise(got, want)
    else:
        for g, w in zip(got[:3], want[:3]):  # grad_x, grad_weight, grad_bias
            bound = 4 * torch.finfo(dtype).eps * float(w.double().abs().max())
            assert float((g.double() - w.double()).abs().max()) <= bound


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_through_norms_without_grad_x(pw, dtype):
    """grad_x not asked for (deferred to the dw backward's load): nothing written, and the
    norms' gradients the bits they are when it is."""
    rows, c = 300, 264
    gen = _gen(28)
    du, x, res = (randn(rows, c, dtype=torch.float64, gen=gen).to(dtype) for _ in range(3))
    nx, nr = make_norm(c, dtype, _gen(29)), make_norm(c, dtype, _gen(30))
    with_x = pw.through_norms(du, x, nx, res, nr, True, False)
    without = pw.through_norms(du, x, nx, res, nr, False, False)
    assert without[0] is None
    assert_bitwise([t for g in with_x[2:] for t in (g or ())],
                   [t for g in without[2:] for t in (g or ())])

