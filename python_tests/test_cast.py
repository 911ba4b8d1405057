"""cat_cast and cast_params (docs/OPS.md § Parameter casts): the op against torch.cat and .to()
bitwise for every pair of floating dtypes, opcheck, the bad input it refuses; cast_params'
values and gradients against autograd's own concatenation and cast, the order it lays the
parameters out in, and one op each way. The CUDA kernel runs the same comparisons under emulation
in test_cuda_emulation_cast.py; the model's autocast tests (test_model.py) run it in a block."""
from __future__ import annotations

import pytest
import torch

from convmixer_kernels.ops import cast
from dispatch_count import OpCounter

_ops = torch.ops.convmixer_kernels
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _tensors(dtypes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 1, 3, 3), (6,), (5, 6, 1, 1), (5,)]
    # Values of a few hundred, so every narrowing rounds; the first past float16's range.
    tensors = [(torch.randn(shape, generator=gen, dtype=torch.float64) * 300).to(dtype)
               for shape, dtype in zip(shapes, dtypes)]
    if tensors[0].dtype in (torch.float32, torch.float64):
        tensors[0].view(-1)[0] = 1e5
    return tensors


@pytest.mark.parametrize("src", FLOATS, ids=str)
@pytest.mark.parametrize("dst", FLOATS, ids=str)
def test_cat_cast_is_cat_then_to(src, dst):
    tensors = _tensors([src, torch.float32, src, torch.float64])
    got = _ops.cat_cast(tensors, dst)
    want = torch.cat([t.reshape(-1).to(dst) for t in tensors])
    assert got.dtype == dst and torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~got.isnan()], want[~want.isnan()])


def test_cat_cast_takes_any_layout():
    t = torch.randn(4, 6).t()  # not contiguous
    assert torch.equal(_ops.cat_cast([t, torch.ones(2)], torch.bfloat16),
                       torch.cat([t.reshape(-1), torch.ones(2)]).bfloat16())


@pytest.mark.parametrize("dst", [torch.bfloat16, torch.float64], ids=str)
def test_opcheck_cat_cast(dst):
    torch.library.opcheck(_ops.cat_cast.default, (_tensors(FLOATS), dst))


@pytest.mark.parametrize("call,error,match", [
    (lambda: _ops.cat_cast([torch.ones(2)], torch.int32), TypeError, "dtype must be float32"),
    (lambda: _ops.cat_cast([torch.ones(2), torch.ones(2, dtype=torch.int64)], torch.float32),
     TypeError, "tensor 1 must be float32"),
    (lambda: _ops.cat_cast([torch.ones(2), torch.ones(2, device="meta")], torch.float32),
     ValueError, "tensor 1 is on meta"),
    # No derivative of its own: an error, not gradients silently None (cast_params has one).
    (lambda: _ops.cat_cast([torch.ones(2, requires_grad=True)], torch.bfloat16), RuntimeError,
     "cat_cast has no derivative of its own .* use convmixer_kernels.ops.cast.cast_params"),
])
def test_cat_cast_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_cast_params_values_and_gradients(bias):
    """Values and gradients as autograd's cat and cast give them, one cat_cast each way, the
    largest parameter (the GEMM operand) first in the buffer, None passed through."""
    params = [p.requires_grad_() for p in _tensors([torch.float32] * 4, seed=1)]
    if not bias:
        params[1] = params[3] = None
    given = [p for p in params if p is not None]
    with OpCounter() as forward:
        views = cast.cast_params(params, torch.bfloat16)
    assert +forward.ops == {"convmixer_kernels.cat_cast.default": 1}
    assert [v is None for v in views] == [p is None for p in params]
    largest = max(given, key=torch.Tensor.numel)
    assert views[params.index(largest)].data_ptr() == min(v.data_ptr() for v in views
                                                          if v is not None)
    grads = [torch.randn(v.shape, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(i))
             for i, v in enumerate(views) if v is not None]
    with OpCounter() as backward:
        torch.autograd.backward([v for v in views if v is not None], grads)
    assert +backward.ops == {"convmixer_kernels.cat_cast.default": 1}
    for p, v, g in zip(given, [v for v in views if v is not None], grads):
        assert v.dtype == torch.bfloat16 and torch.equal(v, p.detach().bfloat16())
        assert p.grad.dtype == torch.float32 and torch.equal(p.grad, g.float())


def test_cast_params_in_the_compute_dtype_is_no_copy():
    params = _tensors([torch.bfloat16] * 4)
    assert all(a is b for a, b in zip(cast.cast_params(params, torch.bfloat16), params))


def test_cast_params_without_the_op_is_the_same(monkeypatch):
    """A device without cat_cast's kernel (the Triton backend with a build without CUDA): ATen's
    cat and cast, the same values and gradients."""
    results = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(cast, "_NATIVE", {})
        params = [p.requires_grad_() for p in _tensors([torch.float32] * 4, seed=2)]
        views = cast.cast_params(params, torch.float16)
        sum((v.float() * (i + 1)).sum() for i, v in enumerate(views)).backward()
        results.append((*views, *(p.grad for p in params)))
    for a, b in zip(*results):
        assert torch.equal(a, b)
