"""The CUDA parameter-cast kernel (csrc/cuda/kernels/cat_cast.cuh) run on the CPU under
EMULATION, through csrc/cuda/check/cat_cast_check.cu: bitwise torch.cat and .to() for every pair
of floating dtypes (the CPU op is held to the same in test_cast.py), more tensors than one launch
takes is refused by the entry (the torch launcher splits them), an empty tensor among them, and
results independent of the CTA order."""
from __future__ import annotations

import ctypes

import pytest
import torch

from cuda_emulation import Guarded, bind, launch_log, load_check_library, ptr, reverse_cta_order
from emulated_cuda import CUDA_ERROR_INVALID_VALUE, DTYPE_CODE

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def kernel():
    lib = load_check_library("cat_cast_check.cu")
    fn = bind(lib, "convmixer_cat_cast", ctypes.c_int,
              [ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p),
               ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_longlong), ctypes.c_void_p,
               ctypes.c_void_p])

    def run(tensors, dtype, count=None):
        n = len(tensors) if count is None else count
        srcs = (ctypes.c_void_p * len(tensors))(*(ptr(t) for t in tensors))
        types = (ctypes.c_int * len(tensors))(*(DTYPE_CODE[t.dtype] for t in tensors))
        numels = (ctypes.c_longlong * len(tensors))(*(t.numel() for t in tensors))
        out = Guarded((sum(t.numel() for t in tensors),), dtype)
        rc = fn(DTYPE_CODE[dtype], n, srcs, types, numels, ptr(out.tensor), None)
        out.check()
        return rc, out.tensor
    run.lib = lib
    return run


def _tensors(dtypes):
    gen = torch.Generator().manual_seed(0)
    sizes = [700, 3, 0, 129]  # several CTAs, a partial one, an empty tensor between
    tensors = [(torch.randn(n, generator=gen, dtype=torch.float64) * 300).to(dtype)
               for n, dtype in zip(sizes, dtypes)]
    if tensors[0].dtype in (torch.float32, torch.float64):
        tensors[0][0] = 1e5  # past float16's range
    return tensors


@pytest.mark.parametrize("src", FLOATS, ids=str)
@pytest.mark.parametrize("dst", FLOATS, ids=str)
def test_kernel_is_cat_then_to(kernel, src, dst):
    tensors = _tensors([src, torch.float64, src, torch.float32])
    rc, got = kernel(tensors, dst)
    assert rc == 0
    want = torch.cat([t.to(dst) for t in tensors])
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~got.isnan()], want[~want.isnan()])


def test_one_launch_and_cta_order(kernel):
    tensors = _tensors([torch.float32] * 4)
    launch_log(kernel.lib)
    _, first = kernel(tensors, torch.bfloat16)
    assert len(launch_log(kernel.lib)) == 1
    with reverse_cta_order(kernel.lib):
        _, again = kernel(tensors, torch.bfloat16)
    assert torch.equal(first, again)


def test_more_tensors_than_a_launch_takes_are_refused(kernel):
    tensors = [torch.ones(2)] * 9
    rc, _ = kernel(tensors, torch.float32)
    assert rc == CUDA_ERROR_INVALID_VALUE
