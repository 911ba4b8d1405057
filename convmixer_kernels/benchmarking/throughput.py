"""Timing and memory of training steps, contender against contender, in one run."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from .contenders import CKPT, setup


@dataclass
class Result:
    contender: str
    step_ms: float = float("nan")
    images_per_s: float = float("nan")
    speedup: float = float("nan")       # over the best eager contender (without checkpointing)
    peak_mb: float = float("nan")       # see `memory_measure` in the JSON
    saved_mb: float = float("nan")      # activation bytes autograd saves for the backward
    roofline: float = float("nan")      # fused step floor / measured step time
    step_times_ms: list = field(default_factory=list)
    error: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor, dtype=torch.float32) -> int:
    """Bytes of the distinct tensors autograd saves for the backward of one forward."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if t.device.type != "meta" and storage.nbytes() > 0:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            model(x)
    return sum(n for ptr, n in seen.items() if ptr not in params)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_RSS_PROBE = """
import json, sys, torch
from convmixer_kernels.benchmarking.contenders import setup
a = json.loads(sys.argv[1])
s = setup(a["contender"], a["model"], a["batch"], a["image"], getattr(torch, a["dtype"]),
          torch.device("cpu"), a["seed"])
for _ in range(2):
    s.step()
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent across exec.
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
print(int(hwm.split()[1]) / 1024)  # KiB -> MiB
"""


def cpu_peak_rss_mb(contender, model_name, batch, image, dtype, seed) -> float:
    """Peak RSS of a fresh process that sets up `contender` and runs two training steps: the
    only way to give each contender its own peak on the CPU, where torch keeps no such stats.
    A plain subprocess, not multiprocessing: spawn would re-import the caller's __main__."""
    args = json.dumps({"contender": contender, "model": model_name, "batch": batch,
                       "image": image, "dtype": str(dtype).split(".")[-1], "seed": seed})
    done = subprocess.run([sys.executable, "-c", _RSS_PROBE, args], capture_output=True,
                          text=True, timeout=900, cwd=_package_parent(),
                          env={**os.environ, "PYTHONPATH": _package_parent()})
    if done.returncode != 0:
        raise RuntimeError(f"memory probe failed: {done.stderr.strip().splitlines()[-1:]}")
    return float(done.stdout.strip().splitlines()[-1])


def _package_parent() -> str:
    """The probe must import this same convmixer_kernels, wherever it was imported from: it
    starts there, and finds it first on its path."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cuda_step_peak_mb(step, device: torch.device) -> float:
    """Peak memory one step allocates above what is resident before it."""
    _sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def run(contenders, model_name, batch, image, dtype, device, steps, warmup, seed=0,
        progress=None, measure_memory=True) -> list[Result]:
    """Sets every contender up, then times them interleaved: timed round r runs one step of
    each contender in turn, so a slow spell of a shared machine lands on all of them."""
    results = {c: Result(c) for c in contenders}
    setups = {}
    for c in contenders:
        try:
            s = setup(c, model_name, batch, image, dtype, device, seed)
            for _ in range(warmup):
                s.step()
                if progress:
                    progress.update()
            _sync(device)
            setups[c] = s
        except Exception as exc:  # a contender that cannot run is reported, not fatal
            results[c].error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    for _ in range(steps):
        for c, s in list(setups.items()):
            try:
                _sync(device)
                t0 = time.perf_counter()
                s.step()
                _sync(device)
                results[c].step_times_ms.append((time.perf_counter() - t0) * 1e3)
            except Exception as exc:
                results[c].error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                del setups[c]
            if progress:
                progress.update()
    for c, s in setups.items():
        r = results[c]
        r.step_ms = statistics.median(r.step_times_ms)
        r.images_per_s = batch / (r.step_ms / 1e3)
        r.saved_mb = saved_activation_bytes(s.model, s.x, dtype) / 2**20
        if measure_memory:
            r.peak_mb = (cuda_step_peak_mb(s.step, device) if device.type == "cuda"
                         else cpu_peak_rss_mb(c, model_name, batch, image, dtype, seed))
    ok = [r for r in results.values() if not r.error]
    best_eager = min((r.step_ms for r in ok
                      if r.contender.startswith("eager") and not r.contender.endswith(CKPT)),
                     default=None)
    for r in ok:
        if best_eager:
            r.speedup = best_eager / r.step_ms
    return list(results.values())
