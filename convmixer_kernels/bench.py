"""Training-step comparison of fused ConvMixer against eager PyTorch.

    python -m convmixer_kernels.bench                # CPU: ConvMixer-256/8, batch 32, 32×32
    python -m convmixer_kernels.bench --help

Each contender trains the same model (same initial weights, synthetic images, fixed seed) with
SGD; the table reports the median step time over timed steps after warm-up, images/s, the
speed-up over the best eager contender, and the activation memory saved for the backward
(bytes of distinct tensors autograd keeps alive, which is what bounds the batch size).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from . import model as models

MODELS = ("convmixer_256_8", "convmixer_768_32", "convmixer_1536_20", "convmixer_1024_20_ks9_p14")
CONTENDERS = ("eager-nchw", "eager-channels-last", "fused")


@dataclass
class Result:
    contender: str
    step_ms: float
    images_per_s: float
    saved_mb: float
    speedup: float = 1.0


def build(contender: str, model_name: str, seed: int, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return getattr(models, model_name)(fused=contender == "fused", **overrides)


def synthetic_batch(batch: int, image: int, classes: int, seed: int, channels_last: bool):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, image, image, generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)
    return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), y


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One SGD training step of `model` on (x, y)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves for the backward of one forward."""
    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type != "meta" and t.untyped_storage().nbytes() > 0:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(n for ptr, n in seen.items() if ptr not in params)


def run(args) -> list[Result]:
    """Times every contender, interleaved: timed round r runs one step of each contender in
    turn, so a slow spell of a shared machine lands on all of them rather than on one."""
    setups = {}
    for contender in args.contenders:
        model = build(contender, args.model, args.seed)
        x, y = synthetic_batch(args.batch_size, args.image_size, model.num_classes, args.seed,
                               channels_last=contender != "eager-nchw")
        step = make_step(model, x, y)
        for _ in range(args.warmup):
            step()
        setups[contender] = (model, x, step)
    times = {c: [] for c in setups}
    for _ in range(args.steps):
        for contender, (_, _, step) in setups.items():
            t0 = time.perf_counter()
            step()
            times[contender].append(time.perf_counter() - t0)
    results = []
    for contender, (model, x, _) in setups.items():
        median = statistics.median(times[contender])
        saved = saved_activation_bytes(model, x)
        results.append(Result(contender, median * 1e3, args.batch_size / median, saved / 2**20))
    best_eager = min((r.step_ms for r in results if r.contender.startswith("eager")),
                     default=None)
    for r in results:
        r.speedup = best_eager / r.step_ms if best_eager else float("nan")
    return results


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    return {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "git_commit": git_commit()}


def format_table(results: list[Result]) -> str:
    rows = [f"{'contender':<22}{'step ms':>10}{'images/s':>11}{'vs best eager':>15}{'saved MB':>10}"]
    for r in results:
        rows.append(f"{r.contender:<22}{r.step_ms:>10.1f}{r.images_per_s:>11.1f}"
                    f"{r.speedup:>14.2f}x{r.saved_mb:>10.1f}")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m convmixer_kernels.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="convmixer_256_8")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument("--json", help="also write the results and environment to this file")
    args = p.parse_args(argv)
    results = run(args)
    env = environment()
    print(f"{args.model}, batch {args.batch_size}, {args.image_size}x{args.image_size}, "
          f"training step (SGD), {env['device']}, {env['threads']} threads, torch {env['torch']}")
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "environment": env,
                       "results": [asdict(r) for r in results]}, f, indent=2)


if __name__ == "__main__":
    main()
