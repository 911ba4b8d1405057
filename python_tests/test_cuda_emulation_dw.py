"""The CUDA dw-stage kernels (csrc/cuda/kernels/dw_stage.cuh) run on the CPU under EMULATION.

Through the extern "C" entry points of csrc/cuda/check/dw_stage_check.cu, with CPU tensors as
device memory (python_tests/cuda_emulation): forward (train and eval), backward (dA, dW, db, dX and
the norm's sums) against a float64 autograd reference, for the register-tap fast paths (k = 3, 5,
7, 9) and the generic path (k = 1, 11, 15; and every k in float64), odd sizes, channel counts that
leave partial channel blocks, the 16-byte and the scalar load paths, and determinism. What this
cannot check (races, real GPU arithmetic, speed) is for python_tests/test_cuda_gpu.py on a GPU.
"""
from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from convmixer_kernels.activations import ACTIVATIONS, NAMES
from cuda_emulation import Guarded, bind, launch_log, load_check_library, ptr, reverse_cta_order

DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
# Codes csrc/activation.h does not have.
UNKNOWN_ACT_CODES = [-1, max(a.code for a in ACTIVATIONS.values()) + 1]
P = ctypes.c_void_p
LL = ctypes.c_longlong
SZ = ctypes.c_size_t


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def act_code(act):
    """The entry points' code of an activation name; an int passes as it is (an unknown code)."""
    return act if isinstance(act, int) else ACTIVATIONS[act].code


class DwKernels:
    def __init__(self):
        self.lib = load_check_library("dw_stage_check.cu")
        self.fwd = bind(self.lib, "convmixer_dw_forward", ctypes.c_int, [
            ctypes.c_int, ctypes.c_int, P, LL, LL, LL, LL, ctypes.c_int,  # dtype act x N C H W K
            P, P, P, P, P, P, P, P,                                         # norm w b out mean var
            P, SZ, ctypes.POINTER(SZ), P])                                  # ws, size, size out, stream
        self.bwd = bind(self.lib, "convmixer_dw_backward", ctypes.c_int, [
            ctypes.c_int, ctypes.c_int, P, P, P, P, P, LL, LL, LL, LL, ctypes.c_int,
            P, P, P, P, P, P, P, P, P, P, P,
            P, SZ, ctypes.POINTER(SZ), P])

    @staticmethod
    def _shape(x):
        n, c, h, w = x.shape
        return n, c, h, w

    def forward(self, x, norm, weight, bias, act, stats, x_offset=0):
        """(out NCHW view of NHWC memory, mean, var); x NCHW-shaped channels_last."""
        n, c, h, w = self._shape(x)
        k = weight.shape[-1]
        dtype = x.dtype
        acc = acc_dtype(dtype)
        xg = Guarded((n, h, w, c), dtype, offset=x_offset)
        xg.tensor.copy_(x.permute(0, 2, 3, 1))
        size = SZ(0)
        code = DTYPE_CODE[dtype]
        assert self.fwd(code, act_code(act), ptr(xg.tensor), n, c, h, w, k, *([None] * 9),
                        0, ctypes.byref(size), None) == 0
        ws = Guarded((max(size.value, 1),), torch.uint8)
        out = Guarded((n, h, w, c), dtype)
        mean, var = Guarded((c,), acc), Guarded((c,), acc)
        nm, ns, nt = norm if norm is not None else (None, None, None)
        rc = self.fwd(code, act_code(act), ptr(xg.tensor), n, c, h, w, k, ptr(nm), ptr(ns), ptr(nt),
                      ptr(weight.contiguous()), ptr(bias), ptr(out.tensor),
                      ptr(mean.tensor) if stats else None, ptr(var.tensor) if stats else None,
                      ptr(ws.tensor), ws.tensor.numel(), None, None)
        assert rc == 0, f"convmixer_dw_forward returned cudaError {rc}"
        for g in (xg, ws, out, mean, var):
            g.check()
        return out.tensor.permute(0, 3, 1, 2).clone(), mean.tensor.clone(), var.tensor.clone()

    def backward(self, grad_out, grad_mean, grad_var, mean, x, norm, weight, bias, act):
        """(grad_x, grad_weight, grad_bias, sum_dx, sum_dx_xc)."""
        n, c, h, w = self._shape(x)
        k = weight.shape[-1]
        dtype = x.dtype
        acc = acc_dtype(dtype)
        nhwc = lambda t: Guarded.like(t.permute(0, 2, 3, 1).contiguous())  # noqa: E731
        xg, gog = nhwc(x), nhwc(grad_out)
        size = SZ(0)
        code = DTYPE_CODE[dtype]
        args_head = (code, act_code(act))
        assert self.bwd(*args_head, None, None, None, None, None, n, c, h, w, k, *([None] * 11),
                        None, 0, ctypes.byref(size), None) == 0
        ws = Guarded((max(size.value, 1),), torch.uint8)
        grad_pre, grad_x = Guarded((n, h, w, c), dtype), Guarded((n, h, w, c), dtype)
        grad_w, grad_b = Guarded((c, k * k), dtype), Guarded((c,), dtype)
        sum_dx, sum_dx_xc = Guarded((c,), acc), Guarded((c,), acc)
        nm, ns, nt = norm if norm is not None else (None, None, None)
        rc = self.bwd(*args_head, ptr(gog.tensor), ptr(grad_mean), ptr(grad_var), ptr(mean),
                      ptr(xg.tensor), n, c, h, w, k, ptr(nm), ptr(ns), ptr(nt),
                      ptr(weight.contiguous()), ptr(bias), ptr(grad_pre.tensor),
                      ptr(grad_x.tensor), ptr(grad_w.tensor), ptr(grad_b.tensor),
                      ptr(sum_dx.tensor), ptr(sum_dx_xc.tensor), ptr(ws.tensor),
                      ws.tensor.numel(), None, None)
        assert rc == 0, f"convmixer_dw_backward returned cudaError {rc}"
        for g in (xg, gog, ws, grad_pre, grad_x, grad_w, grad_b):
            g.check()
        if norm is not None:
            sum_dx.check()
            sum_dx_xc.check()
        return (grad_x.tensor.permute(0, 3, 1, 2).clone(), grad_w.tensor.view(c, 1, k, k).clone(),
                grad_b.tensor.clone(), sum_dx.tensor.clone(), sum_dx_xc.tensor.clone())


@pytest.fixture(scope="module")
def kernels():
    return DwKernels()


def make_inputs(shape, k, dtype, seed, with_norm=True, with_bias=True):
    n, c, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    acc = acc_dtype(dtype)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=gen, dtype=torch.float64) * scale)  # noqa: E731
    x = rnd(n, c, h, w).to(dtype)
    norm = None
    if with_norm:
        norm = ((rnd(c) * 0.5).to(acc), (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(acc),
                (rnd(c) * 0.5).to(acc))
    weight = rnd(c, 1, k, k, scale=1.0 / k).to(dtype)
    bias = rnd(c, scale=0.5).to(dtype) if with_bias else None
    return x, norm, weight, bias


def reference_forward(x, norm, weight, bias, act):
    """float64 autograd graph of the stage: (xn leaf pieces, out, mean, var)."""
    v = x.double()
    if norm is not None:
        m, s, t = (q.double().view(1, -1, 1, 1) for q in norm)
        v = (v - m) * s + t
    a = F.conv2d(v, weight.double(), None if bias is None else bias.double(),
                 padding=weight.shape[-1] // 2, groups=x.shape[1])
    out = ACTIVATIONS[act].functional(a)
    var, mean = torch.var_mean(out, dim=(0, 2, 3), unbiased=False)
    return out, mean, var


def scale_of(t):
    return float(t.double().abs().max()) + 1e-30


# Tolerances against float64, relative to the tensor's largest magnitude. float32: the k*k-term
# sums and the fixed-order reductions of at most a few thousand terms stay well inside 1e-5.
# bfloat16/float16: one rounding of the stored value (2^-8 / 2^-11 relative) dominates; dX is
# computed from dA stored in the storage dtype, so it carries that rounding once more. Indexing or
# tiling mistakes show up as errors of order 1, far above these bounds.
TOL = {torch.float32: 2e-5, torch.float64: 1e-11, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def assert_close(actual, expected, dtype, what):
    bound = TOL[dtype] * scale_of(expected)
    err = (actual.double() - expected.double()).abs()
    bad = ~(err <= bound)
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{err.numel()} off, max error "
                           f"{float(err.max()):.3g} > {bound:.3g}")


CASES = [
    # (dtype, k, shape)
    *[(torch.float32, k, (2, 37, 9, 11)) for k in (3, 5, 7, 9)],   # fast paths, scalar loads (C % 4 != 0)
    *[(torch.float32, k, (1, 64, 17, 10)) for k in (1, 11, 15)],   # generic path, 16-byte loads, 2 blocks
    (torch.float32, 9, (3, 40, 16, 16)),                            # several parts and tiles per image
    (torch.bfloat16, 9, (2, 48, 13, 7)),                            # 16-byte bf16 loads (48 % 8 == 0)
    (torch.bfloat16, 5, (2, 21, 5, 6)),
    (torch.float16, 7, (1, 40, 9, 9)),
    (torch.float64, 3, (2, 10, 6, 7)),                              # float64: generic path for every k
    (torch.float64, 11, (1, 5, 4, 15)),
]


@pytest.mark.parametrize("act", NAMES)
@pytest.mark.parametrize("dtype,k,shape", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_forward_and_backward(kernels, dtype, k, shape, act):
    check_forward_backward(kernels, dtype, k, shape, act)


@pytest.mark.parametrize("target_ctas", [1, 4], ids=lambda n: f"target{n}")
@pytest.mark.parametrize("dtype,k,shape", [(torch.float32, 9, (3, 40, 16, 16)),
                                           (torch.float32, 11, (2, 33, 20, 9)),
                                           (torch.bfloat16, 5, (2, 64, 17, 17))],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_ctas_walking_several_tiles(kernels, dtype, k, shape, target_ctas):
    # The real plan (2048 CTAs) gives every small test shape one tile per CTA. A lower target
    # makes each CTA walk a run of tiles, as the paper shapes do on a GPU: the statistics merged
    # across tiles, dW accumulated in shared memory across tiles, the barriers between tiles.
    kernels.lib.convmixer_dw_set_target_ctas(ctypes.c_longlong(target_ctas))
    try:
        check_forward_backward(kernels, dtype, k, shape, "gelu")
    finally:
        kernels.lib.convmixer_dw_set_target_ctas(ctypes.c_longlong(0))


def check_forward_backward(kernels, dtype, k, shape, act):
    x, norm, weight, bias = make_inputs(shape, k, dtype, seed=k + shape[1])
    out, mean, var = kernels.forward(x, norm, weight, bias, act, stats=True)
    ref_out, ref_mean, ref_var = reference_forward(x, norm, weight, bias, act)
    assert_close(out, ref_out, dtype, "out")
    assert_close(mean, ref_mean, dtype, "mean")
    assert_close(var, ref_var, dtype, "var")

    # Backward of  L = <out, G> + <mean, gm> + <var, gv>  through the same graph in float64.
    gen = torch.Generator().manual_seed(7)
    c = shape[1]
    grad_out = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    gm = torch.randn(c, generator=gen, dtype=torch.float64).to(acc_dtype(dtype))
    gv = torch.randn(c, generator=gen, dtype=torch.float64).to(acc_dtype(dtype))
    leaves = [x.double().requires_grad_(), weight.double().requires_grad_(),
              bias.double().requires_grad_(), *(q.double().requires_grad_() for q in norm)]
    xd, wd, bd, md, sd, td = leaves
    o64, m64, v64 = reference_forward(xd, (md, sd, td), wd, bd, act)
    loss = (o64 * grad_out.double()).sum() + (m64 * gm.double()).sum() + (v64 * gv.double()).sum()
    gx, gw, gb, gmean, gscale, gshift = torch.autograd.grad(loss, leaves)

    grad_x, grad_w, grad_b, sum_dx, sum_dx_xc = kernels.backward(
        grad_out, gm, gv, mean, x, norm, weight, bias, act)
    assert_close(grad_x, gx, dtype, "grad_x")
    assert_close(grad_w, gw, dtype, "grad_weight")
    assert_close(grad_b, gb, dtype, "grad_bias")
    assert_close(sum_dx, gshift, dtype, "sum dX (grad of shift)")
    assert_close(sum_dx_xc, gscale, dtype, "sum dX (x - mean) (grad of scale)")
    assert_close(-sum_dx * norm[1], gmean, dtype, "grad of the norm's mean")


@pytest.mark.parametrize("k", [5, 15])
def test_eval_without_norm_or_bias(kernels, k):
    x, _, weight, _ = make_inputs((2, 33, 8, 9), k, torch.float32, seed=3, with_norm=False,
                                  with_bias=False)
    out, mean, var = kernels.forward(x, None, weight, None, "gelu", stats=False)
    ref_out, _, _ = reference_forward(x, None, weight, None, "gelu")
    assert_close(out, ref_out, torch.float32, "out")
    assert torch.isnan(mean).all() and torch.isnan(var).all(), "no statistics asked, none written"


def test_backward_without_statistics_gradients_or_norm(kernels):
    dtype, k, shape = torch.float32, 7, (2, 24, 10, 9)
    x, _, weight, bias = make_inputs(shape, k, dtype, seed=11, with_norm=False)
    grad_out = torch.randn(shape, dtype=torch.float64).to(dtype)
    leaves = [x.double().requires_grad_(), weight.double().requires_grad_(),
              bias.double().requires_grad_()]
    o64, _, _ = reference_forward(leaves[0], None, leaves[1], leaves[2], "relu")
    gx, gw, gb = torch.autograd.grad((o64 * grad_out.double()).sum(), leaves)
    grad_x, grad_w, grad_b, _, _ = kernels.backward(grad_out, None, None, None, x, None, weight,
                                                    bias, "relu")
    assert_close(grad_x, gx, dtype, "grad_x")
    assert_close(grad_w, gw, dtype, "grad_weight")
    assert_close(grad_b, gb, dtype, "grad_bias")


def test_float64_tiles_too_large_for_shared_memory_are_refused(kernels):
    # float64 with k >= 13: the backward's tile + halo, taps and dW accumulators exceed sm_90's
    # 227 KiB of shared memory per block. The plan says so (the torch launcher turns that into a
    # ValueError naming dtype and kernel size) instead of launching a kernel that cannot start.
    size = SZ(0)
    rc = kernels.fwd(DTYPE_CODE[torch.float64], act_code("gelu"), None, 1, 5, 4, 15, 13,
                     *([None] * 9), 0, ctypes.byref(size), None)
    assert rc == 1  # cudaErrorInvalidValue


@pytest.mark.parametrize("code", UNKNOWN_ACT_CODES)
def test_unknown_activation_code_is_refused(kernels, code):
    # An activation code the C++ list lacks is an error before any kernel runs, never another
    # activation's kernels.
    x, norm, weight, bias = make_inputs((2, 8, 5, 6), 3, torch.float32, seed=2)
    launch_log(kernels.lib)
    with pytest.raises(AssertionError, match=r"returned cudaError 1\b"):
        kernels.forward(x, norm, weight, bias, code, stats=True)
    assert launch_log(kernels.lib) == []
    out, mean, _ = kernels.forward(x, norm, weight, bias, "gelu", stats=True)
    launch_log(kernels.lib)
    c = x.shape[1]
    with pytest.raises(AssertionError, match=r"returned cudaError 1\b"):
        kernels.backward(torch.ones_like(out), torch.ones(c), torch.ones(c), mean, x, norm, weight,
                         bias, code)
    assert launch_log(kernels.lib) == []


def test_scalar_loads_match_vector_loads_bitwise(kernels):
    # 32 channels of float32: 16-byte loads from an aligned x, scalar loads once x is moved off
    # the 16-byte boundary by one element. Same values, same order: identical bits.
    x, norm, weight, bias = make_inputs((2, 32, 9, 10), 9, torch.float32, seed=5)
    a = kernels.forward(x, norm, weight, bias, "gelu", stats=True)
    b = kernels.forward(x, norm, weight, bias, "gelu", stats=True, x_offset=1)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_results_do_not_depend_on_cta_order(kernels):
    x, norm, weight, bias = make_inputs((3, 40, 16, 16), 7, torch.float32, seed=9)
    a = kernels.forward(x, norm, weight, bias, "gelu", stats=True)
    with reverse_cta_order(kernels.lib):
        b = kernels.forward(x, norm, weight, bias, "gelu", stats=True)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
