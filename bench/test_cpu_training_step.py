"""CPU: a training step, fused against eager channels_last (and torch.compile), per configuration.

    pytest bench/test_cpu_training_step.py --benchmark-only --benchmark-json=bench/results/cpu.json
    CONVMIXER_BENCH_COMPILE=1 pytest bench/test_cpu_training_step.py --benchmark-only   # + compile

The configurations are issue 16's: ConvMixer-256/8 at batch 32 (SGD) and a small model (dim 64,
depth 4, k5, p2) at batch 64 (AdamW), on 32×32 images, in fp32 and under bf16 autocast. Each
(configuration, dtype) is one pytest-benchmark group, so its table compares the contenders head
to head, and bench/conftest.py states every row's speed-up over the group's eager and
torch.compile rows (and writes it into the JSON's extra_info). A benchmark, not a test: nothing
here asserts a time. Every row also records how loaded the machine was while it ran
(extra_info.load, convmixer_kernels.benchmarking.load), and the summary warns when that makes the
ratios untrustworthy. torch.compile is opt-in: Inductor needs minutes per configuration on a
small CPU.
"""
import os

import pytest
import torch

from convmixer_kernels.benchmarking import load, saved_activation_bytes, setup

CPU = torch.device("cpu")
# (id, paper model, architecture overrides, batch, image size, optimizer)
CONFIGS = [
    ("convmixer_256_8-b32-sgd", "convmixer_256_8", {}, 32, 32, "sgd"),
    ("dim64-depth4-k5-p2-b64-adamw", "convmixer_256_8", {"dim": 64, "depth": 4}, 64, 32, "adamw"),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONTENDERS = ["eager-channels-last", "fused-cpu"]
if os.environ.get("CONVMIXER_BENCH_COMPILE") == "1":
    CONTENDERS.append("compile")


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c[0])
def test_training_step(record_environment, config, dtype, contender):
    benchmark = record_environment
    name, model, overrides, batch, image, optimizer = config
    benchmark.group = f"train step {name}, {image}x{image}, {dtype}, CPU"
    s = setup(contender, model, batch, image, DTYPES[dtype], CPU, optimizer=optimizer,
              overrides=overrides)
    s.step()  # warm-up: allocator, oneDNN primitive caches, Inductor's compile
    meter = load.Meter(torch.get_num_threads())

    def step():
        before = load.snapshot()
        s.step()
        meter.add(before, load.snapshot())

    benchmark.extra_info.update({"contender": contender, "config": name, "dtype": dtype,
                                 "saved_mb": saved_activation_bytes(s.model, s.x, DTYPES[dtype]) / 2**20,
                                 "loadavg_before": load.loadavg()})
    benchmark.pedantic(step, rounds=9, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update({"load": meter.as_dict(), "loadavg_after": load.loadavg()})
