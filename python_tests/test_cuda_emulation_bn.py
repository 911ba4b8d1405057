"""The CUDA BatchNorm glue kernels (csrc/cuda/kernels/bn_ops.cuh) run on the CPU under EMULATION.

Each launch entry is driven through csrc/cuda/check/bn_ops_check.cu with CPU tensors as device
memory (python_tests/cuda_emulation) and compared with nn.BatchNorm2d's formulas evaluated in
float64, and with the CPU op (csrc/cpu/bn_ops.cpp), which computes the same maths in the same
order: every vector in each storage dtype, affine or not, every running-statistics case (momentum,
momentum=None from num_batches_tracked, a count tensor, absent buffers), widths over one CTA; and
the training BatchNorm's one kernel (bn_train_norm_kernel), bitwise the two it replaces.
"""
from __future__ import annotations

import ctypes

import pytest
import torch

import convmixer_kernels  # noqa: F401  (the CPU ops, for the comparison)
from cuda_emulation import Guarded, bind, launch_log, load_check_library, ptr, reverse_cta_order
from emulated_cuda import CUDA_ERROR_INVALID_VALUE, DTYPE_CODE

P, LL, I, D = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_double
ELEM = {**DTYPE_CODE, torch.int64: 4}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
CHANNELS = [1, 37, 256, 600]  # under one CTA, exactly one, several with a partial last
_ops = torch.ops.convmixer_kernels

# Relative to the reference's magnitude: a few float32 roundings (1e-6), or one rounding of the
# result to a half-precision output (2^-11, 2^-8); float64 a few ulps.
TOL = {torch.float32: 1e-6, torch.float64: 1e-14, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_close(actual, expected, dtype, what):
    bound = TOL[dtype] * (expected.double().abs() + 1e-30)
    err = (actual.double() - expected.double()).abs()
    bad = ~(err <= bound)
    assert not bad.any(), f"{what}: {int(bad.sum())}/{err.numel()} off, max error {float(err.max()):.3g}"


class BnKernels:
    def __init__(self):
        self.lib = load_check_library("bn_ops_check.cu")
        self.fwd = bind(self.lib, "convmixer_bn_scale_shift", I,
                        [I, LL, D, P, I, P, I, P, I, P, P, P])
        self.bwd = bind(self.lib, "convmixer_bn_scale_shift_backward", I,
                        [I, LL, D, P, P, P, I, P, I, P, P, P, I, P])
        self.stats = bind(self.lib, "convmixer_bn_running_stats", I,
                          [I, LL, P, P, P, I, P, I, ctypes.POINTER(LL), D, I, D, P, I, P])
        self.many = bind(self.lib, "convmixer_bn_running_stats_many", I,
                         [I, I, P, P, P, P, P, P, P, P, D, I, D, P])
        self.train = bind(self.lib, "convmixer_bn_train_norm", I,
                          [I, LL, P, P, P, I, P, I, ctypes.POINTER(LL), D, I, D, P, I,
                           D, P, I, P, I, P, P, P])

    def scale_shift(self, var, weight, bias, eps, acc):
        c = var.shape[0]
        scale, shift = Guarded((c,), acc), Guarded((c,), acc)
        code = lambda t: ELEM[t.dtype] if t is not None else 0  # noqa: E731
        rc = self.fwd(ELEM[acc], c, eps, ptr(var), code(var), ptr(weight), code(weight),
                      ptr(bias), code(bias), ptr(scale.tensor), ptr(shift.tensor), None)
        assert rc == 0
        scale.check()
        shift.check()
        return scale.tensor, shift.tensor

    def scale_shift_backward(self, grad_scale, grad_shift, var, weight, bias, eps, acc):
        c = var.shape[0]
        gv = Guarded((c,), var.dtype)
        gw = Guarded((c,), weight.dtype) if weight is not None else None
        gb = Guarded((c,), bias.dtype) if bias is not None else None
        rc = self.bwd(ELEM[acc], c, eps, ptr(grad_scale), ptr(grad_shift), ptr(var),
                      ELEM[var.dtype], ptr(weight), ELEM[weight.dtype] if weight is not None else 0,
                      ptr(gv.tensor), ptr(gw.tensor) if gw else None,
                      ptr(gb.tensor) if gb else None, ELEM[bias.dtype] if bias is not None else 0,
                      None)
        assert rc == 0
        for g in (gv, gw, gb):
            if g is not None:
                g.check()
        return gv.tensor, gw.tensor if gw else None, gb.tensor if gb else None

    @staticmethod
    def _running_args(mean, var, running_mean, running_var, tracked, momentum, count):
        count_t = count if isinstance(count, torch.Tensor) else None
        return (ELEM[mean.dtype], mean.shape[0], ptr(mean), ptr(var), ptr(running_mean),
                ELEM[running_mean.dtype] if running_mean is not None else 0,
                ptr(running_var), ELEM[running_var.dtype] if running_var is not None else 0,
                ctypes.cast(ptr(tracked), ctypes.POINTER(LL)) if tracked is not None else None,
                0.0 if momentum is None else momentum, int(momentum is None),
                0.0 if count_t is not None else float(count), ptr(count_t),
                ELEM[count_t.dtype] if count_t is not None else 0)

    def running_stats(self, mean, var, running_mean, running_var, tracked, momentum, count):
        return self.stats(*self._running_args(mean, var, running_mean, running_var, tracked,
                                              momentum, count), None)

    def running_stats_many(self, items, momentum, count):
        """bn_running_stats_many_kernel over items (mean, var, running_mean, running_var,
        tracked), every buffer given; the return code."""
        n = len(items)
        arr = lambda kind, values: (kind * max(n, 1))(*values)  # noqa: E731
        args = (ELEM[items[0][0].dtype] if items else 0, n,
                arr(LL, [m.shape[0] for m, *_ in items]),
                arr(P, [ptr(it[0]) for it in items]), arr(P, [ptr(it[1]) for it in items]),
                arr(P, [ptr(it[2]) for it in items]), arr(I, [ELEM[it[2].dtype] for it in items]),
                arr(P, [ptr(it[3]) for it in items]), arr(I, [ELEM[it[3].dtype] for it in items]),
                arr(P, [ptr(it[4]) for it in items]),
                0.0 if momentum is None else momentum, int(momentum is None), float(count), None)
        return self.many(*args)

    def train_norm(self, mean, var, running_mean, running_var, tracked, momentum, count, weight,
                   bias, eps):
        """bn_train_norm_kernel: the running statistics updated in place, (scale, shift)."""
        c, acc = mean.shape[0], mean.dtype
        scale, shift = Guarded((c,), acc), Guarded((c,), acc)
        code = lambda t: ELEM[t.dtype] if t is not None else 0  # noqa: E731
        rc = self.train(*self._running_args(mean, var, running_mean, running_var, tracked,
                                            momentum, count),
                        eps, ptr(weight), code(weight), ptr(bias), code(bias), ptr(scale.tensor),
                        ptr(shift.tensor), None)
        assert rc == 0, f"convmixer_bn_train_norm returned cudaError {rc}"
        scale.check()
        shift.check()
        return scale.tensor, shift.tensor


@pytest.fixture(scope="module")
def kernels():
    return BnKernels()


def vectors(c, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    var = (torch.rand(c, generator=gen, dtype=torch.float64) * 3 + 0.01).to(dtype)
    weight = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype)
    bias = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype)
    return var, weight, bias


@pytest.mark.parametrize("c", CHANNELS)
@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_scale_shift_and_backward(kernels, c, acc, dtype, affine):
    """Forward and backward against the formulas in float64, and equal to the CPU op."""
    var, weight, bias = vectors(c, dtype, c)
    if not affine:
        weight = bias = None
    eps = 1e-5
    scale, shift = kernels.scale_shift(var, weight, bias, eps, acc)
    invstd = (var.double() + eps).rsqrt()
    w64 = weight.double() if affine else torch.ones(c, dtype=torch.float64)
    assert_close(scale, w64 * invstd, acc, "scale")
    assert_close(shift, bias.double() if affine else torch.zeros(c, dtype=torch.float64), acc,
                 "shift")
    cpu = _ops.bn_scale_shift(var, weight, bias, eps, acc)
    torch.testing.assert_close((scale, shift), cpu, rtol=TOL[acc], atol=0)

    gen = torch.Generator().manual_seed(1)
    gs, gt = (torch.randn(c, generator=gen, dtype=acc) for _ in range(2))
    gv, gw, gb = kernels.scale_shift_backward(gs, gt, var, weight, bias, eps, acc)
    out_tol = max(acc, dtype, key=TOL.get)  # the gradients are stored in the inputs' dtype
    assert_close(gv, -0.5 * gs.double() * w64 * invstd ** 3, out_tol, "grad_var")
    if affine:
        assert_close(gw, gs.double() * invstd, out_tol, "grad_weight")
        assert_close(gb, gt.double(), out_tol, "grad_bias")
        assert gw.dtype == weight.dtype and gb.dtype == bias.dtype
    else:
        assert gw is None and gb is None
    cpu = _ops.bn_scale_shift_backward(gs, gt, var, weight, bias, eps, acc)
    torch.testing.assert_close(gv, cpu[0], rtol=TOL[out_tol], atol=0)
    if affine:
        torch.testing.assert_close((gw, gb), cpu[1:], rtol=TOL[out_tol], atol=0)


def test_absent_output_gradients_are_zero(kernels):
    var, weight, bias = vectors(37, torch.float32, 0)
    gv, gw, gb = kernels.scale_shift_backward(None, None, var, weight, bias, 1e-5, torch.float32)
    for g in (gv, gw, gb):
        assert (g == 0).all()


def reference_update(rm, rv, n, means, variances, count, momentum):
    """nn.BatchNorm2d's update over the (mean, var) pairs, in float64."""
    rm, rv = rm.double(), rv.double()
    for mean, var in zip(means, variances):
        n += 1
        f = 1.0 / n if momentum is None else momentum
        rm = (1 - f) * rm + f * mean.double()
        rv = (1 - f) * rv + f * var.double() * count / (count - 1)
    return rm, rv, n


@pytest.mark.parametrize("c", [37, 600])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("acc,running", [(torch.float32, torch.float32),
                                         (torch.float64, torch.float64),
                                         (torch.float32, torch.float16),
                                         (torch.float32, torch.bfloat16),
                                         (torch.float32, torch.float64)])
@pytest.mark.parametrize("count_kind", ["int", "float tensor", "int64 tensor"])
def test_running_stats_over_steps(kernels, c, momentum, acc, running, count_kind):
    gen = torch.Generator().manual_seed(c)
    steps = 3
    means = [torch.randn(c, generator=gen, dtype=acc) for _ in range(steps)]
    vars_ = [torch.rand(c, generator=gen, dtype=acc) + 0.1 for _ in range(steps)]
    count = 50
    count_arg = {"int": count, "float tensor": torch.tensor(float(count), dtype=acc),
                 "int64 tensor": torch.tensor(count)}[count_kind]
    rm = torch.randn(c, generator=gen, dtype=torch.float64).to(running)
    rv = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(running)
    tracked = torch.tensor(4, dtype=torch.int64)
    cpu = (rm.clone(), rv.clone(), tracked.clone())
    want_m, want_v, want_n = reference_update(rm, rv, 4, means, vars_, count, momentum)
    gm, gv = Guarded.like(rm), Guarded.like(rv)
    for k in range(steps):
        assert kernels.running_stats(means[k], vars_[k], gm.tensor, gv.tensor, tracked, momentum,
                                     count_arg) == 0
        _ops.bn_update_running_stats(means[k], vars_[k], *cpu, momentum,
                                     0.0 if isinstance(count_arg, torch.Tensor) else float(count),
                                     count_arg if isinstance(count_arg, torch.Tensor) else None)
    gm.check()
    gv.check()
    assert int(tracked) == want_n == int(cpu[2])
    tol = running if running in (torch.float16, torch.bfloat16) else acc
    # Three steps of a few roundings each, relative to the magnitude of the running values (a
    # running mean near zero is a difference of two terms); the CPU op may contract its
    # multiply-adds where the emulation rounds each step, so it is held to the same bound.
    for k, (want, name) in enumerate(((want_m, "running_mean"), (want_v, "running_var"))):
        bound = 4 * TOL[tol] * float(want.abs().max())
        for got, who in (((gm, gv)[k].tensor, "kernel"), (cpu[k], "CPU op")):
            assert float((got.double() - want).abs().max()) <= bound, (name, who)


def test_running_stats_absent_buffers(kernels):
    """Each running tensor may be absent; num_batches_tracked alone still counts."""
    mean, var = torch.randn(37), torch.rand(37) + 0.1
    tracked = torch.tensor(0, dtype=torch.int64)
    assert kernels.running_stats(mean, var, None, None, tracked, 0.1, 8) == 0
    assert int(tracked) == 1
    rm = Guarded.like(torch.zeros(37))
    assert kernels.running_stats(mean, var, rm.tensor, None, None, 0.5, 8) == 0
    rm.check()
    torch.testing.assert_close(rm.tensor, 0.5 * mean, rtol=1e-6, atol=0)


def test_running_stats_cta_order_and_one_launch(kernels):
    """One launch each, and the results do not depend on the CTA order."""
    var, weight, bias = vectors(600, torch.float32, 3)
    launch_log(kernels.lib)
    first = kernels.scale_shift(var, weight, bias, 1e-5, torch.float32)
    with reverse_cta_order(kernels.lib):
        again = kernels.scale_shift(var, weight, bias, 1e-5, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    kernels.scale_shift_backward(torch.randn(600), None, var, weight, bias, 1e-5, torch.float32)
    tracked = torch.tensor(0, dtype=torch.int64)
    kernels.running_stats(torch.randn(600), var, torch.zeros(600), torch.ones(600), tracked,
                          None, 10)
    names = [line.split("<")[0].split()[-1].split("::")[-1] for line in launch_log(kernels.lib)]
    assert [n for n in names] == ["bn_scale_shift_kernel", "bn_scale_shift_kernel",
                                  "bn_scale_shift_backward_kernel", "bn_running_stats_kernel"]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("acc,running", [(torch.float32, torch.float32),
                                         (torch.float32, torch.bfloat16),
                                         (torch.float32, torch.float64),
                                         (torch.float64, torch.float64)])
def test_running_stats_many_is_one_kernel_each(kernels, momentum, acc, running):
    """bn_running_stats_many_kernel: each item (its own C, one CTA) bitwise what
    bn_running_stats_kernel gives it alone, over two steps, in one launch; 33 items are refused
    (one launch takes 32), and items that would update in float and in double do not mix."""
    gen = torch.Generator().manual_seed(7)
    widths = [37, 600, 256, 1]

    def items():
        return [(torch.randn(c, generator=gen, dtype=acc), torch.rand(c, generator=gen,
                                                                     dtype=acc) + 0.1,
                 torch.randn(c, generator=gen, dtype=torch.float64).to(running),
                 (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(running),
                 torch.tensor(3, dtype=torch.int64)) for c in widths]

    together, alone = items(), None
    alone = [tuple(t.clone() for t in it) for it in together]
    for _ in range(2):
        batch = [(torch.randn(c, generator=gen, dtype=acc),
                  torch.rand(c, generator=gen, dtype=acc) + 0.1) for c in widths]
        together = [(m, v, *it[2:]) for (m, v), it in zip(batch, together)]
        alone = [(m, v, *it[2:]) for (m, v), it in zip(batch, alone)]
        launch_log(kernels.lib)
        assert kernels.running_stats_many(together, momentum, 50) == 0
        assert len(launch_log(kernels.lib)) == 1
        for m, v, rm, rv, n in alone:
            assert kernels.running_stats(m, v, rm, rv, n, momentum, 50) == 0
    for a, b in zip(together, alone):
        for x, y in zip(a[2:], b[2:]):
            assert torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8))
    m, v, rm, rv, n = together[0]
    assert kernels.running_stats_many([(m, v, rm, rv, n)] * 33, momentum, 50) == \
        CUDA_ERROR_INVALID_VALUE
    if running != torch.float64 and acc == torch.float32:
        wide = (m, v, rm.double(), rv.double(), n)
        assert kernels.running_stats_many([together[0], wide], momentum, 50) == \
            CUDA_ERROR_INVALID_VALUE


@pytest.mark.parametrize("c", [37, 600])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("acc,running,param", [(torch.float32, torch.float32, torch.float32),
                                               (torch.float32, torch.float64, torch.bfloat16),
                                               (torch.float64, torch.float64, torch.float64)])
@pytest.mark.parametrize("affine", [True, False])
def test_train_norm_is_the_two_kernels(kernels, c, momentum, acc, running, param, affine):
    """One launch of bn_train_norm_kernel: bitwise the running-statistics kernel then the
    scale-shift kernel of the batch var, over three steps (num_batches_tracked read before its
    increment in each), with a count tensor in the last."""
    gen = torch.Generator().manual_seed(c)
    _, weight, bias = vectors(c, param, c + 1)
    if not affine:
        weight = bias = None
    first = (torch.randn(c, generator=gen, dtype=torch.float64).to(running),
             (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(running),
             torch.tensor(2, dtype=torch.int64))
    state = [first, tuple(t.clone() for t in first)]
    for step, count in enumerate((40, 40, torch.tensor(40.0, dtype=acc))):
        mean = torch.randn(c, generator=gen, dtype=acc)
        var = torch.rand(c, generator=gen, dtype=acc) + 0.1
        launch_log(kernels.lib)
        one = kernels.train_norm(mean, var, *state[0], momentum, count, weight, bias, 1e-5)
        assert len(launch_log(kernels.lib)) == 1
        assert kernels.running_stats(mean, var, *state[1], momentum, count) == 0
        two = kernels.scale_shift(var, weight, bias, 1e-5, acc)
        for a, b in zip((*one, *state[0]), (*two, *state[1])):
            assert torch.equal(a, b), step


def test_invalid_calls_are_refused(kernels):
    """What the launch entries cannot take is cudaErrorInvalidValue before anything runs."""
    var, weight, bias = vectors(8, torch.float32, 0)
    out = torch.full((8,), 7.0)
    # a storage type that is no accumulation type
    assert kernels.fwd(2, 8, 1e-5, ptr(var), 0, None, 0, None, 0, ptr(out), ptr(out),
                       None) == CUDA_ERROR_INVALID_VALUE
    # weight without bias
    assert kernels.fwd(0, 8, 1e-5, ptr(var), 0, ptr(weight), 0, None, 0, ptr(out), ptr(out),
                       None) == CUDA_ERROR_INVALID_VALUE
    # an integer var
    assert kernels.fwd(0, 8, 1e-5, ptr(var), 4, None, 0, None, 0, ptr(out), ptr(out),
                       None) == CUDA_ERROR_INVALID_VALUE
    # a cumulative average without num_batches_tracked
    assert kernels.running_stats(var, var, out, None, None, None, 8) == CUDA_ERROR_INVALID_VALUE
    assert (out == 7).all()
