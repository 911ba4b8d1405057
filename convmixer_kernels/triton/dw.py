"""Triton kernels of the dw stage (docs/OPS.md): norm-on-load, depthwise k×k conv, bias, act,
batch statistics; and its backward, split as the CUDA backend's (docs/CUDA.md).

Layout: activations are NHWC, so a program owns BLOCK_C contiguous channels of a BLOCK_H×BLOCK_W
pixel tile and every load and store is a [pixels, channels] block contiguous along channels.
The conv reads its input straight from global memory, one shifted [pixels, channels] block per
tap (neighbouring taps and tiles hit L1), with the input norm applied on load and zeros outside
the image; each row of taps is unrolled (tl.static_range) up to k = 9.

One conv kernel serves three passes, chosen by its EPI constexpr:
  EPI_FWD  out = act(conv(norm(x)) + b), and the batch statistics of out; with AUX also the
           pre-activation a = conv(norm(x)) + b (keep_pre_act);
  EPI_DA   dA = dO·act'(a), with a recomputed and dO = grad_out + const + lin·o, into a tensor
           in the storage dtype (as the CUDA backend's backward kernel 1); with the forward's
           pre-activation given, or its output where act' and act follow from it (relu), as AUX,
           no conv runs: a is read instead;
  EPI_DX   dX = conv(dA) with the taps rotated 180° (the transposed conv) (+ grad_res with AUX,
           the residual's gradient of the same norm(x)), grad_x = dX·scale, and the input
           norm's sums Σ dX, Σ dX·(x - mean).
dW and db come from a fourth kernel that walks a contiguous run of pixels per program with the
[taps, channels] products accumulated in registers, reduced nowhere until its one store.

Programs are persistent along the pixel axis: program (g, c) walks tiles g, g+G, ... of the
whole batch, so the per-channel reductions accumulate in the program and are written as one
partial row per program, then merged in float64 on the host (deterministic, no atomics). The
configuration is chosen per dtype and kernel size from one table (no autotuning), so the host
knows it and sizes G from it.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..activations import ACTIVATIONS
from ._activations import act_bwd, act_fwd
from ._common import (INTERPRET, acc_dtype, check_runnable, dtype_class, gpu_plan, launch,
                      load_channel_vector, merge_moments, merge_tile_moments, present,
                      reduce_partials, stat_coefficients, store_moments, target_programs, tl_acc)
from ._validate import check_dw_args

EPI_FWD = tl.constexpr(0)
EPI_DA = tl.constexpr(1)
EPI_DX = tl.constexpr(2)
# Up to this kernel size a row of taps is unrolled; above it one runtime loop over all taps
# keeps compile time and code size bounded.
_UNROLL_K = tl.constexpr(9)

# ---------------------------------------------------------------------------------------------
# Device functions


@triton.jit
def _tile_origin(t, tiles_img, tiles_w, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Image index (int64, for the address arithmetic) and top-left pixel of tile t."""
    n = t // tiles_img
    r = t % tiles_img
    return n.to(tl.int64), (r // tiles_w) * BLOCK_H, (r % tiles_w) * BLOCK_W


@triton.jit
def _nhwc_offsets(n, ys, xs, cs, H, W, C):
    return ((n * H + ys) * W + xs)[:, None] * C + cs[None, :]


@triton.jit
def _tap(acc, src_ptr, n, ys, xs, cs, cmask, H, W, C, wt_ptr, t, C_PAD, mean, scale, shift,
         NORM: tl.constexpr, ACC: tl.constexpr):
    """acc += w[t] · norm(src) at pixels (ys, xs): zero outside the image, because "same"
    padding pads the normalised input (a border tap must not contribute `shift`)."""
    inside = (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)
    mask = inside[:, None] & cmask[None, :]
    v = tl.load(src_ptr + _nhwc_offsets(n, ys, xs, cs, H, W, C), mask=mask, other=0.0).to(ACC)
    if NORM:
        v = tl.where(mask, (v - mean[None, :]) * scale[None, :] + shift[None, :], 0.0)
    return acc + v * tl.load(wt_ptr + t * C_PAD + cs)[None, :]


@triton.jit
def _conv(src_ptr, n, y0, x0, py, px, cs, cmask, H, W, C, wt_ptr, C_PAD, bias, mean, scale,
          shift, NORM: tl.constexpr, K: tl.constexpr, ACC: tl.constexpr):
    """bias + Σ_ij w[i, j] · norm(src)[y + i - p, x + j - p] on the tile's pixels (y0 + py,
    x0 + px); `wt_ptr` points at the [k·k, C_PAD] transposed taps."""
    P = K // 2
    acc = tl.zeros([py.shape[0], cs.shape[0]], dtype=ACC) + bias[None, :]
    if K <= _UNROLL_K:
        # One row of taps unrolled per step: unrolling all k² let the compiler hoist every
        # tap's loads at once (81 blocks in flight at k = 9, thousands of bytes of spills).
        for i in range(K):
            for j in tl.static_range(K):
                acc = _tap(acc, src_ptr, n, y0 + py + (i - P), x0 + px + (j - P), cs, cmask, H, W,
                           C, wt_ptr, i * K + j, C_PAD, mean, scale, shift, NORM, ACC)
    else:
        for t in range(K * K):
            acc = _tap(acc, src_ptr, n, y0 + py + (t // K - P), x0 + px + (t % K - P), cs,
                       cmask, H, W, C, wt_ptr, t, C_PAD, mean, scale, shift, NORM, ACC)
    return acc


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _dw_conv_kernel(src_ptr, mean_ptr, scale_ptr, shift_ptr, wt_ptr, b_ptr, out_ptr, gout_ptr,
                    coef_ptr, x_ptr, part_ptr, aux_ptr, N, C, H, W, G, C_PAD,
                    K: tl.constexpr, ACT: tl.constexpr, HAS_NORM: tl.constexpr, AUX: tl.constexpr,
                    HAS_BIAS: tl.constexpr, STATS: tl.constexpr, HAS_COEF: tl.constexpr,
                    NEED_O: tl.constexpr, EPI: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """The conv pass of kind EPI (see the module docstring). With EPI_DX, `src` is dA (no norm
    on load, no bias) and HAS_NORM says whether x had a norm (its mean and scale at mean_ptr and
    scale_ptr), which grad_x and the partial sums go through. With AUX, `aux_ptr` is where
    EPI_FWD stores a, what EPI_DA reads a from (the forward's pre-activation, or its output
    where act' follows from it), or grad_res (EPI_DX, added to dX)."""
    pid_g = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    NORM_IN: tl.constexpr = HAS_NORM and EPI != EPI_DX
    mean = load_channel_vector(mean_ptr, cs, cmask, HAS_NORM, 0.0, ACC)
    scale = load_channel_vector(scale_ptr, cs, cmask, HAS_NORM, 1.0, ACC)
    shift = load_channel_vector(shift_ptr, cs, cmask, NORM_IN, 0.0, ACC)
    bias = load_channel_vector(b_ptr, cs, cmask, HAS_BIAS and EPI != EPI_DX, 0.0, ACC)
    # EPI_DA: dO = grad_out + const + lin·o, the statistics' gradients folded per channel.
    const = load_channel_vector(coef_ptr, cs, cmask, HAS_COEF and EPI == EPI_DA, 0.0, ACC)
    lin = load_channel_vector(coef_ptr + C, cs, cmask, HAS_COEF and EPI == EPI_DA, 0.0, ACC)
    # Per-channel accumulators over this program's tiles: the statistics (EPI_FWD) or
    # Σ dX, Σ dX·(x - mean) (EPI_DX).
    run_n = tl.zeros([BLOCK_C], dtype=ACC)
    run_shift = tl.zeros([BLOCK_C], dtype=ACC)
    run_a = tl.zeros([BLOCK_C], dtype=ACC)
    run_b = tl.zeros([BLOCK_C], dtype=ACC)

    p = tl.arange(0, BLOCK_H * BLOCK_W)
    py = p // BLOCK_W
    px = p % BLOCK_W
    tiles_w = tl.cdiv(W, BLOCK_W)
    tiles_img = tl.cdiv(H, BLOCK_H) * tiles_w
    for t in range(pid_g, N * tiles_img, G):
        n, y0, x0 = _tile_origin(t, tiles_img, tiles_w, BLOCK_H, BLOCK_W)
        ys = y0 + py
        xs = x0 + px
        valid = (ys < H) & (xs < W)
        mask = valid[:, None] & cmask[None, :]
        offs = _nhwc_offsets(n, ys, xs, cs, H, W, C)
        if EPI == EPI_DA and AUX:  # the saved a (or relu's output) stands in: no recompute
            a = tl.load(aux_ptr + offs, mask=mask, other=0.0).to(ACC)
        else:
            a = _conv(src_ptr, n, y0, x0, py, px, cs, cmask, H, W, C, wt_ptr, C_PAD, bias, mean,
                      scale, shift, NORM_IN, K, ACC)
        if EPI == EPI_FWD:
            if AUX:
                tl.store(aux_ptr + offs, a.to(aux_ptr.dtype.element_ty), mask=mask)
            o = act_fwd(a, ACT).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + offs, o, mask=mask)
            if STATS:  # of the output as stored (rounded), per docs/OPS.md
                if t == pid_g:
                    # The shift, a sample of each channel: the first tile's first pixel (a
                    # tile's origin is always inside) as just stored, read back (from L2)
                    # after a barrier rather than extracted by a reduction over the tile.
                    tl.debug_barrier()
                    run_shift = tl.load(out_ptr + ((n * H + y0) * W + x0) * C + cs,
                                        mask=cmask, other=0.0, cache_modifier=".cg").to(ACC)
                run_n, run_a, run_b = merge_tile_moments(run_n, run_a, run_b, o.to(ACC), valid,
                                                         run_shift)
        elif EPI == EPI_DA:
            d_o = tl.load(gout_ptr + offs, mask=mask, other=0.0).to(ACC)
            if HAS_COEF:
                d_o += const[None, :]
                if NEED_O:  # o as stored, since the statistics were of the stored output
                    o = act_fwd(a, ACT).to(out_ptr.dtype.element_ty).to(ACC)
                    d_o += lin[None, :] * o
            tl.store(out_ptr + offs, act_bwd(a, d_o, ACT).to(out_ptr.dtype.element_ty),
                     mask=mask)
        else:
            if AUX:  # grad_res, a gradient of norm(x) too: before the norm's backward
                a += tl.load(aux_ptr + offs, mask=mask, other=0.0).to(ACC)
            if HAS_NORM:
                d_x = tl.where(mask, a, 0.0)
                xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
                run_a += tl.sum(d_x, axis=0)
                run_b += tl.sum(d_x * (xv - mean[None, :]), axis=0)
                a = d_x * scale[None, :]
            tl.store(out_ptr + offs, a.to(out_ptr.dtype.element_ty), mask=mask)
    row = pid_g * C_PAD + cs
    if EPI == EPI_FWD:
        if STATS:
            store_moments(part_ptr, row, G * C_PAD, run_n, run_shift, run_a, run_b)
    elif EPI == EPI_DX:
        if HAS_NORM:
            tl.store(part_ptr + row, run_a)
            tl.store(part_ptr + G * C_PAD + row, run_b)


@triton.jit
def _dw_wgrad_kernel(da_ptr, x_ptr, mean_ptr, scale_ptr, shift_ptr, dw_part_ptr, db_part_ptr,
                     N, C, H, W, C_PAD, PIX_PER_PROG,
                     K: tl.constexpr, HAS_NORM: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """dW[t, c] = Σ_pixels dA[p, c] · norm(x)[p + tap t, c] and db[c] = Σ dA[p, c] over a
    contiguous run of PIX_PER_PROG pixels (of the flattened N·H·W): one pixel per step, all
    k·k taps of BLOCK_C channels at once, the products accumulated in registers where each
    thread owns its own (tap, channel) entries, so no reduction across threads at all; one
    partial row per program."""
    P = K // 2
    pid_g = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    taps = tl.arange(0, BLOCK_T)
    ti = taps // K - P
    tj = taps % K - P
    tvalid = taps < K * K
    mean = load_channel_vector(mean_ptr, cs, cmask, HAS_NORM, 0.0, ACC)
    scale = load_channel_vector(scale_ptr, cs, cmask, HAS_NORM, 1.0, ACC)
    shift = load_channel_vector(shift_ptr, cs, cmask, HAS_NORM, 0.0, ACC)
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=ACC)
    d_b = tl.zeros([BLOCK_C], dtype=ACC)
    hw = H * W
    start = pid_g.to(tl.int64) * PIX_PER_PROG  # int64: N·H·W·C may pass 2^31
    for i in range(0, tl.minimum(PIX_PER_PROG, N * hw - start)):
        q = start + i
        n = q // hw
        y = (q % hw) // W
        xq = q % W
        d_a = tl.load(da_ptr + q * C + cs, mask=cmask, other=0.0).to(ACC)
        ys = y + ti
        xs = xq + tj
        inside = tvalid & (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)
        mask = inside[:, None] & cmask[None, :]
        v = tl.load(x_ptr + _nhwc_offsets(n, ys, xs, cs, H, W, C), mask=mask,
                    other=0.0).to(ACC)
        if HAS_NORM:
            v = tl.where(mask, (v - mean[None, :]) * scale[None, :] + shift[None, :], 0.0)
        acc += v * d_a[None, :]
        d_b += d_a
    tl.store(dw_part_ptr + pid_g * (BLOCK_T * C_PAD) + taps[:, None] * C_PAD + cs[None, :], acc)
    tl.store(db_part_ptr + pid_g * C_PAD + cs, d_b)


# ---------------------------------------------------------------------------------------------
# Launch configuration

# (BLOCK_H, BLOCK_W, BLOCK_C, num_warps, maxnreg) per dtype class (_common.dtype_class), for
# the conv kernel; the dW kernel takes BLOCK_C, num_warps and maxnreg from it. One entry per
# class: the host must know the configuration (it sizes G and the partials from it), and one
# configuration per kernel variant keeps a training step's compilations few (compile_plan).
# Each compiles for sm_90a without spills (tools/triton_compile_check.py): 8 warps, because 4
# left the k = 9 forward with statistics short of registers; maxnreg = 255 because ptxas' own
# register target at 8 warps (80 to 168 in some variants) spilled a few bytes. The k = 9
# variants then take up to 255 registers, one 8-warp program per SM: whether a smaller tile
# at higher occupancy is faster is for a GPU to measure.
_TILES = {16: (8, 8, 32, 8, 255), 32: (8, 8, 32, 8, 255), 64: (8, 8, 16, 4, None)}
_INTERPRET_TILE = (8, 16, 16, 1, None)
LAUNCHED = ("_dw_conv_kernel", "_dw_wgrad_kernel")

# Tests pin a configuration here, e.g. {"BLOCK_H": 8, "BLOCK_W": 8, "BLOCK_C": 16,
# "num_warps": 1, "groups": 2}, to exercise tilings the table would not pick ("groups" sets G);
# None means the table's. Other keys (BLOCK_E, of an earlier design) are ignored.
CONFIG_OVERRIDE: Optional[dict] = None


def config_for(x: torch.Tensor) -> dict:
    """The conv kernel's configuration for a launch on x."""
    if CONFIG_OVERRIDE is not None:
        return {k: v for k, v in CONFIG_OVERRIDE.items()
                if k in ("BLOCK_H", "BLOCK_W", "BLOCK_C", "num_warps", "maxnreg")
                and v is not None}
    bh, bw, bc, nw, maxnreg = _TILES[dtype_class(x.dtype)] if gpu_plan(x) else _INTERPRET_TILE
    cfg = dict(BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=bc, num_warps=nw)
    if maxnreg is not None:
        cfg["maxnreg"] = maxnreg
    return cfg


class _Geometry:
    """Host-side sizes shared by the forward and backward launches, from the configuration in
    use: G (programs per channel block), C_PAD (a multiple of BLOCK_C: the taps and partials
    need no channel mask)."""

    def __init__(self, x: torch.Tensor, k: int):
        self.n, self.c, self.h, self.w = x.shape
        self.k, self.p = k, k // 2
        self.cfg = config_for(x)
        bc = self.cfg["BLOCK_C"]
        self.c_blocks = triton.cdiv(self.c, bc)
        self.c_pad = self.c_blocks * bc
        tiles = (self.n * triton.cdiv(self.h, self.cfg["BLOCK_H"])
                 * triton.cdiv(self.w, self.cfg["BLOCK_W"]))
        if CONFIG_OVERRIDE is not None and "groups" in CONFIG_OVERRIDE:
            want = CONFIG_OVERRIDE["groups"]
        elif gpu_plan(x):
            want = triton.cdiv(target_programs(x.device), self.c_blocks)
        else:  # the interpreter: more than one group, so the cross-program merge is exercised
            want = 3
        self.groups = max(1, min(tiles, want))
        self.block_t = triton.next_power_of_2(k * k)

    def taps(self, weight: torch.Tensor, acc: torch.dtype, rotate: bool = False) -> torch.Tensor:
        """The [k·k, C_PAD] transposed taps in the accumulation dtype, zero-padded; rotated
        180° for the transposed conv."""
        w = weight.reshape(self.c, self.k * self.k)
        if rotate:
            w = w.flip(1)
        wt = torch.zeros((self.k * self.k, self.c_pad), dtype=acc, device=weight.device)
        wt[:, :self.c] = w.t()
        return wt

    def conv(self, args, meta):
        launch(_dw_conv_kernel, lambda m: (self.groups, self.c_blocks), args, meta, self.cfg)


def _vec_or(t: Optional[torch.Tensor], dummy: torch.Tensor) -> torch.Tensor:
    return t.contiguous() if t is not None else dummy


# ---------------------------------------------------------------------------------------------
# The ops


def dw_stage(x, x_mean, x_scale, x_shift, weight, bias, act, stats, keep_pre_act=False):
    """docs/OPS.md dw_stage, on Triton."""
    op = "dw_stage"
    check_dw_args(op, x, (x_mean, x_scale, x_shift), weight, bias, act)
    check_runnable(op, x)
    if stats and x.shape[0] * x.shape[2] * x.shape[3] == 1:
        raise ValueError(f"{op}: expected more than 1 value per channel when training, got "
                         f"input size {tuple(x.shape)}")
    x = x.contiguous(memory_format=torch.channels_last)
    acc = acc_dtype(x.dtype)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    pre_act = torch.empty_like(out) if keep_pre_act else x.new_empty((0,))
    if x.numel() == 0:
        nan = torch.full((x.shape[1] if stats else 0,), float("nan"), dtype=acc,
                         device=x.device)
        return out, pre_act, nan, nan.clone()
    geo = _Geometry(x, weight.shape[-1])
    wt = geo.taps(weight, acc)
    part = torch.empty((4, geo.groups, geo.c_pad), dtype=acc, device=x.device) if stats else wt
    geo.conv((x, _vec_or(x_mean, wt), _vec_or(x_scale, wt), _vec_or(x_shift, wt), wt,
              _vec_or(bias, wt), out, x, wt, x, part, pre_act if keep_pre_act else x, geo.n, geo.c,
              geo.h, geo.w, geo.groups, geo.c_pad),
             dict(K=geo.k, ACT=ACTIVATIONS[act].code, HAS_NORM=x_mean is not None,
                  AUX=keep_pre_act,
                  HAS_BIAS=bias is not None, STATS=stats, HAS_COEF=False, NEED_O=False,
                  EPI=EPI_FWD, ACC=tl_acc(x.dtype)))
    if not stats:
        empty = x.new_empty((0,), dtype=acc)
        return out, pre_act, empty, empty.clone()
    return (out, pre_act, *merge_moments(part[:, :, :geo.c], acc))


def dw_stage_backward(grad_out, grad_mean, grad_var, x, x_mean, x_scale, x_shift, weight, bias,
                      mean, act, grad_res=None, saved_out=None, pre_act=None):
    """docs/OPS.md dw_stage_backward, on Triton."""
    op = "dw_stage_backward"
    check_dw_args(op, x, (x_mean, x_scale, x_shift), weight, bias, act)
    check_runnable(op, x)
    for name, t in (("grad_out", grad_out), ("grad_res", grad_res), ("saved_out", saved_out),
                    ("pre_act", pre_act)):
        if t is None or (name != "grad_out" and t.numel() == 0):
            continue
        if t.shape != x.shape or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{op}: {name} must match x ({tuple(x.shape)}, {x.dtype}, "
                             f"{x.device}), got {tuple(t.shape)}, {t.dtype}, {t.device}")
    grad_res = grad_res.contiguous(memory_format=torch.channels_last) if present(grad_res) else None
    # What replaces the recompute of a: the forward's pre-activation, or, only where act'
    # follows from the output (relu), the saved output.
    if present(pre_act):
        saved = pre_act
    elif present(saved_out) and not ACTIVATIONS[act].needs_pre_activation:
        saved = saved_out
    else:
        saved = None
    saved = saved.contiguous(memory_format=torch.channels_last) if saved is not None else None
    x = x.contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    acc = acc_dtype(x.dtype)
    coef = stat_coefficients(op, grad_mean, grad_var, mean, n * h * w, c, x.device, acc)
    grad_x = torch.empty_like(x, memory_format=torch.channels_last)
    has_norm = x_mean is not None
    if x.numel() == 0:
        def zeros(*shape, dtype=acc):
            return torch.zeros(shape, dtype=dtype, device=x.device)
        norm_len = c if has_norm else 0
        return (grad_x, zeros(norm_len), zeros(norm_len), zeros(norm_len),
                zeros(*weight.shape, dtype=weight.dtype), zeros(c, dtype=weight.dtype))
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    geo = _Geometry(x, weight.shape[-1])
    wt = geo.taps(weight, acc)
    xm, xs, xt = (_vec_or(v, wt) for v in (x_mean, x_scale, x_shift))
    flags = dict(K=geo.k, ACT=ACTIVATIONS[act].code, HAS_NORM=has_norm, STATS=False,
                 ACC=tl_acc(x.dtype))
    shape = (geo.n, geo.c, geo.h, geo.w)

    # 1. dA = dO·act'(a), a recomputed (or read from pre_act or the saved output), in the
    # storage dtype.
    d_a = torch.empty_like(x, memory_format=torch.channels_last)
    geo.conv((x, xm, xs, xt, wt, _vec_or(bias, wt), d_a, grad_out,
              coef if coef is not None else wt, x, wt,
              saved if saved is not None else x, *shape, geo.groups, geo.c_pad),
             dict(flags, HAS_BIAS=bias is not None, HAS_COEF=coef is not None,
                  NEED_O=present(grad_var), EPI=EPI_DA, AUX=saved is not None))

    # 2. dX: the transposed conv of dA (the taps rotated 180°) through the input norm.
    vec_part = torch.empty((2, geo.groups, geo.c_pad), dtype=acc, device=x.device)
    geo.conv((d_a, xm, xs, xt, geo.taps(weight, acc, rotate=True), wt, grad_x, grad_out, wt, x,
              vec_part, grad_res if grad_res is not None else x, *shape, geo.groups, geo.c_pad),
             dict(flags, HAS_BIAS=False, HAS_COEF=False, NEED_O=False, EPI=EPI_DX,
                  AUX=grad_res is not None))

    # 3. dW and db, each program over a contiguous run of pixels.
    pixels = geo.n * geo.h * geo.w
    per_prog = triton.cdiv(pixels, geo.groups)
    progs = triton.cdiv(pixels, per_prog)
    dw_part = torch.empty((progs, geo.block_t, geo.c_pad), dtype=acc, device=x.device)
    db_part = torch.empty((progs, geo.c_pad), dtype=acc, device=x.device)
    launch(_dw_wgrad_kernel, lambda m: (progs, geo.c_blocks),
           (d_a, x, xm, xs, xt, dw_part, db_part, *shape, geo.c_pad, per_prog),
           dict(K=geo.k, HAS_NORM=has_norm, ACC=tl_acc(x.dtype), BLOCK_T=geo.block_t),
           {k: v for k, v in geo.cfg.items() if k in ("BLOCK_C", "num_warps", "maxnreg")})

    k2 = geo.k * geo.k
    grad_w = reduce_partials(dw_part[:, :k2, :c], weight.dtype).t().contiguous().view(
        weight.shape)
    grad_b = reduce_partials(db_part[:, :c], weight.dtype)
    if not has_norm:
        empty = x.new_empty((0,), dtype=acc)
        return grad_x, empty, empty.clone(), empty.clone(), grad_w, grad_b
    sum_dx = reduce_partials(vec_part[0, :, :c], acc)
    return (grad_x, -x_scale * sum_dx, reduce_partials(vec_part[1, :, :c], acc), sum_dx, grad_w,
            grad_b)
