"""Pieces shared by the Triton stage kernels: the norm-on-load, per-channel moments, and the
host-side helpers (dtypes, launch sizes, the deterministic merge of per-program partials).

Statistics and gradient sums are two-level reductions: each program reduces its own tiles in
registers and writes one partial row, and the rows are merged afterwards in float64 by ordinary
torch reductions. No float atomics anywhere, so every result is the same from run to run.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _mode_probe():
    pass


# Whether this module's kernels were defined under Triton's interpreter (TRITON_INTERPRET=1 at
# import). Fixed for the life of the process: triton.jit decides it when a kernel is defined.
INTERPRET: bool = isinstance(_mode_probe, InterpretedFunction)

# triton.language's own jit functions (tl.cdiv, tl.sum, ...) were defined when triton was
# imported; kernels of the other mode cannot call them. Say so now rather than at first launch.
if INTERPRET != isinstance(tl.cdiv, InterpretedFunction):
    raise ImportError(
        "convmixer_kernels.triton: TRITON_INTERPRET changed between importing triton and "
        "importing convmixer_kernels' Triton kernels; set (or unset) it before triton is first "
        "imported in this process")

# ---------------------------------------------------------------------------------------------
# Device functions


@triton.jit
def load_channel_vector(ptr, cs, cmask, PRESENT: tl.constexpr, default, ACC: tl.constexpr):
    """A [BLOCK_C] slice of a per-channel vector, or `default` everywhere when it is absent."""
    if PRESENT:
        v = tl.load(ptr + cs, mask=cmask, other=default).to(ACC)
    else:
        v = tl.zeros(cs.shape, dtype=ACC) + default
    return v


@triton.jit
def first_row(v):
    """Row 0 of a [rows, channels] block, as a [channels] vector."""
    rows = tl.arange(0, v.shape[0])
    return tl.sum(tl.where((rows == 0)[:, None], v, 0.0), axis=0)


@triton.jit
def merge_tile_moments(run_n, run_mean, run_m2, v, valid, shift):
    """Folds the rows of `v` [BLOCK_P, BLOCK_C] where `valid` [BLOCK_P] into running per-channel
    (count, mean, M2) of v - shift, with Chan's parallel formula.

    `shift` is a sample of each channel's data, so the shifted values are of the order of the
    spread, not of the mean, and the tile's own mean and M2 (two passes over registers) lose
    nothing when |mean| >> std (docs/DESIGN.md §6). The host adds the shift back in float64.
    """
    keep = valid[:, None]
    d = v - shift[None, :]
    cnt = tl.sum(valid.to(v.dtype), axis=0)
    t_mean = tl.sum(tl.where(keep, d, 0.0), axis=0) / tl.maximum(cnt, 1.0)
    e = tl.where(keep, d - t_mean[None, :], 0.0)
    t_m2 = tl.sum(e * e, axis=0)
    n_new = run_n + cnt
    frac = cnt / tl.maximum(n_new, 1.0)
    delta = t_mean - run_mean
    return n_new, run_mean + delta * frac, run_m2 + t_m2 + delta * delta * run_n * frac


@triton.jit
def store_moments(part_ptr, row, stride, n, shift, mean, m2):
    """One partial row of the [4, rows, C] moments: (count, shift, mean - shift, M2)."""
    tl.store(part_ptr + row, n)
    tl.store(part_ptr + stride + row, shift)
    tl.store(part_ptr + 2 * stride + row, mean)
    tl.store(part_ptr + 3 * stride + row, m2)


# ---------------------------------------------------------------------------------------------
# Host helpers


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 activations, float32 otherwise (docs/OPS.md)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dtype_class(dtype: torch.dtype) -> int:
    """The bits of a storage dtype, which pick the kernels' configuration tables: 16 (bfloat16,
    float16: tensor-core dots), 32 (IEEE float32 dots on the FMA units), 64."""
    return {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32, torch.float64: 64}[dtype]


def tuned(kernel, table: dict, key: list, dtype_arg: str, interpret_config):
    """triton.autotune of `kernel` over the configurations of `table` ({dtype class: [Config]}),
    each start trying only those of the dtype class of its argument `dtype_arg`. The tables
    hold what compiles for sm_90a without spills and within an H200 block's shared memory
    (tools/triton_compile_check.py checks every entry), so a config that fits one dtype never
    runs another. Under the interpreter, `interpret_config` alone (it cannot autotune)."""
    if INTERPRET:
        return triton.autotune(configs=[interpret_config], key=key)(kernel)
    union = [cfg for cfgs in table.values() for cfg in cfgs]

    def by_dtype(configs, named_args, **kwargs):
        allowed = {id(cfg) for cfg in table[dtype_class(named_args[dtype_arg].dtype)]}
        return [cfg for cfg in configs if id(cfg) in allowed]

    return triton.autotune(configs=union, key=key,
                           prune_configs_by={"early_config_prune": by_dtype})(kernel)


def tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# SMs of the GPU that recorded launches are planned for (an H200), see recording().
PLAN_SMS = 132


def target_programs(device: torch.device) -> int:
    """How many programs keep a GPU busy: a few per SM, so that one program's barrier or
    reduction stalls are hidden by the others'."""
    if _RECORDING is not None:
        return 4 * PLAN_SMS
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def gpu_plan(t: torch.Tensor) -> bool:
    """Whether launches on `t` are planned for a GPU (tile sizes, grid sizes): on CUDA tensors,
    and on any tensor while recording; otherwise they are planned for the interpreter."""
    return t.device.type == "cuda" or _RECORDING is not None


# ---------------------------------------------------------------------------------------------
# Launches, and recording them instead
#
# Every kernel start goes through launch(). Under recording() nothing runs: each start is kept
# as a Launch (the raw jit function, its runtime arguments, its constexpr flags and the
# configurations the autotuner would try for it), on CPU tensors and with the planning of a
# GPU. tools/triton_compile_check.py compiles what the launchers record, and
# convmixer_kernels.triton.compile_plan counts what a model's training step would compile.


@dataclass
class Launch:
    name: str          # the kernel's function name
    fn: object         # the triton.JITFunction
    args: tuple        # runtime arguments, positional
    meta: dict         # constexpr flags the launcher passes
    configs: list      # triton.Config the autotuner would compile for this start
    key: tuple         # the autotuner's cache key (None for a pinned config)


_RECORDING: Optional[list] = None


@contextlib.contextmanager
def recording():
    """Within it, the launchers take CPU tensors, plan for an H200 and record their launches
    into the yielded list instead of starting kernels (their outputs are left unwritten)."""
    global _RECORDING
    if INTERPRET:
        raise RuntimeError("recording launches needs the compiled kernels: TRITON_INTERPRET "
                           "must be unset when triton is first imported")
    previous, _RECORDING = _RECORDING, []
    try:
        yield _RECORDING
    finally:
        _RECORDING = previous


def autotune_key(tuner, args: tuple, meta: dict) -> tuple:
    """The autotuner's cache key for a start, as triton.runtime.Autotuner.run forms it: the
    named arguments' values, then the dtype of every tensor argument."""
    named = {**dict(zip(tuner.arg_names, args)), **meta}
    key = [named[k] for k in tuner.keys if k in named]
    key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    return tuple(key)


_OPTIONS = ("num_warps", "num_stages", "maxnreg")


def _pinned(config: dict):
    return triton.Config({k: v for k, v in config.items() if k not in _OPTIONS},
                         num_warps=config.get("num_warps", 4),
                         num_stages=config.get("num_stages", 3),
                         maxnreg=config.get("maxnreg"))


def launch(kernel, grid: Callable[[dict], tuple], args: tuple, meta: dict,
           config: Optional[dict] = None) -> None:
    """Starts `kernel` on grid(meta). `kernel` is a triton.autotune'd kernel (its autotuner
    picks the configuration) or, with `config` (tile constexprs plus num_warps/num_stages), a
    raw jit kernel or an autotuned one's, with that configuration pinned."""
    tuner = kernel if isinstance(kernel, Autotuner) else None
    fn = tuner.fn if tuner is not None else kernel
    if _RECORDING is not None:
        if config is not None:
            configs, key = [_pinned(config)], None
        else:
            named = dict(zip(tuner.arg_names, args))
            configs = (tuner.early_config_prune(tuner.configs, named, **meta)
                       if tuner.early_config_prune else list(tuner.configs))
            key = autotune_key(tuner, args, meta)
        _RECORDING.append(Launch(fn.__name__, fn, tuple(args), dict(meta), configs, key))
        return
    if config is None:
        tuner[grid](*args, **meta)
    else:
        fn[grid(config)](*args, **meta, **config)


def merge_moments(part: torch.Tensor, out_dtype: torch.dtype):
    """(mean, biased var) per channel from partials [4, G, C] = (count, shift, shifted mean,
    M2), as store_moments writes them.

    All-at-once Chan merge in float64: mean_g = shift_g + shifted mean_g exactly, and
    M2 = Σ M2_g + Σ n_g (mean_g - mean)², a sum of non-negative terms (no cancellation);
    deterministic (no atomics).
    """
    cnt, shift, smean, m2_g = part.to(torch.float64).unbind(0)
    mean_g = shift + smean
    total = cnt.sum(0)
    mean = (cnt * mean_g).sum(0) / total
    m2 = m2_g.sum(0) + (cnt * (mean_g - mean).square()).sum(0)
    return mean.to(out_dtype), (m2 / total).to(out_dtype)


def reduce_partials(part: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Sum of per-program partial rows (dim 0) in float64, in a fixed order: deterministic."""
    return part.to(torch.float64).sum(0).to(out_dtype)


def check_runnable(op: str, *tensors) -> None:
    """The kernels run CUDA tensors; CPU tensors only under the interpreter."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cpu" and not INTERPRET and _RECORDING is None:
            raise RuntimeError(
                f"{op}: the Triton backend runs CPU tensors only under Triton's interpreter, and "
                "convmixer_kernels' Triton kernels were defined without it (TRITON_INTERPRET=1 "
                "must be set before triton is first imported); use CUDA tensors or another "
                "backend")
        if t.device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"{op}: the Triton backend cannot run tensors on {t.device}")


def present(t) -> bool:
    """An optional tensor that is given and non-empty (empty means "absent" in the schemas)."""
    return t is not None and t.numel() > 0


def stat_coefficients(op, grad_mean, grad_var, mean, count, c, device, acc):
    """[2, C] (const, lin) such that dO = grad_out + const + lin·o, from the statistics'
    gradients dO = grad_out + grad_mean/M + grad_var·2(o - mean)/M (docs/OPS.md); None when
    both are absent. Folding them per channel here leaves one FMA per element in the kernels."""
    has_gm, has_gv = present(grad_mean), present(grad_var)
    if not (has_gm or has_gv):
        return None
    for name, v in (("grad_mean", grad_mean), ("grad_var", grad_var), ("mean", mean)):
        if present(v) and (v.dim() != 1 or v.shape[0] != c or v.device != device):
            raise ValueError(f"{op}: {name} must be a [{c}] vector on {device}, got "
                             f"{tuple(v.shape)} on {v.device}")
    if has_gv and not present(mean):
        raise ValueError(f"{op}: grad_var needs the forward's mean")
    inv_m = 1.0 / max(count, 1)
    const = torch.zeros(c, dtype=acc, device=device)
    lin = torch.zeros(c, dtype=acc, device=device)
    if has_gm:
        const += grad_mean.to(acc) * inv_m
    if has_gv:
        lin = 2.0 * grad_var.to(acc) * inv_m
        const -= lin * mean.to(acc)
    return torch.stack([const, lin])
