"""Summary tables of a bench/test_stages.py run, from its pytest-benchmark JSON.

    pytest bench/test_stages.py --benchmark-only --benchmark-json=stages.json
    python -m convmixer_kernels.benchmarking.stages_report stages.json [--out stages.md]

One Markdown table per group (stage, pass, shape), one row per contender:

* ms: the median time of a call;
* vs eager, vs compile, vs matmul: speed-up over the best eager layout (NCHW or
  channels_last, whichever is faster in that group), over torch.compile and over the bare GEMMs
  of the same shape (pw only), as the other's time / this row's time: above 1 is faster,
  "-" when the group has no such contender;
* GB/s: the stage's unavoidable bytes (extra_info.stage_cost,
  convmixer_kernels.benchmarking.roofline) over the time, so every contender of a group is
  measured against the same work;
* HBM floor, roofline: the fraction of the floor achieved, floor / time, where the HBM floor
  is bytes / measured bandwidth and the roofline floor is the larger of that and FLOPs / the
  measured FLOP rate of the units the stage runs on (extra_info.ceilings).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

from .roofline import Ceilings, StageCost, stage_floor_seconds

EAGER_PREFIX = "eager-"


def load(path: str) -> list[dict]:
    with open(path) as f:
        return json.load(f)["benchmarks"]


def _ratio(other: float | None, mine: float) -> float | None:
    return None if other is None else other / mine


def summarize(benchmarks: list[dict]) -> dict[str, list[dict]]:
    """Group name -> one dict per contender with the columns described in the module doc."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in benchmarks:
        groups[b["group"]].append(b)
    summary = {}
    for group, rows in groups.items():
        times = {r["extra_info"]["contender"]: r["stats"]["median"] for r in rows}
        eager = [t for c, t in times.items() if c.startswith(EAGER_PREFIX)]
        best_eager = min(eager) if eager else None
        out = []
        for r in rows:
            info, t = r["extra_info"], r["stats"]["median"]
            row = {"contender": info["contender"], "ms": t * 1e3,
                   "vs_eager": _ratio(best_eager, t), "vs_compile": _ratio(times.get("compile"), t),
                   "vs_matmul": _ratio(times.get("matmul"), t),
                   "gb_per_s": None, "hbm_floor": None, "roofline": None}
            if "stage_cost" in info:
                cost = StageCost(**info["stage_cost"])
                row["gb_per_s"] = cost.bytes / t / 1e9
                if "ceilings" in info:
                    ceil = Ceilings(**info["ceilings"])
                    row["hbm_floor"] = cost.bytes / ceil.bandwidth / t
                    row["roofline"] = stage_floor_seconds(cost, ceil) / t
            out.append(row)
        out.sort(key=lambda row: row["ms"])
        summary[group] = out
    return summary


def _cell(v: float | None, spec: str, suffix: str = "") -> str:
    return "-" if v is None else format(v, spec) + suffix


def _pct(v: float | None) -> str:
    return _cell(None if v is None else 100 * v, ".1f", "%")


def environment_line(benchmarks: list[dict]) -> str:
    """Where the run was measured, from the first row (every row records the same)."""
    info = benchmarks[0]["extra_info"] if benchmarks else {}
    keys = ("device", "dtype", "torch", "cuda", "triton", "git_commit")
    return ", ".join(f"{k} {info[k]}" for k in keys if info.get(k))


def format_markdown(summary: dict[str, list[dict]], header: str = "") -> str:
    lines = [header, ""] if header else []
    for group, rows in summary.items():
        lines += [f"### {group}", "",
                  "| contender | ms | vs eager | vs compile | vs matmul | GB/s | HBM floor | "
                  "roofline |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(
                f"| {r['contender']} | {r['ms']:.3f} | {_cell(r['vs_eager'], '.2f', 'x')} | "
                f"{_cell(r['vs_compile'], '.2f', 'x')} | {_cell(r['vs_matmul'], '.2f', 'x')} | "
                f"{_cell(r['gb_per_s'], '.1f')} | {_pct(r['hbm_floor'])} | {_pct(r['roofline'])} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m convmixer_kernels.benchmarking.stages_report",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", help="pytest-benchmark JSON of bench/test_stages.py")
    p.add_argument("--out", help="also write the tables to this file")
    args = p.parse_args(argv)
    benchmarks = load(args.json)
    text = format_markdown(summarize(benchmarks), environment_line(benchmarks))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
