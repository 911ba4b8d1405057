"""Fused and eager ConvMixer trained side by side: do the loss curves agree?

Both start from the same weights and see the same batches of a synthetic task that can be
learnt (each class adds its own fixed pattern to noise), so any gap between the curves beyond
float rounding would be a bug in the fused path, not luck.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..model import ConvMixer


@dataclass
class Curves:
    steps: int
    eager: list
    fused: list
    smoothed_gap: float   # largest |difference| of the two curves' moving averages
    noise: float          # the eager curve's own step-to-step spread over the same window
    agree: bool

    def as_dict(self) -> dict:
        return asdict(self)


def _task(classes: int, image: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randn(classes, 3, image, image, generator=gen)

    def batch(size: int):
        y = torch.randint(0, classes, (size,), generator=gen)
        x = 0.5 * torch.randn(size, 3, image, image, generator=gen) + patterns[y]
        return x, y

    return batch


def _moving_average(values, window: int):
    t = torch.tensor(values, dtype=torch.float64)
    if len(values) < window:
        return t
    return t.unfold(0, window, 1).mean(1)


def train_side_by_side(steps: int = 300, batch: int = 32, image: int = 16, dim: int = 64,
                       depth: int = 2, classes: int = 10, seed: int = 0, backend: str = "auto",
                       device: str = "cpu", window: int = 20, progress=None) -> Curves:
    torch.manual_seed(seed)
    cfg = dict(dim=dim, depth=depth, kernel_size=5, patch_size=2, num_classes=classes)
    eager = ConvMixer(**cfg).to(device)
    fused = ConvMixer(**cfg, fused=True, backend=backend).to(device)
    fused.load_state_dict(eager.state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (eager, fused)]
    next_batch = _task(classes, image, seed)
    losses = ([], [])
    for _ in range(steps):
        x, y = next_batch(batch)
        x, y = x.to(device), y.to(device)
        for model, opt, log in zip((eager, fused), opts, losses):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            log.append(loss.item())
        if progress:
            progress.update()
    e, f = (_moving_average(v, window) for v in losses)
    gap = (e - f).abs().max().item()
    eager_t = torch.tensor(losses[0], dtype=torch.float64)
    noise = (eager_t[window:] - _moving_average(losses[0], window)[:-1]).abs().mean().item() \
        if steps > window else float("inf")
    return Curves(steps, losses[0], losses[1], gap, noise, gap <= noise)
