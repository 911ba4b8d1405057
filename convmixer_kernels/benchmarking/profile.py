"""Where a training step's time goes: self CPU time per op, per step (torch.profiler).

    # fused-cpu, ConvMixer-256/8, batch 32
    python -m convmixer_kernels.benchmarking.profile
    python -m convmixer_kernels.benchmarking.profile --contender eager-channels-last
    python -m convmixer_kernels.benchmarking.profile --dim 64 --depth 4 --batch-size 64 \
        --optimizer adamw --dtype bf16
    # also as a Markdown table
    python -m convmixer_kernels.benchmarking.profile --out FILE

The configuration options are the bench's (python -m convmixer_kernels.bench --help). One table
row per op name: self CPU milliseconds per step (the op's own time, children excluded), share
of the profiled total, calls per step. Read the rows of the fused ops with two facts of the
profiler in mind:

* A fused op's forward kernel is not an event of its own: the autograd wrapper that
  torch.library.register_autograd generates, recorded as "GeneratedBackwardFor_<op>", calls it
  below autograd through a redispatch, which the profiler does not record, so the kernel's time
  is that wrapper's self time. The table names those rows "<op> (forward kernel)".
* The backward op (convmixer_kernels::*_backward) is recorded under its autograd node
  ("...Backward"), whose own self time is the glue around it.

Profiles are wall-clock self times: on a loaded machine every row grows, memory-bound ones most;
the report ends with the machine's load while profiling (convmixer_kernels.benchmarking.load).
"""
from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch

from . import load
from .cli import DTYPES, MODELS, environment
from .contenders import OPTIMIZERS, all_contenders, setup

_FORWARD = re.compile(r"^GeneratedBackwardFor_convmixer_kernels_(\w+?)_default$")


def op_label(name: str) -> str:
    """The row name of a profiler event: the fused ops' forward kernels by their op name."""
    m = _FORWARD.match(name)
    if m:
        return f"convmixer_kernels::{m.group(1)} (forward kernel)"
    return name


def profile_steps(step, steps: int) -> tuple[list[dict], float, load.Meter]:
    """Self CPU time per op label over `steps` calls of step(); (rows, total ms, meter)."""
    meter = load.Meter(torch.get_num_threads())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            before = load.snapshot()
            step()
            meter.add(before, load.snapshot())
    self_us, calls = defaultdict(float), defaultdict(int)
    for e in prof.key_averages():
        label = op_label(e.key)
        self_us[label] += e.self_cpu_time_total
        calls[label] += e.count
    total = sum(self_us.values())
    rows = [{"op": k, "self_ms_per_step": v / 1e3 / steps,
             "share": v / total if total else 0.0, "calls_per_step": calls[k] / steps}
            for k, v in sorted(self_us.items(), key=lambda kv: -kv[1])]
    return rows, total / 1e3 / steps, meter


def format_rows(rows: list[dict], limit: int, markdown: bool) -> str:
    shown = rows[:limit]
    rest = sum(r["self_ms_per_step"] for r in rows[limit:])
    if markdown:
        lines = ["| op | self CPU ms/step | share | calls/step |", "|---|---:|---:|---:|"]
        lines += [f"| `{r['op']}` | {r['self_ms_per_step']:.1f} | {100 * r['share']:.1f}% | "
                  f"{r['calls_per_step']:g} |" for r in shown]
        if rest:
            lines.append(f"| (the other {len(rows) - limit} ops) | {rest:.1f} | | |")
        return "\n".join(lines)
    lines = [f"{'op':<62}{'self ms/step':>13}{'share':>8}{'calls/step':>11}"]
    lines += [f"{r['op'][:61]:<62}{r['self_ms_per_step']:>13.1f}{100 * r['share']:>7.1f}%"
              f"{r['calls_per_step']:>11g}" for r in shown]
    if rest:
        lines.append(f"{'(the other %d ops)' % (len(rows) - limit):<62}{rest:>13.1f}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m convmixer_kernels.benchmarking.profile",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contender", default="fused-cpu",
                   help="eager-nchw, eager-channels-last, compile, fused-<backend>")
    p.add_argument("--model", choices=MODELS, default="convmixer_256_8")
    p.add_argument("--dim", type=int)
    p.add_argument("--depth", type=int)
    p.add_argument("--kernel-size", type=int)
    p.add_argument("--patch-size", type=int)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    p.add_argument("--threads", type=int)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--rows", type=int, default=25, help="ops shown (the rest summed)")
    p.add_argument("--out", help="also write the report as Markdown to this file")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    if args.contender not in all_contenders(device):
        raise SystemExit(f"unknown contender {args.contender!r}; choose from "
                         f"{all_contenders(device)}")
    overrides = {k: getattr(args, k) for k in ("dim", "depth", "kernel_size", "patch_size")
                 if getattr(args, k) is not None}
    s = setup(args.contender, args.model, args.batch_size, args.image_size, DTYPES[args.dtype],
              device, optimizer=args.optimizer, overrides=overrides)
    for _ in range(args.warmup):
        s.step()
    load_before = load.loadavg()
    rows, total, meter = profile_steps(s.step, args.steps)
    env = environment(device)
    arch = "".join(f", {k} {v}" for k, v in overrides.items())
    title = (f"{args.contender}: {args.model}{arch}, batch {args.batch_size}, "
             f"{args.image_size}x{args.image_size}, {args.dtype}, {args.optimizer} training "
             f"step, {env['cpu_threads']} threads, {env['device']}, torch {env['torch']}")
    warnings = load.assess({args.contender: meter}, meter.threads, load_before)
    load_line = load.format_load({args.contender: meter}, meter.threads, load_before,
                                 load.loadavg(), warnings)
    summary = (f"self CPU time per step, {args.steps} profiled steps: total {total:.1f} ms "
               f"(profiled wall {1e3 * meter.wall_s / args.steps:.1f} ms/step)")
    print(title)
    print(summary)
    print(format_rows(rows, args.rows, markdown=False))
    print(load_line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"{title}\n\n{summary}\n\n{format_rows(rows, args.rows, markdown=True)}\n\n"
                    "```\n" + load_line + "\n```\n")


if __name__ == "__main__":
    main()
