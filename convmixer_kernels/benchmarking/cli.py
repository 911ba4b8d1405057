"""`python -m convmixer_kernels.bench`: fused ConvMixer against eager PyTorch and torch.compile.

Trains the chosen ConvMixer on synthetic images (fixed seed) with every contender and prints
one row each: median step time over timed steps after warm-up (device-synchronised), images/s,
speed-up over the best eager contender, peak memory, activation memory saved for the backward,
and the fraction of the roofline floor achieved (convmixer_kernels.benchmarking.roofline).

    python -m convmixer_kernels.bench                          # CPU: ConvMixer-256/8, batch 32
    python -m convmixer_kernels.bench --model convmixer_768_32 --dtype bf16 --out results/
    python -m convmixer_kernels.bench --dim 64 --depth 4 --batch-size 64 --optimizer adamw
    python -m convmixer_kernels.bench --convergence --out results/

Every timed step is also charged its CPU time and the machine's load (/proc/stat, load
averages; convmixer_kernels.benchmarking.load): the run ends with a load report, and warnings
when the figures cannot be trusted because other work was competing for the cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess

import torch

from . import roofline
from .. import model as models
from . import contenders as cont
from .convergence import train_side_by_side
from .plots import convergence_chart, throughput_chart
from .throughput import run

MODELS = ("convmixer_256_8", "convmixer_768_32", "convmixer_1536_20", "convmixer_1024_20_ks9_p14")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_name(device), "device_type": device.type,
            "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton_version,
            "python": platform.python_version(), "git_commit": git_commit()}


def _fmt(v: float, spec: str) -> str:
    if v == v:
        return format(v, spec)
    return "-".rjust(int(spec.split(".")[0] or 0))  # NaN -> "-", as wide as a number


def format_table(results) -> str:
    """One row per contender: the median step, the spread of its steps ((max - min) / median),
    throughput, speed-ups, memory and the fraction of the roofline floor."""
    compiled = any(r.speedup_vs_compile == r.speedup_vs_compile for r in results)
    own = any(r.roofline_own == r.roofline_own for r in results)
    head = (f"{'contender':<26}{'step ms':>9}{'spread':>8}{'images/s':>10}{'vs eager':>10}"
            + (f"{'vs compile':>11}" if compiled else "")
            + f"{'peak MB':>9}{'saved MB':>9}{'roofline':>9}"
            + (f"{'of own':>8}" if own else ""))
    rows = [head, "-" * len(head)]
    for r in results:
        if r.error:
            rows.append(f"{r.contender:<26}  failed: {r.error}")
            continue
        rows.append(f"{r.contender:<26}{_fmt(r.step_ms, '9.1f')}{_fmt(100 * r.spread, '7.1f')}%"
                    f"{_fmt(r.images_per_s, '10.1f')}{_fmt(r.speedup, '9.2f')}x"
                    + (f"{_fmt(r.speedup_vs_compile, '10.2f')}x" if compiled else "")
                    + f"{_fmt(r.peak_mb, '9.0f')}{_fmt(r.saved_mb, '9.0f')}"
                    f"{_fmt(100 * r.roofline, '8.1f')}%"
                    + (f"{_fmt(100 * r.roofline_own, '7.1f')}%" if own else ""))
    return "\n".join(rows)


def checkpointing_summary(results) -> list[dict]:
    """Each contender against its '+ckpt' twin: peak memory, saved bytes and step time."""
    by_name = {r.contender: r for r in results if not r.error}
    rows = []
    for name, twin in by_name.items():
        plain = by_name.get(cont.base_contender(name))
        if name.endswith(cont.CKPT) and plain is not None:
            rows.append({"contender": plain.contender,
                         "peak_mb": [plain.peak_mb, twin.peak_mb],
                         "saved_mb": [plain.saved_mb, twin.saved_mb],
                         "step_ms": [plain.step_ms, twin.step_ms]})
    return rows


def format_checkpointing(rows) -> str:
    lines = []
    for r in rows:
        (p0, p1), (s0, s1), (t0, t1) = r["peak_mb"], r["saved_mb"], r["step_ms"]
        change = "" if p0 != p0 or p1 != p1 else f" ({100 * (p1 / p0 - 1):+.0f}%)"
        lines.append(f"grad checkpointing, {r['contender']}: peak {_fmt(p0, '.0f')} -> "
                     f"{_fmt(p1, '.0f')} MB{change}, saved for backward {s0:.0f} -> "
                     f"{s1:.0f} MB, step {t1 / t0:.2f}x the time")
    return "\n".join(lines)


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, leave=False)
    except ImportError:
        return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m convmixer_kernels.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", choices=MODELS,
                   help="default: convmixer_256_8 on CPU, convmixer_768_32 on GPU")
    p.add_argument("--dim", type=int, help="override the model's width")
    p.add_argument("--depth", type=int, help="override the model's number of blocks")
    p.add_argument("--kernel-size", type=int, help="override the depthwise kernel size")
    p.add_argument("--patch-size", type=int, help="override the patch size")
    p.add_argument("--batch-size", type=int, help="default: 32 on CPU, 128 on GPU")
    p.add_argument("--image-size", type=int, help="default: 32 for convmixer_256_8, else 224")
    p.add_argument("--dtype", choices=DTYPES,
                   help="autocast dtype; default fp32 on CPU, bf16 on GPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 9 CPU, 20 GPU)")
    p.add_argument("--optimizer", choices=cont.OPTIMIZERS, default="sgd",
                   help="SGD with momentum (default) or AdamW")
    p.add_argument("--threads", type=int,
                   help="CPU threads (torch.set_num_threads); default: torch's, one per core")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before timing, wait up to SECONDS for other processes to use under 5%% "
                        "of the CPU (a warning if they never do)")
    p.add_argument("--warmup", type=int, default=None, help="default 2 CPU, 5 GPU")
    p.add_argument("--contenders", nargs="+",
                   help="any of: eager-nchw eager-channels-last compile compile-max-autotune "
                        "fused-<backend>, or 'all' (default: all but torch.compile on CPU)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="also run each eager and fused contender with gradient checkpointing "
                        "(as '<contender>+ckpt') and report the peak-memory drop")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probe")
    p.add_argument("--out", help="directory for results.json and throughput.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--convergence", action="store_true",
                   help="instead: train fused and eager side by side and compare loss curves")
    p.add_argument("--convergence-steps", type=int, default=300)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.model = args.model or ("convmixer_768_32" if gpu else "convmixer_256_8")
    args.batch_size = args.batch_size or (128 if gpu else 32)
    args.image_size = args.image_size or (32 if args.model == "convmixer_256_8" else 224)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.steps = args.steps or (20 if gpu else 9)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    known = cont.all_contenders(device)
    if not args.contenders:
        args.contenders = cont.default_contenders(device)
    elif args.contenders == ["all"]:
        args.contenders = known
    if args.grad_checkpointing:
        args.contenders = cont.with_checkpointing(args.contenders)
    unknown = [c for c in args.contenders if cont.base_contender(c) not in known
               or (c.endswith(cont.CKPT) and cont.base_contender(c) in cont.COMPILED)]
    if unknown:
        p.error(f"unknown or unavailable contenders {unknown}; on {device} choose from {known}")
    return args, device


def model_overrides(args) -> dict:
    """The architecture arguments given on the command line, on top of --model's."""
    return {k: getattr(args, k) for k in ("dim", "depth", "kernel_size", "patch_size")
            if getattr(args, k) is not None}


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def main_convergence(args, device) -> None:
    bar = _progress(args.convergence_steps, "convergence")
    curves = train_side_by_side(steps=args.convergence_steps, seed=args.seed, device=str(device),
                                progress=bar)
    if bar:
        bar.close()
    print(f"convergence over {curves.steps} steps: final loss eager {curves.eager[-1]:.4f}, "
          f"fused {curves.fused[-1]:.4f}; smoothed gap {curves.smoothed_gap:.4g} vs noise "
          f"{curves.noise:.4g}: {'agree' if curves.agree else 'DISAGREE'}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_json(os.path.join(args.out, "convergence.json"),
                   {"environment": environment(device), **curves.as_dict()})
        convergence_chart(curves, os.path.join(args.out, "convergence.png"))


def main(argv=None) -> None:
    args, device = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.convergence:
        return main_convergence(args, device)
    dtype = DTYPES[args.dtype]
    env = environment(device)
    overrides = model_overrides(args)
    bar = _progress(len(args.contenders) * (args.steps + args.warmup), "bench")
    timed = run(args.contenders, args.model, args.batch_size, args.image_size, dtype, device,
                args.steps, args.warmup, args.seed, progress=bar,
                measure_memory=not args.no_memory, optimizer=args.optimizer,
                overrides=overrides, wait_quiet_s=args.wait_quiet)
    results = timed.results
    if bar:
        bar.close()
    with torch.device("meta"):
        shape = getattr(models, args.model)(**overrides)
    cost = roofline.model_cost(shape, args.batch_size, args.image_size, dtype)
    ceilings = roofline.measure_ceilings(device, dtype)
    floor = roofline.floor_seconds(cost, ceilings)
    # The CUDA backend is also held against the bytes it moves today (its ledger): how far it is
    # from its own data flow's floor, apart from how far that data flow is from the ideal one.
    own_floor = roofline.floor_seconds(cost, ceilings, moved=cost.cuda_bytes)
    for r in results:
        if not r.error:
            r.roofline = floor / (r.step_ms / 1e3)
            if r.contender.startswith("fused-cuda"):
                r.roofline_own = own_floor / (r.step_ms / 1e3)
    arch = "".join(f", {k.replace('_size', '')} {v}" for k, v in overrides.items())
    title = (f"{args.model}{arch}, batch {args.batch_size}, {args.image_size}x{args.image_size}, "
             f"{args.dtype}, {args.optimizer} training step, {env['device']}, "
             f"{env['cpu_threads']} threads, torch {env['torch']}")
    print(title)
    print(f"median of {args.steps} interleaved steps per contender")
    print(format_table(results))
    ckpt = checkpointing_summary(results)
    if ckpt:
        print(format_checkpointing(ckpt))
    if any(r.roofline_own == r.roofline_own for r in results):
        print(f"'of own': against {own_floor * 1e3:.1f} ms, the floor of the bytes the CUDA "
              f"backend moves today (python -m convmixer_kernels.roofline --ledger)")
    print(f"roofline floor {floor * 1e3:.1f} ms (bandwidth {ceilings.bandwidth / 1e9:.0f} GB/s, "
          f"matmul {ceilings.matmul_rate / 1e12:.2f} TFLOP/s, "
          f"vector {ceilings.vector_rate / 1e12:.2f} "
          f"TFLOP/s measured here)")
    if device.type == "cpu":
        print(timed.format_load())
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        memory_measure = ("torch.cuda.max_memory_allocated over one step, above resident memory"
                          if device.type == "cuda" else
                          "peak RSS of a fresh process running two steps of the contender")
        write_json(os.path.join(args.out, "results.json"), {
            "config": {k: v for k, v in vars(args).items()}, "environment": env,
            "memory_measure": memory_measure, "ceilings": ceilings.as_dict(),
            "step_cost": cost.as_dict(), "floor_ms": floor * 1e3, "grad_checkpointing": ckpt,
            "load": timed.load_dict(), "results": [r.as_dict() for r in results]})
        if throughput_chart(results, title, os.path.join(args.out, "throughput.png")):
            print(f"wrote {args.out}/results.json and {args.out}/throughput.png")
        else:
            print(f"wrote {args.out}/results.json (install matplotlib for throughput.png)")
