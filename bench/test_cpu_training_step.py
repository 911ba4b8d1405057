"""CPU: a ConvMixer-256/8 training step (batch 32, 32×32 images), fused against eager.

    pytest bench/test_cpu_training_step.py --benchmark-only --benchmark-json=bench/results/cpu.json

Contenders share one group, so pytest-benchmark's table compares them head to head; each row
also records the activation memory saved for the backward (extra_info.saved_mb).
"""
import pytest

from convmixer_kernels.bench import (CONTENDERS, build, make_step, saved_activation_bytes,
                                     synthetic_batch)


@pytest.mark.parametrize("contender", CONTENDERS)
def test_convmixer_256_8_training_step(record_environment, contender):
    benchmark = record_environment
    benchmark.group = "convmixer_256_8 train step, batch 32, 32x32, CPU"
    model = build(contender, "convmixer_256_8", seed=0)
    x, y = synthetic_batch(32, 32, model.num_classes, seed=0,
                           channels_last=contender != "eager-nchw")
    step = make_step(model, x, y)
    step()  # warm-up: allocator, oneDNN primitive caches
    benchmark.extra_info["saved_mb"] = saved_activation_bytes(model, x) / 2**20
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
