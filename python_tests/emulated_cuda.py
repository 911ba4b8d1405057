"""The CUDA check TUs' extern "C" entry points (csrc/cuda/check/*.cu) as Python, run under
EMULATION (python_tests/cuda_emulation): what the test_cuda_emulation*.py modules share, and the
CUDA dw stage as an autograd function, which the stage harness (test_ops.py) runs as backend
"cuda-emu".

The dw stage's entry points are the whole stage, as the torch launcher csrc/cuda/dw_stage.cu runs
it: `dw_stage` here does what that launcher does around them (NHWC buffers, the norm's gradients
from the backward's two sums) and nothing else, so the harness checks the kernels' arithmetic,
indexing and tiling against the same reference and tolerances as every other backend. The pw
stage has no such entry point (its GEMMs are cuBLAS's, called by the launcher), so its kernels are
tested one by one in test_cuda_emulation_pw.py.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools

import torch

from convmixer_kernels.activations import ACTIVATIONS
from convmixer_kernels.ops.checks import check_dw_stage
from convmixer_kernels.ops.dw_stage import keeps_pre_act
from cuda_emulation import Guarded, bind, load_check_library, ptr, reverse_cta_order
from reference import acc_dtype

# The entry points' dtype codes (csrc/cuda/check/*.cu).
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
# Activation codes csrc/activation.h does not have.
UNKNOWN_ACT_CODES = [-1, max(a.code for a in ACTIVATIONS.values()) + 1]
CUDA_ERROR_INVALID_VALUE = 1

P, LL, SZ = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_size_t

# What the emulated dw stage must meet besides the harness's rule: the error against the float64
# reference of the stored inputs, relative to the reference's largest magnitude. float32: the k*k-
# term sums and the fixed-order reductions of at most a few thousand terms stay well inside 1e-5;
# float64 tighter than reference.DIRECT_TOL (1e-10), which is sized for the CPU's longer sums.
# bfloat16/float16: one rounding of the stored value (2^-8 / 2^-11 relative) dominates; dX is
# computed from dA stored in the storage dtype, so it carries that rounding once more; a bound
# that does not depend on eager's error, unlike the §6 rule. Indexing or tiling mistakes show up
# as errors of order 1, far above these bounds.
DW_MAX_ERROR = {torch.float32: 2e-5, torch.float64: 1e-11, torch.bfloat16: 2e-2,
                torch.float16: 4e-3}


# The entry points' trailing arguments of a folded BatchNorm (csrc/cuda/check/entry.cuh
# bn_norm_of, bn_grad_of), and their values without one.
BN_FORWARD_ARGTYPES = [P, P, ctypes.c_int, ctypes.c_double, P, P]
BN_BACKWARD_ARGTYPES = [P, P, P, P, ctypes.c_int, ctypes.c_double, P, P]
NO_BN_FORWARD = (None, None, 0, 0.0, None, None)
NO_BN_BACKWARD = (None, None, None, None, 0, 0.0, None, None)


def bn_forward_args(bn, channels, acc):
    """(the forward entry's trailing arguments, the Guarded scale and shift they write) for
    bn = (weight, bias, eps) or None."""
    if bn is None:
        return NO_BN_FORWARD, ()
    weight, bias, eps = bn
    scale, shift = Guarded((channels,), acc), Guarded((channels,), acc)
    code = DTYPE_CODE[weight.dtype] if weight is not None else 0
    return (ptr(weight), ptr(bias), code, eps, ptr(scale.tensor), ptr(shift.tensor)), (scale,
                                                                                        shift)


def bn_backward_args(bn, channels):
    """(the backward entry's trailing arguments, the Guarded grad_weight and grad_bias they
    write, none without a weight) for bn = (grad_scale, grad_shift, var, weight, eps) or None."""
    if bn is None:
        return NO_BN_BACKWARD, ()
    grad_scale, grad_shift, var, weight, eps = bn
    if weight is None:
        return (ptr(grad_scale), ptr(grad_shift), ptr(var), None, 0, eps, None, None), ()
    gw, gb = Guarded((channels,), weight.dtype), Guarded((channels,), weight.dtype)
    return (ptr(grad_scale), ptr(grad_shift), ptr(var), ptr(weight), DTYPE_CODE[weight.dtype],
            eps, ptr(gw.tensor), ptr(gb.tensor)), (gw, gb)


def act_code(act):
    """The entry points' code of an activation name; an int passes as it is (an unknown code)."""
    return act if isinstance(act, int) else ACTIVATIONS[act].code


def vec_width(dtype):
    """Elements per 16-byte vector load."""
    return 16 // torch.empty((), dtype=dtype).element_size()


class DwKernels:
    """convmixer_dw_forward / convmixer_dw_backward of csrc/cuda/check/dw_stage_check.cu."""

    def __init__(self):
        self.lib = load_check_library("dw_stage_check.cu")
        self.fwd = bind(self.lib, "convmixer_dw_forward", ctypes.c_int, [
            ctypes.c_int, ctypes.c_int, P, LL, LL, LL, LL, ctypes.c_int,  # dtype act x N C H W K
            P, P, P, P, P, P, P, P, P,                       # norm w b out mean var pre_act
            *BN_FORWARD_ARGTYPES,
            P, SZ, ctypes.POINTER(SZ), P])                          # ws, size, size out, stream
        self.bwd = bind(self.lib, "convmixer_dw_backward", ctypes.c_int, [
            ctypes.c_int, ctypes.c_int, P, P, P, P, P, P, LL, LL, LL, LL, ctypes.c_int,
            P, P, P, P, P, P, P, P, P, P, P, P, P,  # norm w b grad_pre gx gw gb sums grad_res gmean
            P,                                      # pre_act
            *BN_BACKWARD_ARGTYPES,
            P,                                      # grad_out_scale
            P, SZ, ctypes.POINTER(SZ), P])

    def forward(self, x, norm, weight, bias, act, stats, x_offset=0, keep_pre_act=False, bn=None,
                write_out=True):
        """(out NCHW view of NHWC memory, mean, var), and with keep_pre_act the pre-activation
        too, as a fourth; x NCHW-shaped, any layout. Without `stats` mean and var are what the
        kernels left in their (NaN-poisoned) buffers. bn = (weight, bias, eps) folds out's
        BatchNorm in: its scale and shift come last. write_out=False passes no out (with
        keep_pre_act): out comes back as None."""
        n, c, h, w = x.shape
        k = weight.shape[-1]
        dtype = x.dtype
        acc = acc_dtype(dtype)
        xg = Guarded((n, h, w, c), dtype, offset=x_offset)
        xg.tensor.copy_(x.permute(0, 2, 3, 1))
        size = SZ(0)
        code = DTYPE_CODE[dtype]
        assert self.fwd(code, act_code(act), ptr(xg.tensor), n, c, h, w, k, *([None] * 9),
                        *NO_BN_FORWARD, None, 0, ctypes.byref(size), None) == 0
        ws = Guarded((max(size.value, 1),), torch.uint8)
        # At least one pixel: an empty tensor's data_ptr() is null, which makes the call a size
        # query.
        out = Guarded((n, h, w, c) if n * h * w else (1, 1, 1, c), dtype) if write_out else None
        mean, var = Guarded((c,), acc), Guarded((c,), acc)
        pre = Guarded((n, h, w, c), dtype) if keep_pre_act else None
        nm, ns, nt = norm if norm is not None else (None, None, None)
        bn_args, bn_out = bn_forward_args(bn, c, acc)
        rc = self.fwd(code, act_code(act), ptr(xg.tensor), n, c, h, w, k, ptr(nm), ptr(ns), ptr(nt),
                      ptr(weight.contiguous()), ptr(bias), ptr(out.tensor) if out else None,
                      ptr(mean.tensor) if stats else None, ptr(var.tensor) if stats else None,
                      ptr(pre.tensor) if pre is not None else None, *bn_args,
                      ptr(ws.tensor), ws.tensor.numel(), None, None)
        assert rc == 0, f"convmixer_dw_forward returned cudaError {rc}"
        for g in (xg, ws, *([out] if out else []), mean, var, *([pre] if pre is not None else []),
                  *bn_out):
            g.check()
        out_nchw = (None if out is None else out.tensor.permute(0, 3, 1, 2).clone() if n * h * w
                    else x.new_empty(x.shape, dtype=dtype))
        result = (out_nchw, mean.tensor.clone(), var.tensor.clone())
        if pre is not None:
            result += (pre.tensor.permute(0, 3, 1, 2).clone(),)
        return result + tuple(g.tensor.clone() for g in bn_out)

    def backward(self, grad_out, grad_mean, grad_var, mean, x, norm, weight, bias, act, out=None,
                 grad_res=None, pre_act=None, bn=None, grad_out_scale=None, scratch=True):
        """(grad_x, grad_weight, grad_bias, sum_dx, sum_dx_xc, grad_norm_mean): the norm's
        gradients are (grad_norm_mean, sum_dx_xc, sum_dx), the last three garbage without a norm.
        `out`: the forward's output (NCHW shape), which spares ReLU the conv recompute; None:
        recompute. pre_act (the forward's, NCHW shape), given, replaces the recompute for every
        activation. grad_res, when given, joins dX before the norm's backward. bn = (grad_scale,
        grad_shift, var, weight, eps) folds out's BatchNorm in: its weight's and bias's gradients
        come last (with a weight). grad_out_scale ([C]): grad_out is scaled by it on load.
        scratch=False passes no dA scratch (grad_pre), which only the two-kernel path (a
        recomputed) needs."""
        n, c, h, w = x.shape
        k = weight.shape[-1]
        dtype = x.dtype
        acc = acc_dtype(dtype)
        # The entry reads every tensor as x's storage type (or its accumulation type): another
        # dtype would be read as garbage, not converted.
        assert all(t is None or t.dtype == dtype for t in (grad_out, out, pre_act, grad_res)), (
            "grad_out, out, pre_act and grad_res must have x's dtype")
        assert all(t is None or t.dtype == acc for t in (grad_mean, grad_var, mean)), (
            "grad_mean, grad_var and mean must have the accumulation dtype")
        nhwc = lambda t: Guarded.like(t.permute(0, 2, 3, 1).contiguous())  # noqa: E731
        xg, gog = nhwc(x), nhwc(grad_out)
        outg = nhwc(out) if out is not None else None
        preg = nhwc(pre_act) if pre_act is not None else None
        grg = None if grad_res is None else nhwc(grad_res)
        size = SZ(0)
        code = DTYPE_CODE[dtype]
        args_head = (code, act_code(act))
        assert self.bwd(*args_head, *([None] * 6), n, c, h, w, k, *([None] * 14),
                        *NO_BN_BACKWARD, None, None, 0, ctypes.byref(size), None) == 0
        ws = Guarded((max(size.value, 1),), torch.uint8)
        grad_pre, grad_x = Guarded((n, h, w, c), dtype), Guarded((n, h, w, c), dtype)
        grad_w, grad_b = Guarded((c, k * k), dtype), Guarded((c,), dtype)
        sum_dx, sum_dx_xc = Guarded((c,), acc), Guarded((c,), acc)
        grad_norm_mean = Guarded((c,), acc)
        nm, ns, nt = norm if norm is not None else (None, None, None)
        bn_args, bn_out = bn_backward_args(bn, c)
        rc = self.bwd(*args_head, ptr(gog.tensor), ptr(grad_mean), ptr(grad_var), ptr(mean),
                      ptr(outg.tensor) if outg is not None else None, ptr(xg.tensor),
                      n, c, h, w, k, ptr(nm), ptr(ns), ptr(nt),
                      ptr(weight.contiguous()), ptr(bias),
                      ptr(grad_pre.tensor) if scratch else None,
                      ptr(grad_x.tensor), ptr(grad_w.tensor), ptr(grad_b.tensor),
                      ptr(sum_dx.tensor), ptr(sum_dx_xc.tensor),
                      ptr(None if grad_res is None else grg.tensor), ptr(grad_norm_mean.tensor),
                      ptr(None if preg is None else preg.tensor), *bn_args, ptr(grad_out_scale),
                      ptr(ws.tensor), ws.tensor.numel(), None, None)
        assert rc == 0, f"convmixer_dw_backward returned cudaError {rc}"
        for g in (xg, gog, ws, grad_pre, grad_x, grad_w, grad_b, *bn_out,
                  *(t for t in (outg, preg) if t is not None)):
            g.check()
        if grg is not None:
            grg.check()
        if norm is not None:
            sum_dx.check()
            sum_dx_xc.check()
            grad_norm_mean.check()
        return (grad_x.tensor.permute(0, 3, 1, 2).clone(), grad_w.tensor.view(c, 1, k, k).clone(),
                grad_b.tensor.clone(), sum_dx.tensor.clone(), sum_dx_xc.tensor.clone(),
                grad_norm_mean.tensor.clone(), *(g.tensor.clone() for g in bn_out))


@functools.cache
def dw_kernels() -> DwKernels:
    """The emulated dw-stage library, compiled on first use (skips the test without a compiler)."""
    return DwKernels()


@contextlib.contextmanager
def dw_target_ctas(n: int):
    """The dw plan sized for `n` CTAs instead of a GPU's 2048, so each CTA walks a run of tiles
    (the statistics merged and dW accumulated across tiles, the barriers between them) on shapes
    small enough to emulate."""
    lib = dw_kernels().lib
    lib.convmixer_dw_set_target_ctas(ctypes.c_longlong(n))
    try:
        yield
    finally:
        lib.convmixer_dw_set_target_ctas(ctypes.c_longlong(0))


def dw_reversed_ctas():
    """Context manager: the dw kernels run their CTAs last to first."""
    return reverse_cta_order(dw_kernels().lib)


# Set by dw_recompute: _DwStage saves no a (nor out) for its backward.
_RECOMPUTE = False


@contextlib.contextmanager
def dw_recompute():
    """The emulated dw stage's backward recomputes a (the two-kernel path of
    csrc/cuda/kernels/dw_stage.cuh) instead of reading the saved a or out (the fused kernel)."""
    global _RECOMPUTE
    _RECOMPUTE = True
    try:
        yield
    finally:
        _RECOMPUTE = False


class _DwStage(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_mean, x_scale, x_shift, weight, bias, act, stats):
        norm = (x_mean, x_scale, x_shift) if x_mean is not None else None
        # The pre-activation where the CUDA backend's policy keeps it (as ops.dw_stage and
        # ops.mixer_block ask the launcher to): the backward then reads it, else recomputes.
        keep = not _RECOMPUTE and keeps_pre_act(act, weight.shape[-1], x.dtype, "cuda")
        out, mean, var, *pre = dw_kernels().forward(x, norm, weight, bias, act, stats,
                                                    keep_pre_act=keep)
        if not stats:
            assert torch.isnan(mean).all() and torch.isnan(var).all(), (
                "no statistics asked, yet some written")
            mean = var = x.new_empty((0,), dtype=acc_dtype(x.dtype))
        # The forward's out too (the next stage keeps it anyway): ReLU's backward then skips the
        # conv recompute, as the CUDA launcher does when the glue passes saved_out.
        ctx.save_for_backward(x, x_mean, x_scale, x_shift, weight, bias, mean,
                              None if _RECOMPUTE else out, pre[0] if keep else None)
        ctx.act, ctx.stats = act, stats
        return out, mean, var

    @staticmethod
    def backward(ctx, grad_out, grad_mean, grad_var):
        x, x_mean, x_scale, x_shift, weight, bias, mean, out, pre_act = ctx.saved_tensors
        norm = (x_mean, x_scale, x_shift) if x_mean is not None else None
        if not ctx.stats:
            grad_mean = grad_var = mean = None
        grad_x, grad_w, grad_b, sum_dx, sum_dx_xc, g_mean = dw_kernels().backward(
            grad_out, grad_mean, grad_var, mean, x, norm, weight, bias, ctx.act, out=out,
            pre_act=pre_act)
        # As the launcher: the norm's gradients as the kernels' finalize wrote them.
        norm_grads = (g_mean, sum_dx_xc, sum_dx) if norm else (None, None, None)
        return (grad_x, *norm_grads, grad_w, grad_b if bias is not None else None, None, None)


def dw_stage(x, weight, bias=None, *, act="gelu", x_norm=None, stats=True):
    """convmixer_kernels.ops.dw_stage on the emulated CUDA kernels (CPU tensors)."""
    check_dw_stage(x, weight, bias, act, x_norm, stats)
    m, s, t = x_norm if x_norm is not None else (None, None, None)
    return _DwStage.apply(x, m, s, t, weight, bias, act, stats)
