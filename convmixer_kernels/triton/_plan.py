"""What a model's step makes triton compile, counted without a GPU, and warming it up on one.

A compilation is what triton's JIT caches: one kernel for one set of constexprs (the launcher's
flags plus one autotuning configuration), num_warps/num_stages and one specialisation of its
runtime arguments (dtypes, and integers and pointers divisible by 16). compilations() keys
recorded launches (_common.recording) exactly as the JIT does, for an H200 target; the
autotuner compiles every configuration it keeps for a start (_common.Launch.configs) the first
time it sees that start's key.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton

from ._common import Launch, recording

# What the launchers plan for while recording: an H200, which the NVIDIA backend compiles for as
# sm_90a.
TARGET_ARCH = 90


@dataclass
class Compilation:
    kernel: str      # the kernel's function name
    config: object   # the triton.Config
    launch: Launch   # a start that requests it
    key: str         # triton's JIT cache key (kernel name + specialisation + options)


def _target():
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", TARGET_ARCH, 32)


def compilations(launches: Sequence[Launch]) -> list[Compilation]:
    """The distinct compilations `launches` request, in first-request order."""
    from triton.compiler import make_backend
    from triton.runtime.jit import compute_cache_key, create_function_from_signature
    backend = make_backend(_target())
    binders = {}
    seen: dict[str, Compilation] = {}
    for ln in launches:
        if ln.fn not in binders:
            binders[ln.fn] = create_function_from_signature(ln.fn.signature, ln.fn.params,
                                                            backend)
        for cfg in ln.configs:
            _, spec, options = binders[ln.fn](*ln.args, **ln.meta, **cfg.all_kwargs())
            key = ln.name + compute_cache_key({}, spec, options)
            if key not in seen:
                seen[key] = Compilation(ln.name, cfg, ln, key)
    return list(seen.values())


def _step(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype, train: bool) -> None:
    """One forward (and, training, backward) of `model` on `x`, under autocast to `dtype` when
    that is a low-precision type, as a training script runs it."""
    low = dtype in (torch.float16, torch.bfloat16)
    with torch.autocast(x.device.type, dtype=dtype, enabled=low):
        with torch.set_grad_enabled(train):
            out = model(x)
    if train:
        out.float().square().mean().backward()


def _input(model, input_shape, dtype, device):
    param = next(model.parameters())
    data_dtype = param.dtype if dtype in (torch.float16, torch.bfloat16) else dtype
    return torch.zeros(input_shape, dtype=data_dtype, device=device)


def compile_plan(model: torch.nn.Module, input_shape: Sequence[int],
                 dtype: torch.dtype = torch.float32, train: bool = True) -> list[Compilation]:
    """The compilations one step of `model` (a fused ConvMixer on backend "triton", or any
    module whose Triton ops run through these launchers) on an input of `input_shape` makes
    triton do on an H200: its launches recorded on a CPU copy of the model, nothing run."""
    cpu = copy.deepcopy(model).to("cpu")
    if dtype == torch.float64:
        cpu = cpu.double()
    cpu.train(train)
    with recording() as launches:
        _step(cpu, _input(cpu, input_shape, dtype, "cpu"), dtype, train)
    return compilations(launches)


def warmup(model: torch.nn.Module, input_shape: Sequence[int],
           dtype: Optional[torch.dtype] = None, train: Optional[bool] = None) -> int:
    """Compiles (and autotunes) every Triton kernel one step of `model` needs on its device, so
    that a timed run that follows compiles nothing. Runs one forward (and, when training, one
    backward) on zeros of `input_shape`, then puts back the parameters' gradients and the
    buffers (BatchNorm's running statistics) as they were. `dtype`: the stage dtype (default
    the parameters'; float16/bfloat16 run under autocast); `train`: default model.training.

    Returns how many kernels triton compiled for it (0 when everything was already cached).
    """
    param = next(model.parameters())
    dtype = dtype or param.dtype
    train = model.training if train is None else train
    was_training = model.training
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    grads = {n: (None if p.grad is None else p.grad.detach().clone())
             for n, p in model.named_parameters()}
    before = _compiled_count()
    try:
        model.train(train)
        _step(model, _input(model, input_shape, dtype, param.device), dtype, train)
        if param.device.type == "cuda":
            torch.cuda.synchronize(param.device)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
        for n, p in model.named_parameters():
            p.grad = grads[n]
    return _compiled_count() - before


def _compiled_count() -> int:
    """Kernels in the JIT caches of this package's kernels, over all devices."""
    from triton.runtime.autotuner import Autotuner
    from . import dw, pw
    total = 0
    for mod in (dw, pw):
        for obj in vars(mod).values():
            if isinstance(obj, Autotuner):
                for caches in getattr(obj.fn, "device_caches", {}).values():
                    total += len(caches[0])
    return total
