"""Bad input raises a clear ValueError/TypeError/RuntimeError, never a crash or a wrong answer.

The public ops validate in Python before dispatch (convmixer_kernels/ops/checks.py); the raw
torch.ops re-check what their memory accesses depend on (TORCH_CHECK_VALUE -> ValueError,
TORCH_CHECK_TYPE -> TypeError); the model checks its constructor arguments. Each bad case is
paired with the corrected call succeeding, so every `raises` is about the one thing broken.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from convmixer_kernels import ConvMixer, available_backends
from convmixer_kernels.activations import NAMES
from convmixer_kernels.ops import Norm, dw_stage, pw_stage

_ops = torch.ops.convmixer_kernels

N, C, H, W, K = 2, 5, 6, 7, 3
COUT = 4


def _bad_act(op, act):
    """The message of every layer (Python checks, C++ and Triton ops) for an unknown `act`."""
    return rf"{op}: act must be one of {re.escape(str(NAMES))}, got {re.escape(repr(act))}"


def _x(c=C, dtype=torch.float32, n=N, h=H, w=W):
    return torch.randn(n, c, h, w).to(dtype)


def _norm(c=C, dtype=torch.float32, device="cpu"):
    return Norm(torch.zeros(c, dtype=dtype, device=device),
                torch.ones(c, dtype=dtype, device=device),
                torch.zeros(c, dtype=dtype, device=device))


def _dw_w(c=C, k=K, dtype=torch.float32):
    return torch.randn(c, 1, k, k).to(dtype)


def _pw_w(cout=COUT, cin=C, dtype=torch.float32):
    return torch.randn(cout, cin, 1, 1).to(dtype)


def test_good_calls_pass():
    """The baseline every bad case below departs from, by one argument."""
    dw_stage(_x(), _dw_w(), torch.zeros(C), x_norm=_norm())
    pw_stage(_x(), _pw_w(), torch.zeros(COUT), x_norm=_norm(), residual=_x(),
             residual_norm=_norm())
    dw_stage(_x(dtype=torch.float64), _dw_w(dtype=torch.float64),
             x_norm=_norm(dtype=torch.float64))
    dw_stage(_x(dtype=torch.bfloat16), _dw_w(dtype=torch.bfloat16), x_norm=_norm())


# ---------------------------------------------------------------------------------------------
# dw_stage

DW_BAD = [
    # (id, kwargs overriding the good call, exception, message pattern)
    ("x_rank_3", dict(x=torch.randn(C, H, W)), ValueError, r"x must be 4-d \[N, C, H, W\]"),
    ("x_rank_5", dict(x=torch.randn(1, N, C, H, W)), ValueError, r"x must be 4-d"),
    ("x_not_tensor", dict(x=[[1.0]]), TypeError, r"x must be a tensor"),
    ("weight_rank_3", dict(weight=torch.randn(C, K, K)), ValueError,
     r"weight must be a depthwise \[C, 1, k, k\]"),
    ("weight_not_depthwise", dict(weight=torch.randn(C, 2, K, K)), ValueError,
     r"weight must be a depthwise"),
    ("channels", dict(weight=_dw_w(c=C + 1), bias=torch.zeros(C + 1)), ValueError,
     rf"x has {C} channels but the weights expect {C + 1}"),
    ("even_kernel", dict(weight=_dw_w(k=4)), ValueError, r"kernel size must be odd.*got 4"),
    ("kernel_17", dict(weight=_dw_w(k=17)), ValueError,
     r"kernel size must be in \[1, 15\], got 17"),
    ("non_square", dict(weight=torch.randn(C, 1, 3, 5)), ValueError,
     r"kernel must be square, got 3x5"),
    ("int_x_and_weight", dict(x=torch.ones(N, C, H, W, dtype=torch.int32),
                              weight=torch.ones(C, 1, K, K, dtype=torch.int32), bias=None,
                              x_norm=None),
     TypeError, r"x must be a floating-point tensor, got torch.int32"),
    ("int_weight", dict(weight=torch.ones(C, 1, K, K, dtype=torch.int64)), TypeError,
     r"weight is torch.int64 but x is torch.float32"),
    ("mixed_dtypes", dict(weight=_dw_w(dtype=torch.float64)), TypeError,
     r"weight is torch.float64 but x is torch.float32"),
    ("bias_dtype", dict(bias=torch.zeros(C, dtype=torch.bfloat16)), TypeError,
     r"bias is torch.bfloat16 but x is torch.float32"),
    ("bias_shape", dict(bias=torch.zeros(C + 2)), ValueError, rf"bias must have shape \[{C}\]"),
    ("bias_2d", dict(bias=torch.zeros(1, C)), ValueError, rf"bias must have shape \[{C}\]"),
    ("weight_on_meta", dict(weight=_dw_w().to("meta")), ValueError,
     r"weight is on meta but x is on cpu; all tensors must be on one device"),
    ("x_on_meta", dict(x=_x().to("meta")), ValueError,
     r"weight is on cpu but x is on meta; all tensors must be on one device"),
    ("bias_on_meta", dict(bias=torch.zeros(C, device="meta")), ValueError,
     r"bias is on meta but x is on cpu"),
    ("norm_shape", dict(x_norm=Norm(torch.zeros(C + 1), torch.ones(C), torch.zeros(C))),
     ValueError, rf"x_norm.mean must have shape \[{C}\], got \({C + 1},\)"),
    ("norm_2d", dict(x_norm=Norm(torch.zeros(C), torch.ones(1, C), torch.zeros(C))),
     ValueError, rf"x_norm.scale must have shape \[{C}\]"),
    ("norm_dtype_f64", dict(x_norm=_norm(dtype=torch.float64)), TypeError,
     r"x_norm.mean must be torch.float32 for torch.float32 activations, got torch.float64"),
    ("norm_dtype_int", dict(x_norm=Norm(torch.zeros(C), torch.ones(C),
                                        torch.zeros(C, dtype=torch.int64))),
     TypeError, r"x_norm.shift must be torch.float32"),
    ("norm_on_meta", dict(x_norm=_norm(device="meta")), ValueError,
     r"x_norm.mean is on meta but x is on cpu"),
    ("norm_pair", dict(x_norm=(torch.zeros(C), torch.ones(C))), ValueError,
     r"x_norm must be a \(mean, scale, shift\) triple"),
    ("norm_not_tensor", dict(x_norm=Norm(torch.zeros(C), 1.0, torch.zeros(C))), TypeError,
     r"x_norm.scale must be a tensor"),
    ("act", dict(act="tanh"), ValueError, _bad_act("dw_stage", "tanh")),
    ("act_case", dict(act="GELU"), ValueError, _bad_act("dw_stage", "GELU")),
    ("act_none", dict(act=None), ValueError, _bad_act("dw_stage", None)),
    ("backend_foo", dict(backend="foo"), ValueError, r"unknown backend 'foo'"),
]


def _stage_call(stage, defaults, over):
    """stage(x, weight, bias, **rest) with `over` replacing any of the good `defaults`."""
    kw = {**defaults, **over}
    x, weight, bias = kw.pop("x"), kw.pop("weight"), kw.pop("bias")
    return stage(x, weight, bias, **kw)


def _dw_call(**over):
    return _stage_call(dw_stage, dict(x=_x(), weight=_dw_w(), bias=torch.zeros(C),
                                      x_norm=_norm(), act="gelu", stats=True, backend="auto"),
                       over)


def test_dw_stage_bf16_norm_must_be_float32():
    x, w = _x(dtype=torch.bfloat16), _dw_w(dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"x_norm.mean must be torch.float32 for torch.bfloat16"):
        dw_stage(x, w, x_norm=_norm(dtype=torch.bfloat16))
    dw_stage(x, w, x_norm=_norm(dtype=torch.float32))


def test_f64_norm_must_be_float64():
    x, w = _x(dtype=torch.float64), _dw_w(dtype=torch.float64)
    with pytest.raises(TypeError, match=r"must be torch.float64 for torch.float64 activations"):
        dw_stage(x, w, x_norm=_norm(dtype=torch.float32))
    with pytest.raises(TypeError, match=r"must be torch.float64 for torch.float64 activations"):
        pw_stage(x, _pw_w(dtype=torch.float64), x_norm=_norm(dtype=torch.float32))


# ---------------------------------------------------------------------------------------------
# pw_stage

PW_BAD = [
    ("x_rank_2", dict(x=torch.randn(N, C)), ValueError, r"x must be 4-d"),
    ("x_not_tensor", dict(x=3.0), TypeError, r"x must be a tensor"),
    ("weight_2d", dict(weight=torch.randn(COUT, C)), ValueError,
     r"weight must be a pointwise \[Cout, Cin, 1, 1\] tensor"),
    ("weight_3x3", dict(weight=torch.randn(COUT, C, 3, 3)), ValueError,
     r"weight must be a pointwise"),
    ("channels", dict(weight=_pw_w(cin=C + 1)), ValueError,
     rf"x has {C} channels but the weights expect {C + 1}"),
    ("int_x", dict(x=torch.ones(N, C, H, W, dtype=torch.int64), x_norm=None,
                   residual=None, residual_norm=None), TypeError,
     r"x must be a floating-point tensor, got torch.int64"),
    ("mixed_dtypes", dict(weight=_pw_w(dtype=torch.float64)), TypeError,
     r"weight is torch.float64 but x is torch.float32"),
    ("residual_dtype", dict(residual=_x(dtype=torch.bfloat16)), TypeError,
     r"residual is torch.bfloat16 but x is torch.float32"),
    ("bias_is_cin", dict(bias=torch.zeros(C)), ValueError, rf"bias must have shape \[{COUT}\]"),
    ("weight_on_meta", dict(weight=_pw_w().to("meta")), ValueError,
     r"weight is on meta but x is on cpu; all tensors must be on one device"),
    ("residual_on_meta", dict(residual=_x().to("meta")), ValueError,
     r"residual is on meta but x is on cpu"),
    ("residual_shape", dict(residual=_x(h=H + 1)), ValueError,
     rf"residual has shape \({N}, {C}, {H + 1}, {W}\) but x has \({N}, {C}, {H}, {W}\)"),
    ("residual_channels", dict(residual=_x(c=C + 1), residual_norm=None), ValueError,
     r"residual has shape"),
    ("residual_not_tensor", dict(residual=1.0, residual_norm=None), TypeError,
     r"residual must be a tensor or None"),
    ("residual_norm_alone", dict(residual=None), ValueError,
     r"residual_norm given without a residual"),
    ("x_norm_shape", dict(x_norm=_norm(c=COUT)), ValueError,
     rf"x_norm.mean must have shape \[{C}\]"),
    ("residual_norm_shape", dict(residual_norm=_norm(c=C - 1)), ValueError,
     rf"residual_norm.mean must have shape \[{C}\]"),
    ("x_norm_dtype", dict(x_norm=_norm(dtype=torch.float16)), TypeError,
     r"x_norm.mean must be torch.float32 for torch.float32 activations, got torch.float16"),
    ("residual_norm_dtype", dict(residual_norm=_norm(dtype=torch.float64)), TypeError,
     r"residual_norm.mean must be torch.float32"),
    ("residual_norm_on_meta", dict(residual_norm=_norm(device="meta")), ValueError,
     r"residual_norm.mean is on meta but x is on cpu"),
    ("act", dict(act="sigmoid"), ValueError, _bad_act("pw_stage", "sigmoid")),
    ("backend_foo", dict(backend="foo"), ValueError, r"unknown backend 'foo'"),
]


def _pw_call(**over):
    return _stage_call(pw_stage, dict(x=_x(), weight=_pw_w(), bias=torch.zeros(COUT),
                                      x_norm=_norm(), residual=_x(), residual_norm=_norm(),
                                      act="relu", stats=True, backend="auto"), over)


@pytest.mark.parametrize(
    "call,case", [(_dw_call, c) for c in DW_BAD] + [(_pw_call, c) for c in PW_BAD],
    ids=[f"dw-{c[0]}" for c in DW_BAD] + [f"pw-{c[0]}" for c in PW_BAD])
def test_stage_bad_input(call, case):
    _, over, exc, match = case
    with pytest.raises(exc, match=match):
        call(**over)


# ---------------------------------------------------------------------------------------------
# Backends


@pytest.mark.skipif("cuda" in available_backends(), reason="this build has the CUDA backend")
@pytest.mark.parametrize("op", ["dw", "pw"])
def test_cuda_backend_unavailable_on_cpu_build(op):
    call = _dw_call if op == "dw" else _pw_call
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is not available in this build.*"
                                           r"available: \['cpu'\]"):
        call(backend="cuda")
    call(backend="cpu")  # the one this build has
    call(backend="auto")


@pytest.mark.skipif("cuda" not in available_backends(), reason="needs the CUDA backend")
def test_cuda_backend_rejects_cpu_tensors():
    with pytest.raises(ValueError, match=r"backend 'cuda' cannot run tensors on cpu"):
        _dw_call(backend="cuda")


# ---------------------------------------------------------------------------------------------
# One value per channel in training, as nn.BatchNorm2d


def _torch_message(shape) -> str:
    """What eager BatchNorm2d says for a training input of this shape."""
    with pytest.raises(ValueError) as info:
        F.batch_norm(torch.randn(*shape), None, None, training=True)
    return str(info.value)


def test_dw_stage_one_value_per_channel():
    x = _x(n=1, h=1, w=1)
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training") \
            as info:
        dw_stage(x, _dw_w(), x_norm=_norm(), stats=True)
    assert str(info.value) == _torch_message(x.shape)
    # Without statistics (eval) a single value per channel is fine, as in eager BatchNorm.
    out, mean, var = dw_stage(x, _dw_w(), x_norm=_norm(), stats=False)
    assert out.shape == x.shape and mean.numel() == 0
    # Two values per channel are enough.
    dw_stage(_x(n=2, h=1, w=1), _dw_w(), stats=True)
    dw_stage(_x(n=1, h=1, w=2), _dw_w(), stats=True)


def test_pw_stage_one_value_per_channel():
    x = _x(n=1, h=1, w=1)
    with pytest.raises(ValueError, match=r"^Expected more than 1 value per channel when training"):
        pw_stage(x, _pw_w(), residual=_x(n=1, h=1, w=1), stats=True)
    out, _, _ = pw_stage(x, _pw_w(), residual=_x(n=1, h=1, w=1), stats=False)
    assert out.shape == (1, COUT, 1, 1)
    pw_stage(_x(n=1, h=2, w=1), _pw_w(), stats=True)


# ---------------------------------------------------------------------------------------------
# The raw ops re-check what their memory accesses depend on


def _raw_dw(**over):
    args = dict(x=_x(), x_mean=None, x_scale=None, x_shift=None, weight=_dw_w(), bias=None,
                act="gelu", stats=True)
    args.update(over)
    return _ops.dw_stage(*args.values())


def _raw_pw(**over):
    args = dict(x=_x(), x_mean=None, x_scale=None, x_shift=None, res=None, res_mean=None,
                res_scale=None, res_shift=None, weight=_pw_w(), bias=None, act="gelu",
                stats=True, keep_pre_act=False)
    args.update(over)
    return _ops.pw_stage(*args.values())


RAW_BAD = [
    ("dw_channels", lambda: _raw_dw(weight=_dw_w(c=C + 3)), ValueError,
     rf"weight must be \[{C}, 1, k, k\]"),
    ("dw_kernel_17", lambda: _raw_dw(weight=_dw_w(k=17)), ValueError,
     r"kernel size must be odd and in \[1, 15\], got 17"),
    ("dw_even", lambda: _raw_dw(weight=_dw_w(k=2)), ValueError, r"kernel size must be odd"),
    ("dw_x_rank", lambda: _raw_dw(x=torch.randn(C, H, W)), ValueError, r"x must be 4-d"),
    ("dw_weight_dtype", lambda: _raw_dw(weight=_dw_w(dtype=torch.float64)), TypeError,
     r"weight dtype Double differs from x dtype Float"),
    ("dw_bias_shape", lambda: _raw_dw(bias=torch.zeros(C + 1)), ValueError,
     rf"bias must be \[{C}\]"),
    ("dw_norm_partial", lambda: _raw_dw(x_mean=torch.zeros(C)), ValueError,
     r"must be given together"),
    ("dw_norm_shape", lambda: _raw_dw(x_mean=torch.zeros(C + 1), x_scale=torch.ones(C),
                                      x_shift=torch.zeros(C)),
     ValueError, rf"norm vectors must have shape \[{C}\]"),
    ("dw_norm_dtype", lambda: _raw_dw(x_mean=torch.zeros(C), x_scale=torch.ones(C),
                                      x_shift=torch.zeros(C, dtype=torch.float64)),
     TypeError, r"norm vectors must be Float"),
    ("dw_act", lambda: _raw_dw(act="swish"), ValueError, _bad_act("dw_stage", "swish")),
    ("dw_act_case", lambda: _raw_dw(act="ReLU"), ValueError, _bad_act("dw_stage", "ReLU")),
    ("pw_act", lambda: _raw_pw(act="swish"), ValueError, _bad_act("pw_stage", "swish")),
    ("dw_one_value", lambda: _raw_dw(x=_x(n=1, h=1, w=1)), ValueError,
     r"expected more than 1 value per channel when training"),
    ("pw_channels", lambda: _raw_pw(weight=_pw_w(cin=C - 1)), ValueError,
     rf"weight must be \[Cout, {C}, 1, 1\]"),
    ("pw_res_shape", lambda: _raw_pw(res=_x(w=W + 1)), ValueError, r"res must have the shape of x"),
    ("pw_res_dtype", lambda: _raw_pw(res=_x(dtype=torch.float64)), TypeError,
     r"res dtype Double differs"),
    ("pw_res_norm_without_res", lambda: _raw_pw(res_mean=torch.zeros(C), res_scale=torch.ones(C),
                                                res_shift=torch.zeros(C)),
     ValueError, r"a res norm needs res"),
    ("pw_bias_shape", lambda: _raw_pw(bias=torch.zeros(C)), ValueError,
     rf"bias must be \[{COUT}\]"),
    ("pw_one_value", lambda: _raw_pw(x=_x(n=1, h=1, w=1)), ValueError,
     r"expected more than 1 value per channel when training"),
]


def _dw_backward_args(**over):
    x, w = _x(), _dw_w()
    out, _, mean, *_ = _ops.dw_stage(x, None, None, None, w, None, "gelu", True)
    args = dict(grad_out=torch.ones_like(out), grad_mean=torch.ones(C), grad_var=torch.ones(C),
                x=x, x_mean=None, x_scale=None, x_shift=None, weight=w, bias=None, mean=mean,
                act="gelu")
    args.update(over)
    return tuple(args.values())


def _pw_backward_args(**over):
    x, w = _x(), _pw_w()
    out, pre_act, mean, *_ = _ops.pw_stage(x, None, None, None, None, None, None, None, w, None,
                                          "gelu", True, True)
    args = dict(grad_out=torch.ones_like(out), grad_mean=torch.ones(COUT),
                grad_var=torch.ones(COUT), x=x, x_mean=None, x_scale=None, x_shift=None,
                res=None, res_mean=None, res_scale=None, res_shift=None, weight=w, bias=None,
                pre_act=pre_act, mean=mean, act="gelu")
    args.update(over)
    return tuple(args.values())


RAW_BAD += [
    ("dw_bwd_grad_out_shape",
     lambda: _ops.dw_stage_backward(*_dw_backward_args(grad_out=torch.ones(N, C, H, W + 1))),
     ValueError, r"grad_out must have shape"),
    ("dw_bwd_grad_out_dtype",
     lambda: _ops.dw_stage_backward(*_dw_backward_args(
         grad_out=torch.ones(N, C, H, W, dtype=torch.float64))),
     TypeError, r"grad_out dtype Double differs"),
    ("dw_bwd_grad_var_without_mean",
     lambda: _ops.dw_stage_backward(*_dw_backward_args(mean=None)),
     ValueError, r"grad_var needs the forward's mean"),
    ("dw_bwd_grad_mean_shape",
     lambda: _ops.dw_stage_backward(*_dw_backward_args(grad_mean=torch.ones(C + 1))),
     ValueError, rf"grad_mean must be \[{C}\]"),
    ("pw_bwd_grad_out_shape",
     lambda: _ops.pw_stage_backward(*_pw_backward_args(grad_out=torch.ones(N, C, H, W))),
     ValueError, rf"grad_out must have shape \[{N}, {COUT}, {H}, {W}\]"),
    ("pw_bwd_pre_act_shape",
     lambda: _ops.pw_stage_backward(*_pw_backward_args(pre_act=torch.ones(N, COUT, H, W - 1))),
     ValueError, r"pre_act must have shape"),
    ("pw_bwd_grad_var_without_mean",
     lambda: _ops.pw_stage_backward(*_pw_backward_args(mean=None)),
     ValueError, r"grad_var needs the forward's mean"),
    ("pw_bwd_mean_shape",
     lambda: _ops.pw_stage_backward(*_pw_backward_args(mean=torch.zeros(C))),
     ValueError, rf"mean must be \[{COUT}\]"),
    ("dw_bwd_act", lambda: _ops.dw_stage_backward(*_dw_backward_args(act="")),
     ValueError, _bad_act("dw_stage_backward", "")),
    ("pw_bwd_act", lambda: _ops.pw_stage_backward(*_pw_backward_args(act="gelu ")),
     ValueError, _bad_act("pw_stage_backward", "gelu ")),
]


@pytest.mark.parametrize("case", RAW_BAD, ids=[c[0] for c in RAW_BAD])
def test_raw_op_bad_input(case):
    _, call, exc, match = case
    with pytest.raises(exc, match=match):
        call()


def test_raw_backward_good_args_pass():
    """The baselines of the raw backward cases above are valid calls."""
    _ops.dw_stage_backward(*_dw_backward_args())
    _ops.pw_stage_backward(*_pw_backward_args())
    _raw_dw()
    _raw_pw(res=_x())


# ---------------------------------------------------------------------------------------------
# The model


@pytest.mark.parametrize("kernel_size", [4, 0, 17, -3])
def test_model_bad_kernel_size(kernel_size):
    with pytest.raises(ValueError, match=rf"kernel_size must be odd and in \[1, 15\], got "
                                         rf"{re.escape(str(kernel_size))}"):
        ConvMixer(dim=8, depth=1, kernel_size=kernel_size)


def test_model_bad_backend_and_act():
    with pytest.raises(ValueError, match=r"unknown backend 'nope'"):
        ConvMixer(dim=8, depth=1, kernel_size=3, backend="nope")
    with pytest.raises(ValueError, match=r"act must be one of " + re.escape(str(NAMES)) +
                       r", got 'tanh'"):
        ConvMixer(dim=8, depth=1, kernel_size=3, act="tanh")
    ConvMixer(dim=8, depth=1, kernel_size=3, backend="cpu", act="relu", fused=True)


@pytest.mark.skipif("cuda" in available_backends(), reason="this build has the CUDA backend")
def test_model_cuda_backend_unavailable():
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is not available in this build"):
        ConvMixer(dim=8, depth=1, kernel_size=3, backend="cuda", fused=True)


def _models(**kw):
    torch.manual_seed(0)
    eager = ConvMixer(dim=8, depth=2, kernel_size=3, patch_size=7, num_classes=3, **kw)
    fused = ConvMixer(dim=8, depth=2, kernel_size=3, patch_size=7, num_classes=3, fused=True,
                      **kw)
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def test_model_one_value_per_channel_in_training():
    """A 1×3×7×7 image becomes 1×8×1×1 after the stem: training must refuse it, as eager
    BatchNorm does, with the same message."""
    eager, fused = _models()
    _assert_same_one_value_error(eager, fused)


def _assert_same_one_value_error(eager, fused):
    x = torch.randn(1, 3, 7, 7)
    with pytest.raises(ValueError) as eager_info:
        eager(x)
    with pytest.raises(ValueError) as fused_info:
        fused(x)
    assert "Expected more than 1 value per channel when training" in str(eager_info.value)
    assert str(fused_info.value) == str(eager_info.value)


def test_model_one_value_per_channel_in_fused_blocks():
    """The same with the stem's BatchNorm in eval, so that the error comes from the blocks:
    eager BN1 raises, and so must the fused dw_stage that computes BN1's statistics."""
    eager, fused = _models()
    eager.stem[2].eval()
    fused.stem[2].eval()
    before = {name: buf.clone() for name, buf in fused.named_buffers()}
    _assert_same_one_value_error(eager, fused)
    # The failed fused call left the BatchNorm buffers as they were. (Eager BatchNorm2d bumps
    # num_batches_tracked before F.batch_norm raises; the fused path checks first. Neither
    # touches running_mean/var.)
    for name, buf in fused.named_buffers():
        assert torch.equal(buf, before[name]), name


def test_model_one_value_per_channel_in_eval_is_fine():
    x = torch.randn(1, 3, 7, 7)
    eager, fused = _models()
    eager.eval()
    fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), eager(x), rtol=1e-5, atol=1e-5)
