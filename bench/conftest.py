"""Shared by the benchmark suites: the environment stamp of each row, and the ratios.

A benchmark group compares contenders of one configuration. After a run, every row's speed-up
over the group's best eager row and its torch.compile row (the other's median / this row's
median: above 1 is faster) is written into the JSON (extra_info.speedup_vs_eager,
speedup_vs_compile, and a top-level "ratios" table) and printed at the end of the session, with
a warning for each group whose rows were measured while other processes competed for the cores
(extra_info.load, see convmixer_kernels.benchmarking.load).
"""
from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from convmixer_kernels.benchmarking import load
from convmixer_kernels.benchmarking.cli import device_name


@pytest.fixture
def record_environment(benchmark):
    """Stamps each pytest-benchmark row with the device and versions it was measured on."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    benchmark.extra_info.update({"device": device_name(device), "threads": torch.get_num_threads(),
                                 "torch": torch.__version__})
    return benchmark


def _contender(row: dict) -> str:
    return row["extra_info"].get("contender", row["name"])


def ratios(rows: list[dict]) -> list[dict]:
    """Per group, each row's speed-up over the best eager row and the best compile row; rows are
    pytest-benchmark's JSON benchmarks ({"group", "name", "stats": {"median"}, "extra_info"})."""
    groups = defaultdict(list)
    for row in rows:
        groups[row["group"]].append(row)
    out = []
    for group, members in groups.items():
        def best(prefix):
            times = [r["stats"]["median"] for r in members if _contender(r).startswith(prefix)]
            return min(times) if times else None

        eager, compiled = best("eager"), best("compile")
        for r in members:
            median = r["stats"]["median"]
            out.append({"group": group, "contender": _contender(r), "median_s": median,
                        "speedup_vs_eager": eager / median if eager else None,
                        "speedup_vs_compile": compiled / median if compiled else None,
                        "load_warnings": _load_warnings(r)})
    return out


def _load_warnings(row: dict) -> list[str]:
    info = row["extra_info"]
    if "load" not in info:
        return []
    m = info["load"]
    meter = load.Meter(m["threads"], m["wall_s"], m["cpu_s"], m["others_s"], m["steal_s"])
    return load.assess({_contender(row): meter}, m["threads"], info.get("loadavg_before"))


def pytest_benchmark_update_json(config, benchmarks, output_json):
    table = ratios(output_json["benchmarks"])
    by_key = {(r["group"], r["contender"]): r for r in table}
    for row in output_json["benchmarks"]:
        r = by_key[(row["group"], _contender(row))]
        row["extra_info"]["speedup_vs_eager"] = r["speedup_vs_eager"]
        row["extra_info"]["speedup_vs_compile"] = r["speedup_vs_compile"]
    output_json["ratios"] = table


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    rows = [b.as_dict(include_data=False) for b in session.benchmarks if b.has_error is False]
    table = ratios(rows)
    if not table:
        return
    write = terminalreporter.write_line
    write("")
    write("speed-up over the group's best eager row (and torch.compile row): median / median, "
          "above 1 is faster")
    for group in dict.fromkeys(r["group"] for r in table):
        write(f"  {group}")
        for r in (r for r in table if r["group"] == group):
            vs_compile = ("" if r["speedup_vs_compile"] is None
                          else f", {r['speedup_vs_compile']:.2f}x vs compile")
            vs_eager = "-" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}x"
            write(f"    {r['contender']:<24}{r['median_s'] * 1e3:9.2f} ms  {vs_eager} vs eager"
                  f"{vs_compile}")
            for w in r["load_warnings"]:
                write(f"    WARNING (load): {w}")
