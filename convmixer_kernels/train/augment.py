"""Training augmentation on batched tensors, on the training device.

Random-resized crop and horizontal flip (and the geometric RandAugment ops) are one per-sample
affine map, applied with a single grid_sample; the photometric RandAugment ops and random
erasing are per-sample blends. Every random number is drawn up front, on the CPU, from a
generator the loop derives from (seed, epoch) for the *global* batch, and each process applies
its slice: the augmentation of a sample depends neither on the number of processes nor on the
device, and a resumed run redraws exactly the same values.

RandAugment here follows timm's "rand-mN-mM" conventions (magnitude 0–10, random sign, the same
op list minus equalize) but applies the geometric ops together with the crop, before the
photometric ones, instead of in the drawn order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

OPS = ("identity", "autocontrast", "brightness", "color", "contrast", "sharpness", "solarize",
       "posterize", "rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_GEOMETRIC = {"rotate", "shear_x", "shear_y", "translate_x", "translate_y"}


@dataclass
class Augment:
    image_size: int
    mean: tuple
    std: tuple
    scale: tuple = (0.75, 1.0)   # area fraction of the random-resized crop
    ratio: tuple = (1.0, 1.0)    # aspect ratio range of the crop
    flip: bool = True
    randaugment: Optional[tuple] = None  # (ops per image, magnitude in [0, 10])
    reprob: float = 0.0          # random-erasing probability

    def sample(self, n: int, g: torch.Generator) -> dict:
        """The random choices for `n` images (CPU tensors, first dimension n)."""
        def uniform(lo, hi, *shape):
            return lo + (hi - lo) * torch.rand(n, *shape, generator=g, dtype=torch.float64)

        area = uniform(*self.scale)
        aspect = torch.exp(uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
        w = torch.sqrt(area * aspect).clamp(max=1.0)  # half-extents in [-1, 1] coordinates
        h = torch.sqrt(area / aspect).clamp(max=1.0)
        p = {"w": w, "h": h, "cx": uniform(-1, 1) * (1 - w), "cy": uniform(-1, 1) * (1 - h)}
        flip = torch.rand(n, generator=g) < 0.5
        p["flip"] = flip if self.flip else torch.zeros_like(flip)
        if self.randaugment:
            k = int(self.randaugment[0])
            p["ops"] = torch.randint(0, len(OPS), (n, k), generator=g)
            p["signs"] = torch.randint(0, 2, (n, k), generator=g) * 2.0 - 1.0
        if self.reprob > 0:
            e_area = uniform(0.02, 1 / 3)
            e_aspect = torch.exp(uniform(math.log(0.3), math.log(1 / 0.3)))
            eh = torch.sqrt(e_area * e_aspect).clamp(max=1.0)
            ew = torch.sqrt(e_area / e_aspect).clamp(max=1.0)
            p.update(erase=torch.rand(n, generator=g) < self.reprob, eh=eh, ew=ew,
                     ey=uniform(0, 1) * (1 - eh), ex=uniform(0, 1) * (1 - ew),
                     fill=torch.randn(n, 3, generator=g))
        return p

    # -----------------------------------------------------------------------------------------

    def train(self, images: torch.Tensor, p: dict) -> torch.Tensor:
        """uint8 [B, 3, S, S] on the device -> normalised float [B, 3, size, size], NHWC."""
        n, dev = images.shape[0], images.device
        x = images.float().div_(255)
        ops = p.get("ops")
        mag = self.randaugment[1] / 10 if ops is not None else 0.0
        # Which ops this batch uses is known on the host: no device sync to skip the rest.
        used = set(OPS[i] for i in ops.unique().tolist()) if ops is not None else set()

        theta = torch.zeros(n, 3, 3, dtype=torch.float64)
        theta[:, 0, 0] = torch.where(p["flip"], -p["w"], p["w"])
        theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2], theta[:, 2, 2] = p["cx"], p["h"], p["cy"], 1
        for name in sorted(used & _GEOMETRIC):
            theta = theta @ _geometric(name, ops, p["signs"], mag)
        grid = F.affine_grid(theta[:, :2].to(dev, torch.float32), [n, 3, self.image_size,
                                                                   self.image_size],
                             align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

        for name in OPS:
            if name in used and name not in _GEOMETRIC and name != "identity":
                for r in range(ops.shape[1]):
                    chosen = ops[:, r] == OPS.index(name)
                    if chosen.any():
                        sel = chosen.to(dev).view(-1, 1, 1, 1)
                        level = (1 + 0.9 * mag * p["signs"][:, r]).to(dev, torch.float32)
                        x = torch.where(sel, _photometric(name, x, level.view(-1, 1, 1, 1), mag), x)

        x = self._normalize(x)
        if "erase" in p and p["erase"].any():
            x = _erase(x, p)
        return x.contiguous(memory_format=torch.channels_last)

    def eval(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, S, S] -> the centre `image_size` square (resized if S is smaller)."""
        s, size = images.shape[-1], self.image_size
        x = images.float().div_(255)
        if s > size:
            top = (s - size) // 2
            x = x[..., top:top + size, top:top + size]
        elif s < size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return self._normalize(x).contiguous(memory_format=torch.channels_last)

    def _normalize(self, x):
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def _geometric(name, ops, signs, mag):
    """Per-sample 3×3 maps (identity where the op was not drawn), output -> input coordinates."""
    n = ops.shape[0]
    m = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
    amount = (signs * (ops == OPS.index(name))).sum(1).to(torch.float64)  # ±1 per draw, or 0
    if name == "rotate":
        angle = amount * math.radians(30) * mag
        m[:, 0, 0], m[:, 0, 1] = torch.cos(angle), -torch.sin(angle)
        m[:, 1, 0], m[:, 1, 1] = torch.sin(angle), torch.cos(angle)
    elif name == "shear_x":
        m[:, 0, 1] = amount * 0.3 * mag
    elif name == "shear_y":
        m[:, 1, 0] = amount * 0.3 * mag
    elif name == "translate_x":
        m[:, 0, 2] = amount * 2 * 0.45 * mag  # 45% of the width; [-1, 1] spans 2
    elif name == "translate_y":
        m[:, 1, 2] = amount * 2 * 0.45 * mag
    return m


def _photometric(name, x, level, mag):
    """The op applied to the whole batch in [0, 1]; `level` is 1 ± 0.9·magnitude per image."""
    if name == "brightness":
        out = x * level
    elif name == "color":
        gray = (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        out = gray + level * (x - gray)
    elif name == "contrast":
        gray = (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        mean = gray.mean(dim=(2, 3), keepdim=True)
        out = mean + level * (x - mean)
    elif name == "sharpness":  # PIL's smoothing kernel
        k = x.new_tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13
        blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3),
                           groups=3)
        out = blurred + level * (x - blurred)
    elif name == "solarize":
        out = torch.where(x >= 1 - mag, 1 - x, x)
    elif name == "posterize":
        step = 2 ** (8 - max(1, 8 - int(4 * mag)))
        out = torch.floor(x * 255 / step) * step / 255
    elif name == "autocontrast":
        lo = x.amin(dim=(2, 3), keepdim=True)
        hi = x.amax(dim=(2, 3), keepdim=True)
        out = torch.where(hi > lo, (x - lo) / (hi - lo).clamp(min=1e-6), x)
    else:
        raise ValueError(f"unknown photometric op {name!r}")
    return out.clamp(0, 1)


def _erase(x, p):
    """Random erasing (timm's per-channel "rand" fill): a random box set to normal noise."""
    n, _, s, _ = x.shape
    dev = x.device
    coords = (torch.arange(s, device=dev, dtype=torch.float32) + 0.5) / s

    def span(start, extent):
        start = start.to(dev, torch.float32).view(-1, 1)
        return (coords >= start) & (coords < start + extent.to(dev, torch.float32).view(-1, 1))

    box = span(p["ey"], p["eh"])[:, :, None] & span(p["ex"], p["ew"])[:, None, :]
    box &= p["erase"].to(dev).view(-1, 1, 1)
    fill = p["fill"].to(dev, x.dtype).view(n, 3, 1, 1)
    return torch.where(box[:, None], fill, x)
