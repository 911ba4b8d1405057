"""Checkpoints that lose nothing: model, optimizer, scheduler, GradScaler, progress and RNGs.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed
over the previous one (os.replace is atomic on POSIX and Windows), so an interruption at any
moment leaves either the old checkpoint or the new one, never a torn file. Everything in it is
tensors and plain Python values, so it loads with torch.load(weights_only=True): resuming never
unpickles arbitrary objects.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import torch

FORMAT = 1


def save_checkpoint(path, state: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory for this.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise RuntimeError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise RuntimeError(f"{path} is not a convmixer_kernels.train checkpoint (format "
                           f"{state.get('format') if isinstance(state, dict) else None!r}, "
                           f"expected {FORMAT})")
    return state


def rng_state(device: torch.device) -> dict:
    """Every random generator this process's training draws from (the data order and the
    augmentation come from generators derived from (seed, epoch), which need no saving)."""
    state = {"torch": torch.get_rng_state(), "python": _python_state(random.getstate())}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    try:
        import numpy as np
    except ImportError:
        return state
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": pos,
                      "has_gauss": has_gauss, "gauss": gauss}
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_python_state(state["python"], restore=True))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if "numpy" in state:
        import numpy as np
        s = state["numpy"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype("uint32"), s["pos"],
                             s["has_gauss"], s["gauss"]))


def _python_state(state, restore: bool = False):
    # random.getstate() is (version, tuple of 625 ints, gauss): stored as a tensor so that the
    # checkpoint stays loadable with weights_only=True.
    version, internal, gauss = state
    if restore:
        return version, tuple(int(v) for v in internal.tolist()), gauss
    return version, torch.tensor(internal, dtype=torch.int64), gauss
