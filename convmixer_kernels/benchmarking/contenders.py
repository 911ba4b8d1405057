"""The contenders of the training-throughput comparison: how each builds its model and step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import model as models
from ..ops import available_backends

EAGER = ("eager-nchw", "eager-channels-last")
COMPILED = ("compile", "compile-max-autotune")
# The fused CUDA model's whole training step captured once in a CUDA graph and replayed: what the
# kernels give without the host cost of their launches (GPU only).
GRAPHED = "fused-graph"
# "<contender>+ckpt": the same contender with model.set_grad_checkpointing(True)
CKPT = "+ckpt"


def base_contender(contender: str) -> str:
    return contender.removesuffix(CKPT)


def with_checkpointing(contenders: list[str]) -> list[str]:
    """Each eager and fused contender followed by its gradient-checkpointing twin (torch.compile
    contenders have none: the model would be compiled around the recompute)."""
    out = []
    for c in contenders:
        out.append(c)
        if (c not in COMPILED and c != GRAPHED and not c.endswith(CKPT)
                and f"{c}{CKPT}" not in contenders):
            out.append(f"{c}{CKPT}")
    return out


def fused_contenders(device: torch.device) -> list[str]:
    """One fused contender per backend of this build that runs tensors on `device`, and the
    CUDA backend's graphed step on a GPU."""
    fused = [f"fused-{b}" for b in available_backends()
             if b == device.type or (b == "triton" and device.type == "cuda")]
    return fused + ([GRAPHED] if "fused-cuda" in fused else [])


def all_contenders(device: torch.device) -> list[str]:
    return [*EAGER, *COMPILED, *fused_contenders(device)]


def default_contenders(device: torch.device) -> list[str]:
    # Inductor needs a minute or more per model on a small CPU; the default CPU run stays short.
    if device.type == "cpu":
        return [*EAGER, *fused_contenders(device)]
    return all_contenders(device)


def build_model(contender: str, model_name: str, seed: int, device: torch.device,
                **overrides) -> torch.nn.Module:
    """The contender's model, initialised identically for every contender (same seed);
    `overrides` change the paper model's arguments (dim, depth, kernel_size, ...)."""
    torch.manual_seed(seed)
    name = base_contender(contender)
    if name == GRAPHED:
        name = "fused-cuda"
    fused = name.startswith("fused")
    backend = name.split("-", 1)[1] if fused else "auto"
    model = getattr(models, model_name)(fused=fused, backend=backend, **overrides).to(device)
    model.set_grad_checkpointing(contender.endswith(CKPT))
    if contender != "eager-nchw":
        model = model.to(memory_format=torch.channels_last)
    return model


def synthetic_batch(batch: int, image: int, classes: int, seed: int, device: torch.device,
                    channels_last: bool):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, image, image, generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)
    x = x.to(device)
    return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), y.to(device)


OPTIMIZERS = ("sgd", "adamw")


def make_optimizer(name: str, params, capturable: bool = False) -> torch.optim.Optimizer:
    """`capturable`: AdamW keeps its step count on the GPU, so a CUDA graph can hold its step
    (SGD has no host state to begin with)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, capturable=capturable)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
              dtype: torch.dtype = torch.float32, compile_mode: str | None = None,
              optimizer: str = "sgd") -> Callable[[], None]:
    """One training step of `model` on (x, y) (SGD with momentum, or AdamW), under autocast when
    `dtype` is not fp32."""
    opt = make_optimizer(optimizer, model.parameters())
    forward = torch.compile(model, mode=compile_mode) if compile_mode else model
    device_type = x.device.type
    autocast = dtype != torch.float32

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=dtype, enabled=autocast):
            loss = torch.nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()

    return step


def make_graph_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                    dtype: torch.dtype = torch.float32, optimizer: str = "sgd") -> Callable[[], None]:
    """make_step's training step captured in a CUDA graph: returns its replay. Warm-up steps on
    a side stream first (torch.cuda.graphs' recipe); the gradients live in the graph's pool and
    each replay's backward overwrites them, so the step needs no zero_grad."""
    opt = make_optimizer(optimizer, model.parameters(), capturable=True)
    autocast = dtype != torch.float32

    def body():
        # The autocast cache would hold casts made during capture across replays: off.
        with torch.autocast("cuda", dtype=dtype, enabled=autocast, cache_enabled=False):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        body()
    return graph.replay


@dataclass
class Setup:
    model: torch.nn.Module
    x: torch.Tensor
    step: Callable[[], None]


def setup(contender: str, model_name: str, batch: int, image: int, dtype: torch.dtype,
          device: torch.device, seed: int = 0, optimizer: str = "sgd",
          overrides: dict | None = None) -> Setup:
    overrides = overrides or {}
    if contender in COMPILED:
        model = build_model("eager-channels-last", model_name, seed, device, **overrides)
        mode = "max-autotune" if contender == "compile-max-autotune" else None
    else:
        model = build_model(contender, model_name, seed, device, **overrides)
        mode = None
    x, y = synthetic_batch(batch, image, model.num_classes, seed, device,
                           channels_last=base_contender(contender) != "eager-nchw")
    if base_contender(contender) == GRAPHED:
        if device.type != "cuda" or contender.endswith(CKPT):
            raise ValueError(f"{GRAPHED} runs on a CUDA device only, without checkpointing")
        return Setup(model, x, make_graph_step(model, x, y, dtype, optimizer=optimizer))
    return Setup(model, x, make_step(model, x, y, dtype, compile_mode=mode, optimizer=optimizer))
