"""How busy the machine was while the bench timed, and whether its figures can be trusted.

A step time measured while other processes compete for the cores is not the contender's speed,
and contention does not slow every contender alike (oneDNN's eager kernels suffer far more than
the fused ones on a shared 2-core machine), so a loaded run can flip a comparison. Every timed
step is therefore bracketed by two snapshots of

* this process's CPU time (all its threads, time.process_time),
* the whole machine's busy and stolen CPU time (/proc/stat, Linux only),

and each contender's steps add up to its CPU time over wall time per bench thread (near 1 when
its threads ran undisturbed, lower when they waited for a core) and the share of the machine's
CPU that *other* processes used while it was timed (busy time not ours). The 1-, 5- and 15-minute
load averages before and after the timed steps are recorded too. `assess` turns these into
warnings: other processes above 5% of the machine's CPU, steal above 2%, or the bench's threads
running under 80% of the wall time. The load average is a warning only where /proc/stat is
missing: it lags by a minute and counts the bench's own set-up (warm-up steps, torch.compile's
compilation), so on a 2-core machine it sits near the bench's thread count however idle the
machine otherwise is, while /proc/stat measures exactly the steps timed. `wait_for_quiet` can hold
the timing back until the machine is idle.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

# Thresholds of `assess`. Another process using more than 5% of the machine while a contender
# was timed, or a contender's threads running less than 80% of the wall time, make a run
# untrustworthy (on an idle machine both eager and fused run at 0.98-1.00 per thread: OpenMP's
# waits spin).
MAX_OTHERS_SHARE = 0.05
MAX_STEAL_SHARE = 0.02
MIN_UTILISATION = 0.8


@dataclass
class Snapshot:
    wall: float          # time.perf_counter()
    cpu: float           # this process's CPU seconds, all threads (time.process_time)
    busy: float | None   # the machine's busy CPU seconds, all cores (None without /proc/stat)
    steal: float | None  # CPU seconds the hypervisor gave to other guests


def _proc_stat() -> tuple[float, float] | tuple[None, None]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat's cpu line."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None, None
    if not fields or fields[0] != "cpu":
        return None, None
    ticks = [int(v) for v in fields[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal (guest time is inside user already)
    busy = ticks[0] + ticks[1] + ticks[2] + sum(ticks[5:7])
    steal = ticks[7] if len(ticks) > 7 else 0
    return busy / hz, steal / hz


def snapshot() -> Snapshot:
    busy, steal = _proc_stat()
    return Snapshot(time.perf_counter(), time.process_time(), busy, steal)


def loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def cores() -> int:
    return os.cpu_count() or 1


@dataclass
class Meter:
    """The CPU accounting of one contender's timed steps, summed over its steps."""

    threads: int
    wall_s: float = 0.0
    cpu_s: float = 0.0
    others_s: float | None = 0.0
    steal_s: float | None = 0.0

    def add(self, before: Snapshot, after: Snapshot) -> float:
        """Adds one step bracketed by two snapshots; returns its CPU milliseconds."""
        cpu = after.cpu - before.cpu
        self.wall_s += after.wall - before.wall
        self.cpu_s += cpu
        if before.busy is None or after.busy is None or self.others_s is None:
            self.others_s = self.steal_s = None
        else:
            self.others_s += max(0.0, (after.busy - before.busy) - cpu)
            self.steal_s += after.steal - before.steal
        return cpu * 1e3

    @property
    def utilisation(self) -> float:
        """CPU time / (wall time x bench threads): 1 when every thread ran all the time."""
        return self.cpu_s / (self.wall_s * self.threads) if self.wall_s > 0 else float("nan")

    def share(self, seconds: float | None) -> float | None:
        """`seconds` of CPU as a share of the machine's CPU over this contender's wall time."""
        if seconds is None or self.wall_s <= 0:
            return None
        return seconds / (self.wall_s * cores())

    def as_dict(self) -> dict:
        return {**asdict(self), "cpu_utilisation": self.utilisation,
                "others_cpu_share": self.share(self.others_s),
                "steal_share": self.share(self.steal_s)}


def assess(meters: dict[str, Meter], threads: int, load_before: list[float] | None) -> list[str]:
    """Why the figures of a run may not be trusted; empty when nothing says so."""
    warnings = []
    n = cores()
    measured = all(m.others_s is not None for m in meters.values())
    if not measured and load_before is not None and load_before[0] > n - threads + 0.5:
        warnings.append(
            f"the 1-minute load average was {load_before[0]:.2f} before timing, above the "
            f"{n} cores minus the bench's {threads} threads: other work was running")
    for name, m in meters.items():
        others, steal = m.share(m.others_s), m.share(m.steal_s)
        if others is not None and others > MAX_OTHERS_SHARE:
            warnings.append(f"{name}: other processes used {100 * others:.0f}% of the machine's "
                            "CPU while it was timed")
        if steal is not None and steal > MAX_STEAL_SHARE:
            warnings.append(f"{name}: the hypervisor took {100 * steal:.0f}% of the CPU (steal)")
        if m.utilisation < MIN_UTILISATION:
            warnings.append(f"{name}: its threads ran {100 * m.utilisation:.0f}% of the wall time "
                            f"(CPU time / wall / {threads} threads): they waited for cores")
    return warnings


def others_share(seconds: float = 2.0) -> float | None:
    """The share of the machine's CPU busy over the next `seconds` (this process idles while it
    measures, so it is other work); None without /proc/stat."""
    busy0, _ = _proc_stat()
    if busy0 is None:
        return None
    t0 = time.perf_counter()
    time.sleep(seconds)
    busy1, _ = _proc_stat()
    return (busy1 - busy0) / ((time.perf_counter() - t0) * cores())


def wait_for_quiet(max_wait_s: float, threshold: float = MAX_OTHERS_SHARE,
                   window_s: float = 2.0) -> tuple[bool, float | None]:
    """Waits until other processes use under `threshold` of the machine's CPU over a window,
    for at most `max_wait_s`; returns (quiet, the last share measured)."""
    deadline = time.perf_counter() + max_wait_s
    while True:
        share = others_share(window_s)
        if share is None or share < threshold:
            return share is not None, share
        if time.perf_counter() >= deadline:
            return False, share


def format_load(meters: dict[str, Meter], threads: int, load_before, load_after,
                warnings: list[str]) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    def avg(v):
        return "unknown" if v is None else " ".join(f"{x:.2f}" for x in v)

    lines = [f"machine load while timing ({cores()} cores, {threads} bench threads): load "
             f"average (1/5/15 min) {avg(load_before)} before, {avg(load_after)} after",
             f"  {'contender':<26}{'CPU/wall/thread':>16}{'others CPU':>12}{'steal':>8}"]
    for name, m in meters.items():
        lines.append(f"  {name:<26}{m.utilisation:>16.2f}{pct(m.share(m.others_s)):>12}"
                     f"{pct(m.share(m.steal_s)):>8}")
    if warnings:
        lines += [f"WARNING: {w}" for w in warnings]
        lines.append("WARNING: these timings are not trustworthy; rerun on an idle machine")
    else:
        lines.append("no sign of other load: the timings can be trusted")
    return "\n".join(lines)
