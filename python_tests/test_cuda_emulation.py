"""CUDA kernels run on the CPU under EMULATION (python_tests/cuda_emulation), no GPU needed.

The torch-free kernel sources are compiled with g++ against a shim that runs every thread of every
CTA (CTAs one after another, __syncthreads real), so these tests check the kernels' arithmetic,
indexing, tiling and host-side planning in CI. They cannot find races or anything that needs CTAs
to run concurrently, and they say nothing about speed: that needs a GPU.

Buffers are CPU tensors whose data_ptr() the kernels see as device pointers; Guarded puts poisoned
(NaN) bands around them, so out-of-bounds reads show up as NaN and out-of-bounds writes are caught.
"""
from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cuda_emulation import Guarded, bind, launch_log, load_check_library, ptr, reverse_cta_order
from emulated_cuda import CUDA_ERROR_INVALID_VALUE, DTYPE_CODE, vec_width
from reference import acc_dtype

c_int, c_ll, c_ptr = ctypes.c_int, ctypes.c_longlong, ctypes.c_void_p
CUDA_ERROR_INVALID_CONFIGURATION = 9

# ------------------------------------------------------------------------------------------------
# Channel statistics: csrc/cuda/kernels/channel_stats.cuh through convmixer_channel_stats()
# ------------------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


# Tolerances against a float64 reference computed on the stored (already rounded) inputs, so they
# measure only the kernel's accumulation error. With float accumulation (u = 6e-8), Welford chains
# of at most 32 rows per thread and ~log2(tiles) levels of Chan merges stay within a few dozen u;
# measured: ~2e-7 relative in the variance for every shape here. 1e-6 of |mean| + std for the mean
# and 1e-5 relative for the variance leave margin, and 1e-5 still fails an accumulation that does
# not shift by x[0] (about 3e-5 at mean 1e4, std 1: see the kernel header). double: u = 1e-16.
def tolerances(dtype):
    return (1e-13, 1e-12) if dtype == torch.float64 else (1e-6, 1e-5)


class ChannelStats:
    def __init__(self):
        self.lib = load_check_library("channel_stats_check.cu")
        self.fn = bind(self.lib, "convmixer_channel_stats", c_int, [
            c_int, c_ptr, c_ll, c_ll,            # dtype, x, rows, channels
            c_ptr, ctypes.c_size_t,              # workspace, its size
            c_ptr, c_ptr, c_ptr, c_ptr,          # mean, var, running_mean, running_var
            ctypes.c_double, ctypes.POINTER(ctypes.c_size_t), c_ptr])  # momentum, size out, stream

    def workspace_bytes(self, dtype, rows, channels):
        size = ctypes.c_size_t(12345)
        rc = self.fn(DTYPE_CODE[dtype], None, rows, channels, None, 0, None, None, None, None, 0.0,
                     ctypes.byref(size), None)
        assert rc == 0
        return size.value

    def __call__(self, x, running_mean=None, running_var=None, momentum=0.1):
        """(mean, var, launch log) of a [rows, channels] tensor. Any argument may be Guarded."""
        def unwrap(t):
            return t.tensor if isinstance(t, Guarded) else t

        xt = unwrap(x)
        rows, channels = xt.shape
        acc = acc_dtype(xt.dtype)
        ws = Guarded((self.workspace_bytes(xt.dtype, rows, channels),), torch.uint8)
        mean, var = Guarded((channels,), acc), Guarded((channels,), acc)
        launch_log(self.lib)
        rc = self.fn(DTYPE_CODE[xt.dtype], ptr(xt), rows, channels, ptr(ws.tensor),
                     ws.tensor.numel(), ptr(mean.tensor), ptr(var.tensor),
                     ptr(unwrap(running_mean)), ptr(unwrap(running_var)), momentum, None, None)
        assert rc == 0, f"convmixer_channel_stats returned cudaError {rc}"
        for g in (x, ws, mean, var, running_mean, running_var):
            if isinstance(g, Guarded):
                g.check()
        return mean.tensor.clone(), var.tensor.clone(), launch_log(self.lib)


@pytest.fixture(scope="module")
def stats():
    return ChannelStats()


def reference(x):
    var, mean = torch.var_mean(x.double(), dim=0, correction=0)
    return mean, var


def assert_within(actual, expected, bound, what):
    err = (actual.double() - expected).abs()
    bad = ~(err <= bound)  # NaN fails too
    if bad.any():
        c = int(bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} channels off, e.g. channel {c}: "
                             f"{float(actual[c])!r} vs {float(expected[c])!r} "
                             f"(bound {float(bound[c]):.3g})")


def assert_stats(x, mean, var):
    mean_ref, var_ref = reference(x)
    rtol_mean, rtol_var = tolerances(x.dtype)
    assert_within(mean, mean_ref, rtol_mean * (mean_ref.abs() + var_ref.sqrt()), "mean")
    assert_within(var, var_ref, rtol_var * var_ref, "var")


def partials_path(log):
    """'vector' or 'scalar': which partials kernel instantiation ran."""
    (line,) = [entry for entry in log if "channel_stats_partials_kernel<" in entry]
    return "vector" if ", true>" in line.split("(")[0] else "scalar"


# One row; one partial tile; a whole 256-row tile; partial last tiles; 20 tiles.
ROWS = [1, 2, 255, 1000, 5000]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels", [1, 3, 7, 8, 33, 100])
def test_matches_reference(stats, dtype, channels):
    for rows in ROWS:
        x = Guarded.like((torch.randn(rows, channels) * 3 + 0.5).to(dtype))
        mean, var, log = stats(x)
        assert_stats(x.tensor, mean, var)
        # Vector loads need whole 16-byte vectors per row (and an aligned base: Guarded keeps it).
        assert partials_path(log) == ("vector" if channels % vec_width(dtype) == 0 else "scalar")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_several_channel_blocks(stats, dtype):
    # 264 channels: 2 (16-bit), 3 (float) or 5 (double) CTA columns, the last one partly empty.
    x = Guarded.like(torch.randn(600, 264).to(dtype))
    mean, var, log = stats(x)
    assert_stats(x.tensor, mean, var)
    assert partials_path(log) == "vector"


@pytest.mark.parametrize("dtype, channels", [(torch.float32, 3), (torch.bfloat16, 8)], ids=str)
def test_many_tiles(stats, dtype, channels):
    # Past 2048 * 256 rows the plan grows tiles beyond 256 rows (here to 384, the last one
    # partial), and with over 256 tiles the finalize kernel's unrolled loop over tiles runs.
    rows = 2048 * 256 + 1000
    x = Guarded.like(torch.randn(rows, channels).to(dtype))
    mean, var, log = stats(x)
    assert_stats(x.tensor, mean, var)
    tiles = int(log[0].split("grid=(")[1].split(",")[0])
    assert 256 < tiles < rows / 256


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scalar_path_is_bitwise_the_vector_path(stats, dtype):
    # The header promises that both layouts give every channel the same rows in the same order.
    # A base one element off 16 bytes forces the scalar kernel onto the same data.
    data = torch.randn(1000, 40).to(dtype)
    mean_v, var_v, log_v = stats(Guarded.like(data))
    mean_s, var_s, log_s = stats(Guarded.like(data, offset=1))
    assert (partials_path(log_v), partials_path(log_s)) == ("vector", "scalar")
    assert torch.equal(mean_v, mean_s) and torch.equal(var_v, var_s)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mean_far_from_zero(stats, dtype):
    # Mean 1e4, where float's resolution is ~1e-3. The 16-bit dtypes cannot store std 1 there
    # (spacing 8 and 64), so their std is 16x that spacing. Channel 0 is constant: its variance
    # must come out exactly 0.
    std = {torch.float16: 128.0, torch.bfloat16: 1024.0}.get(dtype, 1.0)
    data = torch.randn(5000, 8) * std + 1e4
    data[:, 0] = 1e4 + 3
    x = Guarded.like(data.to(dtype))
    mean, var, _ = stats(x)
    assert_stats(x.tensor, mean, var)
    assert var[0] == 0 and mean[0] == x.tensor[0, 0].to(mean.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_running_stats(stats, dtype):
    rows, channels, momentum = 1000, 33, 0.3
    acc = acc_dtype(dtype)
    x = Guarded.like(torch.randn(rows, channels).to(dtype))
    rm0, rv0 = torch.randn(channels, dtype=acc), torch.rand(channels, dtype=acc) + 0.5
    rm, rv = Guarded.like(rm0), Guarded.like(rv0)
    mean, var, _ = stats(x, rm, rv, momentum)
    assert_stats(x.tensor, mean, var)
    # torch.nn.BatchNorm's update: the unbiased variance goes into running_var.
    mean_ref, var_ref = reference(x.tensor)
    rm_ref = (1 - momentum) * rm0.double() + momentum * mean_ref
    rv_ref = (1 - momentum) * rv0.double() + momentum * var_ref * rows / (rows - 1)
    rtol_mean, rtol_var = tolerances(dtype)
    assert_within(rm.tensor, rm_ref, rtol_mean * (rm_ref.abs() + mean_ref.abs() + var_ref.sqrt()),
                  "running_mean")
    assert_within(rv.tensor, rv_ref, rtol_var * rv_ref, "running_var")


def test_running_stats_edge_cases(stats):
    # One row: mean and var are exact, the unbiased variance is 0/0 (NaN, like PyTorch's kernels).
    x = torch.randn(1, 5)
    rm, rv = torch.zeros(5), torch.ones(5)
    mean, var, _ = stats(x, rm, rv, 0.1)
    assert torch.equal(mean, x[0]) and torch.equal(var, torch.zeros(5))
    torch.testing.assert_close(rm, 0.1 * x[0])
    assert rv.isnan().all()
    # No rows: NaN statistics, running statistics untouched, and only the finalize kernel runs.
    rm, rv = torch.randn(5), torch.rand(5)
    rm0, rv0 = rm.clone(), rv.clone()
    mean, var, log = stats(torch.empty(0, 5), rm, rv, 0.1)
    assert mean.isnan().all() and var.isnan().all()
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    assert len(log) == 1 and "channel_stats_finalize_kernel<" in log[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_deterministic(stats, dtype):
    # The reduction order is fixed by the shape alone: repeated runs, and CTAs executed in the
    # opposite order, must agree bit for bit.
    x = Guarded.like(torch.randn(5000, 33).to(dtype))
    first = stats(x)[:2]
    again = stats(x)[:2]
    with reverse_cta_order(stats.lib):
        backwards = stats(x)[:2]
    for a, b, c in zip(first, again, backwards):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_host_entry_errors(stats):
    x, out = torch.randn(300, 8), torch.empty(8)
    need = stats.workspace_bytes(torch.float32, 300, 8)
    ws = torch.empty(need, dtype=torch.uint8)

    def call(dtype_code=0, rows=300, channels=8, ws_bytes=need):
        return stats.fn(dtype_code, ptr(x), rows, channels, ptr(ws), ws_bytes, ptr(out), ptr(out),
                        None, None, 0.1, None, None)

    assert call(dtype_code=7) == CUDA_ERROR_INVALID_VALUE
    assert call(ws_bytes=need - 1) == CUDA_ERROR_INVALID_VALUE
    assert call(rows=-1) == CUDA_ERROR_INVALID_VALUE
    launch_log(stats.lib)
    assert call(channels=0) == 0 and launch_log(stats.lib) == []


# ------------------------------------------------------------------------------------------------
# The emulation itself (cuda_emulation/selftest.cu): what the tests above, and the next kernels'
# tests, rely on
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def selftest():
    return load_check_library(Path(__file__).parent / "cuda_emulation" / "selftest.cu")


def test_half_and_bfloat16_conversions(stats):
    lib = stats.lib
    # Every 16-bit pattern widens like torch does (NaNs compared as NaNs).
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    for name, dtype in (("half", torch.float16), ("bfloat16", torch.bfloat16)):
        out = torch.empty(65536)
        getattr(lib, f"convmixer_emu_{name}_to_float")(ptr(bits), ptr(out), c_ll(65536))
        torch.testing.assert_close(out, bits.view(dtype).float(), rtol=0, atol=0, equal_nan=True)
    # Narrowing rounds to nearest even like torch: ties, overflow, subnormals, NaN.
    specials = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 65504.0, 65520.0, 65519.99,
                1 + 2 ** -11, 1 + 3 * 2 ** -11, 2.0 ** -25, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 3.4e38,
                6e-8]
    f = torch.cat([torch.randn(100000) * 10.0 ** torch.randint(-8, 6, (100000,)),
                   torch.tensor(specials)])
    for name, dtype in (("half", torch.float16), ("bfloat16", torch.bfloat16)):
        out = torch.empty(len(f), dtype=torch.int16)
        getattr(lib, f"convmixer_emu_float_to_{name}")(ptr(f), ptr(out), c_ll(len(f)))
        expected = f.to(dtype)
        nan = expected.isnan()
        assert torch.equal(out.view(dtype).isnan(), nan)
        assert torch.equal(out[~nan], expected.view(torch.int16)[~nan])


@pytest.mark.parametrize("n, block", [(1000, (32, 8)), (200, (16, 4)), (5, (8, 1))])
def test_dynamic_smem_syncthreads_and_early_exit(selftest, n, block):
    x = torch.randn(n)
    threads = block[0] * block[1]
    out = Guarded(((n + threads - 1) // threads,), torch.float32)
    fn = bind(selftest, "selftest_block_sum", c_int, [c_ptr, c_int, c_ptr, c_int, c_int])
    assert fn(ptr(x), n, ptr(out.tensor), *block) == 0
    out.check()
    padded = torch.nn.functional.pad(x, (0, out.tensor.numel() * threads - n)).view(-1, threads)
    torch.testing.assert_close(out.tensor, 2 * padded.sum(1), rtol=1e-5, atol=1e-5)
    # The launch kept its template arguments and the dynamic size computed in the <<<...>>>.
    (line,) = launch_log(selftest)
    assert "block_sum_kernel<float, 2>" in line and f"smem={threads * 4}" in line


def test_shared_memory_is_poisoned_before_every_cta(selftest):
    out = torch.zeros(3 * 2, dtype=torch.int32)
    assert selftest.selftest_unwritten_shared(ptr(out), 3) == 0
    # Every CTA, not just the first, sees 0xFFFFFFFF where it wrote nothing (not the 7s the
    # previous CTA left), in dynamic and in static shared memory.
    assert (out == -1).all(), out


def test_warp_shuffles_and_ballot(selftest):
    x = torch.randn(256)
    xor_sum, down_sum = torch.empty(256), torch.empty(8)
    ballot = torch.empty(8, dtype=torch.int32)
    fn = bind(selftest, "selftest_warp", c_int, [c_ptr, c_int, c_ptr, c_ptr, c_ptr])
    assert fn(ptr(x), 256, ptr(xor_sum), ptr(down_sum), ptr(ballot)) == 0
    warps = x.view(8, 32)
    torch.testing.assert_close(xor_sum.view(8, 32), warps.sum(1, keepdim=True).expand(8, 32))
    torch.testing.assert_close(down_sum, warps.sum(1))
    expected = ((warps > 0).long() << torch.arange(32)).sum(1)
    assert torch.equal(ballot.long() & 0xFFFFFFFF, expected)


def test_three_dimensional_indices(selftest):
    grid, block = (3, 2, 2), (4, 2, 3)
    n_blocks, n_threads = 12, 24
    out = Guarded((n_blocks * n_threads,), torch.int32)
    fn = bind(selftest, "selftest_index", c_int, [c_ptr] + [ctypes.c_uint] * 6)
    assert fn(ptr(out.tensor), *grid, *block) == 0
    out.check()
    b, t = torch.meshgrid(torch.arange(n_blocks), torch.arange(n_threads), indexing="ij")
    assert torch.equal(out.tensor.long(), (b * 1000 + t).flatten())


def test_launch_checks(selftest):
    x, out = torch.randn(32), torch.empty(1)
    # 64 KiB of dynamic shared memory is rejected until opted into with cudaFuncSetAttribute.
    without, with_attribute = divmod(selftest.selftest_smem_optin(ptr(x), ptr(out)), 1000)[::-1]
    assert (without, with_attribute) == (CUDA_ERROR_INVALID_VALUE, 0)
    torch.testing.assert_close(out, x.sum().view(1))
    # 1025 threads per block: an invalid configuration, and nothing runs.
    launch_log(selftest)
    assert selftest.selftest_bad_config(ptr(out)) == CUDA_ERROR_INVALID_CONFIGURATION
    assert launch_log(selftest)[0].endswith("REJECTED")


@pytest.mark.parametrize("offset_bytes, skew", [(4, 0), (0, 1)],
                         ids=["misaligned_uint4", "smem_overflow"])
def test_gpu_faults_trap(selftest, offset_bytes, skew):
    # What would fault (or silently corrupt memory) on a GPU kills the emulating process with
    # SIGILL instead of passing on x86; a child process runs it so that this test survives.
    x, out = torch.arange(8, dtype=torch.float32), torch.empty(1)
    fn = bind(selftest, "selftest_vector_load", c_int, [c_ptr, c_int, c_ptr])
    assert fn(ptr(x), 0, ptr(out)) == 0 and out.item() == 0 + 3  # the well-behaved launch
    child = (f"import ctypes; lib = ctypes.CDLL({selftest._name!r}); "
             "buf = (ctypes.c_float * 12)(); base = (ctypes.addressof(buf) + 15) // 16 * 16; "
             f"lib.selftest_vector_load(ctypes.c_void_p(base + {offset_bytes}), {skew}, "
             "ctypes.c_void_p(base + 32))")
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGILL, (proc.returncode, proc.stderr.decode()[-2000:])
