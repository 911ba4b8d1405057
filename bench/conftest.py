import platform

import pytest
import torch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@pytest.fixture
def record_environment(benchmark):
    """Stamps each pytest-benchmark row with the device and versions it was measured on."""
    benchmark.extra_info.update({"device": cpu_name(), "threads": torch.get_num_threads(),
                                 "torch": torch.__version__})
    return benchmark
