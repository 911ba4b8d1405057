"""The CUDA pw-stage kernels (csrc/cuda/kernels/pw_stage.cuh) run on the CPU under EMULATION.

Each fused kernel around the stage's GEMMs is driven through csrc/cuda/check/pw_stage_check.cu
with CPU tensors as device memory (python_tests/cuda_emulation), and compared with its formula in
docs/OPS.md evaluated in float64: the prologue (norms + residual), the forward epilogue (act and
the statistics of the stored output), the backward epilogue (dP and the bias gradient) and the
norm-gradient kernel, for widths that fill channel blocks exactly and widths that do not, both
load paths, and every storage dtype. The GEMMs themselves are cuBLAS's, run by the torch launcher
and tested with the whole stage on a GPU (the "cuda" cases of python_tests/test_ops.py); there is
no entry point for the whole pw stage, so it is not a "cuda-emu" backend there as the dw stage is.
"""
from __future__ import annotations

import ctypes

import pytest
import torch

from convmixer_kernels.activations import ACTIVATIONS, NAMES
from cuda_emulation import Guarded, bind, launch_log, load_check_library, ptr, reverse_cta_order
from emulated_cuda import (BN_BACKWARD_ARGTYPES, BN_FORWARD_ARGTYPES, DTYPE_CODE, NO_BN_BACKWARD,
                           NO_BN_FORWARD, UNKNOWN_ACT_CODES, act_code, bn_backward_args,
                           bn_forward_args, vec_width)
from reference import acc_dtype, ref_norm, to64
from stage_checks import make_norm, randn

P, LL, SZ = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_size_t
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (rows, channels): one row; a partial row tile; exact and partial channel blocks (a block is
# 32 lanes x 16 bytes: 128 float32, 256 bfloat16 channels); widths that are not a multiple of the
# 16-byte vector (scalar path).
SHAPES = [(1, 16), (7, 24), (300, 37), (130, 256), (70, 264)]


# Relative to the largest magnitude of the reference: one rounding to the storage dtype plus
# float32 accumulation over at most a few hundred rows (float32 2e-6), 2^-8 (bfloat16), 2^-11
# (float16). A wrong channel, row or tile would be off by order one.
TOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_close(actual, expected, dtype, what):
    bound = TOL[dtype] * (float(expected.double().abs().max()) + 1e-30)
    err = (actual.double() - expected.double()).abs()
    bad = ~(err <= bound)
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{err.numel()} off, max error "
                           f"{float(err.max()):.3g} > {bound:.3g}")


class PwKernels:
    def __init__(self):
        self.lib = load_check_library("pw_stage_check.cu")
        self.prologue_fn = bind(self.lib, "convmixer_pw_prologue", ctypes.c_int,
                                [ctypes.c_int, LL, LL] + [P] * 9 + [ctypes.c_int, P])
        self.forward_fn = bind(self.lib, "convmixer_pw_epilogue_forward", ctypes.c_int,
                               [ctypes.c_int, ctypes.c_int, LL, LL, P, P, P, P,
                                *BN_FORWARD_ARGTYPES, P, SZ, ctypes.POINTER(SZ), P])
        self.backward_fn = bind(self.lib, "convmixer_pw_epilogue_backward", ctypes.c_int,
                                [ctypes.c_int, ctypes.c_int, LL, LL, P, P, P, P, P, P, P,
                                 *BN_BACKWARD_ARGTYPES, P, SZ, ctypes.POINTER(SZ), P])
        self.norms_fn = bind(self.lib, "convmixer_pw_through_norms", ctypes.c_int,
                             [ctypes.c_int, LL, LL] + [P] * 15
                             + [ctypes.c_int, P, SZ, ctypes.POINTER(SZ), P])

    @staticmethod
    def _workspace(size):
        return Guarded((max(size.value, 1),), torch.uint8)

    def prologue(self, x, nx, res, nr, offset=0, x_act=None):
        """u; with x_act (a name or a raw code), x read as act(x)."""
        rows, c = x.shape
        xg = Guarded.like(x, offset)
        rg = Guarded.like(res, offset) if res is not None else None
        u = Guarded((rows, c), x.dtype, offset)
        nx = nx or (None, None, None)
        nr = nr or (None, None, None)
        rc = self.prologue_fn(DTYPE_CODE[x.dtype], rows, c, ptr(xg.tensor), *map(ptr, nx),
                              ptr(rg.tensor) if rg else None, *map(ptr, nr), ptr(u.tensor),
                              x_act_code(x_act), None)
        assert rc == 0, f"convmixer_pw_prologue returned cudaError {rc}"
        u.check()
        return u.tensor.clone()

    def epilogue_forward(self, pre, act, stats=True, offset=0, bn=None):
        """(out, mean, var), and with bn = (weight, bias, eps) the folded BatchNorm's scale and
        shift after them."""
        rows, c = pre.shape
        code = DTYPE_CODE[pre.dtype]
        size = SZ(0)
        assert self.forward_fn(code, act_code(act), rows, c, None, None, None, None,
                               *NO_BN_FORWARD, None, 0, ctypes.byref(size), None) == 0
        ws = self._workspace(size)
        pg = Guarded.like(pre, offset)
        # At least one row: an empty tensor's data_ptr() is null, which makes the call a size query.
        out = Guarded((max(rows, 1), c), pre.dtype, offset)
        mean, var = Guarded((c,), acc_dtype(pre.dtype)), Guarded((c,), acc_dtype(pre.dtype))
        bn_args, bn_out = bn_forward_args(bn, c, acc_dtype(pre.dtype))
        rc = self.forward_fn(code, act_code(act), rows, c, ptr(pg.tensor), ptr(out.tensor),
                             ptr(mean.tensor) if stats else None, ptr(var.tensor) if stats else None,
                             *bn_args, ptr(ws.tensor), ws.tensor.numel(), None, None)
        assert rc == 0, f"convmixer_pw_epilogue_forward returned cudaError {rc}"
        for g in (pg, out, ws, mean, var, *bn_out):
            g.check()
        return (out.tensor[:rows].clone(), mean.tensor.clone(), var.tensor.clone(),
                *(g.tensor.clone() for g in bn_out))

    def epilogue_backward(self, grad_out, pre, gm, gv, mean, act, bn=None):
        """dP and the bias gradient (the kernel's last CTAs sum the tiles' partials), and with
        bn = (grad_scale, grad_shift, var, weight, eps) the folded BatchNorm's weight and bias
        gradients after them (with a weight)."""
        rows, c = pre.shape
        code = DTYPE_CODE[pre.dtype]
        size = SZ(0)
        assert self.backward_fn(code, act_code(act), rows, c, None, None, None, None, None, None,
                                None, *NO_BN_BACKWARD, None, 0, ctypes.byref(size), None) == 0
        ws = self._workspace(size)
        dp, db = Guarded((rows, c), pre.dtype), Guarded((c,), pre.dtype)
        bn_args, bn_out = bn_backward_args(bn, c)
        rc = self.backward_fn(code, act_code(act), rows, c, ptr(grad_out), ptr(pre), ptr(gm),
                              ptr(gv), ptr(mean), ptr(dp.tensor), ptr(db.tensor), *bn_args,
                              ptr(ws.tensor), ws.tensor.numel(), None, None)
        assert rc == 0, f"convmixer_pw_epilogue_backward returned cudaError {rc}"
        for g in (dp, db, ws, *bn_out):
            g.check()
        return (dp.tensor.clone(), db.tensor.clone(), *(g.tensor.clone() for g in bn_out))

    def through_norms(self, du, x, nx, res, nr, write_x, write_res, x_act=None):
        """grad_x, grad_res (None where not written) and the gradients of x's and res's norm
        vectors, (mean, scale, shift) each (None without that norm); with x_act, x read as
        act(x)."""
        rows, c = du.shape
        code = DTYPE_CODE[du.dtype]
        acc = acc_dtype(du.dtype)
        size = SZ(0)
        assert self.norms_fn(code, rows, c, *([None] * 15), -1, None, 0, ctypes.byref(size),
                             None) == 0
        ws = self._workspace(size)
        gx = Guarded((rows, c), du.dtype) if write_x else None
        gr = Guarded((rows, c), du.dtype) if write_res else None
        x_grads = [Guarded((c,), acc) for _ in range(3)] if nx else None
        res_grads = [Guarded((c,), acc) for _ in range(3)] if nr else None
        xm, xs = nx[:2] if nx else (None, None)
        rm, rs = nr[:2] if nr else (None, None)
        rc = self.norms_fn(code, rows, c, ptr(du), ptr(x), ptr(xm), ptr(xs), ptr(res), ptr(rm),
                           ptr(rs), ptr(gx.tensor) if gx else None, ptr(gr.tensor) if gr else None,
                           *(ptr(g.tensor) if g else None for g in (x_grads or [None] * 3)),
                           *(ptr(g.tensor) if g else None for g in (res_grads or [None] * 3)),
                           x_act_code(x_act), ptr(ws.tensor), ws.tensor.numel(), None, None)
        assert rc == 0, f"convmixer_pw_through_norms returned cudaError {rc}"
        for g in (gx, gr, ws, *(x_grads or ()), *(res_grads or ())):
            if g is not None:
                g.check()

        def out(gs):
            return tuple(g.tensor.clone() for g in gs) if gs else None
        return (gx.tensor.clone() if gx else None, gr.tensor.clone() if gr else None,
                out(x_grads), out(res_grads))


@pytest.fixture(scope="module")
def kernels():
    return PwKernels()


def rand(shape, dtype, seed, scale=1.0, offset=0.0):
    return (randn(*shape, dtype=torch.float64, gen=_gen(seed), scale=scale) + offset).to(dtype)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def apply_norm(v, norm):
    """The norm of [rows, C] values, in float64."""
    return ref_norm(v.double(), to64(norm))


def act64(act, p):
    return ACTIVATIONS[act].functional(p)


def x_act_code(x_act):
    """The entries' x_act: -1 for none (pw_launch.cuh kNoXAct), an activation's code, or a raw
    code as given."""
    return -1 if x_act is None else act_code(x_act)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_prologue(kernels, dtype, shape):
    rows, c = shape
    x, res = rand(shape, dtype, 1), rand(shape, dtype, 2)
    nx, nr = make_norm(c, dtype, _gen(3)), make_norm(c, dtype, _gen(4))
    for args in ((nx, res, nr), (nx, res, None), (None, res, None), (nx, None, None)):
        u = kernels.prologue(x, args[0], args[1], args[2])
        ref = apply_norm(x, args[0]) + (apply_norm(args[1], args[2]) if args[1] is not None else 0)
        assert_close(u, ref, dtype, f"u with norms {args[0] is not None}/{args[2] is not None}")


@pytest.mark.parametrize("act", NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
def test_epilogue_forward(kernels, dtype, shape, act):
    pre = rand(shape, dtype, 5, scale=2.0, offset=0.3)
    out, mean, var = kernels.epilogue_forward(pre, act)
    ref = act64(act, pre.double())
    assert_close(out, ref, dtype, "out")
    # The statistics are of the output as stored (docs/OPS.md).
    var_ref, mean_ref = torch.var_mean(out.double(), dim=0, unbiased=False)
    stat_tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert_close(mean, mean_ref, torch.float64 if dtype == torch.float64 else torch.float32, "mean")
    assert (var.double() - var_ref).abs().max() <= stat_tol * (float(var_ref.max()) + 1e-30)
    _, mean_eval, _ = kernels.epilogue_forward(pre, act, stats=False)
    assert torch.isnan(mean_eval).all(), "statistics written although none were asked for"


@pytest.mark.parametrize("act", NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
def test_epilogue_backward(kernels, dtype, shape, act):
    rows, c = shape
    acc = acc_dtype(dtype)
    pre = rand(shape, dtype, 6, scale=2.0)
    grad_out = rand(shape, dtype, 7)
    gm, gv = rand((c,), acc, 8), rand((c,), acc, 9)
    out = act64(act, pre.double()).to(dtype)
    mean = out.double().mean(0).to(acc)
    dp, db = kernels.epilogue_backward(grad_out, pre, gm, gv, mean, act)
    # dO = grad_out + gm / M + gv * 2 (o - mean) / M, through act' at p, in float64.
    p64 = pre.double().requires_grad_()
    o64 = act64(act, p64)
    d_o = grad_out.double() + gm.double() / rows + gv.double() * 2 * (out.double() - mean.double()) / rows
    (ref,) = torch.autograd.grad(o64, p64, d_o)
    assert_close(dp, ref, dtype, "dP")
    # The bias gradient sums the stored dP (what the GEMMs see).
    assert_close(db, dp.double().sum(0), dtype, "grad_bias")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
def test_through_norms(kernels, dtype, shape):
    rows, c = shape
    du, x, res = rand(shape, dtype, 10), rand(shape, dtype, 11, offset=1.0), rand(shape, dtype, 12)
    nx, nr = make_norm(c, dtype, _gen(13)), make_norm(c, dtype, _gen(14))
    gx, gr, (xgm, xgs, xgt), (rgm, rgs, rgt) = kernels.through_norms(du, x, nx, res, nr, True,
                                                                      True)
    d = du.double()
    s0 = d.sum(0)
    assert_close(gx, d * nx[1].double(), dtype, "grad_x")
    assert_close(gr, d * nr[1].double(), dtype, "grad_res")
    # The norms' gradients (docs/OPS.md): mean -sum dU scale, scale sum dU (v - mean), shift sum dU.
    assert_close(xgt, s0, dtype, "x: grad shift = sum dU")
    assert_close(rgt, s0, dtype, "res: grad shift = sum dU")
    assert_close(xgm, -s0 * nx[1].double(), dtype, "x: grad mean = -sum dU scale")
    assert_close(rgm, -s0 * nr[1].double(), dtype, "res: grad mean = -sum dU scale")
    assert_close(xgs, (d * (x.double() - nx[0].double())).sum(0), dtype, "sum dU (x - mean)")
    assert_close(rgs, (d * (res.double() - nr[0].double())).sum(0), dtype, "sum dU (res - mean)")
    # One sum of dU behind both norms' gradients, and the mean's is that sum times -scale exactly.
    assert torch.equal(xgt, rgt)
    assert torch.equal(xgm, -xgt * nx[1]) and torch.equal(rgm, -rgt * nr[1])
    # Residual without a norm: grad_res is a copy of dU; the x norm's gradients still come out.
    _, gr, x_grads, res_grads = kernels.through_norms(du, x, nx, res, None, True, True)
    assert torch.equal(gr, du)
    assert res_grads is None
    for a, b in zip(x_grads, (xgm, xgs, xgt)):
        assert torch.equal(a, b)
    # No norm on x (grad_x is dU itself, not written): res's gradients alone.
    gx, _, x_grads, res_grads = kernels.through_norms(du, x, None, res, nr, False, True)
    assert gx is None and x_grads is None
    for a, b in zip(res_grads, (rgm, rgs, rgt)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_through_norms_without_rows(kernels, dtype):
    # No rows: no CTA runs, and every gradient is zero (the sums are empty); the bias's too.
    du = torch.empty((0, 40), dtype=dtype)
    v = torch.ones((1, 40), dtype=dtype)  # x and res: never read, but given (a null res is none)
    nx, nr = make_norm(40, dtype, _gen(20)), make_norm(40, dtype, _gen(21))
    _, _, x_grads, res_grads = kernels.through_norms(du, v, nx, v, nr, True, True)
    acc = acc_dtype(dtype)
    _, gb = kernels.epilogue_backward(du, du, torch.zeros(40, dtype=acc),
                                      torch.zeros(40, dtype=acc), torch.zeros(40, dtype=acc),
                                      "gelu")
    for g in (*x_grads, *res_grads, gb):
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("act", NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 24), (300, 37), (130, 256)], ids=str)
def test_x_act_reads_x_as_the_stored_activation(kernels, dtype, shape, act):
    # x a pre-activation (the dw stage wrote only a): the prologue and through-norms read act(x)
    # rounded to storage, bitwise what they give on the stored out of the epilogue's act (the
    # same device function), and grad_x is then act(x)'s gradient, dU times x's scale.
    rows, c = shape
    a = rand(shape, dtype, 40, scale=2.0)
    stored = kernels.epilogue_forward(a, act, stats=False)[0]
    res, du = rand(shape, dtype, 41), rand(shape, dtype, 42)
    nx, nr = make_norm(c, dtype, _gen(43)), make_norm(c, dtype, _gen(44))
    # (None, None, None): the launcher runs the prologue for act(x) alone too.
    for args in ((nx, res, nr), (nx, None, None), (None, res, None), (None, None, None)):
        u = kernels.prologue(a, *args, x_act=act)
        assert torch.equal(u, kernels.prologue(stored, *args))
        ref = apply_norm(act64(act, a.double()).to(dtype), args[0])
        if args[1] is not None:
            ref = ref + apply_norm(args[1], args[2])
        assert_close(u, ref, dtype, f"u with x read as {act}(x)")
    got = kernels.through_norms(du, a, nx, res, nr, True, True, x_act=act)
    want = kernels.through_norms(du, stored, nx, res, nr, True, True)
    for g, w in zip((got[0], got[1], *got[2], *got[3]), (want[0], want[1], *want[2], *want[3])):
        assert torch.equal(g, w)


@pytest.mark.parametrize("code", [c for c in UNKNOWN_ACT_CODES if c != -1] + [-2])
def test_unknown_x_act_code_is_refused(kernels, code):
    # -1 is "no x act"; any other code the list lacks is an error before any kernel runs.
    rows, c = SHAPES[2]
    x, du = rand((rows, c), torch.float32, 45), rand((rows, c), torch.float32, 46)
    nx = make_norm(c, torch.float32, _gen(47))
    launch_log(kernels.lib)
    with pytest.raises(AssertionError, match=r"returned cudaError 1\b"):
        kernels.prologue(x, nx, None, None, x_act=code)
    with pytest.raises(AssertionError, match=r"returned cudaError 1\b"):
        kernels.through_norms(du, x, nx, None, None, True, False, x_act=code)
    assert launch_log(kernels.lib) == []


@pytest.mark.parametrize("code", UNKNOWN_ACT_CODES)
def test_unknown_activation_code_is_refused(kernels, code):
    # An activation code the C++ list lacks is an error before any kernel runs, never another
    # activation's kernels.
    rows, c = SHAPES[2]
    pre, grad_out = rand((rows, c), torch.float32, 17), rand((rows, c), torch.float32, 18)
    stat = rand((c,), torch.float32, 19)
    launch_log(kernels.lib)
    with pytest.raises(AssertionError, match=r"returned cudaError 1\b"):
        kernels.epilogue_forward(pre, code)
    with pytest.raises(AssertionError, match=r"returned cudaError 1\b"):
        kernels.epilogue_backward(grad_out, pre, stat, stat, stat, code)
    assert launch_log(kernels.lib) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_scalar_path_is_bitwise_the_vector_path(kernels, dtype):
    shape = (150, 2 * 32 * vec_width(dtype))  # two full channel blocks
    pre = rand(shape, dtype, 15)
    a = kernels.epilogue_forward(pre, "gelu")
    b = kernels.epilogue_forward(pre, "gelu", offset=1)  # off the 16-byte boundary: scalar loads
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("shape", [(300, 37), (1100, 264)], ids=str)
def test_results_do_not_depend_on_cta_order(kernels, shape):
    # Another CTA of each channel block is the last to finish and finalizes its sums: the same
    # bits, since it merges every tile in an order fixed by the shape. (1100, 264): 18 tiles of
    # 64 rows, more than the 8 row groups that fold them, and two channel blocks, one partial.
    rows, c = shape
    acc = acc_dtype(torch.float32)
    pre, grad_out = rand(shape, torch.float32, 16), rand(shape, torch.float32, 31)
    x, res = rand(shape, torch.float32, 32), rand(shape, torch.float32, 33)
    nx, nr = make_norm(c, torch.float32, _gen(34)), make_norm(c, torch.float32, _gen(35))
    gm, gv, mean = rand((c,), acc, 36), rand((c,), acc, 37), rand((c,), acc, 38)

    def run():
        return (*kernels.epilogue_forward(pre, "gelu"),
                *kernels.epilogue_backward(grad_out, pre, gm, gv, mean, "gelu"),
                *(t for grads in kernels.through_norms(grad_out, x, nx, res, nr, True, True)[2:]
                  for t in grads))
    a = run()
    with reverse_cta_order(kernels.lib):
        b = run()
    for u, v in zip(a, b):
        assert torch.equal(u, v)
