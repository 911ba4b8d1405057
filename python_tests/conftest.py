import os

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "large_memory: needs tens of GB of GPU memory (skips itself when they are not "
                   "free); deselect with -m 'not large_memory'")
    # Under pytest-xdist (-n auto: a worker a core) a worker with torch's default of a thread a
    # core oversubscribes the machine, and OpenMP's spinning threads slow every worker. One
    # intra-op thread a worker; the tests of threaded paths set their own count.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_tf32():
    """float32 means float32 in these tests. On a GPU, eager float32 convolutions default to
    TF32 (cudnn.allow_tf32 is True; ~1e-3 relative error), which would make the eager model the
    inaccurate side of every float32 fused-vs-eager comparison (1e-4 tolerances); the matmul
    flag also pins float32 GEMMs (the CUDA pw stage's at::mm) to full precision whatever the
    session's matmul precision. No effect on CPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
