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

from . import load
from .contenders import CKPT, COMPILED, setup


@dataclass
class Result:
    contender: str
    step_ms: float = float("nan")
    images_per_s: float = float("nan")
    speedup: float = float("nan")       # over the best eager contender (without checkpointing)
    speedup_vs_compile: float = float("nan")  # over the best torch.compile contender
    peak_mb: float = float("nan")       # see `memory_measure` in the JSON
    saved_mb: float = float("nan")      # activation bytes autograd saves for the backward
    roofline: float = float("nan")      # fused step floor / measured step time
    # the floor of the bytes this implementation moves (the CUDA ledger) / measured step time
    roofline_own: float = float("nan")
    step_times_ms: list = field(default_factory=list)
    step_cpu_ms: list = field(default_factory=list)  # this process's CPU time of each step
    load: dict = field(default_factory=dict)          # load.Meter.as_dict() of the timed steps
    error: str = ""

    @property
    def spread(self) -> float:
        """(max - min) / median of the step times."""
        t = self.step_times_ms
        return (max(t) - min(t)) / self.step_ms if t and self.step_ms > 0 else float("nan")

    def as_dict(self) -> dict:
        d = asdict(self)
        t = sorted(self.step_times_ms)
        if t:
            q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0]] * 3
            d.update(step_min_ms=t[0], step_max_ms=t[-1], step_iqr_ms=q[2] - q[0],
                     spread=self.spread)
        return d


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
          torch.device("cpu"), a["seed"], a["optimizer"], a["overrides"])
for _ in range(2):
    s.step()
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent across exec.
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
print(int(hwm.split()[1]) / 1024)  # KiB -> MiB
"""


def cpu_peak_rss_mb(contender, model_name, batch, image, dtype, seed, optimizer="sgd",
                    overrides=None) -> float:
    """Peak RSS of a fresh process that sets up `contender` and runs two training steps: the
    only way to give each contender its own peak on the CPU, where torch keeps no such stats.
    A plain subprocess, not multiprocessing: spawn would re-import the caller's __main__."""
    args = json.dumps({"contender": contender, "model": model_name, "batch": batch,
                       "image": image, "dtype": str(dtype).split(".")[-1], "seed": seed,
                       "optimizer": optimizer, "overrides": overrides or {}})
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


@dataclass
class Run:
    """The results of `run`, and how loaded the machine was while they were timed."""
    results: list
    threads: int
    load_before: list | None
    load_after: list | None
    meters: dict
    warnings: list

    @property
    def trustworthy(self) -> bool:
        return not self.warnings

    def load_dict(self) -> dict:
        return {"cores": load.cores(), "threads": self.threads,
                "loadavg_before": self.load_before, "loadavg_after": self.load_after,
                "per_contender": {c: m.as_dict() for c, m in self.meters.items()},
                "warnings": self.warnings, "trustworthy": self.trustworthy}

    def format_load(self) -> str:
        return load.format_load(self.meters, self.threads, self.load_before, self.load_after,
                                self.warnings)


def run(contenders, model_name, batch, image, dtype, device, steps, warmup, seed=0,
        progress=None, measure_memory=True, optimizer="sgd", overrides=None,
        wait_quiet_s: float = 0.0) -> Run:
    """Sets every contender up, then times them interleaved: timed round r runs one step of
    each contender in turn, so a slow spell of a shared machine lands on all of them. Each step
    is also charged its CPU time and the machine's load (convmixer_kernels.benchmarking.load)."""
    results = {c: Result(c) for c in contenders}
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    meters = {c: load.Meter(threads) for c in contenders}
    setups = {}
    for c in contenders:
        try:
            s = setup(c, model_name, batch, image, dtype, device, seed, optimizer, overrides)
            for _ in range(warmup):
                s.step()
                if progress:
                    progress.update()
            _sync(device)
            setups[c] = s
        except Exception as exc:  # a contender that cannot run is reported, not fatal
            results[c].error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    quiet = None
    if wait_quiet_s > 0 and device.type == "cpu":
        quiet = load.wait_for_quiet(wait_quiet_s)
    load_before = load.loadavg()
    for _ in range(steps):
        for c, s in list(setups.items()):
            try:
                _sync(device)
                before = load.snapshot()
                s.step()
                _sync(device)
                after = load.snapshot()
                results[c].step_times_ms.append((after.wall - before.wall) * 1e3)
                results[c].step_cpu_ms.append(meters[c].add(before, after))
            except Exception as exc:
                results[c].error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                del setups[c]
            if progress:
                progress.update()
    load_after = load.loadavg()
    timed = {c: m for c, m in meters.items() if not results[c].error}
    for c, s in setups.items():
        r = results[c]
        r.step_ms = statistics.median(r.step_times_ms)
        r.images_per_s = batch / (r.step_ms / 1e3)
        r.load = meters[c].as_dict()
        r.saved_mb = saved_activation_bytes(s.model, s.x, dtype) / 2**20
        if measure_memory:
            r.peak_mb = (cuda_step_peak_mb(s.step, device) if device.type == "cuda"
                         else cpu_peak_rss_mb(c, model_name, batch, image, dtype, seed,
                                              optimizer, overrides))
    ok = [r for r in results.values() if not r.error]
    best_eager = min((r.step_ms for r in ok
                      if r.contender.startswith("eager") and not r.contender.endswith(CKPT)),
                     default=None)
    best_compile = min((r.step_ms for r in ok if r.contender in COMPILED), default=None)
    for r in ok:
        if best_eager:
            r.speedup = best_eager / r.step_ms
        if best_compile:
            r.speedup_vs_compile = best_compile / r.step_ms
    warnings = load.assess(timed, threads, load_before) if device.type == "cpu" else []
    if quiet is not None and not quiet[0] and quiet[1] is not None:
        warnings.insert(0, f"waited {wait_quiet_s:.0f} s for an idle machine in vain: other "
                           f"processes still used {100 * quiet[1]:.0f}% of the CPU")
    return Run(list(results.values()), threads, load_before, load_after, timed, warnings)
