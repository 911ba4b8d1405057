"""The fused stage ops against the eager reference (python_tests/reference.py), docs/OPS.md, on
every backend (python_tests/backends.py): cpu, triton (under Triton's interpreter without a GPU),
cuda-emu (the CUDA dw kernels under emulation), and on a GPU cuda and triton-gpu.

Each check is written once; each backend runs its own cases, sized for it: the CPU the full
grids (every dtype, kernel size, activation and optional input), the interpreter and the
emulation small shapes that still cross their tiles, channel blocks and chunks, a GPU the dtypes
the interpreter cannot compute (bfloat16), paper widths, every autotuner configuration and
run-to-run determinism at sizes where races would show.

Tolerances are reference.py's: float64 and float32 directly against a float64 reference,
bfloat16/float16 by the docs/DESIGN.md §6 rule (the fused error at most 2x eager PyTorch's in
the same dtype), float64 gradcheck on tiny shapes.
"""
from __future__ import annotations

import re
from itertools import product

import pytest
import torch

from backends import ONCE, TRITON, over_backends, tuned
from convmixer_kernels.activations import ACTIVATIONS, NAMES
from convmixer_kernels.ops import Norm
from reference import (assert_close_direct, assert_close_rule, ref_dw_stage, ref_pw_stage,
                       stats_of_stored, to64)
from stage_checks import (DW_PARTS, LAYOUTS, PW_PARTS, assert_bitwise, call, cast_cotangents,
                          check_case, cotangents, dw_case, gradcheck_case, make_norm, pw_case,
                          randn, run, stage_args)

f64, f32, bf16, f16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
DTYPES = [f64, f32, bf16, f16]
LOW = [bf16, f16]
KERNELS = [1, 3, 5, 7, 9, 15]
ACTS = list(NAMES)
MODES = ["train", "eval"]  # stats=True (batch statistics) or False


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dw(backend, dtype, shape, k, act="gelu", mode="train", parts="norm_bias", layout="nchw"):
    """The dw case the tests below run; its seed is fixed by k and C."""
    return dw_case(shape, k, dtype, device=backend.device, act=act, stats=mode == "train",
                   parts=parts, layout=layout, seed=k + shape[1])


def _pw(backend, dtype, shape, act="gelu", mode="train", parts="both_norms_bias",
        layout="nchw", res_layout=None):
    """The pw case the tests below run; its seed is fixed by Cin and Cout."""
    return pw_case(shape, dtype, device=backend.device, act=act, stats=mode == "train",
                   parts=parts, layout=layout, res_layout=res_layout, seed=shape[1] + shape[2])


# ---------------------------------------------------------------------------------------------
# Forward values over the full grid (the CPU; every other backend checks its forward values
# together with its gradients below)

# (N, C, H, W): odd, non-square spatial sizes; C not a multiple of 8 or 32 (and 40 > one
# 32-lane channel block of the CPU dw kernel); the last has H and W smaller than most kernels.
DW_SHAPES = [(2, 5, 7, 11), (3, 12, 9, 5), (2, 40, 3, 5)]
# (N, Cin, Cout, H, W)
PW_SHAPES = [(2, 5, 12, 7, 11), (3, 40, 12, 5, 3), (2, 12, 40, 9, 1)]


@over_backends("dtype,k,act,parts,shape",
               cpu=product(DTYPES, KERNELS, ACTS, DW_PARTS, DW_SHAPES))
def test_dw_stage_forward(backend, dtype, k, act, parts, shape):
    check_case(_dw(backend, dtype, shape, k, act, parts=parts), backend, grads=False)


@over_backends("dtype,act,parts,shape", cpu=product(DTYPES, ACTS, PW_PARTS, PW_SHAPES))
def test_pw_stage_forward(backend, dtype, act, parts, shape):
    check_case(_pw(backend, dtype, shape, act, parts=parts), backend, grads=False)


# ---------------------------------------------------------------------------------------------
# Outputs, statistics and the gradient of every input


def _dw_cases(dtypes, shapes, kernels, acts=("gelu",), modes=("train",), parts=("norm_bias",),
              layouts=("nchw",), tunings=(None,)):
    return [(d, s, k, a, m, p, lay, t) for d, s, k, a, m, p, lay, t in
            product(dtypes, shapes, kernels, acts, modes, parts, layouts, tunings)]


# Triton under the interpreter: k in {3, 5, 7, 9}, both activations, training and eval; odd,
# non-square images; C = 12 or 6 leaves lanes of the 16-channel block masked; H = 9 crosses the
# interpreter's 8-row tile; pinned small tilings cross tile borders, channel blocks, persistent
# programs walking several tiles, Chan merges across tiles and programs, dW partials
# accumulated over tiles.
TRITON_DW = [
    (f32, (3, 12, 9, 5), 3, "gelu", "train"),
    (f32, (3, 12, 9, 5), 3, "relu", "eval"),
    (f32, (2, 6, 7, 11), 7, "relu", "train"),
    (f32, (2, 6, 7, 11), 7, "gelu", "eval"),
    (f32, (2, 6, 9, 7), 9, "gelu", "train"),
    (f32, (4, 6, 5, 3), 9, "relu", "train"),  # k larger than H and W: every tap a border tap
]
# The CUDA dw kernels under emulation: the register-tap fast paths (k = 3, 5, 7, 9) and the
# generic path (k = 1, 11, 15; and every k in float64), odd sizes, channel counts that leave
# partial channel blocks, the 16-byte and the scalar load paths.
EMU_DW = [
    *[(f32, k, (2, 37, 9, 11)) for k in (3, 5, 7, 9)],  # fast paths, scalar loads (C % 4 != 0)
    *[(f32, k, (1, 64, 17, 10)) for k in (1, 11, 15)],  # generic path, 16-byte loads, 2 blocks
    (f32, 9, (3, 40, 16, 16)),                          # several parts and tiles per image
    (bf16, 9, (2, 48, 13, 7)),                          # 16-byte bf16 loads (48 % 8 == 0)
    (bf16, 5, (2, 21, 5, 6)),
    (f16, 7, (1, 40, 9, 9)),
    (f64, 3, (2, 10, 6, 7)),                            # float64: generic path for every k
    (f64, 11, (1, 5, 4, 15)),
]
# The emulated plan sized for 1 or 4 CTAs: on these shapes each CTA then walks a run of tiles,
# as the paper shapes do on a GPU (the real plan gives every small shape one tile per CTA).
EMU_DW_WALKING = [(f32, 9, (3, 40, 16, 16)), (f32, 11, (2, 33, 20, 9)), (bf16, 5, (2, 64, 17, 17))]
TRITON_DW_CLASSES = sorted(TRITON.dw._TILES) if TRITON is not None else [32]


@over_backends(
    "dtype,shape,k,act,mode,parts,layout,tuning",
    cpu=_dw_cases([f32, bf16, f16], [(3, 40, 7, 11)], [1, 3, 9, 15], ACTS, MODES),
    triton=[
        *[(d, s, k, a, m, "norm_bias", "nchw", None) for d, s, k, a, m in TRITON_DW],
        (f32, (2, 12, 6, 11), 3, "gelu", "train", "norm_bias", "nchw", "tiles4"),
        (f32, (2, 12, 6, 11), 5, "relu", "train", "norm_bias", "nchw", "tiles8"),
        *_dw_cases([f32], [(2, 5, 4, 6)], [3], parts=["plain", "bias", "norm"]),
        *_dw_cases([f64], [(2, 5, 6, 7)], [5]),
        *_dw_cases([f16], [(2, 12, 7, 9)], [3]),
    ],
    # Every configuration of the dw table, forced one at a time (odd sizes: partial tiles and a
    # partial channel block); the low-precision dtypes; the CIFAR model's stage shape at a small
    # batch (ConvMixer-256/8, k5, 16×16 tokens).
    triton_gpu=[
        *[(f32, (3, 80, 19, 23), k, "gelu" if k != 7 else "relu", "train", "norm_bias", "nchw",
           f"dw_config{c}") for c in TRITON_DW_CLASSES for k in (3, 7, 9)],
        *_dw_cases(LOW, [(4, 96, 17, 21)], [3, 9], ACTS),
        *_dw_cases([f32], [(8, 256, 16, 16)], [5]),
    ],
    # C = 37 and 67 are not multiples of 8 (one 16-byte bf16 vector) or 32 (a warp's channels);
    # 7×9 and 13×11 leave partial spatial tiles, and k = 9, 15 exceed H or W; ConvMixer-768's
    # width at 32×32 tokens: many channel blocks, N·H·W = 2048 per channel.
    cuda=[
        *_dw_cases([f32], [(3, 37, 7, 9), (2, 67, 13, 11)], KERNELS, ACTS),
        *_dw_cases(LOW, [(4, 96, 17, 21)], KERNELS, ACTS),
        # the float32 NCHW ones are in the first line
        *[c for c in _dw_cases([f32, bf16], [(2, 67, 13, 11)], [3, 9],
                               layouts=["nchw", "channels_last"])
          if (c[0], c[6]) != (f32, "nchw")],
        *_dw_cases([f32, bf16], [(2, 768, 32, 32)], [7, 9]),
    ],
    # Every case with a saved (the one-kernel backward) and recomputed (the two kernels).
    cuda_emu=[
        *[(d, s, k, a, "train", "norm_bias", "nchw", tuning)
          for (d, k, s), a, tuning in product(EMU_DW, ACTS, (None, "recompute"))],
        *[(d, s, k, "gelu", "train", "norm_bias", "nchw", f"ctas{n}")
          for (d, k, s), n in product(EMU_DW_WALKING, (1, 4))],
        *_dw_cases([f32], [(2, 33, 8, 9)], [5, 15], modes=["eval"], parts=["plain"]),
        *_dw_cases([f32], [(2, 24, 10, 9)], [7], ["relu"], ["eval"], ["bias"]),
    ])
def test_dw_stage(backend, dtype, shape, k, act, mode, parts, layout, tuning):
    with tuned(tuning):
        check_case(_dw(backend, dtype, shape, k, act, mode, parts, layout), backend)


def _pw_cases(dtypes, shapes, acts=("gelu",), modes=("train",), parts=("both_norms_bias",),
              layouts=("nchw",), tunings=(None,)):
    return list(product(dtypes, shapes, acts, modes, parts, layouts, tunings))


# Triton under the interpreter: Cin = 40 takes three 16-wide K blocks, Cout = 36 three N blocks,
# and M = 105 rows four 32-row M-tiles and two wgrad splits.
TRITON_PW_SHAPE = (3, 40, 36, 5, 7)
# (Cin, Cout): square at the paper widths and small ones that leave partial tiles and vectors,
# and two with Cin != Cout.
CUDA_PW_CHANNELS = [(16, 16), (24, 24), (256, 256), (768, 768), (1536, 1536), (24, 40),
                    (768, 256)]


@over_backends(
    "dtype,shape,act,mode,parts,layout,tuning",
    cpu=_pw_cases([f32, bf16, f16], [(3, 40, 36, 7, 5)], ACTS, MODES,
                  ["plain", "both_norms_bias", "norm_residual", "residual"]),
    triton=[
        *_pw_cases([f32], [TRITON_PW_SHAPE], ACTS, MODES, ["both_norms_bias", "norm_residual"]),
        *_pw_cases([f32], [(2, 12, 10, 3, 5)],
                   parts=["plain", "bias", "norm_bias", "residual", "residual_norm"]),
        *_pw_cases([f64], [(2, 12, 10, 5, 7)], ["relu"]),
        *_pw_cases([f16], [TRITON_PW_SHAPE]),
        # Cin = 5: weight rows 20 bytes apart, which TMA cannot take: the pointer loads.
        *_pw_cases([f32], [(2, 5, 12, 3, 5)]),
    ],
    # Every configuration (M, Cin, Cout not multiples of any tile), the low-precision dtypes,
    # the CIFAR model's stage shape.
    triton_gpu=[
        *_pw_cases([f32], [(3, 200, 136, 13, 11)], tunings=[f"pw_config{i}" for i in range(3)]),
        *_pw_cases(LOW, [(4, 192, 160, 15, 13)], ACTS),
        *_pw_cases([f32], [(8, 256, 256, 16, 16)]),
    ],
    # A later block's pw stage at every width (M = 2·13·11 = 286 rows, not a multiple of any
    # GEMM tile), every combination of optional inputs, and both input layouts.
    cuda=[
        *_pw_cases([f32, *LOW], [(2, cin, cout, 13, 11) for cin, cout in CUDA_PW_CHANNELS],
                   ACTS),
        *[c for c in _pw_cases([f32, bf16], [(3, 40, 36, 7, 5)], ["gelu", "relu"], MODES,
                               PW_PARTS)
          if (c[2] == "gelu") == (c[3] == "train")],
        *_pw_cases([f32, bf16], [(2, 67, 40, 9, 7)], layouts=["nchw", "channels_last"]),
    ])
def test_pw_stage(backend, dtype, shape, act, mode, parts, layout, tuning):
    with tuned(tuning):
        check_case(_pw(backend, dtype, shape, act, mode, parts, layout), backend)


@over_backends("dtype", triton=[f16], triton_gpu=[bf16, f16])
def test_pw_weight_descriptors_match_pointer_loads(backend, dtype, monkeypatch):
    """The GEMMs' weight tiles through a tensor descriptor (TMA on a GPU) and through pointers
    are the same tiles: outputs, statistics and gradients bitwise equal."""
    case = _pw(backend, dtype, TRITON_PW_SHAPE)
    cots = cast_cotangents(cotangents(case), dtype)
    with_desc = run(call(case, backend), case.leaves, cots)
    monkeypatch.setattr(TRITON.pw, "USE_WEIGHT_DESCRIPTORS", False)
    without = run(call(case, backend), case.leaves, cots)
    assert_bitwise(with_desc[0], without[0])
    assert_bitwise(with_desc[1], without[1])


# 4·32·32 = 4096 rows: several row chunks of the CPU pw stage's fused pipeline (float), so its
# chunk GEMMs run on the pool's threads and its weight gradient sums several row groups.
PW_CHUNKED = (4, 24, 20, 32, 32)


@over_backends("dtype", cpu=[f64, f32])
def test_pw_stage_several_chunks(backend, dtype):
    """The chunked pipeline on at least two threads, with a weight that requires grad."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        check_case(_pw(backend, dtype, PW_CHUNKED), backend)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# float64 gradcheck of every differentiable input


DW_GRADCHECK = [
    # (shape, k, act, parts)
    ((2, 3, 4, 5), 3, "gelu", "norm_bias"),
    ((2, 3, 4, 5), 3, "relu", "norm_bias"),
    ((2, 3, 4, 5), 3, "gelu", "plain"),
    ((2, 3, 4, 5), 3, "relu", "bias"),
    ((3, 2, 3, 5), 5, "gelu", "norm"),  # H < k
    ((2, 4, 5, 3), 1, "gelu", "norm_bias"),
    ((2, 2, 6, 5), 7, "relu", "norm_bias"),  # k larger than both H and W
]
CUDA_DW_GRADCHECK = [
    ((2, 3, 4, 5), 3, "gelu", "norm_bias"),
    ((2, 4, 5, 3), 1, "relu", "bias"),
    ((2, 2, 6, 5), 7, "relu", "norm"),  # k larger than H and W
]


@over_backends("shape,k,act,parts,mode",
               cpu=[(*c, m) for c, m in product(DW_GRADCHECK, MODES)],
               cuda=[(*c, m) for c, m in product(CUDA_DW_GRADCHECK, MODES)])
def test_dw_stage_gradcheck(backend, shape, k, act, parts, mode):
    assert gradcheck_case(_dw(backend, f64, shape, k, act, mode, parts), backend)


@over_backends("parts,act,mode", cpu=product(PW_PARTS, ACTS, MODES))
def test_pw_stage_gradcheck(backend, parts, act, mode):
    assert gradcheck_case(_pw(backend, f64, (2, 4, 3, 3, 4), act, mode, parts), backend)


@over_backends("stage", cpu=["dw", "pw"])
def test_gradcheck_of_statistics_alone(backend, stage):
    """Only the statistics are differentiated: the output's gradient reaches the formula as None
    (gradients are not materialised) and counts as zero; pw's pre_act never gets one."""
    gen = _gen(14)
    x = randn(2, 3, 4, 5, dtype=f64, gen=gen).to(backend.device).requires_grad_()
    if stage == "dw":
        w = randn(3, 1, 3, 3, dtype=f64, gen=gen, scale=0.3).to(backend.device).requires_grad_()
        fn = lambda x, w: backend.stage("dw")(x, w, None)[1:]  # noqa: E731
    else:
        w = randn(4, 3, 1, 1, dtype=f64, gen=gen, scale=0.5).to(backend.device).requires_grad_()
        fn = lambda x, w: backend.stage("pw")(x, w, None, residual=x.flip(3))[1:]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w))


@over_backends(cpu=ONCE)
def test_block_chain_gradcheck(backend):
    """dw -> BN1 norm from its batch stats -> pw with residual, as the model chains them:
    the consumer's norm-mean gradient flows back into the producer's statistics."""
    gen = _gen(12)
    n, c, h, w = 2, 3, 4, 5

    def leaf(*shape, scale=1.0):
        return randn(*shape, dtype=f64, gen=gen, scale=scale).to(backend.device).requires_grad_()

    x, dw_w, dw_b = leaf(n, c, h, w), leaf(c, 1, 3, 3, scale=0.3), leaf(c)
    pw_w = leaf(c, c, 1, 1, scale=0.5)
    gamma = (torch.rand(c, dtype=f64, generator=gen) + 0.5).to(backend.device).requires_grad_()
    beta = leaf(c)

    def block(dw, pw, x, dw_w, dw_b, pw_w, gamma, beta):
        g, mean, var = dw(x, dw_w, dw_b, act="gelu")
        norm1 = Norm(mean, gamma * torch.rsqrt(var + 1e-5), beta)
        return pw(g, pw_w, None, act="gelu", x_norm=norm1, residual=x)

    args = (x, dw_w, dw_b, pw_w, gamma, beta)
    fused = (backend.stage("dw"), backend.stage("pw"))
    assert torch.autograd.gradcheck(lambda *a: block(*fused, *a), args)
    # And it is the eager block's gradient.
    outs = block(*fused, *args)
    cots = [randn(*t.shape, dtype=f64, gen=gen).to(backend.device) for t in outs]
    _, got = run(lambda *a: block(*fused, *a), args, cots)
    _, ref = run(lambda *a: block(ref_dw_stage, ref_pw_stage, *a), args, cots)
    for g, r in zip(got, ref):
        assert_close_direct(g, r, f64)


# ---------------------------------------------------------------------------------------------
# The backward ops' optional inputs (docs/OPS.md): dw_stage_backward's grad_res (added into
# grad_x in its store) and saved_out, pw_stage_backward's saved_out (act' from the output for
# relu), and the block-level path that uses them (ops.mixer_block)


def _dw_backward_inputs(backend, dtype, shape, k, act, parts="norm_bias", with_pre_act=False):
    """The raw dw_stage_backward arguments of a case (the forward run for out and mean), and the
    forward's output; with_pre_act: and its pre-activation, as a fourth."""
    case = _dw(backend, dtype, shape, k, act, parts=parts)
    (x, weight, bias), kw = stage_args(case)
    m, s, t = kw.get("x_norm") or (None, None, None)
    out, pre, mean, *_ = backend.raw("dw_stage")(x, m, s, t, weight, bias, act, True, with_pre_act)
    gen = _gen(31)
    acc = mean.dtype
    grad_out = randn(*out.shape, dtype=dtype, gen=gen).to(backend.device)
    gm, gv = (randn(shape[1], dtype=acc, gen=gen).to(backend.device) for _ in range(2))
    grad_res = randn(*x.shape, dtype=dtype, gen=gen).to(backend.device)
    args = (grad_out, gm, gv, x, m, s, t, weight, bias, mean, act)
    return (args, grad_res, out, pre) if with_pre_act else (args, grad_res, out)


def _with_grad_res(base, grad_res, x, norm, dtype):
    """Checks dw_stage_backward's outputs given grad_res against its outputs `base` without:
    grad_res is a gradient of norm(x) joining dX before the norm's backward, so grad_x gains
    grad_res·scale and the norm's sums gain grad_res's; the weight and bias gradients keep
    every bit. Returns the expected outputs, in float64."""
    gx, gm, gs, gt, gw, gb = base[:6]
    r = grad_res.double()
    if norm[0] is None:
        return gx.double() + r, gm, gs, gt, gw, gb
    mean, scale = (v.double().view(1, -1, 1, 1) for v in norm[:2])
    shift_g = gt.double() + r.sum((0, 2, 3))
    return (gx.double() + r * scale, -scale.flatten() * shift_g,
            gs.double() + (r * (x.double() - mean)).sum((0, 2, 3)), shift_g, gw, gb)


def _assert_grad_res(with_res, base, grad_res, x, norm, dtype):
    expected = _with_grad_res(base, grad_res, x, norm, dtype)
    assert_bitwise(with_res[4:], base[4:])
    for name, a, e in zip(("grad_x", "grad_x_mean", "grad_x_scale", "grad_x_shift"), with_res,
                          expected):
        assert_close_direct(a, e, dtype, name=f"{name} with grad_res")
    if norm[0] is None and dtype == f64:  # dX + grad_res rounded once, as Python rounds it
        assert_bitwise([with_res[0]], [base[0] + grad_res])


@over_backends("dtype,shape,k,act,parts",
               cpu=[(d, (2, 40, 7, 9), 5, a, p) for d in (f64, f32) for a in ACTS
                    for p in ("norm_bias", "plain")],
               triton=[(f64, (2, 12, 5, 9), 3, a, "norm_bias") for a in ACTS],
               cuda=[(d, (4, 40, 18, 22), 7, a, "norm_bias") for d in (f64, f32) for a in ACTS])
def test_dw_backward_grad_res_and_saved_out(backend, dtype, shape, k, act, parts):
    """grad_res joins dX before the norm's backward (_with_grad_res) and changes nothing else.
    saved_out changes no bit: for relu the backward reads act' and act from it (o <= 0 exactly
    where a <= 0, relu(o) = o), for gelu it is not used. Nor does the forward's pre_act
    (keep_pre_act), read instead of the recompute: in float32 and float64 the forward stored a
    exactly as the recompute forms it."""
    args, grad_res, out, pre = _dw_backward_inputs(backend, dtype, shape, k, act, parts,
                                                   with_pre_act=True)
    op = backend.raw("dw_stage_backward")
    base = op(*args)
    from_out = op(*args, None, out)
    assert_bitwise(base, from_out)
    assert_bitwise(base, op(*args, None, None, pre))
    assert_bitwise(base, op(*args, None, out, pre))
    _assert_grad_res(op(*args, grad_res, out), base, grad_res, args[3], args[4:7], dtype)
    # Empty means absent, as for the other optional inputs.
    empty = torch.empty(0, dtype=dtype, device=backend.device)
    assert_bitwise(base, op(*args, empty, empty, empty))


@over_backends(cuda_emu=ONCE)
def test_dw_backward_grad_res_emulated(backend):
    """The CUDA backward-input kernel's grad_res (the launcher passes it straight through), as
    the ops' (_with_grad_res), in float64."""
    import emulated_cuda
    case = dw_case((2, 40, 9, 10), 5, f64, device="cpu", seed=3)
    x, m, s, t, weight, bias = case.leaves
    kernels = emulated_cuda.dw_kernels()
    out, mean, _ = kernels.forward(x, (m, s, t), weight, bias, "gelu", stats=True)
    gen = _gen(32)
    grad_out = randn(*out.shape, dtype=f64, gen=gen)
    gm, gv = randn(40, dtype=f64, gen=gen), randn(40, dtype=f64, gen=gen)
    grad_res = randn(*x.shape, dtype=f64, gen=gen)
    args = (grad_out, gm, gv, mean, x, (m, s, t), weight, bias, "gelu")
    # The emulation's outputs in the op's order: grad_x, the norm's (mean, scale, shift), w, b.
    as_op = lambda o: (o[0], o[5], o[4], o[3], o[1], o[2])  # noqa: E731
    base = as_op(kernels.backward(*args))
    with_res = as_op(kernels.backward(*args, grad_res=grad_res))
    _assert_grad_res(with_res, base, grad_res, x, (m, s, t), f64)


@over_backends("act", cpu=ACTS, triton=ACTS)
def test_saved_out_is_read_where_the_table_says(backend, act):
    """The kernels read saved_out exactly for the activations whose needs_pre_activation is
    False (csrc/activation.h's derivative_from_output agrees with activations.py): a wrong
    saved_out changes dw_stage_backward's results for those, and nothing for the others."""
    from convmixer_kernels.activations import ACTIVATIONS
    args, _, out = _dw_backward_inputs(backend, f32, (2, 8, 5, 6), 3, act)
    op = backend.raw("dw_stage_backward")
    base = op(*args)
    wrong = op(*args, None, -out)
    changed = not all(torch.equal(a, b) for a, b in zip(base, wrong))
    assert changed == (not ACTIVATIONS[act].needs_pre_activation)


@over_backends("act", cpu=ACTS, triton=ACTS)
def test_pre_act_is_read_whenever_given(backend, act):
    """dw_stage_backward reads a given pre_act for every activation, in place of the recompute
    (and of relu's saved_out): a wrong one changes the results."""
    args, _, out, pre = _dw_backward_inputs(backend, f32, (2, 8, 5, 6), 3, act,
                                            with_pre_act=True)
    op = backend.raw("dw_stage_backward")
    base = op(*args, None, out)
    wrong = op(*args, None, out, -pre)
    assert not all(torch.equal(a, b) for a, b in zip(base, wrong))


@over_backends("dtype,parts",
               cpu=product([f64, f32], ["both_norms_bias", "plain", "norm_residual"]),
               triton=[(f64, "both_norms_bias")], cuda=[(f32, "both_norms_bias")])
def test_pw_backward_saved_out_for_relu(backend, dtype, parts):
    """For relu, the forward's output stands in for the pre-activation: the same bits as with
    pre_act, and as recomputing p; for gelu saved_out is not used."""
    for act in ACTS:
        case = _pw(backend, dtype, (2, 12, 40, 5, 7), act, parts=parts)
        (x, weight, bias), kw = stage_args(case)
        xm, xs, xt = kw.get("x_norm") or (None, None, None)
        rm, rs, rt = kw.get("residual_norm") or (None, None, None)
        res = kw.get("residual")
        out, pre, mean, *_ = backend.raw("pw_stage")(x, xm, xs, xt, res, rm, rs, rt, weight, bias,
                                                    act, True, True)
        gen = _gen(33)
        grad_out = randn(*out.shape, dtype=dtype, gen=gen).to(backend.device)
        gm, gv = (randn(40, dtype=mean.dtype, gen=gen).to(backend.device) for _ in range(2))
        head = (grad_out, gm, gv, x, xm, xs, xt, res, rm, rs, rt, weight, bias)
        op = backend.raw("pw_stage_backward")
        with_pre = op(*head, pre, mean, act)
        assert_bitwise(with_pre, op(*head, pre, mean, act, out))
        if act == "relu":
            assert_bitwise(with_pre, op(*head, None, mean, act, out))
        else:
            assert_bitwise(op(*head, None, mean, act), op(*head, None, mean, act, out))


@over_backends("dtype,parts",
               cpu=product([f64, f32, bf16], ["both_norms_bias", "plain", "norm_residual"]),
               triton=[(f64, "both_norms_bias")], cuda=[(f32, "both_norms_bias")])
def test_pw_keep_u(backend, dtype, parts):
    """keep_u hands the forward's GEMM input u = norm(x) + res_norm(res) over (nothing without a
    norm or residual: u is x); the backward given it as saved_u gives the same bits as the one
    that forms u again, with and without pre_act."""
    case = _pw(backend, dtype, (2, 12, 40, 5, 7), "gelu", parts=parts)
    (x, weight, bias), kw = stage_args(case)
    xm, xs, xt = kw.get("x_norm") or (None, None, None)
    rm, rs, rt = kw.get("residual_norm") or (None, None, None)
    res = kw.get("residual")
    out, pre, mean, _, u, *_ = backend.raw("pw_stage")(x, xm, xs, xt, res, rm, rs, rt, weight, bias,
                                                   "gelu", True, True, True)
    if parts == "plain":
        assert u.numel() == 0
        return
    expected = torch.zeros_like(x, dtype=mean.dtype)
    for v, norm in ((x, (xm, xs, xt)), (res, (rm, rs, rt))):
        if v is not None:
            m, sc, sh = (t.view(1, -1, 1, 1) if t is not None else None for t in norm)
            expected += (v.to(mean.dtype) - m) * sc + sh if m is not None else v.to(mean.dtype)
    assert u.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(u, expected.to(dtype))
    gen = _gen(34)
    grad_out = randn(*out.shape, dtype=dtype, gen=gen).to(backend.device)
    gm, gv = (randn(40, dtype=mean.dtype, gen=gen).to(backend.device) for _ in range(2))
    head = (grad_out, gm, gv, x, xm, xs, xt, res, rm, rs, rt, weight, bias)
    op = backend.raw("pw_stage_backward")
    for p in (pre, None):
        assert_bitwise(op(*head, p, mean, "gelu"), op(*head, p, mean, "gelu", None, u))
    # ... because the saved u is what the weight gradient reads (dW = dPᵀ u: doubling u doubles
    # it exactly), while the gradients through the norms still come from x and res.
    base, doubled = op(*head, pre, mean, "gelu", None, u), op(*head, pre, mean, "gelu", None, 2 * u)
    assert_bitwise(doubled[8:9], (2 * base[8],))  # grad_weight
    assert_bitwise(doubled[:8] + doubled[9:], base[:8] + base[9:])


@over_backends("dtype,parts", cpu=product([f64, f32], ["both_norms_bias", "residual_norm"]),
               triton=[(f64, "both_norms_bias")], cuda=[(f32, "both_norms_bias")])
def test_pw_backward_grad_res_normed(backend, dtype, parts):
    """grad_res_normed: the residual's gradient is dU itself, the gradient of norm_res(res) (the
    plain one times res_scale), and the res norm's gradients are left to the caller (empty);
    every other output keeps its bits."""
    case = _pw(backend, dtype, (2, 12, 40, 5, 7), "gelu", parts=parts)
    (x, weight, bias), kw = stage_args(case)
    xm, xs, xt = kw.get("x_norm") or (None, None, None)
    rm, rs, rt = kw["residual_norm"]
    res = kw["residual"]
    out, pre, mean, *_ = backend.raw("pw_stage")(x, xm, xs, xt, res, rm, rs, rt, weight, bias,
                                                   "gelu", True, True)
    gen = _gen(35)
    grad_out = randn(*out.shape, dtype=dtype, gen=gen).to(backend.device)
    gm, gv = (randn(40, dtype=mean.dtype, gen=gen).to(backend.device) for _ in range(2))
    args = (grad_out, gm, gv, x, xm, xs, xt, res, rm, rs, rt, weight, bias, pre, mean, "gelu")
    op = backend.raw("pw_stage_backward")
    plain, normed = op(*args), op(*args, None, None, True)
    assert_bitwise(normed[:4] + normed[8:], plain[:4] + plain[8:])
    assert all(g.numel() == 0 for g in normed[5:8])
    scaled = normed[4].double() * rs.double().view(1, -1, 1, 1)
    if dtype == f64:
        assert_bitwise([scaled], [plain[4]])
    else:
        assert_close_direct(plain[4], scaled, dtype, name="grad_res")


@over_backends("dtype,parts", cpu=product([f64, f32], ["both_norms_bias", "residual_norm"]),
               triton=[(f64, "both_norms_bias")], cuda=[(f32, "both_norms_bias")])
def test_pw_backward_defer_grad_x(backend, dtype, parts):
    """defer_grad_x (with grad_res_normed): grad_x is left empty, the caller's to form as
    grad_res·x_scale (dU·x_scale, dw_stage_backward's grad_out_scale; dU itself where x has no
    norm); every other output keeps its bits. Without grad_res_normed and a residual it is
    refused."""
    case = _pw(backend, dtype, (2, 12, 40, 5, 7), "gelu", parts=parts)
    (x, weight, bias), kw = stage_args(case)
    xm, xs, xt = kw.get("x_norm", (None, None, None))
    rm, rs, rt = kw["residual_norm"]
    res = kw["residual"]
    out, pre, mean, *_ = backend.raw("pw_stage")(x, xm, xs, xt, res, rm, rs, rt, weight, bias,
                                                   "gelu", True, True)
    gen = _gen(36)
    grad_out = randn(*out.shape, dtype=dtype, gen=gen).to(backend.device)
    args = (grad_out, None, None, x, xm, xs, xt, res, rm, rs, rt, weight, bias, pre, mean, "gelu",
            None, None, True)
    op = backend.raw("pw_stage_backward")
    normed, deferred = op(*args), op(*args, defer_grad_x=True)
    assert deferred[0].numel() == 0
    assert_bitwise(deferred[1:], normed[1:])
    formed = deferred[4].double() * (1 if xs is None else xs.double().view(1, -1, 1, 1))
    if dtype == f64:
        assert_bitwise([formed], [normed[0]])
    else:
        assert_close_direct(normed[0], formed, dtype, name="grad_x")
    with pytest.raises(ValueError, match="defer_grad_x needs grad_res_normed"):
        op(*args[:-1], False, defer_grad_x=True)


@over_backends("dtype,act", cpu=product([f64, f32, bf16], ACTS), triton=[(f64, "gelu")],
               cuda=[(f32, a) for a in ACTS] + [(bf16, "gelu")])
def test_pw_stage_x_act_reads_act_of_x(backend, dtype, act):
    """x_act (docs/OPS.md "Act on load"): x is a pre-activation and the stage reads act(x) as a
    stage that wrote act's output would have stored it. Forward and backward (whose grad_x is
    then act(x)'s gradient) against the float64 op on act(x) (in 16-bit storage, the rule
    against the op on eager's stored act(x)); a kept u is act(x)'s prologue, and kept even
    where without x_act u would be x itself."""
    case = _pw(backend, dtype, (2, 12, 40, 5, 7), "gelu")
    (a, weight, bias), kw = stage_args(case)
    gen = _gen(45)
    grad_out = randn(2, 40, 5, 7, dtype=dtype, gen=gen).to(backend.device)
    fwd, bwd = backend.raw("pw_stage"), backend.raw("pw_stage_backward")

    def stage(x, x_act, cast):
        xm, xs, xt = map(cast, kw["x_norm"])
        rm, rs, rt = map(cast, kw["residual_norm"])
        res, w, b = cast(kw["residual"]), cast(weight), cast(bias)
        out = fwd(x, xm, xs, xt, res, rm, rs, rt, w, b, "gelu", True, True, True, None, None,
                  None, x_act)
        grads = bwd(cast(grad_out), None, None, x, xm, xs, xt, res, rm, rs, rt, w, b, out[1],
                    out[2], "gelu", None, None, x_act=x_act)
        return [*out[:5], *grads]

    def same(t):
        return t
    got = stage(a, act, same)
    ref = stage(ACTIVATIONS[act].functional(a.double()), None, to64)
    eager = stage(ACTIVATIONS[act].functional(a), None, same)
    names = ["out", "pre_act", "mean", "var", "u", "grad_x", "grad_x_mean", "grad_x_scale",
             "grad_x_shift", "grad_res", "grad_res_mean", "grad_res_scale", "grad_res_shift",
             "grad_weight", "grad_bias"]
    for g, e, r, name in zip(got, eager, ref, names):
        if dtype == bf16:
            assert_close_rule(g, e, r, name=name)
        else:
            assert_close_direct(g, r, dtype, name=name)
    # No norm on x and no residual: u would be x itself, but x is act's input here.
    bare = fwd(a, None, None, None, None, None, None, None, weight, bias, "gelu", True, True,
               True, None, None, None, act)
    u_ref = ACTIVATIONS[act].functional(a.double())
    if dtype == bf16:
        assert_close_rule(bare[4], ACTIVATIONS[act].functional(a), u_ref, name="u, no norms")
    else:
        assert_close_direct(bare[4], u_ref, dtype, name="u, no norms")
    with pytest.raises(ValueError, match="x_act must be one of"):
        fwd(a, None, None, None, None, None, None, None, weight, bias, "gelu", True, True, True,
            None, None, None, "tanh")
    with pytest.raises(ValueError, match="x_act must be one of"):
        bwd(grad_out, None, None, a, None, None, None, None, None, None, None, weight, bias,
            got[1], got[2], "gelu", x_act="tanh")


@over_backends("act", cpu=ACTS, triton=["gelu"])
def test_pw_stage_x_act_gradcheck(backend, act):
    """float64 gradcheck through x_act: the op's autograd takes x's gradient through act' (the
    backward op's grad_x being act(x)'s), and the norms' and weights' gradients see act(x)."""
    # Small: every input element is a gradcheck column, each a forward through the op (under
    # Triton's interpreter a slow one); six rows still give the batch statistics their spread.
    case = _pw(backend, f64, (1, 3, 2, 2, 3), "gelu")
    (a, weight, bias), kw = stage_args(case)
    xm, xs, xt = kw["x_norm"]
    rm, rs, rt = kw["residual_norm"]
    res = kw["residual"]
    op = backend.raw("pw_stage")

    def fn(a, xm, xs, xt, weight, bias):
        out, _, mean, var, *_ = op(a, xm, xs, xt, res, rm, rs, rt, weight, bias, "gelu", True,
                                   True, False, None, None, None, act)
        return out, mean, var
    leaves = [t.detach().clone().requires_grad_() for t in (a, xm, xs, xt, weight, bias)]
    assert torch.autograd.gradcheck(fn, leaves)


@over_backends("dtype,k", cpu=[(f32, 3), (bf16, 7)], triton=[(f32, 3)], cuda=[(bf16, 9)])
def test_dw_stage_write_out_false_writes_a_alone(backend, dtype, k):
    """write_out=False: out is left empty and the pre-activation, the statistics and the folded
    BatchNorm's scale and shift keep their bits; it needs keep_pre_act (a is then the output)."""
    case = _dw(backend, dtype, (2, 12, 9, 5), k)
    (x, weight, bias), kw = stage_args(case)
    m, sc, sh = kw["x_norm"]
    acc = m.dtype
    bn = ((torch.rand(12, generator=_gen(46), dtype=f64) + 0.5).to(acc).to(backend.device),
          randn(12, dtype=acc, gen=_gen(47)).to(backend.device), 1e-5)
    op = backend.raw("dw_stage")
    full = op(x, m, sc, sh, weight, bias, "gelu", True, True, *bn)
    bare = op(x, m, sc, sh, weight, bias, "gelu", True, True, *bn, False)
    assert bare[0].numel() == 0 and full[0].shape == x.shape
    assert_bitwise(bare[1:], full[1:])
    with pytest.raises(ValueError, match="write_out=False needs keep_pre_act"):
        op(x, m, sc, sh, weight, bias, "gelu", True, False, *bn, False)


# Triton: pw only (the composed fold is one function for both stages; the interpreter's dw
# gradcheck takes minutes).
@over_backends("stage", cpu=["dw", "pw"], triton=["pw"], cuda=["dw", "pw"])
def test_folded_batchnorm_gradcheck(backend, stage):
    """The stage ops with their output's BatchNorm folded in (bn_*): float64 gradcheck of out,
    scale and shift through the registered autograd formula, whose backward op takes the Norm's
    gradients back to var, the BatchNorm's weight and bias."""
    gen = _gen(38)
    dev = backend.device
    leaf = lambda *shape, s=1.0: (randn(*shape, dtype=f64, gen=gen, scale=s)  # noqa: E731
                                  .to(dev).requires_grad_())
    bn_w = (torch.rand(4, generator=gen, dtype=f64) + 0.5).to(dev).requires_grad_()
    bn_b = leaf(4)
    if stage == "dw":
        x, w, b = leaf(2, 4, 5, 3), leaf(4, 1, 3, 3, s=0.3), leaf(4)
        op = backend.raw("dw_stage")

        def run(x, w, b, bn_w, bn_b):
            out, _, mean, _, scale, shift = op(x, None, None, None, w, b, "gelu", True, False,
                                               bn_w, bn_b, 1e-3)
            return out, mean, scale, shift
    else:
        # 6 rows: every element is a gradcheck column and every output one a row, each an op
        # call (under Triton's interpreter a slow one).
        x, w, b = leaf(1, 3, 3, 2), leaf(4, 3, 1, 1, s=0.5), leaf(4)
        op = backend.raw("pw_stage")

        def run(x, w, b, bn_w, bn_b):
            out, _, mean, _, _, scale, shift = op(x, None, None, None, None, None, None, None, w,
                                                  b, "gelu", True, True, False, bn_w, bn_b, 1e-3)
            return out, mean, scale, shift
    assert torch.autograd.gradcheck(run, (x, w, b, bn_w, bn_b), atol=1e-6, rtol=1e-5)


@over_backends("dtype", cpu=[f64, f32, bf16], triton=[f32], cuda=[f32, bf16])
def test_dw_backward_grad_out_scale(backend, dtype):
    """grad_out_scale: grad_out is the next stage's dU and the stage's own gradient dU·scale,
    formed on load: in float32/float64 the bits of passing dU·scale itself (one rounding either
    way); in 16-bit storage the product is not rounded to the storage dtype first, so it is
    within that rounding (the CUDA kernels' own: test_cuda_emulation_bn_fold.py). A scale of
    the wrong length is refused."""
    args, _, _ = _dw_backward_inputs(backend, dtype, (2, 5, 6, 7), 3, "gelu")
    grad_out, rest = args[0], args[1:]
    acc = rest[0].dtype
    scale = (torch.rand(5, generator=_gen(37), dtype=torch.float64) + 0.5).to(acc)
    scale = scale.to(backend.device)
    op = backend.raw("dw_stage_backward")
    got = op(*args, grad_out_scale=scale)
    want = op((grad_out.to(acc) * scale.view(1, -1, 1, 1)).to(dtype), *rest)
    if dtype in (f32, f64):
        assert_bitwise(got, want)
    else:  # within a few roundings of the storage dtype, relative to the largest value
        for g, w in zip(got[:6], want[:6]):
            bound = 4 * torch.finfo(dtype).eps * float(w.double().abs().max())
            assert float((g.double() - w.double()).abs().max()) <= bound
    with pytest.raises(ValueError, match="grad_out_scale must be"):
        op(*args, grad_out_scale=scale[:4])


def _block_leaves(backend, dtype, c, k, gen, n=2, h=5, w=6):
    def leaf(*shape, scale=1.0):
        return randn(*shape, dtype=dtype, gen=gen, scale=scale).to(backend.device)
    acc = torch.float64 if dtype == f64 else torch.float32
    h_in = leaf(n, c, h, w)
    norm = make_norm(c, dtype, gen)
    gamma = (torch.rand(c, dtype=f64, generator=gen) + 0.5).to(acc).to(backend.device)
    beta = randn(c, dtype=acc, gen=gen).to(backend.device)
    return [h_in, *(v.to(backend.device) for v in norm), leaf(c, 1, k, k, scale=1 / k), leaf(c),
            leaf(c, c, 1, 1, scale=c ** -0.5), leaf(c), gamma, beta]


def _block(block_fn, act, stats=(True, True)):
    """fn(h, mean, scale, shift, dw_w, dw_b, pw_w, pw_b, gamma, beta) -> (out, mean, var): a
    model block (its input normalised by a previous BN2), BN1 from the dw stage's batch
    statistics, by `block_fn` (mixer_block's signature)."""
    def fn(h, m, s, t, dw_w, dw_b, pw_w, pw_b, gamma, beta):
        def norm1(mean, var):
            if mean.numel() == 0:  # eval: fixed "running" statistics
                mean, var = 0.5 * beta, gamma
            return Norm(mean, gamma * torch.rsqrt(var + 1e-5), beta)
        return block_fn(h, dw_w, dw_b, pw_w, pw_b, norm1, act=act, x_norm=Norm(m, s, t),
                        stats=stats)
    return fn


def _two_stages(backend):
    """mixer_block as the two separate stage calls (their own autograd nodes)."""
    def fn(h, dw_w, dw_b, pw_w, pw_b, norm1, *, act, x_norm, stats):
        g, mean, var = backend.stage("dw")(h, dw_w, dw_b, act=act, x_norm=x_norm, stats=stats[0])
        return backend.stage("pw")(g, pw_w, pw_b, act=act, x_norm=norm1(mean, var), residual=h,
                                   residual_norm=x_norm, stats=stats[1])
    return fn


def _ref_block(h, dw_w, dw_b, pw_w, pw_b, norm1, *, act, x_norm, stats):
    g, mean, var = ref_dw_stage(h, dw_w, dw_b, act=act, x_norm=x_norm, stats=stats[0])
    return ref_pw_stage(g, pw_w, pw_b, act=act, x_norm=norm1(mean, var), residual=h,
                        residual_norm=x_norm, stats=stats[1])


@over_backends("act", cpu=ACTS)
def test_mixer_block_gradcheck(backend, act):
    """float64 gradcheck of the block-level function, every input (h, its norm, both stages'
    weights and biases, BN1's affine parameters) and every output (out and its statistics)."""
    from convmixer_kernels.ops import mixer_block
    leaves = [t.requires_grad_() for t in _block_leaves(backend, f64, 3, 3, _gen(34), h=4, w=5)]
    fn = _block(lambda *a, **kw: mixer_block(*a, **kw, backend=backend.op_backend), act)
    assert torch.autograd.gradcheck(fn, leaves)


@over_backends("dtype,act,c,k,mode", cpu=product([f64, f32], ACTS, [5, 40], [3, 7], MODES),
               triton=[(f64, a, 12, 3, "train") for a in ACTS],
               cuda=[(f32, a, 192, 9, "train") for a in ACTS])
def test_mixer_block_matches_the_two_stages(backend, dtype, act, c, k, mode):
    """The block-level path gives the two separate stages' values and gradients (against the
    float64 eager reference), the residual's gradient now added in the dw backward's store."""
    from convmixer_kernels.ops import mixer_block
    stats = (mode == "train",) * 2
    leaves = _block_leaves(backend, dtype, c, k, _gen(35))
    gen = _gen(36)
    cots = [randn(*leaves[0].shape, dtype=dtype, gen=gen).to(backend.device)]
    if mode == "train":
        cots += [randn(c, gen=gen, dtype=leaves[1].dtype).to(backend.device) for _ in range(2)]
    block = _block(lambda *a, **kw: mixer_block(*a, **kw, backend=backend.op_backend), act,
                   stats)
    got, got_grads = run(block, leaves, cots)
    two, two_grads = run(_block(_two_stages(backend), act, stats), leaves, cots)
    ref, ref_grads = run(_block(_ref_block, act, stats), to64(leaves), [t.double() for t in cots])
    names = ["h", "norm.mean", "norm.scale", "norm.shift", "dw_w", "dw_b", "pw_w", "pw_b",
             "gamma", "beta"]
    assert_bitwise(got, two)  # the forward is the same two op calls
    for g, t, r, name in zip(got_grads, two_grads, ref_grads, names):
        if name != "h" and name not in ("norm.mean", "norm.scale", "norm.shift"):
            assert_bitwise([g], [t])  # only h's gradient (and its norm's) is formed differently
        assert_close_direct(g, r, dtype, name=f"grad of {name}")
    for g, r in zip(got, ref):
        assert_close_direct(g, r, dtype, name="block output")


@over_backends("act", cpu=ACTS, triton=["relu"])
def test_mixer_block_deterministic(backend, act):
    from convmixer_kernels.ops import mixer_block
    leaves = _block_leaves(backend, f32, 40, 5, _gen(37))
    gen = _gen(38)
    cots = [randn(*leaves[0].shape, gen=gen).to(backend.device),
            *(randn(40, gen=gen).to(backend.device) for _ in range(2))]
    block = _block(lambda *a, **kw: mixer_block(*a, **kw, backend=backend.op_backend), act)
    first = run(block, leaves, cots)
    second = run(block, leaves, cots)
    assert_bitwise(first[0], second[0])
    assert_bitwise(first[1], second[1])


def test_dw_keeps_pre_act_where_docs_cuda_counts_it():
    """ops.dw_stage.keeps_pre_act is the rule docs/CUDA.md derives ("Backward: recompute or
    save"), only where act' needs the pre-activation: on CUDA at every k (a saved a makes its
    backward one kernel, 4 passes fewer than recomputing in two), on Triton from k = 7 in 16-bit
    storage and k = 9 in float32/float64; never on the CPU (measured, no clear win)."""
    from convmixer_kernels.ops.dw_stage import keeps_pre_act
    first = {"cuda": {torch.bfloat16: 1, torch.float16: 1, f32: 1, f64: 1},
             "triton": {torch.bfloat16: 7, torch.float16: 7, f32: 9, f64: 9}}
    for backend, dtype, k in product(("cuda", "triton", "cpu"), first["triton"], range(1, 16, 2)):
        expected = backend != "cpu" and k >= first[backend][dtype]
        assert keeps_pre_act("gelu", k, dtype, backend) == expected, (backend, dtype, k)
        assert not keeps_pre_act("relu", k, dtype, backend)


@over_backends("act", cpu=ACTS, triton=["gelu"])
def test_kept_dw_pre_activation_changes_no_bit(backend, act, monkeypatch):
    """With the dw pre-activation kept (forced here, whatever ops.dw_stage.keeps_pre_act says
    for this backend and k), the block and the lone dw stage give the recompute's bits in
    float32: the forward stores a as the backward's recompute forms it (and for relu a read
    back gives the same act' as its saved out)."""
    import importlib
    from convmixer_kernels.ops import mixer_block
    block_module = importlib.import_module("convmixer_kernels.ops.block")
    dw_module = importlib.import_module("convmixer_kernels.ops.dw_stage")
    leaves = _block_leaves(backend, f32, 8, 3, _gen(40))
    gen = _gen(41)
    cots = [randn(*leaves[0].shape, gen=gen).to(backend.device),
            *(randn(8, gen=gen).to(backend.device) for _ in range(2))]
    fused = _block(lambda *a, **kw: mixer_block(*a, **kw, backend=backend.op_backend), act)
    two = _block(_two_stages(backend), act)
    base = [run(fn, leaves, cots) for fn in (fused, two)]
    for module in (block_module, dw_module):
        monkeypatch.setattr(module, "keeps_pre_act", lambda *args: True)
    kept = [run(fn, leaves, cots) for fn in (fused, two)]
    for b, k in zip(base, kept):
        assert_bitwise(b[0], k[0])
        assert_bitwise(b[1], k[1])


@over_backends(cpu=ONCE)
def test_mixer_block_saves_no_pre_activation_for_relu(backend):
    """For relu neither stage keeps a pre-activation: the autograd graph holds the stages'
    inputs and outputs only (which the block returns or the next stage reads anyway). For gelu
    the pw stage keeps one, and the dw stage where ops.dw_stage.keeps_pre_act says so."""
    from convmixer_kernels.ops import mixer_block
    from convmixer_kernels.ops.dw_stage import keeps_pre_act
    for k in (3, 9):
        leaves = [t.requires_grad_() for t in _block_leaves(backend, f32, 8, k, _gen(39))]
        sizes = {}
        for act in ACTS:
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(
                    lambda t: saved.append(t) or t, lambda t: t):
                out, _, _ = _block(lambda *a, **kw: mixer_block(*a, **kw, backend="cpu"),
                                   act)(*leaves)
            big = {t.data_ptr() for t in saved if t.numel() == out.numel()}
            sizes[act] = len(big - {leaves[0].data_ptr(), out.data_ptr()})
        # Besides the block's input and output: g (the dw output, pw's x), and for gelu pw's
        # pre-activation and the dw one where kept.
        dw_pre = int(keeps_pre_act("gelu", k, f32, "cpu"))
        assert sizes == {"gelu": 2 + dw_pre, "relu": 1}, (k, sizes)


@over_backends(cpu=ONCE)
def test_mixer_block_keeps_u_where_the_policy_says(backend):
    """ops.pw_stage.keeps_u's choice reaches the block's pw forward: in 16-bit storage on the CPU
    (as on CUDA) the GEMM input u is saved for the backward, in float32 (the CPU's row-chunk
    pipeline) it is not. The block decides outside its autograd.Functions, whose forward runs
    with grad mode off, where the policy would always say no."""
    from convmixer_kernels.ops import mixer_block
    from convmixer_kernels.ops.pw_stage import keeps_u
    for dtype in (f32, bf16):
        leaves = [t.requires_grad_() for t in _block_leaves(backend, dtype, 8, 3, _gen(40))]
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                      lambda t: t):
            out, _, _ = _block(lambda *a, **kw: mixer_block(*a, **kw, backend="cpu"),
                               "relu")(*leaves)
        big = {t.data_ptr() for t in saved if t.numel() == out.numel()}
        # g (the dw output), and u where kept
        assert len(big - {leaves[0].data_ptr(), out.data_ptr()}) == 1 + keeps_u(False, out)


# ---------------------------------------------------------------------------------------------
# Input layouts: they change nothing but speed


@over_backends("dtype,k,layout", cpu=product([f64, f32, bf16], [3, 7], LAYOUTS),
               triton=[(f32, 3, "channels_last")])
def test_dw_stage_layouts(backend, dtype, k, layout):
    case = _dw(backend, dtype, (3, 12, 7, 5), k, layout=layout)
    (x, weight, bias), kw = stage_args(case)
    stage = backend.stage("dw")
    # Bitwise what the NCHW-contiguous input gives...
    for g, b in zip(stage(x, weight, bias, **kw), stage(x.contiguous(), weight, bias, **kw)):
        assert torch.equal(g, b)
    # ...and that is the reference (evaluated on the very same view).
    check_case(case, backend, grads=False)


@over_backends("dtype,x_layout,res_layout,act",
               cpu=[(d, x, r, "relu") for d, x, r in product([f32, bf16], LAYOUTS, LAYOUTS)],
               triton=[(f32, "channels_last", "nchw", "gelu"),
                       (f32, "transposed", "channels_last", "gelu")])
def test_pw_stage_layouts(backend, dtype, x_layout, res_layout, act):
    case = _pw(backend, dtype, (2, 12, 5, 7, 5), act, layout=x_layout, res_layout=res_layout)
    (x, weight, bias), kw = stage_args(case)
    stage = backend.stage("pw")
    got = stage(x, weight, bias, act=act, **kw)
    base = stage(x.contiguous(), weight, bias, act=act,
                 **dict(kw, residual=kw["residual"].contiguous()))
    for g, b in zip(got, base):
        assert torch.equal(g, b)
    check_case(case, backend, grads=False)


@over_backends(cpu=ONCE)
def test_noncontiguous_weight_and_norm(backend):
    """Strided weights and norm vectors (views of bigger tensors) read the right elements."""
    gen = _gen(5)

    def draw(*shape, scale=1.0):
        return randn(*shape, gen=gen, scale=scale).to(backend.device)

    x = draw(2, 6, 5, 7)
    weight = draw(6, 2, 5, 5, scale=0.2)[:, 1:2]  # [6, 1, 5, 5], not contiguous
    assert not weight.is_contiguous()
    big = draw(3, 12).abs() + 0.5
    norm = Norm(big[0, ::2], big[1, ::2], big[2, 1::2])
    bias = draw(12)[::2]
    got = backend.stage("dw")(x, weight, bias, x_norm=norm)
    ref64 = ref_dw_stage(*to64((x, weight, bias)), x_norm=to64(norm))
    for name, g, r in zip(("out", "mean", "var"), got, ref64):
        assert_close_direct(g, r, f32, name=name)

    pw_w = draw(4, 12, 1, 1).transpose(0, 1)  # [12, 4, 1, 1] strided
    assert not pw_w.is_contiguous()
    x = draw(2, 4, 3, 5)
    residual = x.flip(3)  # a copy, but a different tensor from x
    pw_b = draw(24)[::2]
    got = backend.stage("pw")(x, pw_w, pw_b, residual=residual)
    ref64 = ref_pw_stage(*to64((x, pw_w, pw_b)), residual=to64(residual))
    for name, g, r in zip(("out", "mean", "var"), got, ref64):
        assert_close_direct(g, r, f32, name=name)


# ---------------------------------------------------------------------------------------------
# Eval (no statistics), and the pw stage's saved pre-activation


@over_backends(
    "stage,dtype,shape,k,act,parts",
    cpu=[c for d in (f64, f32, bf16) for c in (("dw", d, (2, 5, 7, 11), 5, "gelu", "norm_bias"),
                                               ("pw", d, (2, 5, 12, 7, 11), None, "gelu",
                                                "both_norms_bias"))],
    cuda=[("dw", d, (3, 37, 7, 9), 7, "relu", p)
          for d, p in product([f32, bf16], ["norm_bias", "bias", "plain"])])
def test_stage_eval(backend, stage, dtype, shape, k, act, parts):
    """stats=False: empty statistics (in the accumulation dtype), outputs and gradients against
    the reference, and the same `out` as the stage computes with statistics."""
    case = (_dw(backend, dtype, shape, k, act, "eval", parts) if stage == "dw" else
            _pw(backend, dtype, shape, act, "eval", parts))
    check_case(case, backend)
    with torch.no_grad():
        assert torch.equal(call(case, backend)(*case.leaves)[0],
                           call(case, backend, stats=True)(*case.leaves)[0])


@over_backends("shape,compare", cpu=[((2, 12, 5, 7, 5), "bitwise")],
               triton=[(TRITON_PW_SHAPE, "bitwise")],
               cuda=[((2, 40, 36, 9, 7), "close")])
def test_pw_stage_pre_activation(backend, shape, compare):
    """pw_stage keeps the pre-activation only when recording gradients: the same values under
    no_grad, and its backward, given it or recomputing it with the forward GEMM, agrees
    (`compare`: bitwise, or within float32's direct tolerance where cuBLAS runs the GEMMs)."""
    case = _pw(backend, f32, shape)
    fn = call(case, backend)
    recorded = fn(*(t.detach().clone().requires_grad_() for t in case.leaves))
    with torch.no_grad():
        plain = fn(*case.leaves)
    for r, p in zip(recorded, plain):
        assert torch.equal(r.detach(), p)

    args = tuple(case.leaves)  # x, x_norm (3), residual, residual_norm (3), weight, bias
    out, pre_act, mean, *_ = backend.raw("pw_stage")(*args, "gelu", True, True)
    gen = _gen(6)
    cout = shape[2]
    g_out, g_mean, g_var = (randn(*s, gen=gen).to(backend.device)
                            for s in (out.shape, (cout,), (cout,)))
    saved = backend.raw("pw_stage_backward")(g_out, g_mean, g_var, *args, pre_act, mean, "gelu")
    recomputed = backend.raw("pw_stage_backward")(g_out, g_mean, g_var, *args, None, mean, "gelu")
    for i, (s, c) in enumerate(zip(saved, recomputed)):
        if compare == "bitwise":
            assert torch.equal(s, c), f"backward output {i}"
        else:
            assert_close_direct(s, c.double(), f32, name=f"backward output {i}")


@over_backends(cpu=ONCE)
def test_raw_pw_stage_pre_act_is_not_differentiable(backend):
    """pre_act is saved for the backward only: autograd must refuse to differentiate through
    it rather than return a silently wrong (zero) gradient."""
    gen = _gen(13)
    x = randn(2, 3, 2, 3, dtype=f64, gen=gen).to(backend.device).requires_grad_()
    w = randn(2, 3, 1, 1, dtype=f64, gen=gen).to(backend.device).requires_grad_()
    out, pre_act, mean, var, *_ = backend.raw("pw_stage")(x, None, None, None, None, None, None,
                                                      None, w, None, "gelu", True, True)
    assert out.requires_grad and mean.requires_grad and var.requires_grad
    assert not pre_act.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad(pre_act.sum(), (x, w))


# ---------------------------------------------------------------------------------------------
# Statistics far from zero


@over_backends("stage,shape", cpu=product(["dw", "pw"], [(3, 5, 15, 17)]),
               triton=product(["dw", "pw"], [(3, 5, 9, 11)]),
               cuda=product(["dw", "pw"], [(3, 37, 15, 17)]))
def test_stats_of_large_offset(backend, stage, shape):
    """|mean| >> std: the statistics survive cancellation (docs/DESIGN.md §6: shifted sums,
    shifted per-tile moments merged with Chan's formula, or Welford merged with it; never a
    naive Σx² − (Σx)²/n in float32). An identity conv plus a bias of 1000 on values of std
    1e-2."""
    c = shape[1]
    x = randn(*shape, gen=_gen(6), scale=1e-2)
    if stage == "dw":
        weight = torch.zeros(c, 1, 3, 3)
        weight[:, :, 1, 1] = 1.0
    else:
        weight = torch.eye(c).view(c, c, 1, 1)
    bias = torch.full((c,), 1000.0)
    out, mean, var = backend.stage(stage)(*(t.to(backend.device) for t in (x, weight, bias)),
                                          act="relu")
    ref = ref_dw_stage if stage == "dw" else ref_pw_stage
    _, mean64, var64 = ref(*to64((x, weight, bias)), act="relu")
    # var ≈ 1e-4 under a mean of 1000: out itself is stored in float32 (ulp(1000) = 6e-5), so
    # the exact statistics are those of the stored values, and the variance must hold to ~1e-3
    # relative of them (and to the rounding of the stored values, 5e-2, of the exact ones).
    stored_mean, stored_var = stats_of_stored(out.cpu())
    torch.testing.assert_close(var.cpu().double(), stored_var, rtol=1e-3, atol=0)
    torch.testing.assert_close(mean.cpu().double(), stored_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.cpu().double(), var64, rtol=5e-2, atol=0)
    torch.testing.assert_close(mean.cpu().double(), mean64, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# Determinism: no float atomics, reductions in an order fixed by the shape


@over_backends(
    "stage,dtype,shape,k,act,tuning",
    # N·H·W = 3·9·13 = 351 rows: more than one 128-row chunk of the CPU reductions.
    cpu=[(s, d, sh, k, "gelu", None) for d in (f32, bf16)
         for s, sh, k in (("dw", (3, 40, 9, 13), 7), ("pw", (3, 40, 36, 9, 13), None),
                          ("pw", PW_CHUNKED, None))],
    triton=[("dw", f32, (2, 12, 5, 9), 3, "gelu", "tiles4")],
    triton_gpu=[("dw", bf16, (8, 192, 32, 32), 9, "gelu", None),
                ("pw", bf16, (8, 192, 192, 32, 32), None, "relu", None)],
    cuda=[(s, d, sh, k, a, None) for d in (f32, bf16)
          for s, sh, k, a in (("dw", (8, 192, 32, 32), 9, "gelu"),
                              ("pw", (8, 192, 192, 32, 32), None, "relu"))],
    # The second run with the CTAs in reverse order; the backward in one kernel, and recomputing
    # a in two.
    cuda_emu=[("dw", f32, (3, 40, 16, 16), 7, "gelu", t) for t in (None, "recompute")])
def test_deterministic(backend, stage, dtype, shape, k, act, tuning):
    """Two runs give bitwise the same outputs, statistics and gradients."""
    case = (_dw(backend, dtype, shape, k, act) if stage == "dw" else
            _pw(backend, dtype, shape, act))
    cots = cast_cotangents(cotangents(case), dtype)
    with tuned(tuning):
        first = run(call(case, backend), case.leaves, cots)
        with backend.second_run():
            second = run(call(case, backend), case.leaves, cots)
    assert_bitwise(first[0], second[0])
    assert_bitwise(first[1], second[1])


@over_backends("stage", cuda=["dw", "pw"])
def test_finalize_counters_per_stream(backend, stage):
    """The last CTA of each channel block finalizes, counting arrivals in a buffer kept per
    stream and left zero by every launch (csrc/cuda/cuda_common.h stream_counters): the stage on
    a side stream, then back on the first, then twice more there, bitwise the same throughout."""
    case = (_dw(backend, f32, (8, 192, 32, 32), 9, "gelu") if stage == "dw" else
            _pw(backend, f32, (8, 192, 192, 32, 32), "gelu"))
    cots = cast_cotangents(cotangents(case), f32)
    first = run(call(case, backend), case.leaves, cots)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = run(call(case, backend), case.leaves, cots)
    torch.cuda.current_stream().wait_stream(side)
    for again in (on_side, *(run(call(case, backend), case.leaves, cots) for _ in range(2))):
        assert_bitwise(first[0], again[0])
        assert_bitwise(first[1], again[1])


@over_backends("stage,shape", cpu=[("dw", (3, 40, 9, 13)), ("pw", (3, 40, 36, 9, 13)),
                                   ("pw", PW_CHUNKED)])
def test_deterministic_across_thread_counts(backend, stage, shape):
    """The CPU reductions are cut into fixed chunks, so the thread count changes nothing."""
    case = _dw(backend, f32, shape, 7) if stage == "dw" else _pw(backend, f32, shape)
    cots = cast_cotangents(cotangents(case), f32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(call(case, backend), case.leaves, cots)
        torch.set_num_threads(max(2, threads))
        many = run(call(case, backend), case.leaves, cots)
    finally:
        torch.set_num_threads(threads)
    assert_bitwise(one[0], many[0])
    assert_bitwise(one[1], many[1])


# ---------------------------------------------------------------------------------------------
# NaN and empty inputs


def _poison(x):
    x = x.clone()
    x[0, 1, 2, 3] = float("nan")
    x[-1, -1, 0, 0] = float("nan")
    return x


def _assert_nan_like(got, ref, what, dtype):
    """Same NaN positions as the reference, and the same values elsewhere."""
    assert len(got) == len(ref)
    assert any(bool(torch.isnan(r).any()) for r in ref), f"no NaN reached the reference {what}"
    for i, (g, r) in enumerate(zip(got, ref)):
        g, r = g.detach(), r.detach()
        assert torch.equal(torch.isnan(g), torch.isnan(r)), f"{what}[{i}] NaN positions differ"
        keep = ~torch.isnan(r)
        assert_close_direct(g[keep], r[keep], dtype, name=f"{what}[{i}] (not NaN)")


def _check_nan_propagates(case, backend, poisoned: str):
    """NaN in the input `poisoned` reaches the outputs and gradients where it reaches the
    eager reference's (in the same dtype), and nowhere else."""
    dtype = case.leaves[0].dtype
    i = case.kinds.index(poisoned)
    leaves = [t.detach().clone().requires_grad_() for t in case.leaves]
    leaves[i] = _poison(leaves[i].detach()).requires_grad_()
    got, ref = call(case, backend)(*leaves), call(case, "ref")(*leaves)
    if not case.stats:
        got, ref = got[:1], ref[:1]
    _assert_nan_like(got, ref, "out", dtype)
    cots = [torch.ones_like(o) for o in ref]
    _assert_nan_like(torch.autograd.grad(got, leaves, cots),
                     torch.autograd.grad(ref, leaves, cots), "grad", dtype)


@over_backends("dtype,act,mode,shape,parts",
               cpu=product([f64, f32], ACTS, MODES, [(2, 5, 7, 6)], ["norm_bias"]),
               triton=[(f32, "relu", "train", (2, 4, 5, 6), "plain")])
def test_dw_stage_nan_propagates(backend, dtype, act, mode, shape, parts):
    _check_nan_propagates(_dw(backend, dtype, shape, 3, act, mode, parts), backend, "x")


@over_backends("where,act,mode", cpu=product(["x", "residual"], ACTS, MODES))
def test_pw_stage_nan_propagates(backend, where, act, mode):
    _check_nan_propagates(_pw(backend, f32, (2, 5, 4, 3, 5), act, mode), backend, where)


@over_backends("stage,dtype,mode",
               cpu=[(s, d, "eval") for d in (f32, bf16) for s in ("dw", "pw")],
               triton=[("dw", f32, "train"), ("pw", f32, "eval")])
def test_empty_batch(backend, stage, dtype, mode):
    """N = 0: outputs of the right shapes and dtypes, NaN statistics, zero (and empty)
    gradients, as the reference gives."""
    case = (_dw(backend, dtype, (2, 5, 7, 6), 5, mode=mode) if stage == "dw" else
            _pw(backend, dtype, (2, 5, 4, 6, 7), mode=mode))
    (x, weight, bias), kw = stage_args(case)
    if "residual" in kw:
        kw["residual"] = kw["residual"][:0]
    leaves = [t.detach().clone().requires_grad_() for t in (x[:0], weight, bias)]
    stats = case.stats
    got = backend.stage(stage)(*leaves, act=case.act, stats=stats, **kw)
    ref = (ref_dw_stage if stage == "dw" else ref_pw_stage)(*leaves, act=case.act, stats=stats,
                                                            **kw)
    for g, r in zip(got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype
    assert got[0].shape == (0, case.out_channels, *x.shape[2:])
    if stats:
        assert torch.isnan(got[1]).all() and torch.isnan(got[2]).all()
    grads = torch.autograd.grad(got[0].sum(), leaves)
    ref_grads = torch.autograd.grad(ref[0].sum(), leaves)
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape
        assert torch.equal(g, r)  # zeros (and empty for x)


# ---------------------------------------------------------------------------------------------
# The registered ops: opcheck (schema, fake implementation, autograd registration, AOT
# dispatch) and the fake implementations' strides


def _raw_dw_args(backend, parts, requires_grad, stats=True, keep_pre_act=False):
    case = _dw(backend, f32, (2, 5, 6, 7), 3, parts=parts)
    (x, weight, bias), kw = stage_args(case)
    m, s, t = kw.get("x_norm") or (None, None, None)
    args = [x, m, s, t, weight, bias]
    if requires_grad:
        args = [a.requires_grad_() if a is not None else None for a in args]
    return (*args, "gelu", stats, keep_pre_act)


def _raw_pw_args(backend, parts, requires_grad, keep_pre_act, stats=True, keep_u=False):
    case = _pw(backend, f32, (2, 5, 4, 6, 7), parts=parts)
    (x, weight, bias), kw = stage_args(case)
    xm, xs, xt = kw.get("x_norm") or (None, None, None)
    rm, rs, rt = kw.get("residual_norm") or (None, None, None)
    args = [x, xm, xs, xt, kw.get("residual"), rm, rs, rt, weight, bias]
    if requires_grad:
        args = [a.requires_grad_() if a is not None else None for a in args]
    return (*args, "relu", stats, keep_pre_act, keep_u)


@over_backends("parts,mode,keep_pre_act",
               cpu=product(["norm_bias", "plain", "norm"], MODES, ["keep_pre_act", "no_pre_act"]),
               triton=[("norm_bias", m, k) for m in MODES for k in ("keep_pre_act", "no_pre_act")],
               cuda=[("norm_bias", "train", "keep_pre_act")])
def test_opcheck_dw_stage(backend, parts, mode, keep_pre_act):
    torch.library.opcheck(backend.raw("dw_stage").default,
                          _raw_dw_args(backend, parts, True, stats=mode == "train",
                                       keep_pre_act=keep_pre_act == "keep_pre_act"))


@over_backends("parts,keep", cpu=product(PW_PARTS, ["keep_pre_act", "no_pre_act", "keep_u"]),
               triton=[("both_norms_bias", k) for k in ("keep_pre_act", "no_pre_act", "keep_u")],
               cuda=[("both_norms_bias", "keep_pre_act"), ("both_norms_bias", "keep_u")])
def test_opcheck_pw_stage(backend, parts, keep):
    torch.library.opcheck(backend.raw("pw_stage").default,
                          _raw_pw_args(backend, parts, True, keep == "keep_pre_act",
                                       keep_u=keep == "keep_u"))


@over_backends(cpu=ONCE, triton=ONCE)
def test_dw_stage_write_out_false_differentiates_its_statistics_only(backend):
    """write_out=False at op level: the statistics (and the folded norm's scale and shift) carry
    their gradients (float64 gradcheck), and a, saved for the backward, is non-differentiable:
    differentiating through it is the block's nodes' (docs/OPS.md "Act on load")."""
    # Small, as in test_pw_stage_x_act_gradcheck: 12 pixels a channel, k = 3 reaching every edge.
    case = _dw(backend, f64, (1, 2, 4, 3), 3)
    (x, weight, bias), kw = stage_args(case)
    m, sc, sh = kw["x_norm"]
    gen = _gen(48)
    bn_w = (torch.rand(2, generator=gen, dtype=f64) + 0.5).to(backend.device)
    bn_b = randn(2, dtype=f64, gen=gen).to(backend.device)
    op = backend.raw("dw_stage")

    def fn(x, weight, bias, bn_w, bn_b):
        out, a, mean, var, scale, shift = op(x, m, sc, sh, weight, bias, "gelu", True, True,
                                             bn_w, bn_b, 1e-5, False)
        assert out.numel() == 0 and not a.requires_grad
        return mean, var, scale, shift
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias, bn_w, bn_b)]
    assert torch.autograd.gradcheck(fn, leaves)


@over_backends("parts", cpu=["both_norms_bias", "plain"], triton=["both_norms_bias"],
               cuda=["both_norms_bias"])
def test_opcheck_act_on_load(backend, parts):
    """The link's arguments (docs/OPS.md "Act on load"): dw_stage without out, pw_stage and its
    backward reading x through gelu (u kept, as the block asks on CUDA; without norms, u is
    act(x)): schema, fake implementations, autograd registration and dispatch agree."""
    dw = _raw_dw_args(backend, "norm_bias", True, keep_pre_act=True)
    torch.library.opcheck(backend.raw("dw_stage").default, (*dw, None, None, None, False))
    args = _raw_pw_args(backend, parts, True, keep_pre_act=True, keep_u=True)
    torch.library.opcheck(backend.raw("pw_stage").default, (*args, None, None, None, "gelu"))
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    x, xm, xs, xt, res, rm, rs, rt, weight, bias, act, *_ = args
    out, p, mean, _, u, *_ = backend.raw("pw_stage")(*args, None, None, None, "gelu")
    grad_out = randn(*out.shape, gen=_gen(25)).to(backend.device)
    torch.library.opcheck(
        backend.raw("pw_stage_backward").default,
        (grad_out, None, None, x, xm, xs, xt, res, rm, rs, rt, weight, bias, p, None, act, None,
         u if u.numel() else None, False, None, None, None, None, None, False, "gelu"))


@over_backends("parts,grads",
               cpu=product(["norm_bias", "plain"], ["all", "out_only", "empty_stats_grads"]),
               triton=[("norm_bias", "all")], cuda=[("norm_bias", "all")])
def test_opcheck_dw_stage_backward(backend, parts, grads):
    x, m, s, t, weight, bias, act, *_ = _raw_dw_args(backend, parts, requires_grad=False)
    out, pre, mean, *_ = backend.raw("dw_stage")(x, m, s, t, weight, bias, act, True, True)
    gen = _gen(23)
    grad_out = randn(*out.shape, gen=gen).to(backend.device).contiguous(
        memory_format=torch.channels_last)
    if grads == "all":
        gm, gv = (randn(5, gen=gen).to(backend.device) for _ in range(2))
    elif grads == "out_only":
        gm, gv, mean = None, None, None
    else:
        gm, gv = (torch.empty(0, device=backend.device) for _ in range(2))
    torch.library.opcheck(backend.raw("dw_stage_backward").default,
                          (grad_out, gm, gv, x, m, s, t, weight, bias, mean, act))
    torch.library.opcheck(backend.raw("dw_stage_backward").default,
                          (grad_out, gm, gv, x, m, s, t, weight, bias, mean, act, None, None, pre))


@over_backends("parts,grads,pre_act",
               cpu=product(PW_PARTS, ["all", "out_only"],
                           ["pre_act", "recompute", "saved_u", "grad_res_normed"]),
               triton=[("both_norms_bias", "all", m)
                       for m in ("pre_act", "saved_u", "grad_res_normed")],
               cuda=[("both_norms_bias", "all", m)
                     for m in ("pre_act", "saved_u", "grad_res_normed")])
def test_opcheck_pw_stage_backward(backend, parts, grads, pre_act):
    args = _raw_pw_args(backend, parts, requires_grad=False, keep_pre_act=pre_act == "pre_act",
                        keep_u=pre_act == "saved_u")
    x, xm, xs, xt, res, rm, rs, rt, weight, bias, act, _, _, _ = args
    out, p, mean, _, u, *_ = backend.raw("pw_stage")(*args)
    gen = _gen(24)
    grad_out = randn(*out.shape, gen=gen).to(backend.device)
    gm, gv = ((randn(4, gen=gen).to(backend.device), randn(4, gen=gen).to(backend.device))
              if grads == "all" else (None, None))
    if grads != "all":
        mean = None
    torch.library.opcheck(
        backend.raw("pw_stage_backward").default,
        (grad_out, gm, gv, x, xm, xs, xt, res, rm, rs, rt, weight, bias,
         p if pre_act == "pre_act" else None, mean, act, None,
         u if pre_act == "saved_u" else None, pre_act == "grad_res_normed"))


@over_backends("act", cpu=ACTS, triton=["relu"], cuda=["relu"])
def test_opcheck_backward_optional_inputs(backend, act):
    """dw_stage_backward with grad_res and saved_out, pw_stage_backward with saved_out and no
    pre_act: schema, fake implementations and dispatch agree."""
    args, grad_res, out = _dw_backward_inputs(backend, f32, (2, 5, 6, 7), 3, act)
    torch.library.opcheck(backend.raw("dw_stage_backward").default, (*args, grad_res, out))
    pw_args = _raw_pw_args(backend, "both_norms_bias", requires_grad=False, keep_pre_act=False)
    pw_args = (*pw_args[:10], act, *pw_args[11:])
    x, xm, xs, xt, res, rm, rs, rt, weight, bias = pw_args[:10]
    out, _, mean, *_ = backend.raw("pw_stage")(*pw_args)
    gen = _gen(25)
    grad_out = randn(*out.shape, gen=gen).to(backend.device)
    gm, gv = randn(4, gen=gen).to(backend.device), randn(4, gen=gen).to(backend.device)
    torch.library.opcheck(
        backend.raw("pw_stage_backward").default,
        (grad_out, gm, gv, x, xm, xs, xt, res, rm, rs, rt, weight, bias, None, mean, act, out))


@over_backends(cpu=ONCE, triton=ONCE)
def test_backward_optional_inputs_of_the_wrong_shape_are_refused(backend):
    args, grad_res, out = _dw_backward_inputs(backend, f32, (2, 5, 6, 7), 3, "relu")
    op = backend.raw("dw_stage_backward")
    with pytest.raises(ValueError, match="grad_res must"):
        op(*args, grad_res[:, :, :5], None)
    with pytest.raises(ValueError, match="saved_out must"):
        op(*args, None, out[:1])
    with pytest.raises(ValueError, match="pre_act must"):
        op(*args, None, None, out[:1])
    pw_args = _raw_pw_args(backend, "both_norms_bias", requires_grad=False, keep_pre_act=False)
    pw_out, _, mean, *_ = backend.raw("pw_stage")(*pw_args)
    with pytest.raises(ValueError, match="saved_out must"):
        backend.raw("pw_stage_backward")(torch.ones_like(pw_out), None, None, *pw_args[:10],
                                         None, None, "relu", pw_out[:, :2])
    with pytest.raises(ValueError, match="saved_u must"):
        backend.raw("pw_stage_backward")(torch.ones_like(pw_out), None, None, *pw_args[:10],
                                         None, None, "relu", None, pw_args[0][:, :2])


@over_backends("stage,dtype", cpu=[("dw", bf16), ("pw", bf16)], triton=[("dw", f32)])
def test_meta_outputs_match_real(backend, stage, dtype):
    """The fake implementations give the shapes, dtypes and strides the kernels produce."""
    case = (_dw(backend, dtype, (2, 5, 6, 7), 3) if stage == "dw" else
            _pw(backend, dtype, (2, 5, 4, 6, 7)))
    real = call(case, backend)(*case.leaves)
    meta = call(case, backend)(*(t.to("meta") for t in case.leaves))
    for r, m in zip(real, meta):
        assert m.device.type == "meta"
        assert (m.shape, m.dtype, m.stride()) == (r.shape, r.dtype, r.stride())


# ---------------------------------------------------------------------------------------------
# What only one backend has


@over_backends("act", triton=["swish", "GELU", ""])
def test_raw_ops_refuse_an_unknown_act(backend, act):
    """An `act` the table lacks is a ValueError naming the op, the value and the activations in
    every raw Triton op, before any kernel runs: never another activation's kernels."""
    def refused(op):
        return pytest.raises(ValueError,
                             match=rf"^{op}: act must be one of {re.escape(str(NAMES))}, got "
                                   rf"{re.escape(repr(act))}$")

    x, m, s, t, w, b, good, *_ = _raw_dw_args(backend, "norm_bias", requires_grad=False)
    out, _, mean, *_ = backend.raw("dw_stage")(x, m, s, t, w, b, good, True)
    with refused("dw_stage"):
        backend.raw("dw_stage")(x, m, s, t, w, b, act, True)
    with refused("dw_stage_backward"):
        backend.raw("dw_stage_backward")(torch.ones_like(out), None, None, x, m, s, t, w, b,
                                         mean, act)
    args = _raw_pw_args(backend, "both_norms_bias", requires_grad=False, keep_pre_act=True)
    out, pre, mean, *_ = backend.raw("pw_stage")(*args)
    with refused("pw_stage"):
        backend.raw("pw_stage")(*args[:10], act, *args[11:])
    with refused("pw_stage_backward"):
        backend.raw("pw_stage_backward")(torch.ones_like(out), None, None, *args[:10], pre,
                                         mean, act)


@over_backends(triton=ONCE)
def test_raw_ops_reject_bad_shapes(backend):
    """Direct torch.ops calls of the Triton ops are checked before any kernel touches memory."""
    dev = backend.device
    dw, pw = backend.raw("dw_stage"), backend.raw("pw_stage")
    x = torch.zeros(2, 4, 5, 5, device=dev)
    with pytest.raises(ValueError, match=r"weight must be \[4, 1, k, k\]"):
        dw(x, None, None, None, torch.zeros(3, 1, 3, 3, device=dev), None, "gelu", True)
    with pytest.raises(ValueError, match="kernel size must be odd"):
        dw(x, None, None, None, torch.zeros(4, 1, 4, 4, device=dev), None, "gelu", True)
    with pytest.raises(ValueError, match="must be given together"):
        dw(x, torch.zeros(4, device=dev), None, None, torch.zeros(4, 1, 3, 3, device=dev), None,
           "gelu", True)
    with pytest.raises(ValueError, match="res must have shape"):
        pw(x, None, None, None, torch.zeros(2, 4, 5, 4, device=dev), None, None, None,
           torch.zeros(3, 4, 1, 1, device=dev), None, "relu", True, False)
    with pytest.raises(ValueError, match="grad_var needs the forward's mean"):
        backend.raw("dw_stage_backward")(x, None, torch.zeros(4, device=dev), x, None, None,
                                         None, torch.zeros(4, 1, 3, 3, device=dev), None, None,
                                         "gelu")
    with pytest.raises(ValueError, match="act must be one of"):
        pw(x, None, None, None, None, None, None, None, torch.zeros(3, 4, 1, 1, device=dev),
           None, "tanh", True, False)


@over_backends(cuda=ONCE)
def test_float64_tile_beyond_shared_memory_is_a_clear_error(backend):
    """float64 with k >= 13 needs more than sm_90's 227 KiB of shared memory per block in the
    backward: the op refuses it up front with a ValueError naming dtype and kernel size, rather
    than failing at launch."""
    x = torch.randn(1, 4, 8, 8, dtype=f64, device=backend.device)
    w = torch.randn(4, 1, 15, 15, dtype=f64, device=backend.device)
    with pytest.raises(ValueError, match="kernel size 15"):
        backend.stage("dw")(x, w, None)


# ---------------------------------------------------------------------------------------------
# Beyond 32-bit indexing. Last in the file on purpose: an out-of-bounds access here would leave
# the CUDA context unusable for every test after it.


@pytest.mark.large_memory
@over_backends("layout", cuda=["channels_last", "nchw"])
def test_dw_forward_beyond_int32_indexing(backend, layout):
    """A bfloat16 dw forward over N·H·W·C = 4096·33·33·1024 ≈ 4.57e9 elements, past both 2**31
    and 2**32: element offsets overflow a signed 32-bit index from image 1926 on and an
    unsigned one from image 3852 on. A few channels, including the last (whose offsets are the
    largest in NHWC), are checked over the whole batch against eager, with their statistics."""
    dev = backend.device
    n, c, h, w, k = 4096, 1024, 33, 33, 7
    numel = n * c * h * w
    assert numel > 2 ** 32
    # input and output (2 bytes each), plus a channels_last copy of an NCHW input.
    need = (2 if layout == "channels_last" else 3) * numel * 2 + 2 ** 30
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} free")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.empty(n, c, h, w, dtype=bf16, device=dev, memory_format=fmt)
    x.normal_(generator=gen)
    small = _gen(1)
    weight = randn(c, 1, k, k, dtype=bf16, gen=small, scale=1.0 / k).to(dev)
    bias = randn(c, dtype=bf16, gen=small, scale=0.5).to(dev)
    norm = Norm(*(v.to(dev) for v in make_norm(c, bf16, small)))
    with torch.no_grad():
        out, mean, var = backend.stage("dw")(x, weight, bias, act="gelu", x_norm=norm)
        chans = torch.tensor([0, 1, c // 2 + 3, c - 1], device=dev)
        xs = x.index_select(1, chans)
        args = (weight.index_select(0, chans), bias.index_select(0, chans))
        norm_s = Norm(*(v.index_select(0, chans) for v in norm))
        got = out.index_select(1, chans)
        del x, out
        torch.cuda.empty_cache()
        eager = ref_dw_stage(xs, *args, act="gelu", x_norm=norm_s)[0]
        ref64 = ref_dw_stage(*to64((xs, *args)), act="gelu", x_norm=to64(norm_s))[0]
    assert_close_rule(got, eager, ref64, name="out (sampled channels)")
    stored_mean, stored_var = stats_of_stored(got)
    assert_close_direct(mean.index_select(0, chans), stored_mean, f32, name="mean")
    assert_close_direct(var.index_select(0, chans), stored_var, f32, name="var")


@over_backends("stage", cpu=["dw", "pw", "block"], triton=["dw"])
def test_second_order_gradients_are_refused(backend, stage):
    """The backward ops have no derivative: a gradient of a gradient is a clear error, never a
    silent zero (PyTorch's fallback for an op without autograd would only warn)."""
    from convmixer_kernels import ConvMixer
    gen = _gen(40)
    if stage == "block":
        model = ConvMixer(dim=8, depth=1, kernel_size=3, patch_size=2, num_classes=3, fused=True,
                          backend=backend.op_backend).double()
        x = randn(2, 3, 8, 8, dtype=f64, gen=gen).requires_grad_()
        out = model(x)
    else:
        x = randn(2, 4, 5, 6, dtype=f64, gen=gen).to(backend.device).requires_grad_()
        shape = (4, 1, 3, 3) if stage == "dw" else (4, 4, 1, 1)
        w = randn(*shape, dtype=f64, gen=gen).to(backend.device).requires_grad_()
        out = backend.stage(stage)(x, w, None, act="relu")[0]
    (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate twice"):
        g.sum().backward()
