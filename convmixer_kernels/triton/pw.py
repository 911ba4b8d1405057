"""Triton kernels of the pw stage (docs/OPS.md): the 1×1 conv as a GEMM over NHWC rows,
[M = N·H·W, Cin] × [Cin, Cout], with the BN-apply + residual prologue on the A tile and the
bias + act + statistics epilogue; and its backward (dP in one fused elementwise kernel, then the
wgrad and dgrad GEMMs, the latter with the norm-gradient reductions in its epilogue).

The forward and dgrad GEMMs load their weight tiles through a tensor descriptor (TMA on Hopper:
one asynchronous bulk copy per tile into shared memory, no per-element address arithmetic or
masks in registers) wherever the weight meets TMA's rules; elsewhere through pointers. Both give
the same tiles, so results do not depend on which ran.

Per-channel reductions are two-level and deterministic: each M-tile (or M-split) writes one
partial row, merged in float64 on the host. BLOCK_M is therefore fixed per launch (it sets the
partial layout); the autotuner varies the other tile sizes, warps and stages.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..activations import ACTIVATIONS
from ._activations import act_bwd, act_fwd
from ._common import (INTERPRET, acc_dtype, check_runnable, dtype_class, gpu_plan, launch,
                      merge_moments, merge_tile_moments, present, reduce_partials,
                      stat_coefficients, store_moments, target_programs, tl_acc, tuned)
from ._validate import check_pw_args

# ---------------------------------------------------------------------------------------------
# Device functions


@triton.jit
def _norm_tile(v, mean_ptr, scale_ptr, shift_ptr, ks, kmask):
    m = tl.load(mean_ptr + ks, mask=kmask, other=0.0)
    s = tl.load(scale_ptr + ks, mask=kmask, other=0.0)
    t = tl.load(shift_ptr + ks, mask=kmask, other=0.0)
    return (v - m[None, :]) * s[None, :] + t[None, :]


@triton.jit
def _load_u(x_ptr, xm_ptr, xs_ptr, xt_ptr, r_ptr, rm_ptr, rs_ptr, rt_ptr, rows, ks, rmask, kmask,
            Cin, HAS_XNORM: tl.constexpr, HAS_RES: tl.constexpr, HAS_RNORM: tl.constexpr,
            ACC: tl.constexpr):
    """u = norm_x(x) + norm_res(res) on a [rows, channels] tile, rounded once to the storage
    dtype as eager materialises it, and zero outside the tile (so it can feed tl.dot)."""
    mask = rmask[:, None] & kmask[None, :]
    offs = rows.to(tl.int64)[:, None] * Cin + ks[None, :]
    u = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_XNORM or HAS_RES:
        v = u.to(ACC)
        if HAS_XNORM:
            v = _norm_tile(v, xm_ptr, xs_ptr, xt_ptr, ks, kmask)
        if HAS_RES:
            r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(ACC)
            if HAS_RNORM:
                r = _norm_tile(r, rm_ptr, rs_ptr, rt_ptr, ks, kmask)
            v += r
        u = tl.where(mask, v, 0.0).to(x_ptr.dtype.element_ty)
    return u


@triton.jit
def _tile_moments(part_ptr, pid_m, n_rows, C, v, valid, cs, shift, ACC: tl.constexpr):
    """This M-tile's moments per channel into row pid_m of the [4, tiles, C] partials, shifted
    by `shift` (a sample of each channel's values)."""
    zero = tl.zeros(cs.shape, dtype=ACC)
    cnt, mean, m2 = merge_tile_moments(zero, zero, zero, v, valid, shift)
    store_moments(part_ptr, pid_m * C + cs, n_rows * C, cnt, shift, mean, m2)


@triton.jit
def _grouped_tile(pid, m_tiles, n_tiles, GROUP_M: tl.constexpr):
    """(M-tile, N-tile) of program `pid` in grouped order: GROUP_M consecutive M-tiles walk
    all N-tiles together (M fastest within the group). The programs in flight then share a few
    A row-blocks, read from HBM about once and then from L2, and all of B (the weights, which
    stay L2-resident), instead of re-reading A once per N-tile as an M-fastest 2-D grid does."""
    per_group = GROUP_M * n_tiles
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(m_tiles - first_m, GROUP_M)
    r = pid % per_group
    return first_m + r % rows_in_group, r // rows_in_group


@triton.jit
def _gemm_tile(M, N, ACC: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """This program's output tile of an [M, N] GEMM in grouped order: its M-tile, its rows and
    columns with their masks, and a zero accumulator."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N),
                                 GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return (pid_m, pid_n, rows, cols, rows < M, cols < N,
            tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC))


@triton.jit
def _weight_tile(w_ptr, w_desc, co0, ci0, cos, cis, comask, cimask, Cin, W_DESC: tl.constexpr):
    """The [cos, cis] tile of the [Cout, Cin] weight (cos from co0, cis from ci0), zero outside
    the weight: one box through the tensor descriptor, or masked pointer loads."""
    if W_DESC:
        return w_desc.load([co0, ci0])
    else:
        return tl.load(w_ptr + cos[:, None] * Cin + cis[None, :],
                       mask=comask[:, None] & cimask[None, :], other=0.0)


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _pw_fwd_kernel(x_ptr, xm_ptr, xs_ptr, xt_ptr, r_ptr, rm_ptr, rs_ptr, rt_ptr, w_ptr, w_desc,
                   b_ptr, out_ptr, pre_ptr, u_ptr, part_ptr, M, Cin, Cout, C_PART,
                   HAS_XNORM: tl.constexpr, HAS_RES: tl.constexpr, HAS_RNORM: tl.constexpr,
                   HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STATS: tl.constexpr,
                   STORE_OUT: tl.constexpr, KEEP_PRE: tl.constexpr, KEEP_U: tl.constexpr,
                   W_DESC: tl.constexpr,
                   ACC: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m_tiles = tl.cdiv(M, BLOCK_M)
    pid_m, pid_n, rows, ns, rmask, nmask, acc = _gemm_tile(M, Cout, ACC, GROUP_M, BLOCK_M,
                                                           BLOCK_N)
    for k0 in range(0, Cin, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < Cin
        u = _load_u(x_ptr, xm_ptr, xs_ptr, xt_ptr, r_ptr, rm_ptr, rs_ptr, rt_ptr, rows, ks,
                    rmask, kmask, Cin, HAS_XNORM, HAS_RES, HAS_RNORM, ACC)
        if KEEP_U:  # written once, by the first column of tiles
            if pid_n == 0:
                tl.store(u_ptr + rows.to(tl.int64)[:, None] * Cin + ks[None, :], u,
                         mask=rmask[:, None] & kmask[None, :])
        w = tl.trans(_weight_tile(w_ptr, w_desc, pid_n * BLOCK_N, k0, ns, ks, nmask, kmask, Cin,
                                  W_DESC))
        # IEEE fp32 products for float32: the contract is fp32 accuracy, which TF32 is not.
        # out_dtype: tl.dot accumulates in float32 unless told (triton 3.6 then refuses a
        # float64 accumulator).
        acc = tl.dot(u, w, acc, input_precision="ieee", out_dtype=ACC)
    # The epilogue runs on the two column halves one after the other: on the whole tile the
    # GELU, two stores and the statistics kept too much live at once (255 registers and
    # spills at BLOCK_N = 128 with 8 warps).
    half_a, half_b = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)),
                                         (0, 2, 1)))
    ns_a = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
    tile = (pid_m * BLOCK_M).to(tl.int64) * Cout
    _fwd_epilogue(half_a, ns_a, rmask, tile, b_ptr, out_ptr, pre_ptr, part_ptr, pid_m, m_tiles,
                  Cout, C_PART, HAS_BIAS, ACT, STATS, STORE_OUT, KEEP_PRE, ACC, BLOCK_M)
    _fwd_epilogue(half_b, ns_a + BLOCK_N // 2, rmask, tile, b_ptr, out_ptr, pre_ptr, part_ptr,
                  pid_m, m_tiles, Cout, C_PART, HAS_BIAS, ACT, STATS, STORE_OUT, KEEP_PRE, ACC,
                  BLOCK_M)


@triton.jit
def _fwd_epilogue(acc, ns, rmask, tile, b_ptr, out_ptr, pre_ptr, part_ptr, pid_m, m_tiles, Cout,
                  C_PART, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STATS: tl.constexpr,
                  STORE_OUT: tl.constexpr, KEEP_PRE: tl.constexpr, ACC: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    """Bias, p, act, stores and statistics of the output columns `ns` of an M-tile whose rows
    start at offset `tile`."""
    nmask = ns < Cout
    if HAS_BIAS:
        acc += tl.load(b_ptr + ns, mask=nmask, other=0.0).to(ACC)[None, :]
    # p is rounded to storage before the act, as eager's conv output is; the backward then
    # sees the same p whether it reads pre_act or recomputes it.
    p = acc.to(out_ptr.dtype.element_ty)
    mask = rmask[:, None] & nmask[None, :]
    # int32 offsets within the tile from its 64-bit row base: int64 offsets would cost two
    # registers per element.
    offs = tl.arange(0, BLOCK_M)[:, None] * Cout + ns[None, :]
    if KEEP_PRE:
        tl.store(pre_ptr + tile + offs, p, mask=mask)
    if STORE_OUT:
        o = act_fwd(p.to(ACC), ACT).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + tile + offs, o, mask=mask)
        if STATS:
            # The shift is the tile's first row (always a valid row) as just stored, read
            # back after a barrier (from L2: .cg, never a stale L1 line): the same values
            # first_row() would extract, without a cross-warp reduction over the tile.
            tl.debug_barrier()
            shift = tl.load(out_ptr + tile + ns, mask=nmask, other=0.0,
                            cache_modifier=".cg").to(ACC)
            _tile_moments(part_ptr, pid_m, m_tiles, C_PART, o.to(ACC), rmask, ns, shift, ACC)


@triton.jit
def _pw_dp_kernel(gout_ptr, pre_ptr, coef_ptr, dp_ptr, db_part_ptr, M, Cout,
                  ACT: tl.constexpr, HAS_COEF: tl.constexpr, NEED_O: tl.constexpr,
                  ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dP = (grad_out + const + lin·o)·act'(p), rounded to storage (it feeds two GEMMs in the
    storage dtype), and this M-tile's Σ dP per channel (the bias gradient)."""
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    nmask = ns < Cout
    mask = rmask[:, None] & nmask[None, :]
    offs = rows.to(tl.int64)[:, None] * Cout + ns[None, :]
    p = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(ACC)
    d_o = tl.load(gout_ptr + offs, mask=mask, other=0.0).to(ACC)
    if HAS_COEF:
        d_o += tl.load(coef_ptr + ns, mask=nmask, other=0.0).to(ACC)[None, :]
        if NEED_O:  # o as stored, since the statistics were of the stored output
            o = act_fwd(p, ACT).to(dp_ptr.dtype.element_ty).to(ACC)
            d_o += tl.load(coef_ptr + Cout + ns, mask=nmask, other=0.0).to(ACC)[None, :] * o
    d_p = act_bwd(p, d_o, ACT).to(dp_ptr.dtype.element_ty)
    tl.store(dp_ptr + offs, d_p, mask=mask)
    d_p = tl.where(mask, d_p.to(ACC), 0.0)
    tl.store(db_part_ptr + pid_m * Cout + ns, tl.sum(d_p, axis=0), mask=nmask)


@triton.jit
def _pw_wgrad_kernel(dp_ptr, x_ptr, xm_ptr, xs_ptr, xt_ptr, r_ptr, rm_ptr, rs_ptr, rt_ptr,
                     gw_part_ptr, M, Cin, Cout, M_PER_SPLIT,
                     HAS_XNORM: tl.constexpr, HAS_RES: tl.constexpr, HAS_RNORM: tl.constexpr,
                     ACC: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
                     BLOCK_MK: tl.constexpr):
    """grad_W partial of M-split s: Σ_{m in split} dP[m, co] · u[m, ci], u formed again by the
    prologue from x and res, or read as it is (saved_u: passed as x, no norm, no residual). Splits write separate partial slabs: deterministic
    split-K without atomics."""
    cos = tl.program_id(0) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    cis = tl.program_id(1) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    split = tl.program_id(2)
    comask = cos < Cout
    cimask = cis < Cin
    acc = tl.zeros([BLOCK_CO, BLOCK_CI], dtype=ACC)
    m_end = tl.minimum(M, (split + 1) * M_PER_SPLIT)
    for m0 in range(split * M_PER_SPLIT, m_end, BLOCK_MK):
        ms = m0 + tl.arange(0, BLOCK_MK)
        mmask = ms < m_end
        d_p = tl.load(dp_ptr + ms.to(tl.int64)[:, None] * Cout + cos[None, :],
                      mask=mmask[:, None] & comask[None, :], other=0.0)
        u = _load_u(x_ptr, xm_ptr, xs_ptr, xt_ptr, r_ptr, rm_ptr, rs_ptr, rt_ptr, ms, cis, mmask,
                    cimask, Cin, HAS_XNORM, HAS_RES, HAS_RNORM, ACC)
        acc = tl.dot(tl.trans(d_p), u, acc, input_precision="ieee", out_dtype=ACC)
    offs = (split * Cout + cos)[:, None] * Cin + cis[None, :]
    tl.store(gw_part_ptr + offs, acc, mask=comask[:, None] & cimask[None, :])


@triton.jit
def _pw_dgrad_kernel(dp_ptr, w_ptr, w_desc, x_ptr, xm_ptr, xs_ptr, r_ptr, rm_ptr, rs_ptr, gx_ptr,
                     gr_ptr, part_ptr, M, Cin, Cout,
                     HAS_XNORM: tl.constexpr, HAS_RES: tl.constexpr, HAS_RNORM: tl.constexpr,
                     W_DESC: tl.constexpr, ACC: tl.constexpr, GROUP_M: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dU = dP·W, then through both norms in the epilogue: grad_x = dU·scale_x (dU without a
    norm), grad_res likewise, and this M-tile's BN-backward sums Σ dU, Σ dU·(x - mean_x),
    Σ dU·(res - mean_res) per input channel."""
    n_rows = tl.cdiv(M, BLOCK_M)
    pid_m, pid_n, rows, cis, rmask, cimask, acc = _gemm_tile(M, Cin, ACC, GROUP_M, BLOCK_M,
                                                             BLOCK_N)
    for k0 in range(0, Cout, BLOCK_K):
        cos = k0 + tl.arange(0, BLOCK_K)
        comask = cos < Cout
        d_p = tl.load(dp_ptr + rows.to(tl.int64)[:, None] * Cout + cos[None, :],
                      mask=rmask[:, None] & comask[None, :], other=0.0)
        w = _weight_tile(w_ptr, w_desc, k0, pid_n * BLOCK_N, cos, cis, comask, cimask, Cin, W_DESC)
        acc = tl.dot(d_p, w, acc, input_precision="ieee", out_dtype=ACC)
    mask = rmask[:, None] & cimask[None, :]
    offs = rows.to(tl.int64)[:, None] * Cin + cis[None, :]
    # dU in the storage dtype, as the GEMM's output is stored in eager.
    d_u = tl.where(mask, acc.to(gx_ptr.dtype.element_ty).to(ACC), 0.0)
    row = pid_m * Cin + cis
    tl.store(part_ptr + row, tl.sum(d_u, axis=0), mask=cimask)
    if HAS_XNORM:
        xm = tl.load(xm_ptr + cis, mask=cimask, other=0.0)
        xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(part_ptr + n_rows * Cin + row, tl.sum(d_u * (xv - xm[None, :]), axis=0),
                 mask=cimask)
        g = d_u * tl.load(xs_ptr + cis, mask=cimask, other=0.0)[None, :]
    else:
        g = d_u
    tl.store(gx_ptr + offs, g.to(gx_ptr.dtype.element_ty), mask=mask)
    if HAS_RES:
        if HAS_RNORM:
            rm = tl.load(rm_ptr + cis, mask=cimask, other=0.0)
            rv = tl.load(r_ptr + offs, mask=mask, other=0.0).to(ACC)
            tl.store(part_ptr + 2 * n_rows * Cin + row,
                     tl.sum(d_u * (rv - rm[None, :]), axis=0), mask=cimask)
            g = d_u * tl.load(rs_ptr + cis, mask=cimask, other=0.0)[None, :]
        else:
            g = d_u
        tl.store(gr_ptr + offs, g.to(gr_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch configuration

def _configs(names, rows):
    return [triton.Config(dict(zip(names, r[:-2])), num_warps=r[-2], num_stages=r[-1])
            for r in rows]


# Per dtype class (_common.dtype_class), (tile sizes..., num_warps, num_stages) with BLOCK_M =
# 128: 16-bit dots run on the tensor cores (wgmma), float32 (IEEE, never TF32) and float64 dots
# on the FMA units, where the accumulator tile lives in registers and must be smaller. Every
# entry compiles for sm_90a without spills and within 227 KiB of shared memory, in the
# heaviest flag combination (tools/triton_compile_check.py); the fewer per class, the fewer
# compilations a training step pays (convmixer_kernels.triton.compile_plan).
_GEMM_TILES = {16: ((128, 64, 8, 3),),
               32: ((64, 32, 8, 2),),
               64: ((32, 16, 8, 2),)}
_DP_TILES = {16: ((64, 8, 1),), 32: ((64, 8, 1),), 64: ((32, 8, 1),)}
_WGRAD_TILES = {16: ((128, 128, 64, 8, 3),),
                32: ((64, 64, 32, 8, 2),),
                64: ((32, 32, 16, 8, 2),)}
_INTERPRET_GEMM = triton.Config({"BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1)


def _table(names, tiles):
    return {cls: _configs(names, rows) for cls, rows in tiles.items()}


LAUNCHED = ("_pw_fwd_kernel", "_pw_dp_kernel", "_pw_wgrad_kernel", "_pw_dgrad_kernel")
# The autotuners' keys hold every constexpr flag: a configuration chosen for one variant of a
# kernel is never reused for another (which may use more registers); the dtypes are added by
# triton itself.
_PW_FLAGS = ["HAS_XNORM", "HAS_RES", "HAS_RNORM"]
_fwd = tuned(_pw_fwd_kernel, _table(("BLOCK_N", "BLOCK_K"), _GEMM_TILES),
             ["Cin", "Cout", *_PW_FLAGS, "HAS_BIAS", "ACT", "STATS", "STORE_OUT", "KEEP_PRE",
              "W_DESC"], "x_ptr", _INTERPRET_GEMM)
_dp = tuned(_pw_dp_kernel, _table(("BLOCK_N",), _DP_TILES),
            ["Cout", "ACT", "HAS_COEF", "NEED_O"], "dp_ptr",
            triton.Config({"BLOCK_N": 16}, num_warps=1))
_wgrad = tuned(_pw_wgrad_kernel, _table(("BLOCK_CO", "BLOCK_CI", "BLOCK_MK"), _WGRAD_TILES),
               ["Cin", "Cout", *_PW_FLAGS], "x_ptr",
               triton.Config({"BLOCK_CO": 16, "BLOCK_CI": 16, "BLOCK_MK": 16}, num_warps=1))
_dgrad = tuned(_pw_dgrad_kernel, _table(("BLOCK_N", "BLOCK_K"), _GEMM_TILES),
               ["Cin", "Cout", *_PW_FLAGS, "W_DESC"], "x_ptr", _INTERPRET_GEMM)

# Whether the GEMMs may load their weight tiles through a tensor descriptor (tests turn it off
# to compare with the pointer loads).
USE_WEIGHT_DESCRIPTORS = True


def _weight_desc(w2d: torch.Tensor, x: torch.Tensor, transposed: bool):
    """A descriptor of the [Cout, Cin] weight with the box the forward (transposed: [BLOCK_N,
    BLOCK_K]) or the dgrad GEMM ([BLOCK_K, BLOCK_N]) loads, for the one GEMM configuration of
    x's dtype class (a descriptor's box is fixed before the autotuner picks, so the tables hold
    one GEMM configuration per class); None where TMA cannot take the weight: rows not a
    multiple of 16 bytes apart or a base not 16-byte aligned, or a GPU before Hopper. Only for
    16-bit dtypes, whose dots run on the tensor cores straight from shared memory; float32 and
    float64 dots run on the FMA units from registers, where the descriptor's shared-memory tile
    needs a layout conversion (the float32 dgrad then spills)."""
    if not USE_WEIGHT_DESCRIPTORS or dtype_class(x.dtype) != 16:
        return None
    if (w2d.stride(0) * w2d.element_size()) % 16 or w2d.data_ptr() % 16:
        return None
    if w2d.device.type == "cuda" and torch.cuda.get_device_capability(w2d.device)[0] < 9:
        return None
    if INTERPRET:
        tile = _INTERPRET_GEMM.kwargs
    else:
        (row,) = _GEMM_TILES[dtype_class(x.dtype)]
        tile = dict(BLOCK_N=row[0], BLOCK_K=row[1])
    box = ([tile["BLOCK_N"], tile["BLOCK_K"]] if transposed
           else [tile["BLOCK_K"], tile["BLOCK_N"]])
    return TensorDescriptor.from_tensor(w2d, box)


def _group_m(x: torch.Tensor) -> int:
    """M-tiles per group of the GEMMs' program order (_grouped_tile): on a GPU 8 row-blocks of
    128 rows share the L2 while they walk every N-tile; under the interpreter 3, so that the
    test shapes end in a ragged group."""
    return 8 if gpu_plan(x) else 3


def _block_m(x: torch.Tensor) -> int:
    """Rows per M-tile; fixed per launch because it sets the partials' layout. Under the
    interpreter small enough that the test shapes span several M-tiles."""
    return 128 if gpu_plan(x) else 32


def _m_per_split(m: int, cin: int, cout: int, x: torch.Tensor) -> int:
    """Rows of M per wgrad split: enough splits to fill the device, each a whole number of the
    largest BLOCK_MK so that only the last split ends in a partial block."""
    step = max(cfg.kwargs["BLOCK_MK"] for cfg in _wgrad.configs)
    if gpu_plan(x):
        tiles = triton.cdiv(cout, 128) * triton.cdiv(cin, 128)
        splits = max(1, min(triton.cdiv(target_programs(x.device), tiles), triton.cdiv(m, 4096)))
    else:  # the interpreter: two splits, so the cross-split sum is exercised
        splits = 2
    return triton.cdiv(triton.cdiv(m, splits), step) * step


def _vec_or(t: Optional[torch.Tensor], dummy: torch.Tensor) -> torch.Tensor:
    return t.contiguous() if t is not None else dummy


# ---------------------------------------------------------------------------------------------
# The ops


def pw_stage(x, x_mean, x_scale, x_shift, res, res_mean, res_scale, res_shift, weight, bias,
             act, stats, keep_pre_act, keep_u=False):
    """docs/OPS.md pw_stage, on Triton."""
    op = "pw_stage"
    check_pw_args(op, x, (x_mean, x_scale, x_shift), res, (res_mean, res_scale, res_shift),
                  weight, bias, act)
    check_runnable(op, x)
    n, cin, h, w = x.shape
    m = n * h * w
    if stats and m == 1:
        raise ValueError(f"{op}: expected more than 1 value per channel when training, got "
                         f"input size {tuple(x.shape)}")
    cout = weight.shape[0]
    acc = acc_dtype(x.dtype)
    out = torch.empty((n, cout, h, w), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    pre = torch.empty_like(out) if keep_pre_act else x.new_empty((0,))
    # u is x itself without a norm or residual: nothing to keep then.
    keep_u = keep_u and (x_mean is not None or res is not None)
    u = torch.empty_like(x, memory_format=torch.channels_last) if keep_u else x.new_empty((0,))
    if m == 0:
        nan = torch.full((cout if stats else 0,), float("nan"), dtype=acc, device=x.device)
        return out, pre, nan, nan.clone(), u
    part = _pw_forward(x, (x_mean, x_scale, x_shift), res, (res_mean, res_scale, res_shift),
                       weight, bias, act, out, pre if keep_pre_act else None, stats,
                       u if keep_u else None)
    if not stats:
        empty = x.new_empty((0,), dtype=acc)
        return out, pre, empty, empty.clone(), u
    mean, var = merge_moments(part, acc)
    return out, pre, mean, var, u


def _pw_forward(x, x_norm, res, res_norm, weight, bias, act, out, pre, stats, u=None):
    """Launches the forward GEMM; writes out, pre and u (each when given); returns the
    statistics partials when `stats`."""
    n, cin, h, w = x.shape
    m, cout = n * h * w, weight.shape[0]
    x = x.contiguous(memory_format=torch.channels_last)
    res = res.contiguous(memory_format=torch.channels_last) if res is not None else None
    w2d = weight.reshape(cout, cin).contiguous()
    block_m = _block_m(x)
    m_tiles = triton.cdiv(m, block_m)
    # Partial rows padded to whole N-tiles of any config: the epilogue stores them unmasked.
    widest = max(cfg.kwargs["BLOCK_N"] for cfg in _fwd.configs)
    c_part = triton.cdiv(cout, widest) * widest
    part = (torch.empty((4, m_tiles, c_part), dtype=acc_dtype(x.dtype), device=x.device)
            if stats else w2d)
    xm, xs, xt = (_vec_or(v, w2d) for v in x_norm)
    rm, rs, rt = (_vec_or(v, w2d) for v in res_norm)
    w_desc = _weight_desc(w2d, x, transposed=True)
    launch(_fwd, lambda meta: (m_tiles * triton.cdiv(cout, meta["BLOCK_N"]),),
           (x, xm, xs, xt, res if res is not None else x, rm, rs, rt, w2d,
            w_desc if w_desc is not None else w2d, bias.contiguous() if bias is not None else w2d,
            out if out is not None else x, pre if pre is not None else x,
            u if u is not None else x, part, m, cin, cout, c_part),
           dict(HAS_XNORM=x_norm[0] is not None, HAS_RES=res is not None,
                HAS_RNORM=res_norm[0] is not None, HAS_BIAS=bias is not None,
                ACT=ACTIVATIONS[act].code, STATS=stats, STORE_OUT=out is not None,
                KEEP_PRE=pre is not None, KEEP_U=u is not None, W_DESC=w_desc is not None, ACC=tl_acc(x.dtype),
                GROUP_M=_group_m(x),
                BLOCK_M=block_m))
    return part[:, :, :cout] if stats else None


def pw_stage_backward(grad_out, grad_mean, grad_var, x, x_mean, x_scale, x_shift, res, res_mean,
                      res_scale, res_shift, weight, bias, pre_act, mean, act, saved_out=None,
                      saved_u=None, grad_res_normed=False):
    """docs/OPS.md pw_stage_backward, on Triton."""
    op = "pw_stage_backward"
    x_norm, res_norm = (x_mean, x_scale, x_shift), (res_mean, res_scale, res_shift)
    check_pw_args(op, x, x_norm, res, res_norm, weight, bias, act)
    check_runnable(op, x)
    n, cin, h, w = x.shape
    m, cout = n * h * w, weight.shape[0]
    out_shape, in_shape = (n, cout, h, w), (n, cin, h, w)
    for name, t, shape in (("grad_out", grad_out, out_shape),
                           ("pre_act", pre_act if present(pre_act) else None, out_shape),
                           ("saved_out", saved_out if present(saved_out) else None, out_shape),
                           ("saved_u", saved_u if present(saved_u) else None, in_shape)):
        if t is not None and (tuple(t.shape) != shape or t.dtype != x.dtype
                              or t.device != x.device):
            raise ValueError(f"{op}: {name} must be {shape} {x.dtype} on {x.device}, got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device}")
    acc = acc_dtype(x.dtype)
    coef = stat_coefficients(op, grad_mean, grad_var, mean, m, cout, x.device, acc)
    # The res norm's backward, unless the caller takes dU itself as the residual's gradient (of
    # norm_res(res)) and does that backward elsewhere (u is still formed with the norm).
    has_xnorm, has_rnorm = x_mean is not None, res_mean is not None and not grad_res_normed
    grad_x = torch.empty_like(x, memory_format=torch.channels_last)
    grad_res = (torch.empty_like(x, memory_format=torch.channels_last) if res is not None
                else x.new_empty((0,)))
    if m == 0:
        zeros = lambda *s, dtype=acc: torch.zeros(s, dtype=dtype, device=x.device)  # noqa: E731
        xn, rn = cin if has_xnorm else 0, cin if has_rnorm else 0
        return (grad_x, zeros(xn), zeros(xn), zeros(xn), grad_res, zeros(rn), zeros(rn),
                zeros(rn), zeros(*weight.shape, dtype=weight.dtype),
                zeros(cout, dtype=weight.dtype))

    x = x.contiguous(memory_format=torch.channels_last)
    res = res.contiguous(memory_format=torch.channels_last) if res is not None else None
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    w2d = weight.reshape(cout, cin).contiguous()
    # The GEMMs' input: the forward's u when kept (read as a plain input, no norm to apply),
    # else formed again on load from x and res.
    none3 = (None, None, None)
    u_in = ((saved_u.contiguous(memory_format=torch.channels_last), none3, None, none3)
            if present(saved_u) else (x, x_norm, res, res_norm))
    if present(pre_act):
        pre = pre_act.contiguous(memory_format=torch.channels_last)
    elif present(saved_out) and not ACTIVATIONS[act].needs_pre_activation:
        # act' follows from the output (relu): it serves as p (act(o) = o, o <= 0 where p <= 0).
        pre = saved_out.contiguous(memory_format=torch.channels_last)
    else:  # recompute p with the forward GEMM, writing nothing else
        pre = torch.empty_like(grad_out, memory_format=torch.channels_last)
        _pw_forward(*u_in, weight, bias, act, None, pre, False)
    block_m = _block_m(x)
    m_tiles = triton.cdiv(m, block_m)

    d_p = torch.empty((m, cout), dtype=x.dtype, device=x.device)
    db_part = torch.empty((m_tiles, cout), dtype=acc, device=x.device)
    launch(_dp, lambda meta: (m_tiles, triton.cdiv(cout, meta["BLOCK_N"])),
           (grad_out, pre, coef if coef is not None else w2d, d_p, db_part, m, cout),
           dict(ACT=ACTIVATIONS[act].code, HAS_COEF=coef is not None, NEED_O=present(grad_var),
                ACC=tl_acc(x.dtype), BLOCK_M=block_m))

    m_per_split = _m_per_split(m, cin, cout, x)
    splits = triton.cdiv(m, m_per_split)
    gw_part = torch.empty((splits, cout, cin), dtype=acc, device=x.device)
    ux, ux_norm, ur, ur_norm = u_in
    launch(_wgrad, lambda meta: (triton.cdiv(cout, meta["BLOCK_CO"]),
                                 triton.cdiv(cin, meta["BLOCK_CI"]), splits),
           (d_p, ux, *(_vec_or(v, w2d) for v in ux_norm), ur if ur is not None else ux,
            *(_vec_or(v, w2d) for v in ur_norm), gw_part, m, cin, cout, m_per_split),
           dict(HAS_XNORM=ux_norm[0] is not None, HAS_RES=ur is not None,
                HAS_RNORM=ur_norm[0] is not None, ACC=tl_acc(x.dtype)))

    if not has_rnorm:
        res_norm = none3
    xm, xs, xt = (_vec_or(v, w2d) for v in x_norm)
    rm, rs, rt = (_vec_or(v, w2d) for v in res_norm)
    flags = dict(HAS_XNORM=has_xnorm, HAS_RES=res is not None, HAS_RNORM=has_rnorm,
                 ACC=tl_acc(x.dtype))

    part = torch.empty((3, m_tiles, cin), dtype=acc, device=x.device)
    w_desc = _weight_desc(w2d, x, transposed=False)
    launch(_dgrad, lambda meta: (m_tiles * triton.cdiv(cin, meta["BLOCK_N"]),),
           (d_p, w2d, w_desc if w_desc is not None else w2d, x, xm, xs,
            res if res is not None else x, rm, rs, grad_x,
            grad_res if res is not None else grad_x, part, m, cin, cout),
           dict(flags, W_DESC=w_desc is not None, GROUP_M=_group_m(x), BLOCK_M=block_m))

    grad_w = reduce_partials(gw_part, weight.dtype).reshape(weight.shape)
    grad_b = reduce_partials(db_part, weight.dtype)
    empty = lambda: x.new_empty((0,), dtype=acc)  # noqa: E731
    sum_du = reduce_partials(part[0], acc)
    x_grads = ((-x_scale * sum_du, reduce_partials(part[1], acc), sum_du.clone())
               if has_xnorm else (empty(), empty(), empty()))
    res_grads = ((-res_scale * sum_du, reduce_partials(part[2], acc), sum_du.clone())
                 if has_rnorm else (empty(), empty(), empty()))
    return (grad_x, *x_grads, grad_res, *res_grads, grad_w, grad_b)
