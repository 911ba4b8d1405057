#!/usr/bin/env python3
"""Ahead-of-time compile check of the Triton backend for an H200 (sm_90a), on a machine
without a GPU.

It runs the four Triton ops' launchers (convmixer_kernels.triton) over every combination of
their inputs that changes what they launch (dtype, kernel size, activation, which optional
inputs are given, statistics, kept pre-activation, the statistics' gradients) under
convmixer_kernels.triton's recording(): nothing starts, each kernel start is recorded with its
arguments, constexpr flags and the autotuning configurations it would try. Every distinct
compilation that yields (kernel × constexprs × configuration × argument specialisation, exactly
as triton's JIT keys its cache) is compiled with triton.compile for GPUTarget("cuda", 90, 32),
which the NVIDIA backend builds for sm_90a, and ptxas' -v report gives registers and spills;
shared memory is the compiled kernel's metadata.

It prints a table (per kernel and configuration: compilations, registers, spills, shared
memory) and exits non-zero when a compilation fails, a shipped configuration spills, or a
kernel needs more than the 232448 bytes of shared memory an H200 block can have.

By default it compiles a sample that still covers every kernel × configuration × dtype (the
combination of flags with the most inputs switched on, which uses the most registers) and
every value of every flag and kernel size at least once per kernel; --full compiles all.

    python tools/triton_compile_check.py            # the CI sample
    python tools/triton_compile_check.py --full     # everything, also odd (unaligned) sizes
    python tools/triton_compile_check.py --list     # what would compile, compile nothing
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("triton_compile_check: unset TRITON_INTERPRET (the check compiles the kernels)")
# ptxas -v's report reaches us only when ptxas runs: a fresh cache makes every compile run it,
# and the knob prints the report (captured per compilation below).
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-compile-check-")
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
# The default triton 3.9 keeps (and warns about): what a launch on the GPU compiles with.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from convmixer_kernels.activations import ACTIVATIONS, NAMES  # noqa: E402
from convmixer_kernels.triton import _common, dw, pw  # noqa: E402
from convmixer_kernels.triton._plan import _target, compilations  # noqa: E402

TARGET = _target()  # GPUTarget("cuda", 90, 32): the NVIDIA backend compiles it as sm_90a
SMEM_LIMIT = 232448                 # bytes of shared memory one H200 block may use (227 KiB)
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
KS = (3, 5, 7, 9, 15)


# ---------------------------------------------------------------------------------------------
# What the launchers start


@dataclass
class Job:
    kernel: str
    config: str
    dtype: str
    flags: dict
    fn: object = field(repr=False)
    args: tuple = field(repr=False)
    kwargs: dict = field(repr=False)
    key: str = ""


def _config_name(cfg) -> str:
    tiles = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    regs = f" r{cfg.maxnreg}" if cfg.maxnreg else ""
    return f"{tiles} w{cfg.num_warps} s{cfg.num_stages}{regs}"


def _t(shape, dtype):
    return torch.zeros(shape, dtype=dtype)


def _norm(c, dtype, given):
    acc = _common.acc_dtype(dtype)
    return (_t((c,), acc), _t((c,), acc), _t((c,), acc)) if given else (None, None, None)


def _dw_calls(dtype, shape):
    n, c, h, w = shape
    acc = _common.acc_dtype(dtype)
    x = _t(shape, dtype)
    for k, act, has_norm, has_bias in itertools.product(KS, NAMES, (False, True), (False, True)):
        weight = _t((c, 1, k, k), dtype)
        bias = _t((c,), dtype) if has_bias else None
        norm = _norm(c, dtype, has_norm)
        base = dict(k=k, act=act, norm=has_norm, bias=has_bias)
        # keep_pre_act / pre_act: where the models use them, training (batch statistics) with an
        # activation whose derivative needs the pre-activation (ops.dw_stage.keeps_pre_act).
        keeps = (False, True) if ACTIVATIONS[act].needs_pre_activation else (False,)
        for stats, keep in itertools.product((False, True), keeps):
            if keep and not stats:
                continue
            yield dict(base, op="dw_stage", stats=stats, keep_pre_act=keep), (
                lambda norm=norm, weight=weight, bias=bias, act=act, stats=stats, keep=keep:
                dw.dw_stage(x, *norm, weight, bias, act, stats, keep))
        for grads, pre in itertools.product(("none", "mean", "mean+var"), keeps):
            if pre and grads != "mean+var":
                continue
            gm = _t((c,), acc) if grads != "none" else None
            gv = _t((c,), acc) if grads == "mean+var" else None
            mean = _t((c,), acc) if gv is not None else None
            yield dict(base, op="dw_stage_backward", stat_grads=grads, pre_act=pre), (
                lambda norm=norm, weight=weight, bias=bias, act=act, gm=gm, gv=gv, mean=mean,
                pre=pre: dw.dw_stage_backward(x, gm, gv, x, *norm, weight, bias, mean, act,
                                              None, None, x if pre else None))


def _pw_calls(dtype, shape):
    n, cin, cout, h, w = shape
    acc = _common.acc_dtype(dtype)
    x = _t((n, cin, h, w), dtype)
    weight = _t((cout, cin, 1, 1), dtype)
    out_like = _t((n, cout, h, w), dtype)
    inputs = [(xn, r, rn) for xn in (False, True) for r in (False, True)
              for rn in (False, True) if r or not rn]
    for act, (has_xn, has_res, has_rn), has_bias in itertools.product(NAMES, inputs,
                                                                      (False, True)):
        xn, rn = _norm(cin, dtype, has_xn), _norm(cin, dtype, has_rn)
        res = _t((n, cin, h, w), dtype) if has_res else None
        bias = _t((cout,), dtype) if has_bias else None
        base = dict(act=act, x_norm=has_xn, res=has_res, res_norm=has_rn, bias=has_bias)
        # keep_u only in training (stats) and where there is a u to keep (a norm or residual).
        for stats, keep, keep_u in itertools.product((False, True), (False, True), (False, True)):
            if keep_u and not (stats and (has_xn or has_res)):
                continue
            yield dict(base, op="pw_stage", stats=stats, keep_pre_act=keep, keep_u=keep_u), (
                lambda xn=xn, res=res, rn=rn, bias=bias, act=act, stats=stats, keep=keep,
                keep_u=keep_u: pw.pw_stage(x, *xn, res, *rn, weight, bias, act, stats, keep,
                                           keep_u))
        for grads, kept in itertools.product(("none", "mean", "mean+var"), (False, True)):
            gm = _t((cout,), acc) if grads != "none" else None
            gv = _t((cout,), acc) if grads == "mean+var" else None
            mean = _t((cout,), acc) if gv is not None else None
            pre = out_like if kept else None
            yield dict(base, op="pw_stage_backward", stat_grads=grads, pre_act=kept), (
                lambda xn=xn, res=res, rn=rn, bias=bias, act=act, gm=gm, gv=gv, mean=mean,
                pre=pre: pw.pw_stage_backward(out_like, gm, gv, x, *xn, res, *rn, weight, bias,
                                              pre, mean, act))


# Sizes for the launchers' arguments: triton specialises integers (and pointers) on divisibility
# by 16, so the aligned sizes (every ConvMixer: C a multiple of 16) and odd ones compile apart.
SHAPES = {"aligned": ((2, 32, 16, 16), (2, 32, 32, 8, 8)),
          "odd": ((3, 40, 11, 13), (3, 40, 24, 7, 5))}


def defined_kernels():
    """The kernels the Triton modules' launchers start, as the modules list them."""
    return set(dw.LAUNCHED) | set(pw.LAUNCHED)


def collect(shapes=("aligned",)):
    """Every distinct compilation the launchers request, keyed as triton's JIT cache keys it."""
    jobs = {}
    for shape_name in shapes:
        dw_shape, pw_shape = SHAPES[shape_name]
        for dtype in DTYPES:
            calls = itertools.chain(_dw_calls(dtype, dw_shape), _pw_calls(dtype, pw_shape))
            for flags, call in calls:
                with _common.recording() as launches:
                    call()
                for comp in compilations(launches):
                    if comp.key not in jobs:
                        ln, cfg = comp.launch, comp.config
                        jobs[comp.key] = Job(
                            ln.name, _config_name(cfg), str(dtype)[6:],
                            dict(flags, shape=shape_name, **_meta_flags(ln.meta)), ln.fn,
                            ln.args, {**ln.meta, **cfg.all_kwargs()}, comp.key)
    return list(jobs.values())


def _meta_flags(meta):
    return {k: (str(v) if not isinstance(v, (bool, int)) else v) for k, v in meta.items()}


def _weight(job):
    """How much a compilation has switched on: its true flags, GELU (the heavier activation)
    and its kernel size (within a group: unrolled or not)."""
    on = sum(v is True for v in job.flags.values())
    return (on + (job.flags.get("act") == "gelu"), job.flags.get("k", 0))


def sample(jobs):
    """Every (kernel, configuration, dtype, code path) once, with the flags that switch most
    on; then every value of every launcher flag and of k at least once per kernel."""
    chosen = {}
    by_group = defaultdict(list)
    for j in jobs:
        # Separate code paths get their own heaviest member: the dw conv kernel's pass (EPI)
        # and unrolled taps (k <= 9) against the runtime tap loop.
        path = (j.flags.get("EPI"), j.flags.get("K", 0) > 9)
        by_group[(j.kernel, j.config, j.dtype, path)].append(j)
    for group in by_group.values():
        best = max(group, key=_weight)
        chosen[best.key] = best
    covered = {(j.kernel, k, str(v)) for j in chosen.values() for k, v in j.flags.items()}
    for j in jobs:
        feats = {(j.kernel, k, str(v)) for k, v in j.flags.items()}
        if not feats <= covered:
            chosen[j.key] = j
            covered |= feats
    return list(chosen.values())


# ---------------------------------------------------------------------------------------------
# Compiling


_PTXAS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_JOBS: list = []


def compile_one(index):
    job = _JOBS[index]
    backend = make_backend(TARGET)
    binder = create_function_from_signature(job.fn.signature, job.fn.params, backend)
    bound, spec, options = binder(*job.args, **job.kwargs)
    start = time.perf_counter()
    log = io.StringIO()
    try:
        options, signature, constexprs, attrs = job.fn._pack_args(backend, job.kwargs, bound,
                                                                  spec, options)
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(job.fn, signature, constexprs, attrs),
                                    target=TARGET, options=options.__dict__)
    except Exception as exc:  # a compile error is a result: reported, and fails the check
        return dict(index=index, error=f"{type(exc).__name__}: {str(exc)[-2000:]}",
                    seconds=time.perf_counter() - start)
    text = log.getvalue()
    spills = [(int(a), int(b)) for a, b in _PTXAS.findall(text)]
    regs = [int(r) for r in _REGS.findall(text)]
    return dict(index=index, seconds=time.perf_counter() - start,
                regs=max(regs) if regs else None,
                spill_stores=max((s for s, _ in spills), default=0),
                spill_loads=max((l for _, l in spills), default=0),
                smem=int(kernel.metadata.shared), arch=_sm_arch(),
                ptxas_seen=bool(regs))


def _sm_arch():
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    return sm_arch_from_capability(TARGET.arch)


def run_all(jobs, workers, verbose):
    global _JOBS
    _JOBS = jobs
    results = []

    def note(res):
        results.append(res)
        job = jobs[res["index"]]
        if verbose:
            print(f"[{len(results)}/{len(jobs)}] {job.kernel:<18} {job.config:<58} "
                  f"{job.dtype:<9} regs={res.get('regs')} spill={res.get('spill_stores')} "
                  f"smem={res.get('smem')} {res['seconds']:.1f}s "
                  f"{'; '.join(problems_of(job, res))}", flush=True)
        elif len(results) % 10 == 0 or len(results) == len(jobs):
            print(f"  compiled {len(results)}/{len(jobs)}", flush=True)

    if workers <= 1:
        for i in range(len(jobs)):
            note(compile_one(i))
    else:
        import multiprocessing
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            for res in pool.map(compile_one, range(len(jobs)), chunksize=1):
                note(res)
    return sorted(results, key=lambda r: r["index"])


# ---------------------------------------------------------------------------------------------
# Report


def problems_of(job, res):
    out = []
    if "error" in res:
        out.append("compile error: " + res["error"].strip().splitlines()[-1][:300])
        return out
    if not res["ptxas_seen"]:
        out.append("no ptxas report (registers and spills unknown)")
    if res["spill_stores"] or res["spill_loads"]:
        out.append(f"spills {res['spill_stores']} B stores / {res['spill_loads']} B loads")
    if res["smem"] > SMEM_LIMIT:
        out.append(f"shared memory {res['smem']} B > {SMEM_LIMIT} B")
    return out


def report(jobs, results, out=sys.stdout):
    rows = defaultdict(list)
    for job, res in zip(jobs, results):
        rows[(job.kernel, job.config)].append((job, res))
    print(f"\n{'kernel':<18} {'configuration':<58} {'n':>4} {'dtypes':<22} {'regs':>8} "
          f"{'spill B':>8} {'smem B':>7} {'bad':>4}", file=out)
    totals = defaultdict(lambda: [0, 0, 0, 0])  # compilations, errors, spilling, over smem
    for (kernel, config), items in sorted(rows.items()):
        ok = [r for _, r in items if "error" not in r]
        regs = [r["regs"] for r in ok if r["regs"] is not None]
        spill = max((r["spill_stores"] for r in ok), default=0)
        smem = max((r["smem"] for r in ok), default=0)
        bad = sum(bool(problems_of(j, r)) for j, r in items)
        dtypes = ",".join(sorted({j.dtype for j, _ in items}))
        rr = f"{min(regs)}-{max(regs)}" if regs else "?"
        print(f"{kernel:<18} {config:<58} {len(items):>4} {dtypes:<22} {rr:>8} {spill:>8} "
              f"{smem:>7} {bad:>4}", file=out)
        t = totals[kernel]
        t[0] += len(items)
        t[1] += sum("error" in r for _, r in items)
        t[2] += sum(1 for r in ok if r["spill_stores"] or r["spill_loads"])
        t[3] += sum(1 for r in ok if r["smem"] > SMEM_LIMIT)
    print(f"\n{'kernel':<18} {'compiled':>8} {'errors':>7} {'spilling':>9} {'over smem':>10}",
          file=out)
    grand = [0, 0, 0, 0]
    for kernel, t in sorted(totals.items()):
        print(f"{kernel:<18} {t[0]:>8} {t[1]:>7} {t[2]:>9} {t[3]:>10}", file=out)
        grand = [a + b for a, b in zip(grand, t)]
    print(f"{'total':<18} {grand[0]:>8} {grand[1]:>7} {grand[2]:>9} {grand[3]:>10}", file=out)
    return grand


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true",
                    help="compile every distinct compilation, aligned and odd sizes (long)")
    ap.add_argument("--list", action="store_true", help="list the compilations, compile none")
    ap.add_argument("--kernel", action="append", help="only these kernels (repeatable)")
    ap.add_argument("--dtype", action="append", help="only these dtypes, e.g. float64")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="write every compilation's result here")
    ap.add_argument("--verbose", action="store_true", help="one line per compilation")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    jobs = collect(("aligned", "odd") if args.full else ("aligned",))
    total = len(jobs)
    unreached = defined_kernels() - {j.kernel for j in jobs}
    if unreached:
        print(f"FAIL kernels no launcher path of the check reaches: {sorted(unreached)}")
        return 1
    if not args.full:
        jobs = sample(jobs)
    if args.kernel:
        jobs = [j for j in jobs if j.kernel in args.kernel]
    if args.dtype:
        jobs = [j for j in jobs if j.dtype in args.dtype]
    jobs.sort(key=lambda j: (j.kernel, j.config, j.dtype, j.key))
    print(f"triton {triton.__version__}, torch {torch.__version__}, target {TARGET}: "
          f"{total} distinct compilations requested by the launchers, compiling {len(jobs)}"
          f"{' (all)' if args.full else ' (sample: every kernel x config x dtype)'} "
          f"[collected in {time.perf_counter() - t0:.1f} s]", flush=True)
    if args.list:
        for j in jobs:
            print(f"{j.kernel:<18} {j.config:<58} {j.dtype:<9} {j.flags}")
        return 0
    t1 = time.perf_counter()
    results = run_all(jobs, max(1, args.jobs), args.verbose)
    failures = [(job, probs) for job, res in zip(jobs, results)
                if (probs := problems_of(job, res))]
    report(jobs, results)
    print(f"\ncompiled {len(jobs)} in {time.perf_counter() - t1:.0f} s with {args.jobs} "
          f"worker(s); arch {results[0].get('arch') if results else '?'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(kernel=j.kernel, config=j.config, dtype=j.dtype, flags=j.flags,
                            **{k: v for k, v in r.items() if k != "index"})
                       for j, r in zip(jobs, results)], f, indent=1)
    for job, probs in failures[:40]:
        print(f"FAIL {job.kernel} [{job.config}] {job.dtype} {job.flags}: {'; '.join(probs)}")
    if failures:
        print(f"{len(failures)} of {len(jobs)} compilations failed the check")
        return 1
    print(f"all {len(jobs)} compilations: compiled, no spills, shared memory <= {SMEM_LIMIT} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
