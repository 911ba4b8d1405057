"""Triton kernels of the dw stage (docs/OPS.md): norm-on-load, depthwise k×k conv, bias, act,
batch statistics; and its backward.

Layout: activations are NHWC, so a program owns BLOCK_C contiguous channels of a BLOCK_H×BLOCK_W
pixel tile and its loads and stores are [pixels, channels] blocks contiguous along channels (the
taps themselves read a staged copy, see below). Programs are persistent
along the pixel axis: program (g, c) walks tiles g, g+G, g+2G, ... of the whole batch, so all
per-channel reductions (statistics, dW, db, the norm-gradient sums) first accumulate in the
program and are written as one partial row per program, then merged in float64 on the host.
The partial layouts depend on G and C only, never on the tile configuration, so autotuning may
change tiles freely.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..activations import ACTIVATIONS
from ._activations import act_bwd, act_fwd
from ._common import (INTERPRET, acc_dtype, check_runnable, first_row, gpu_plan, launch,
                      load_channel_vector, merge_moments, merge_tile_moments, present,
                      reduce_partials, stat_coefficients, store_moments, target_programs, tl_acc)
from ._validate import check_dw_args

# ---------------------------------------------------------------------------------------------
# Device functions
#
# Each program stages norm(x) of its tile plus halo, zero-padded, in a private scratch of
# [pixels, C_PAD] (ACC dtype; L1/L2-resident), and runs the k×k taps on it: a tap is then one
# unmasked load and one FMA, instead of a bounds-checked load and a norm per tap (k² times the
# norm's arithmetic). Barriers order each program's scratch writes and reads across its threads.
# Scratch rows, weights and partials are padded to C_PAD channels (a multiple of every
# BLOCK_C), so those accesses need no channel mask.


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
def _stage_normed(x_ptr, dst, n, y0, x0, EH: tl.constexpr, EW: tl.constexpr, H, W, C, C_PAD,
                  cs, cmask, mean, scale, shift, HAS_NORM: tl.constexpr, ACC: tl.constexpr,
                  BLOCK_E: tl.constexpr):
    """dst[e] = norm(x) at pixel (y0 + e // EW, x0 + e % EW) of image n, for e < EH·EW; exactly
    zero outside the image, because "same" padding pads the normalised input (a border tap
    must not contribute `shift`)."""
    for e0 in range(0, EH * EW, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        ys = y0 + e // EW
        xs = x0 + e % EW
        inside = (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)
        mask = inside[:, None] & cmask[None, :]
        v = tl.load(x_ptr + _nhwc_offsets(n, ys, xs, cs, H, W, C), mask=mask,
                    other=0.0).to(ACC)
        if HAS_NORM:
            v = tl.where(mask, (v - mean[None, :]) * scale[None, :] + shift[None, :], 0.0)
        tl.store(dst + e[:, None] * C_PAD + cs[None, :], v, mask=(e < EH * EW)[:, None])


@triton.jit
def _correlate(win, wts, bias, K: tl.constexpr, EW: tl.constexpr, C_PAD):
    """bias + Σ_ij win[i·EW + j] · w[i, j]: `win` points at tap (0, 0) of each pixel's window
    in the staged scratch, `wts` at the [k·k, C_PAD] transposed taps of this channel block."""
    acc = tl.zeros(win.shape, dtype=bias.dtype) + bias[None, :]
    for i in range(K):
        for j in range(K):
            acc += tl.load(win + (i * EW + j) * C_PAD) * tl.load(wts + (i * K + j) * C_PAD)[None, :]
    return acc


# ---------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _dw_fwd_kernel(x_ptr, mean_ptr, scale_ptr, shift_ptr, wt_ptr, b_ptr, out_ptr, scratch_ptr,
                   part_ptr, N, C, H, W, G, C_PAD, E_STRIDE,
                   K: tl.constexpr, ACT: tl.constexpr, HAS_NORM: tl.constexpr,
                   HAS_BIAS: tl.constexpr, STATS: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_E: tl.constexpr):
    P = K // 2
    EH = BLOCK_H + 2 * P
    EW = BLOCK_W + 2 * P
    pid_g = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    mean = load_channel_vector(mean_ptr, cs, cmask, HAS_NORM, 0.0, ACC)
    scale = load_channel_vector(scale_ptr, cs, cmask, HAS_NORM, 1.0, ACC)
    shift = load_channel_vector(shift_ptr, cs, cmask, HAS_NORM, 0.0, ACC)
    bias = load_channel_vector(b_ptr, cs, cmask, HAS_BIAS, 0.0, ACC)
    run_n = tl.zeros([BLOCK_C], dtype=ACC)
    run_shift = tl.zeros([BLOCK_C], dtype=ACC)
    run_mean = tl.zeros([BLOCK_C], dtype=ACC)
    run_m2 = tl.zeros([BLOCK_C], dtype=ACC)

    scratch = scratch_ptr + pid_g.to(tl.int64) * E_STRIDE * C_PAD
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    py = p // BLOCK_W
    px = p % BLOCK_W
    win = scratch + (py * EW + px)[:, None] * C_PAD + cs[None, :]
    tiles_w = tl.cdiv(W, BLOCK_W)
    tiles_img = tl.cdiv(H, BLOCK_H) * tiles_w
    for t in range(pid_g, N * tiles_img, G):
        n, y0, x0 = _tile_origin(t, tiles_img, tiles_w, BLOCK_H, BLOCK_W)
        _stage_normed(x_ptr, scratch, n, y0 - P, x0 - P, EH, EW, H, W, C, C_PAD, cs, cmask,
                      mean, scale, shift, HAS_NORM, ACC, BLOCK_E)
        tl.debug_barrier()
        a = _correlate(win, wt_ptr + cs, bias, K, EW, C_PAD)
        ys = y0 + py
        xs = x0 + px
        valid = (ys < H) & (xs < W)
        o = act_fwd(a, ACT).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + _nhwc_offsets(n, ys, xs, cs, H, W, C), o,
                 mask=valid[:, None] & cmask[None, :])
        if STATS:  # of the output as stored (rounded), per docs/OPS.md
            ov = o.to(ACC)
            # The shift: the first tile's first pixel (a tile's origin is always inside).
            run_shift = tl.where(t == pid_g, first_row(ov), run_shift)
            run_n, run_mean, run_m2 = merge_tile_moments(run_n, run_mean, run_m2, ov, valid,
                                                          run_shift)
        tl.debug_barrier()  # the next tile's staging overwrites what this one read
    if STATS:
        store_moments(part_ptr, pid_g * C_PAD + cs, G * C_PAD, run_n, run_shift, run_mean,
                      run_m2)


# ---------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _form_d_a(x_scr, da_scr, gout_ptr, wts, n, y0, x0, H, W, C, C_PAD, cs, cmask, bias, const,
              lin, K: tl.constexpr, ACT: tl.constexpr, HAS_COEF: tl.constexpr,
              NEED_O: tl.constexpr, ACC: tl.constexpr, BLOCK_H: tl.constexpr,
              BLOCK_W: tl.constexpr, BLOCK_E: tl.constexpr):
    """dA = dO·act'(a) on the tile plus a k//2 halo into da_scr, with a recomputed from the
    staged norm(x) (tile plus 2·(k//2)) and dO = grad_out + const + lin·o. BLOCK_E pixels at a
    time; the last chunk's overhang is clamped onto the last pixel, so its loads stay inside
    the scratch, and is not stored."""
    P = K // 2
    EH1 = BLOCK_H + 2 * P
    EW1 = BLOCK_W + 2 * P
    EW2 = BLOCK_W + 4 * P
    for e0 in range(0, EH1 * EW1, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        in_e = e < EH1 * EW1
        e = tl.minimum(e, EH1 * EW1 - 1)
        ey = e // EW1
        ex = e % EW1
        a = _correlate(x_scr + (ey * EW2 + ex)[:, None] * C_PAD + cs[None, :], wts, bias, K, EW2,
                       C_PAD)
        ys = y0 - P + ey
        xs = x0 - P + ex
        mask = (in_e & (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W))[:, None] & cmask[None, :]
        d_o = tl.load(gout_ptr + _nhwc_offsets(n, ys, xs, cs, H, W, C), mask=mask,
                      other=0.0).to(ACC)
        if HAS_COEF:
            d_o += const[None, :]
            if NEED_O:  # o as stored, since the statistics were of the stored output
                o = act_fwd(a, ACT).to(gout_ptr.dtype.element_ty).to(ACC)
                d_o += lin[None, :] * o
        # Pixels outside the image are no outputs: dA is zero there, not act'(bias)·const.
        d_a = tl.where(mask, act_bwd(a, d_o, ACT), 0.0)
        tl.store(da_scr + e[:, None] * C_PAD + cs[None, :], d_a, mask=in_e[:, None])


@triton.jit
def _taps_backward(win_x, win_da, wts, dw_row, d_a, first, C_PAD, K: tl.constexpr,
                   EW1: tl.constexpr, EW2: tl.constexpr):
    """Per tap (i, j), for the tile's pixels: this program's dW row += Σ dA · norm(x)[y+i-p,
    x+j-p] (stored on its first tile, added to after: only this program touches the row, so
    no atomics, and autotuner reruns stay exact); and dX += dA[y-i+p, x-j+p] · w[i, j], the
    transposed conv read from the mirrored window. Returns dX."""
    d_x = tl.zeros(d_a.shape, dtype=d_a.dtype)
    for i in range(K):
        for j in range(K):
            ptr = dw_row + (i * K + j) * C_PAD
            g_w = tl.sum(d_a * tl.load(win_x + (i * EW2 + j) * C_PAD), axis=0)
            tl.store(ptr, tl.where(first, g_w, tl.load(ptr) + g_w))
            d_x += tl.load(win_da - (i * EW1 + j) * C_PAD) * tl.load(
                wts + (i * K + j) * C_PAD)[None, :]
    return d_x


@triton.jit
def _dw_bwd_kernel(gout_ptr, coef_ptr, x_ptr, mean_ptr, scale_ptr, shift_ptr, wt_ptr, b_ptr,
                   gx_ptr, scratch_ptr, dw_part_ptr, vec_part_ptr,
                   N, C, H, W, G, C_PAD, E_STRIDE,
                   K: tl.constexpr, ACT: tl.constexpr, HAS_NORM: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_COEF: tl.constexpr, NEED_O: tl.constexpr,
                   ACC: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr):
    """Per tile: stage norm(x) on the tile plus a 2·(k//2) halo; recompute a and form dA on the
    tile plus a k//2 halo (the transposed conv of the tile's border pixels needs the halo's
    dA), into a second scratch; then, for the tile's own pixels, accumulate dW and db and
    write dX = conv_transposed(dA) through the input norm, with its BN-backward sums."""
    P = K // 2
    EW1 = BLOCK_W + 2 * P  # dA region: the tile plus P
    EH2 = BLOCK_H + 4 * P  # norm(x) region: what a on the dA region reads
    EW2 = BLOCK_W + 4 * P
    pid_g = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    mean = load_channel_vector(mean_ptr, cs, cmask, HAS_NORM, 0.0, ACC)
    scale = load_channel_vector(scale_ptr, cs, cmask, HAS_NORM, 1.0, ACC)
    shift = load_channel_vector(shift_ptr, cs, cmask, HAS_NORM, 0.0, ACC)
    bias = load_channel_vector(b_ptr, cs, cmask, HAS_BIAS, 0.0, ACC)
    # dO = grad_out + const + lin·o: the statistics' gradients, folded per channel on the host.
    const = load_channel_vector(coef_ptr, cs, cmask, HAS_COEF, 0.0, ACC)
    lin = load_channel_vector(coef_ptr + C, cs, cmask, HAS_COEF, 0.0, ACC)
    sum_db = tl.zeros([BLOCK_C], dtype=ACC)
    sum_dx = tl.zeros([BLOCK_C], dtype=ACC)
    sum_dxc = tl.zeros([BLOCK_C], dtype=ACC)

    x_scr = scratch_ptr + pid_g.to(tl.int64) * E_STRIDE * C_PAD
    da_scr = x_scr + EH2 * EW2 * C_PAD
    wts = wt_ptr + cs
    dw_row = dw_part_ptr + pid_g * (K * K * C_PAD) + cs
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    py = p // BLOCK_W
    px = p % BLOCK_W
    # Windows of the tile's pixels: tap (0, 0) in the norm(x) scratch, and the mirrored window
    # dA[y - (i - P), x - (j - P)] of the transposed conv (tap (0, 0) at +2P, stepping back).
    win_x = x_scr + ((py + P) * EW2 + (px + P))[:, None] * C_PAD + cs[None, :]
    win_da = da_scr + ((py + 2 * P) * EW1 + (px + 2 * P))[:, None] * C_PAD + cs[None, :]
    centre_da = da_scr + ((py + P) * EW1 + (px + P))[:, None] * C_PAD + cs[None, :]
    tiles_w = tl.cdiv(W, BLOCK_W)
    tiles_img = tl.cdiv(H, BLOCK_H) * tiles_w
    for t in range(pid_g, N * tiles_img, G):
        n, y0, x0 = _tile_origin(t, tiles_img, tiles_w, BLOCK_H, BLOCK_W)
        _stage_normed(x_ptr, x_scr, n, y0 - 2 * P, x0 - 2 * P, EH2, EW2, H, W, C, C_PAD, cs,
                      cmask, mean, scale, shift, HAS_NORM, ACC, BLOCK_E)
        tl.debug_barrier()

        _form_d_a(x_scr, da_scr, gout_ptr, wts, n, y0, x0, H, W, C, C_PAD, cs, cmask, bias,
                  const, lin, K, ACT, HAS_COEF, NEED_O, ACC, BLOCK_H, BLOCK_W, BLOCK_E)
        tl.debug_barrier()

        # The tile's own pixels (dA is zero on those outside the image).
        d_a = tl.load(centre_da)
        sum_db += tl.sum(d_a, axis=0)
        d_x = _taps_backward(win_x, win_da, wts, dw_row, d_a, t == pid_g, C_PAD, K, EW1, EW2)
        ys = y0 + py
        xs = x0 + px
        mask = ((ys < H) & (xs < W))[:, None] & cmask[None, :]
        offs = _nhwc_offsets(n, ys, xs, cs, H, W, C)
        if HAS_NORM:
            xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            d_x = tl.where(mask, d_x, 0.0)
            sum_dx += tl.sum(d_x, axis=0)
            sum_dxc += tl.sum(d_x * (xv - mean[None, :]), axis=0)
            g = d_x * scale[None, :]
        else:
            g = d_x
        tl.store(gx_ptr + offs, g.to(gx_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()  # the next tile overwrites the scratches this one read

    row = pid_g * C_PAD + cs
    tl.store(vec_part_ptr + row, sum_db)
    tl.store(vec_part_ptr + G * C_PAD + row, sum_dx)
    tl.store(vec_part_ptr + 2 * G * C_PAD + row, sum_dxc)


# ---------------------------------------------------------------------------------------------
# Launch configuration

def _configs():
    if INTERPRET:
        # One config (the interpreter cannot autotune), with big blocks: the interpreter pays
        # per operation, not per element. Tests pin smaller tilings through CONFIG_OVERRIDE.
        return [triton.Config({"BLOCK_H": 8, "BLOCK_W": 16, "BLOCK_C": 16, "BLOCK_E": 512},
                              num_warps=1, num_stages=1)]
    # num_stages=1: no software pipelining of scratch loads across the barriers.
    return [triton.Config({"BLOCK_H": bh, "BLOCK_W": bw, "BLOCK_C": bc, "BLOCK_E": bh * bw},
                          num_warps=nw, num_stages=1)
            for bh, bw, bc, nw in ((8, 8, 32, 4), (8, 16, 32, 4), (16, 16, 32, 8),
                                   (4, 16, 64, 4), (8, 8, 64, 4), (16, 8, 16, 4))]


_CONFIGS = _configs()
_fwd = triton.autotune(configs=_CONFIGS, key=["C", "H", "W", "K"])(_dw_fwd_kernel)
_bwd = triton.autotune(configs=_CONFIGS, key=["C", "H", "W", "K"])(_dw_bwd_kernel)

# Tests pin a configuration here, e.g. {"BLOCK_H": 8, "BLOCK_W": 8, "BLOCK_C": 16,
# "BLOCK_E": 128, "num_warps": 1, "groups": 2}, to exercise tilings the autotuner would not
# pick ("groups" sets G); None means autotune.
CONFIG_OVERRIDE: Optional[dict] = None


def _configs_in_use() -> list[dict]:
    if CONFIG_OVERRIDE is not None:
        return [CONFIG_OVERRIDE]
    return [cfg.kwargs for cfg in _CONFIGS]


def _launch(tuned, groups, c, args, meta):
    cfg = None
    if CONFIG_OVERRIDE is not None:
        cfg = {k: v for k, v in CONFIG_OVERRIDE.items() if k != "groups"}
    launch(tuned, lambda m: (groups, triton.cdiv(c, m["BLOCK_C"])), args, meta, cfg)


class _Geometry:
    """Host-side sizes shared by the forward and backward launches. None of them depends on
    which configuration the autotuner picks: G, C_PAD and the scratch stride are taken over all
    configurations."""

    def __init__(self, x: torch.Tensor, k: int):
        self.n, self.c, self.h, self.w = x.shape
        self.k, self.p = k, k // 2
        cfgs = _configs_in_use()
        self.c_pad = triton.cdiv(self.c, max(cf["BLOCK_C"] for cf in cfgs)) * max(
            cf["BLOCK_C"] for cf in cfgs)
        max_tiles = max(self.n * triton.cdiv(self.h, cf["BLOCK_H"])
                        * triton.cdiv(self.w, cf["BLOCK_W"]) for cf in cfgs)
        if CONFIG_OVERRIDE is not None and "groups" in CONFIG_OVERRIDE:
            want = CONFIG_OVERRIDE["groups"]
        elif gpu_plan(x):
            min_bc = min(cf["BLOCK_C"] for cf in cfgs)
            want = triton.cdiv(target_programs(x.device), triton.cdiv(self.c, min_bc))
        else:  # the interpreter: more than one group, so the cross-program merge is exercised
            want = 3
        self.groups = max(1, min(max_tiles, want))
        self.fwd_stride = max(self._area(cf, 1) for cf in cfgs)
        self.bwd_stride = max(self._area(cf, 1) + self._area(cf, 2) for cf in cfgs)

    def _area(self, cfg, halos):
        return (cfg["BLOCK_H"] + 2 * halos * self.p) * (cfg["BLOCK_W"] + 2 * halos * self.p)

    def taps(self, weight: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
        """The [k·k, C_PAD] transposed taps in the accumulation dtype, zero-padded."""
        wt = torch.zeros((self.k * self.k, self.c_pad), dtype=acc, device=weight.device)
        wt[:, :self.c] = weight.reshape(self.c, self.k * self.k).t()
        return wt


def _vec_or(t: Optional[torch.Tensor], dummy: torch.Tensor) -> torch.Tensor:
    return t.contiguous() if t is not None else dummy


# ---------------------------------------------------------------------------------------------
# The ops


def dw_stage(x, x_mean, x_scale, x_shift, weight, bias, act, stats):
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
    if x.numel() == 0:
        nan = torch.full((x.shape[1] if stats else 0,), float("nan"), dtype=acc,
                         device=x.device)
        return out, nan, nan.clone()
    geo = _Geometry(x, weight.shape[-1])
    wt = geo.taps(weight, acc)
    scratch = torch.empty(geo.groups * geo.fwd_stride * geo.c_pad, dtype=acc, device=x.device)
    part = torch.empty((4, geo.groups, geo.c_pad), dtype=acc, device=x.device) if stats else wt
    args = (x, _vec_or(x_mean, wt), _vec_or(x_scale, wt), _vec_or(x_shift, wt), wt,
            _vec_or(bias, wt), out, scratch, part, geo.n, geo.c, geo.h, geo.w, geo.groups,
            geo.c_pad, geo.fwd_stride)
    meta = dict(K=geo.k, ACT=ACTIVATIONS[act].code, HAS_NORM=x_mean is not None,
                HAS_BIAS=bias is not None, STATS=stats, ACC=tl_acc(x.dtype))
    _launch(_fwd, geo.groups, geo.c, args, meta)
    if not stats:
        empty = x.new_empty((0,), dtype=acc)
        return out, empty, empty.clone()
    return (out, *merge_moments(part[:, :, :geo.c], acc))


def dw_stage_backward(grad_out, grad_mean, grad_var, x, x_mean, x_scale, x_shift, weight, bias,
                      mean, act):
    """docs/OPS.md dw_stage_backward, on Triton."""
    op = "dw_stage_backward"
    check_dw_args(op, x, (x_mean, x_scale, x_shift), weight, bias, act)
    check_runnable(op, x)
    if grad_out.shape != x.shape or grad_out.dtype != x.dtype or grad_out.device != x.device:
        raise ValueError(f"{op}: grad_out must match x ({tuple(x.shape)}, {x.dtype}, "
                         f"{x.device}), got {tuple(grad_out.shape)}, {grad_out.dtype}, "
                         f"{grad_out.device}")
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
    scratch = torch.empty(geo.groups * geo.bwd_stride * geo.c_pad, dtype=acc, device=x.device)
    # Zero-initialised: a program with no tile never writes its dW rows.
    dw_part = torch.zeros((geo.groups, geo.k * geo.k, geo.c_pad), dtype=acc, device=x.device)
    vec_part = torch.empty((3, geo.groups, geo.c_pad), dtype=acc, device=x.device)
    args = (grad_out, coef if coef is not None else wt, x, _vec_or(x_mean, wt),
            _vec_or(x_scale, wt), _vec_or(x_shift, wt), wt, _vec_or(bias, wt), grad_x, scratch,
            dw_part, vec_part, n, c, h, w, geo.groups, geo.c_pad, geo.bwd_stride)
    meta = dict(K=geo.k, ACT=ACTIVATIONS[act].code, HAS_NORM=has_norm, HAS_BIAS=bias is not None,
                HAS_COEF=coef is not None, NEED_O=present(grad_var), ACC=tl_acc(x.dtype))
    _launch(_bwd, geo.groups, c, args, meta)

    grad_w = reduce_partials(dw_part[:, :, :c], weight.dtype).t().contiguous().view(weight.shape)
    grad_b = reduce_partials(vec_part[0, :, :c], weight.dtype)
    if not has_norm:
        empty = x.new_empty((0,), dtype=acc)
        return grad_x, empty, empty.clone(), empty.clone(), grad_w, grad_b
    sum_dx = reduce_partials(vec_part[1, :, :c], acc)
    return (grad_x, -x_scale * sum_dx, reduce_partials(vec_part[2, :, :c], acc), sum_dx, grad_w,
            grad_b)
