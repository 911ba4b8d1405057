"""CPU: a ConvMixer-256/8 training step (batch 32, 32×32 images), fused against eager.

    pytest bench/test_cpu_training_step.py --benchmark-only --benchmark-json=bench/results/cpu.json

Contenders share one group, so pytest-benchmark's table compares them head to head; each row
also records the activation memory saved for the backward (extra_info.saved_mb).
"""
import pytest
import torch

from convmixer_kernels.benchmarking import EAGER, fused_contenders_for, saved_activation_bytes, setup

CPU = torch.device("cpu")


@pytest.mark.parametrize("contender", [*EAGER, *fused_contenders_for(CPU)])
def test_convmixer_256_8_training_step(record_environment, contender):
    benchmark = record_environment
    benchmark.group = "convmixer_256_8 train step, batch 32, 32x32, CPU"
    s = setup(contender, "convmixer_256_8", batch=32, image=32, dtype=torch.float32, device=CPU)
    s.step()  # warm-up: allocator, oneDNN primitive caches
    benchmark.extra_info["saved_mb"] = saved_activation_bytes(s.model, s.x) / 2**20
    benchmark.pedantic(s.step, rounds=5, iterations=1, warmup_rounds=1)
