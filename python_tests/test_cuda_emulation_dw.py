"""The CUDA dw-stage kernels (csrc/cuda/kernels/dw_stage.cuh) run on the CPU under EMULATION:
what only the kernels' entry points show.

The stage itself (forward in training and eval, backward with dA, dW, db, dX and the norm's sums,
every k path, odd sizes, partial channel blocks, CTAs walking several tiles, results independent
of CTA order) is checked against the reference by test_ops.py, as backend "cuda-emu" (see
emulated_cuda.py), with every other backend's assertions. What this cannot check (races, real GPU
arithmetic, speed) is for the "cuda" backend's cases there, on a GPU.
"""
from __future__ import annotations

import ctypes

import pytest
import torch

from cuda_emulation import launch_log
from emulated_cuda import (CUDA_ERROR_INVALID_VALUE, DTYPE_CODE, NO_BN_FORWARD,
                           UNKNOWN_ACT_CODES, act_code, dw_kernels)
from stage_checks import dw_case


@pytest.fixture(scope="module")
def kernels():
    return dw_kernels()


def _inputs(shape, k, seed):
    """x, (mean, scale, shift), weight, bias of a float32 case, on the CPU."""
    x, m, s, t, weight, bias = dw_case(shape, k, torch.float32, device="cpu", seed=seed).leaves
    return x, (m, s, t), weight, bias


def test_float64_tiles_too_large_for_shared_memory_are_refused(kernels):
    # float64 with k >= 13: the backward's tile + halo, taps and dW accumulators exceed sm_90's
    # 227 KiB of shared memory per block. The plan says so (the torch launcher turns that into a
    # ValueError naming dtype and kernel size) instead of launching a kernel that cannot start.
    size = ctypes.c_size_t(0)
    rc = kernels.fwd(DTYPE_CODE[torch.float64], act_code("gelu"), None, 1, 5, 4, 15, 13,
                     *([None] * 9), *NO_BN_FORWARD, None, 0, ctypes.byref(size), None)
    assert rc == CUDA_ERROR_INVALID_VALUE


@pytest.mark.parametrize("code", UNKNOWN_ACT_CODES)
def test_unknown_activation_code_is_refused(kernels, code):
    # An activation code the C++ list lacks is an error before any kernel runs, never another
    # activation's kernels.
    x, norm, weight, bias = _inputs((2, 8, 5, 6), 3, seed=2)
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
    x, norm, weight, bias = _inputs((2, 32, 9, 10), 9, seed=5)
    a = kernels.forward(x, norm, weight, bias, "gelu", stats=True)
    b = kernels.forward(x, norm, weight, bias, "gelu", stats=True, x_offset=1)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_backward_from_saved_out(kernels, act, dtype):
    # Given the forward's out, the ReLU backward takes relu'(a) and o from it instead of
    # recomputing the conv, in the one-kernel backward (dw_backward_fused.cuh); given a as pre_act
    # it forms the same dA from a (relu commutes with the rounding to storage): identical bits in
    # every gradient, with the statistics' gradient (which reads o) on. GELU ignores out: the
    # call without it, bit for bit. k = 9 takes the register-tap path, k = 11 the generic one;
    # C = 40 leaves a partial channel block.
    for k in (9, 11):
        x, m, s, t, weight, bias = dw_case((2, 40, 9, 10), k, dtype, device="cpu", seed=7).leaves
        norm = (m, s, t)
        out, mean, _, pre = kernels.forward(x, norm, weight, bias, act, stats=True,
                                            keep_pre_act=True)
        gen = torch.Generator().manual_seed(3)
        grad_out = torch.randn(out.shape, generator=gen).to(dtype)
        gm, gv = torch.randn(40, generator=gen), torch.randn(40, generator=gen)
        args = (grad_out, gm, gv, mean, x, norm, weight, bias, act)
        a = kernels.backward(*args, out=out)
        b = kernels.backward(*args, pre_act=pre) if act == "relu" else kernels.backward(*args)
        for u, v in zip(a, b):
            assert torch.equal(u, v)
        # The finalize's mean gradient is bitwise what the launcher's ATen ops made of the sum.
        sum_dx, grad_norm_mean = a[3], a[5]
        assert torch.equal(grad_norm_mean, -sum_dx * s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [5, 9, 11])
def test_forward_without_out_writes_a_and_the_statistics(kernels, dtype, k):
    # Given no out (the pw stage reads act(a) on its load, x_act), the forward writes a and the
    # statistics (with the folded BatchNorm's scale and shift) with the bits it writes beside out.
    x, m, s, t, weight, bias = dw_case((2, 40, 9, 10), k, dtype, device="cpu", seed=11).leaves
    bn = (torch.rand(40) + 0.5, torch.randn(40), 1e-5)
    full = kernels.forward(x, (m, s, t), weight, bias, "gelu", stats=True, keep_pre_act=True,
                           bn=bn)
    bare = kernels.forward(x, (m, s, t), weight, bias, "gelu", stats=True, keep_pre_act=True,
                           bn=bn, write_out=False)
    assert bare[0] is None
    for u, v in zip(full[1:], bare[1:]):
        assert torch.equal(u, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("norm_given", [True, False], ids=["norm", "no_norm"])
def test_backward_from_pre_act(kernels, act, dtype, norm_given):
    # keep_pre_act: the forward writes a = dwconv(norm(x)) + b (its out unchanged), and the
    # backward given it forms dA from a on load in one kernel (dw_backward_fused.cuh) instead of
    # recomputing the conv in two, for every activation. float32: a as stored is the recompute's
    # a and dA stays in float32 on both paths, so grad_x, grad_bias and the norm's sums have the
    # recompute's bits; dW sums the same products over the tile's input pixels instead of its
    # output pixels, another order, so it (and in bfloat16, where the two-kernel path rounds dA to
    # the storage dtype between its kernels, everything) meets the stage's bound against the
    # float64 reference (DW_MAX_ERROR); the recompute path's values are checked there by
    # test_ops.py. k = 9 is the register-tap path, k = 11 the generic one; C = 40 leaves a partial
    # channel block.
    from emulated_cuda import DW_MAX_ERROR
    from reference import ref_dw_stage
    for k in (9, 11):
        x, m, s, t, weight, bias = dw_case((2, 40, 9, 10), k, dtype, device="cpu", seed=7).leaves
        norm = (m, s, t) if norm_given else None
        out, mean, var = kernels.forward(x, norm, weight, bias, act, stats=True)
        out_k, mean_k, var_k, pre = kernels.forward(x, norm, weight, bias, act, stats=True,
                                                    keep_pre_act=True)
        for u, v in zip((out, mean, var), (out_k, mean_k, var_k)):
            assert torch.equal(u, v)
        gen = torch.Generator().manual_seed(3)
        grad_out = torch.randn(out.shape, generator=gen).to(dtype)
        gm, gv = torch.randn(40, generator=gen), torch.randn(40, generator=gen)
        args = (grad_out, gm, gv, mean, x, norm, weight, bias, act)
        recompute = kernels.backward(*args)
        read = kernels.backward(*args, out=out, pre_act=pre)
        # The forward's a, against the same sum in float64.
        x64 = x.double() if norm is None else (x.double() - m.double()[:, None, None]) * (
            s.double()[:, None, None]) + t.double()[:, None, None]
        a64 = torch.nn.functional.conv2d(x64, weight.double(), bias.double(), padding=k // 2,
                                         groups=40)
        assert ((pre.double() - a64).abs().max() / a64.abs().max()).item() <= DW_MAX_ERROR[dtype]
        if dtype == torch.float32:
            # (Without a norm the norm's three outputs are the poisoned buffers: not compared.)
            for i in (0, 2, 3, 4, 5) if norm_given else (0, 2):
                assert torch.equal(recompute[i], read[i]), i
        # The gradients against the float64 reference of the stored inputs.
        leaves = [v.double().requires_grad_() if v is not None else None
                  for v in (x, weight, bias, *(norm or ()))]
        x64, w64, b64 = leaves[:3]
        n64 = tuple(leaves[3:]) if norm is not None else None
        o, mu, va = ref_dw_stage(x64, w64, b64, act=act, x_norm=n64, stats=True)
        torch.autograd.backward((o, mu, va), (grad_out.double(), gm.double(), gv.double()))
        names = ["grad_x", "grad_weight", "grad_bias"]
        pairs = list(zip(read[:3], (x64.grad, w64.grad, b64.grad)))
        if norm is not None:  # (grad_mean, grad_scale, grad_shift) = (read[5], read[4], read[3])
            names += ["grad_norm_mean", "grad_norm_scale", "grad_norm_shift"]
            pairs += list(zip((read[5], read[4], read[3]), (v.grad for v in n64)))
        for name, (got, ref) in zip(names, pairs):
            err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
            assert err <= DW_MAX_ERROR[dtype], (name, err)


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_backward_kernels_and_scratch(kernels, act):
    # With a saved (ReLU: its out; GELU: its pre_act) the backward is the one fused kernel and
    # needs no dA scratch, so the torch launcher allocates none (dw::fused_backward): the same
    # bits without it. Recomputing a it is the data and input kernels, with dA between them: a
    # call without the scratch is refused before any launch.
    x, norm, weight, bias = _inputs((2, 40, 9, 10), 9, seed=4)
    out, mean, _, pre = kernels.forward(x, norm, weight, bias, act, stats=True,
                                        keep_pre_act=True)
    gen = torch.Generator().manual_seed(5)
    args = (torch.randn(out.shape, generator=gen), torch.randn(40, generator=gen),
            torch.randn(40, generator=gen), mean, x, norm, weight, bias, act)
    saved = dict(out=out) if act == "relu" else dict(pre_act=pre)
    launch_log(kernels.lib)
    with_scratch = kernels.backward(*args, **saved)
    log = launch_log(kernels.lib)
    assert [line.split("<")[0].split()[-1] for line in log] == [
        "convmixer_kernels::cuda::dw::dw_backward_fused_kernel"], log
    without = kernels.backward(*args, **saved, scratch=False)
    for u, v in zip(with_scratch, without):
        assert torch.equal(u, v)
    launch_log(kernels.lib)
    kernels.backward(*args)
    names = [line.split("<")[0].split()[-1].rsplit("::", 1)[-1] for line in launch_log(kernels.lib)]
    assert names == ["dw_backward_data_kernel", "dw_backward_input_kernel"], names
    with pytest.raises(AssertionError, match=r"returned cudaError 1\b"):
        kernels.backward(*args, scratch=False)
    assert launch_log(kernels.lib) == []


@pytest.mark.parametrize("dtype,k", [*((torch.float32, k) for k in (3, 5, 7, 9, 11)),
                                     (torch.float64, 3)])
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_fused_backward_slides_the_window_along_a_tile_row(kernels, act, dtype, k):
    # One CTA walking every tile keeps K - 1 columns of dA's window from the tile to the left and
    # forms only the new ones (slide_window at k = 3, 7, 9; k = 5 and 11 form every column: the
    # kernel's kSlides, and K - 1 <= 8); one CTA per tile
    # forms every window whole. dA is the same either way, so grad_x (no sum across pixels) has
    # the same bits; dW, db and the norm's sums run over another partition, in another order.
    # float64 takes the generic path. W = 29: four tiles a row, the last partial; H = 19: two
    # tile rows; C = 40: two channel blocks, the second partial.
    from emulated_cuda import DW_MAX_ERROR, dw_target_ctas
    x, m, s, t, weight, bias = dw_case((2, 40, 19, 29), k, dtype, device="cpu", seed=11).leaves
    norm = (m, s, t)
    out, mean, _, pre = kernels.forward(x, norm, weight, bias, act, stats=True,
                                        keep_pre_act=True)
    gen = torch.Generator().manual_seed(12)
    args = (torch.randn(out.shape, generator=gen, dtype=dtype),
            torch.randn(40, generator=gen, dtype=dtype), torch.randn(40, generator=gen, dtype=dtype),
            mean, x, norm, weight, bias, act)
    saved = dict(out=out) if act == "relu" else dict(pre_act=pre)
    whole = kernels.backward(*args, **saved)
    assert not any(v.isnan().any() for v in whole)
    with dw_target_ctas(2):  # one CTA per channel block
        slid = kernels.backward(*args, **saved)
    assert torch.equal(whole[0], slid[0])
    for u, v in zip(whole[1:], slid[1:]):
        err = ((u.double() - v.double()).abs().max() / v.double().abs().max()).item()
        assert err <= DW_MAX_ERROR[dtype], err


def test_backward_of_no_pixels_is_zero_sums_from_one_finalize(kernels):
    # N = 0: no tile, no part. Only the finalize runs (the data and input kernels have no grid):
    # dW, db and the norm's sums are empty sums, zero, and the mean gradient is -0 · scale.
    x, norm, weight, bias = _inputs((2, 24, 5, 6), 3, seed=9)
    empty = x[:0]
    c = x.shape[1]
    launch_log(kernels.lib)
    grad_x, grad_w, grad_b, sum_dx, sum_dx_xc, grad_mean = kernels.backward(
        empty, torch.ones(c), torch.ones(c), torch.zeros(c), empty, norm, weight, bias, "gelu")
    log = launch_log(kernels.lib)
    assert len(log) == 1 and "dw_backward_finalize_kernel" in log[0], log
    assert grad_x.shape == empty.shape
    for t in (grad_w, grad_b, sum_dx, sum_dx_xc):
        assert torch.equal(t, torch.zeros_like(t))
    assert torch.equal(grad_mean, -torch.zeros(c) * norm[1])
