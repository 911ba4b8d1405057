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

from convmixer_kernels.activations import ACTIVATIONS
from cuda_emulation import Guarded, bind, launch_log, load_check_library, ptr
from emulated_cuda import (BN_FORWARD_ARGTYPES, CUDA_ERROR_INVALID_VALUE, DTYPE_CODE,
                           NO_BN_FORWARD)
from reference import acc_dtype

c_int, c_ll, c_ptr = ctypes.c_int, ctypes.c_longlong, ctypes.c_void_p
CUDA_ERROR_INVALID_CONFIGURATION = 9

# ------------------------------------------------------------------------------------------------
# The statistics finalize (csrc/cuda/kernels/channel_stats.cuh) on the paths that the stage tests'
# small shapes do not reach: hundreds of tiles (the unrolled loop over tiles) and no rows at all.
# It runs in the last CTA of the pw stage's forward epilogue, driven through
# csrc/cuda/check/pw_stage_check.cu.
# ------------------------------------------------------------------------------------------------

# Against a float64 reference computed on the stored output, so they measure only the statistics'
# accumulation error. With float accumulation (u = 6e-8), Welford chains of at most a few dozen rows
# per thread and ~log2(tiles) levels of Chan merges stay within a few dozen u: 1e-6 of |mean| + std
# for the mean and 1e-5 relative for the variance leave margin. double: u = 1e-16.
def tolerances(dtype):
    return (1e-13, 1e-12) if dtype == torch.float64 else (1e-6, 1e-5)


class EpilogueForward:
    def __init__(self):
        self.lib = load_check_library("pw_stage_check.cu")
        self.fn = bind(self.lib, "convmixer_pw_epilogue_forward", c_int, [
            c_int, c_int, c_ll, c_ll,      # dtype, act, rows, channels
            c_ptr, c_ptr, c_ptr, c_ptr,    # pre, out, mean, var
            *BN_FORWARD_ARGTYPES,
            c_ptr, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t), c_ptr])  # workspace, stream

    def __call__(self, pre):
        """(relu(pre) as stored, its mean, its biased var, the launch log)."""
        rows, channels = pre.shape
        code, relu = DTYPE_CODE[pre.dtype], ACTIVATIONS["relu"].code
        size = ctypes.c_size_t(0)
        assert self.fn(code, relu, rows, channels, *([None] * 4), *NO_BN_FORWARD, None, 0,
                       ctypes.byref(size), None) == 0
        ws = Guarded((max(size.value, 1),), torch.uint8)
        # At least one row: an empty tensor's data_ptr() is null, which makes the call a size query.
        out = Guarded((max(rows, 1), channels), pre.dtype)
        acc = acc_dtype(pre.dtype)
        mean, var = Guarded((channels,), acc), Guarded((channels,), acc)
        launch_log(self.lib)
        rc = self.fn(code, relu, rows, channels, ptr(pre), ptr(out.tensor), ptr(mean.tensor),
                     ptr(var.tensor), *NO_BN_FORWARD, ptr(ws.tensor), ws.tensor.numel(), None,
                     None)
        assert rc == 0, f"convmixer_pw_epilogue_forward returned cudaError {rc}"
        for g in (ws, out, mean, var):
            g.check()
        return (out.tensor[:rows].clone(), mean.tensor.clone(), var.tensor.clone(),
                launch_log(self.lib))


@pytest.fixture(scope="module")
def epilogue():
    return EpilogueForward()


def assert_within(actual, expected, bound, what):
    err = (actual.double() - expected).abs()
    bad = ~(err <= bound)  # NaN fails too
    if bad.any():
        c = int(bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} channels off, e.g. channel {c}: "
                             f"{float(actual[c])!r} vs {float(expected[c])!r} "
                             f"(bound {float(bound[c]):.3g})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_finalize_merges_many_tiles(epilogue, dtype):
    # 20000 rows in the pw stage's 64-row tiles: 313 partials per channel, which the last CTA's 8
    # row groups fold 39 or 40 each (two loads unrolled), then merge in order; one launch.
    pre = (torch.randn(20000, 3) * 3 + 0.5).to(dtype)
    out, mean, var, log = epilogue(pre)
    tiles = int(log[0].split("grid=(")[1].split(",")[0])
    assert "pw_epilogue_forward_kernel<" in log[0] and tiles > 256 and len(log) == 1
    var_ref, mean_ref = torch.var_mean(out.double(), dim=0, correction=0)
    rtol_mean, rtol_var = tolerances(dtype)
    assert_within(mean, mean_ref, rtol_mean * (mean_ref.abs() + var_ref.sqrt()), "mean")
    assert_within(var, var_ref, rtol_var * var_ref, "var")


def test_finalize_of_no_rows(epilogue):
    # No rows: NaN statistics (as torch.var_mean of nothing), written by the one kernel that runs.
    _, mean, var, log = epilogue(torch.empty(0, 5))
    assert mean.isnan().all() and var.isnan().all()
    assert len(log) == 1 and "channel_stats_of_no_rows_kernel<" in log[0]


# ------------------------------------------------------------------------------------------------
# The emulation itself (cuda_emulation/selftest.cu): what the tests above, and the next kernels'
# tests, rely on
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def selftest():
    return load_check_library(Path(__file__).parent / "cuda_emulation" / "selftest.cu")


def test_half_and_bfloat16_conversions(selftest):
    lib = selftest
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
