import pytest
import torch

from convmixer_kernels.benchmarking.cli import device_name


@pytest.fixture
def record_environment(benchmark):
    """Stamps each pytest-benchmark row with the device and versions it was measured on."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    benchmark.extra_info.update({"device": device_name(device), "threads": torch.get_num_threads(),
                                 "torch": torch.__version__})
    return benchmark
