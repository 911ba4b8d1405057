"""The BatchNorm glue ops (docs/OPS.md § BatchNorm ops) and bn_norm, which runs them: the Norm and
its gradients against nn.BatchNorm2d and gradcheck, the running statistics against nn.BatchNorm2d
over several steps (momentum, momentum=None, affine=False, track_running_stats=False, eval,
running statistics of another dtype, a gathered count), opcheck, the ATen fallback for devices
without the ops' kernels, and the errors for bad input. The CUDA kernels run the same cases under
emulation in test_cuda_emulation_bn.py; the model tests (test_model.py: training, eval, momentum,
track_running_stats=False, torch.compile) run them inside the fused model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from convmixer_kernels.ops import apply_norm, batch_norm, bn_norm
from dispatch_count import OpCounter

_ops = torch.ops.convmixer_kernels
f32, f64 = torch.float32, torch.float64
# One BatchNorm's forward and backward in float32: a few roundings of values of order one
# (the statistics over 4·6·5 values included); float64 the same at its own epsilon.
TOL = {f32: dict(rtol=2e-5, atol=2e-5), f64: dict(rtol=1e-10, atol=1e-10)}


def _norm_of(bn, x, count=None):
    """Our fused BatchNorm: the batch statistics of x, bn_norm, then the Norm applied."""
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    n = x.shape[0] * x.shape[2] * x.shape[3]
    norm = bn_norm(bn, mean, var, n if count is None else count(n), x.dtype)
    return apply_norm(x, norm)


def _pair(c, dtype, seed=0, **kwargs):
    torch.manual_seed(seed)
    ref = nn.BatchNorm2d(c, dtype=dtype, **kwargs)
    if ref.affine:
        with torch.no_grad():
            ref.weight.copy_(torch.randn(c, dtype=dtype))
            ref.bias.copy_(torch.randn(c, dtype=dtype))
    ours = nn.BatchNorm2d(c, dtype=dtype, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _assert_same_state(ref, ours, dtype):
    for (name, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, **TOL[dtype], msg=name)
        else:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [f32, f64])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("count", ["int", "tensor"])
def test_training_steps_match_batchnorm(dtype, affine, momentum, count):
    """Three training steps: outputs, gradients of x, weight and bias, and the running
    statistics and num_batches_tracked after each step."""
    ref, ours = _pair(6, dtype, affine=affine, momentum=momentum)
    as_count = None if count == "int" else (lambda n: torch.tensor(float(n), dtype=dtype))
    for step in range(3):
        x = torch.randn(4, 6, 5, 6, dtype=dtype) * (step + 1) + step
        g = torch.randn_like(x)
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_r, out_o = ref(xr), _norm_of(ours, xo, as_count)
        torch.testing.assert_close(out_o, out_r, **TOL[dtype])
        (out_r * g).sum().backward()
        (out_o * g).sum().backward()
        torch.testing.assert_close(xo.grad, xr.grad, **TOL[dtype])
        if affine:
            torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **TOL[dtype])
            torch.testing.assert_close(ours.bias.grad, ref.bias.grad, **TOL[dtype])
        _assert_same_state(ref, ours, dtype)


@pytest.mark.parametrize("dtype", [f32, f64])
@pytest.mark.parametrize("affine", [True, False])
def test_eval_uses_running_stats(dtype, affine):
    ref, ours = _pair(6, dtype, affine=affine)
    for _ in range(2):
        x = torch.randn(4, 6, 5, 6, dtype=dtype) + 1
        ref(x)
        _norm_of(ours, x)
    ref.eval()
    ours.eval()
    x = torch.randn(2, 6, 3, 4, dtype=dtype)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r = ref(xr)
    out_o = apply_norm(xo, bn_norm(ours, torch.empty(0), torch.empty(0), 0, dtype))
    torch.testing.assert_close(out_o, out_r, **TOL[dtype])
    out_r.sum().backward()
    out_o.sum().backward()
    torch.testing.assert_close(xo.grad, xr.grad, **TOL[dtype])
    if affine:
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **TOL[dtype])
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, **TOL[dtype])
    _assert_same_state(ref, ours, dtype)


def test_track_running_stats_false():
    """No buffers: batch statistics in training and in eval, nothing to update."""
    ref, ours = _pair(5, f64, track_running_stats=False)
    for mode in ("train", "eval"):
        getattr(ref, mode)()
        getattr(ours, mode)()
        x = torch.randn(3, 5, 4, 4, dtype=f64)
        torch.testing.assert_close(_norm_of(ours, x), ref(x), **TOL[f64])
    assert ours.running_mean is None and ours.num_batches_tracked is None


def test_running_stats_of_another_dtype():
    """Running statistics (and parameters) in bfloat16 and float16, the statistics float32: the
    kernels read and write them in their own dtype; the reference is the ATen formula."""
    bn = nn.BatchNorm2d(7)
    bn.weight.data = torch.randn(7).bfloat16()
    bn.bias.data = torch.randn(7).half()
    bn.running_mean = torch.randn(7).bfloat16()
    bn.running_var = (torch.rand(7) + 0.5).half()
    mean, var = torch.randn(7), torch.rand(7) + 0.1
    expect = (bn.running_mean.float() * 0.9 + mean * 0.1,
              bn.running_var.float() * 0.9 + var * (10 / 9) * 0.1)
    norm = bn_norm(bn, mean, var, 10, f32)
    torch.testing.assert_close(bn.running_mean, expect[0].bfloat16())
    torch.testing.assert_close(bn.running_var, expect[1].half())
    assert bn.running_mean.dtype == torch.bfloat16 and bn.running_var.dtype == torch.float16
    torch.testing.assert_close(norm.scale, bn.weight.float() * (var + bn.eps).rsqrt())
    assert norm.scale.dtype == norm.shift.dtype == f32
    bn.eval()  # eval: the running var is read in float16 by the kernel
    norm = bn_norm(bn, torch.empty(0), torch.empty(0), 0, f32)
    torch.testing.assert_close(norm.scale,
                               bn.weight.float() * (bn.running_var.float() + bn.eps).rsqrt())
    assert norm.mean.dtype == f32


@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck(affine):
    gen = torch.Generator().manual_seed(0)
    var = (torch.rand(9, generator=gen, dtype=f64) + 0.1).requires_grad_()
    w = torch.randn(9, generator=gen, dtype=f64, requires_grad=True) if affine else None
    b = torch.randn(9, generator=gen, dtype=f64, requires_grad=True) if affine else None
    inputs = (var, w, b) if affine else (var,)

    def f(var, w=None, b=None):
        return _ops.bn_scale_shift(var, w, b, 1e-3, f64)

    assert torch.autograd.gradcheck(f, inputs)


def test_gradient_of_one_output_only():
    """Only the scale (or only the shift) differentiated: the other's gradient is zero."""
    var = (torch.rand(4, dtype=f64) + 0.1).requires_grad_()
    w, b = (torch.randn(4, dtype=f64, requires_grad=True) for _ in range(2))
    scale, _ = _ops.bn_scale_shift(var, w, b, 1e-5, f64)
    scale.sum().backward()
    assert b.grad is None or (b.grad == 0).all()
    torch.testing.assert_close(w.grad, (var.detach() + 1e-5).rsqrt())


def _scale_shift_samples():
    v = torch.rand(8) + 0.1
    return [(v, torch.randn(8), torch.randn(8), 1e-5, f32),
            (v.double(), None, None, 1e-5, f64),
            (v.half(), torch.randn(8).bfloat16(), torch.randn(8, dtype=f64), 1e-3, f32)]


@pytest.mark.parametrize("i", range(3))
def test_opcheck_scale_shift(i):
    var, w, b, eps, dtype = _scale_shift_samples()[i]
    args = (var.requires_grad_(var.is_floating_point()),
            None if w is None else w.requires_grad_(), None if b is None else b.requires_grad_(),
            eps, dtype)
    torch.library.opcheck(_ops.bn_scale_shift.default, args)
    grads = (torch.randn(8, dtype=dtype), None)
    torch.library.opcheck(_ops.bn_scale_shift_backward.default,
                          (*grads, var.detach(), None if w is None else w.detach(),
                           None if b is None else b.detach(), eps, dtype))


@pytest.mark.parametrize("momentum,count_tensor", [(0.1, None), (None, None),
                                                  (0.3, torch.tensor(12.0))])
def test_opcheck_update_running_stats(momentum, count_tensor):
    torch.library.opcheck(_ops.bn_update_running_stats.default,
                          (torch.randn(8), torch.rand(8), torch.zeros(8), torch.ones(8).half(),
                           torch.tensor(3), momentum, 12.0, count_tensor))


@pytest.mark.parametrize("momentum,count_tensor,affine", [(0.1, None, True), (None, None, False),
                                                         (0.3, torch.tensor(12.0), True)])
def test_opcheck_train_norm(momentum, count_tensor, affine):
    # Inputs without gradients: the op has no derivative of its own (bn_norm's autograd.Function
    # gives it bn_scale_shift's, which test_training_steps_match_batchnorm checks).
    w, b = (torch.randn(8), torch.randn(8).double()) if affine else (None, None)
    torch.library.opcheck(_ops.bn_train_norm.default,
                          (torch.randn(8), torch.rand(8) + 0.1, w, b, 1e-5, f32, torch.zeros(8),
                           torch.ones(8).half(), torch.tensor(3), momentum, 12.0, count_tensor))


def _many_items(widths, seed, running=f32):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.1,
             torch.randn(c, generator=gen).to(running), (torch.rand(c, generator=gen) + 0.5).to(running),
             torch.tensor(3)) for c in widths]


@pytest.mark.parametrize("momentum", [0.1, None])
def test_update_running_stats_many_is_each_alone(momentum):
    """bn_update_running_stats_many: every item the bits bn_update_running_stats gives it, over
    two steps (num_batches_tracked counted once a step each)."""
    together = _many_items([8, 37, 1], 1)
    alone = [tuple(t.clone() for t in item) for item in together]
    for _ in range(2):
        _ops.bn_update_running_stats_many(*(list(col) for col in zip(*together)), momentum, 12.0)
        for m, v, rm, rv, n in alone:
            _ops.bn_update_running_stats(m, v, rm, rv, n, momentum, 12.0, None)
    for a, b in zip(together, alone):
        for x, y in zip(a[2:], b[2:]):
            assert torch.equal(x, y)
    assert all(int(item[4]) == 5 for item in together)


def test_update_running_stats_many_bad_input():
    items = _many_items([8, 8], 2)
    m, v, rm, rv, n = (list(col) for col in zip(*items))
    with pytest.raises(ValueError, match="lists of one length"):
        _ops.bn_update_running_stats_many(m, v[:1], rm, rv, n, 0.1, 12.0)
    with pytest.raises(ValueError, match="share a running statistic"):
        _ops.bn_update_running_stats_many(m, v, [rm[0], rm[0]], [rv[0], rv[0]], [n[0], n[0]],
                                          0.1, 12.0)
    with pytest.raises(ValueError, match=r"var must be \[4\], got \[8\]"):
        _ops.bn_update_running_stats_many([m[0], m[1][:4]], v, rm, rv, n, 0.1, 12.0)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_pending_updates_match_batchnorm(momentum):
    """PendingUpdates: the buffers after a flush are nn.BatchNorm2d's after the same forwards,
    a BatchNorm met twice included (one module used in two places: its second update waits for a
    call of its own, after the first); nothing is added after the flush."""
    count = 30
    ref, bns = nn.BatchNorm2d(6, momentum=momentum), [nn.BatchNorm2d(6, momentum=momentum),
                                                    nn.BatchNorm2d(6, momentum=momentum)]
    other = nn.BatchNorm2d(6, momentum=momentum)
    bns[1].load_state_dict(other.state_dict())
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(5, 6, 2, 3, generator=gen) for _ in range(3)]
    pending = batch_norm.PendingUpdates(count)
    for x, bn in zip(xs, (bns[0], bns[1], bns[0])):  # bns[0] twice
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        pending.add(bn, mean, var)
    pending.flush()
    for x in (xs[0], xs[2]):
        ref(x)
    other(xs[1])
    for ours, want in ((bns[0], ref), (bns[1], other)):
        torch.testing.assert_close(ours.running_mean, want.running_mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ours.running_var, want.running_var, rtol=1e-6, atol=1e-7)
        assert int(ours.num_batches_tracked) == int(want.num_batches_tracked)
    pending.add(bns[1], xs[0].mean((0, 2, 3)), xs[0].var((0, 2, 3)))
    pending.flush()
    assert int(bns[1].num_batches_tracked) == 1


def test_pending_updates_of_modules_sharing_buffers():
    """Two modules with one set of buffers (a shallow copy) update it twice, in two calls."""
    import copy
    bn = nn.BatchNorm2d(4)
    twin = copy.copy(bn)
    assert twin.running_mean is bn.running_mean
    pending = batch_norm.PendingUpdates(10)
    for m in (bn, twin):
        pending.add(m, torch.ones(4), torch.ones(4))
    pending.flush()
    assert int(bn.num_batches_tracked) == 2


def test_train_norm_is_update_then_scale_shift():
    """bn_train_norm: bn_update_running_stats, then bn_scale_shift of the batch var."""
    mean, var = torch.randn(8), torch.rand(8) + 0.1
    w, b = torch.randn(8), torch.randn(8)
    buffers = [(torch.randn(8), torch.rand(8) + 0.5, torch.tensor(5)) for _ in range(2)]
    buffers[1] = tuple(t.clone() for t in buffers[0])
    got = _ops.bn_train_norm(mean, var, w, b, 1e-5, f32, *buffers[0], None, 30.0, None)
    _ops.bn_update_running_stats(mean, var, *buffers[1], None, 30.0, None)
    want = _ops.bn_scale_shift(var, w, b, 1e-5, f32)
    for a, c in zip((*got, *buffers[0]), (*want, *buffers[1])):
        assert torch.equal(a, c)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_aten_fallback_matches_the_ops(monkeypatch, momentum):
    """A device without the ops' kernels (an extension built without CUDA, the Triton backend on
    a GPU) runs the ATen formulas: the same Norm, gradients and buffers, and no bn op called."""
    results = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(batch_norm, "_NATIVE", {})
        bn = _pair(6, f64, momentum=momentum)[1]
        with OpCounter() as seen:
            for step in range(2):
                x = (torch.randn(3, 6, 4, 4, dtype=f64, generator=torch.Generator().manual_seed(step))
                     .requires_grad_())
                _norm_of(bn, x).square().sum().backward()
        called = any(op.startswith("convmixer_kernels.bn_") for op in seen.ops)
        assert called == native, seen.ops
        # The update is no part of the graph: buffers that required grad would chain the steps.
        assert not any(b.requires_grad for b in bn.buffers())
        results.append((x.grad, bn.weight.grad, bn.bias.grad, *bn.state_dict().values()))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, **TOL[f64])


def test_one_op_per_job():
    """A training BatchNorm's forward is one op (running statistics and the Norm), its backward
    one; without running statistics to track, the forward is bn_scale_shift alone."""
    bn = _pair(6, f32)[1]
    mean = torch.randn(6, requires_grad=True)
    var = (torch.rand(6) + 0.1).requires_grad_()
    with OpCounter() as seen:
        norm = bn_norm(bn, mean, var, 10, f32)
    assert +seen.ops == {"convmixer_kernels.bn_train_norm.default": 1}
    untracked = _pair(6, f32, track_running_stats=False)[1]
    with OpCounter() as seen_untracked:
        bn_norm(untracked, mean, var, 10, f32)
    assert +seen_untracked.ops == {"convmixer_kernels.bn_scale_shift.default": 1}
    grads = (torch.ones(6), torch.ones(6))
    with OpCounter() as seen:
        torch.autograd.backward((norm.scale, norm.shift), grads)
    assert list(seen.ops) == ["convmixer_kernels.bn_scale_shift_backward.default"]


# ---- bad input

def test_bn_norm_bad_statistics():
    bn = nn.BatchNorm2d(4)
    good = torch.zeros(4)
    with pytest.raises(ValueError, match=r"mean must have shape \[4\]"):
        bn_norm(bn, torch.zeros(5), good, 8, f32)
    with pytest.raises(TypeError, match="var must be torch.float32"):
        bn_norm(bn, good, good.double(), 8, f32)
    with pytest.raises(ValueError, match="var is on meta"):
        bn_norm(bn, good, torch.zeros(4, device="meta"), 8, f32)
    with pytest.raises(ValueError, match="statistics are on meta but the BatchNorm's weight is on cpu"):
        bn_norm(bn, torch.zeros(4, device="meta"), torch.zeros(4, device="meta"), 8, f32)
    assert int(bn.num_batches_tracked) == 0  # nothing was updated by the failed calls


@pytest.mark.parametrize("call,error,match", [
    (lambda: _ops.bn_scale_shift(torch.ones(4), torch.ones(4), None, 1e-5, f32), ValueError,
     "weight and bias must be given together"),
    (lambda: _ops.bn_scale_shift(torch.ones(4), None, None, 1e-5, torch.float16), TypeError,
     "dtype must be float32 or float64"),
    (lambda: _ops.bn_scale_shift(torch.ones(4, 1), None, None, 1e-5, f32), ValueError,
     r"var must be \[C\]"),
    (lambda: _ops.bn_scale_shift(torch.ones(4, dtype=torch.int32), None, None, 1e-5, f32),
     TypeError, "var must be float32, float64, float16 or bfloat16"),
    (lambda: _ops.bn_scale_shift(torch.ones(4), torch.ones(3), torch.ones(3), 1e-5, f32),
     ValueError, r"weight must be \[4\]"),
    (lambda: _ops.bn_scale_shift_backward(torch.ones(4, dtype=f64), None, torch.ones(4), None,
                                          None, 1e-5, f32), TypeError,
     "grad_scale must be Float"),
    (lambda: _ops.bn_update_running_stats(torch.ones(4), torch.ones(4), torch.ones(4), None,
                                          torch.tensor(1.0), 0.1, 8.0, None), TypeError,
     "num_batches_tracked must be int64"),
    (lambda: _ops.bn_update_running_stats(torch.ones(4), torch.ones(4), torch.ones(4), None,
                                          None, None, 8.0, None), ValueError,
     "momentum None .* needs num_batches_tracked"),
    (lambda: _ops.bn_update_running_stats(torch.ones(4), torch.ones(4), torch.ones(8)[::2],
                                          None, None, 0.1, 8.0, None), ValueError,
     "running_mean must be contiguous"),
    (lambda: _ops.bn_update_running_stats(torch.ones(4), torch.ones(4).double(), None, None,
                                          None, 0.1, 8.0, None), TypeError, "var must be Float"),
    (lambda: _ops.bn_update_running_stats(torch.ones(4), torch.ones(4), None, torch.ones(4),
                                          None, 0.1, 0.0, torch.ones(2)), ValueError,
     "count_tensor must have one element"),
    (lambda: _ops.bn_update_running_stats(torch.ones(4).half(), torch.ones(4).half(), None,
                                          None, None, 0.1, 8.0, None), TypeError,
     "mean must be float32 or float64"),
    (lambda: _ops.bn_train_norm(torch.ones(4), torch.ones(4), None, None, 1e-5, f64, None, None,
                                None, 0.1, 8.0, None), TypeError,
     "dtype must be the statistics' dtype"),
    (lambda: _ops.bn_train_norm(torch.ones(4), torch.ones(4), torch.ones(4), None, 1e-5, f32,
                                None, None, None, 0.1, 8.0, None), ValueError,
     "weight and bias must be given together"),
    # No derivative of its own: an error, not gradients silently None (bn_norm differentiates it).
    (lambda: _ops.bn_train_norm(torch.ones(4), torch.ones(4), torch.ones(4, requires_grad=True),
                                torch.ones(4), 1e-5, f32, None, None, None, 0.1, 8.0, None),
     RuntimeError, "bn_train_norm has no derivative of its own .* use convmixer_kernels.ops.bn_norm"),
])
def test_raw_ops_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
