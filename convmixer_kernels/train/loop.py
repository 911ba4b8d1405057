"""The training run: set-up, the epoch loop, evaluation, metrics and checkpoints.

One process, or one per GPU under torchrun (DistributedDataParallel, with BatchNorm statistics
synchronised across processes inside the fused path too). The run is a function of its
configuration: model initialisation of the seed, the data order and augmentation of
(seed, epoch), dropout of RNG states that the checkpoint carries; so a run interrupted at an
epoch boundary and resumed ends with the same parameters as one that never stopped.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .. import model as models
from ..ops.backend import resolve
from .augment import Augment
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .data import EpochBatches, TensorImages, derive_generator, load_dataset

__all__ = ["DATASET_DEFAULTS", "MODELS", "TrainConfig", "Trainer", "build_model", "train"]

MODELS = ("convmixer_256_8", "convmixer_768_32", "convmixer_1536_20",
          "convmixer_1024_20_ks9_p14")
# What "the paper's recipe" means per kind of data where the two differ: the CIFAR-10 model and
# crop (scale 0.75–1, square) for small images, ImageNet's for folders of photographs.
DATASET_DEFAULTS = {
    "cifar10": dict(model="convmixer_256_8", image_size=32, crop_scale=0.75, crop_ratio=(1.0, 1.0),
                    epochs=25, batch_size=512),
    "synthetic": dict(model="convmixer_256_8", image_size=32, crop_scale=0.75,
                      crop_ratio=(1.0, 1.0), epochs=5, batch_size=128),
    "imagefolder": dict(model="convmixer_1536_20", image_size=224, crop_scale=0.08,
                        crop_ratio=(3 / 4, 4 / 3), epochs=150, batch_size=64),
}
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
# Settings a resumed run must share with its checkpoint, or it would not continue the same run.
RESUME_KEYS = ("dataset", "model", "dim", "depth", "kernel_size", "patch_size", "act", "epochs",
               "lr", "weight_decay", "opt_eps", "pct_start", "seed", "image_size")


@dataclass
class TrainConfig:
    dataset: str = "synthetic"
    data: Optional[str] = None
    model: Optional[str] = None          # None: the dataset's default (DATASET_DEFAULTS)
    dim: Optional[int] = None            # architecture overrides of the chosen model
    depth: Optional[int] = None
    kernel_size: Optional[int] = None
    patch_size: Optional[int] = None
    act: Optional[str] = None
    drop_rate: float = 0.0
    fused: Optional[bool] = None         # None: fused when a backend runs on the device
    backend: str = "auto"
    sync_bn: bool = True                 # only acts with more than one process
    grad_checkpointing: bool = False     # recompute each block in the backward (less memory)
    epochs: Optional[int] = None
    batch_size: Optional[int] = None     # per process
    lr: float = 0.01                     # the one-cycle peak
    weight_decay: float = 0.01
    opt_eps: float = 1e-3
    pct_start: float = 0.3               # fraction of the steps spent warming up
    label_smoothing: float = 0.1
    clip_grad: float = 1.0               # max gradient norm; 0 disables clipping
    amp: Optional[str] = None            # bf16, fp16, off; None: bf16 on CUDA, off on CPU
    channels_last: bool = True
    image_size: Optional[int] = None
    crop_scale: Optional[float] = None
    flip: bool = True
    randaugment: Optional[tuple] = None  # (ops per image, magnitude 0–10)
    reprob: float = 0.25
    workers: int = 4
    out: str = "runs/convmixer"
    resume: Optional[str] = None
    seed: int = 0
    device: Optional[str] = None
    stop_after: Optional[int] = None     # end this run after so many epochs (resume later)
    progress: bool = True
    synthetic_size: int = 10000
    val_fraction: float = 0.1

    def resolved(self) -> "TrainConfig":
        """A copy with the dataset's defaults filled in."""
        if self.dataset not in DATASET_DEFAULTS:
            raise ValueError(f"unknown dataset {self.dataset!r}: choose one of "
                             f"{sorted(DATASET_DEFAULTS)}")
        defaults = DATASET_DEFAULTS[self.dataset]
        cfg = dataclasses.replace(self)
        for key in ("model", "image_size", "crop_scale", "epochs", "batch_size"):
            if getattr(cfg, key) is None:
                setattr(cfg, key, defaults[key])
        if cfg.model not in MODELS:
            raise ValueError(f"unknown model {cfg.model!r}: choose one of {MODELS}")
        if cfg.amp not in (None, "bf16", "fp16", "off"):
            raise ValueError(f"--amp must be bf16, fp16 or off, got {cfg.amp!r}")
        return cfg

    def record(self) -> dict:
        return {k: _plain(v) for k, v in dataclasses.asdict(self).items()}


# ---------------------------------------------------------------------------------------------
# Processes and devices

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: Optional[str]) -> Dist:
    """One process, or the process torchrun started (RANK, WORLD_SIZE, LOCAL_RANK set)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    wants_cuda = device is None and torch.cuda.is_available() or (device or "").startswith("cuda")
    if world == 1 and not dist.is_initialized():
        return Dist(device=torch.device(device or ("cuda" if wants_cuda else "cpu")))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if wants_cuda else torch.device("cpu")
    owns = not dist.is_initialized()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if owns:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), dev, owns)


def _all_sum(values: list, d: Dist) -> list:
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    if d.world > 1:
        dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------------------------------------
# Building blocks

def build_model(cfg: TrainConfig, num_classes: int, device: torch.device):
    overrides = {k: getattr(cfg, k) for k in ("dim", "depth", "kernel_size", "patch_size", "act")
                 if getattr(cfg, k) is not None}
    fused = cfg.fused
    if fused is None:
        fused = _has_backend(cfg.backend, device)
    elif fused:
        resolve(cfg.backend, device)  # fail now, with the reason, rather than at the first step
    model = getattr(models, cfg.model)(fused=fused, num_classes=num_classes,
                                       drop_rate=cfg.drop_rate, backend=cfg.backend, **overrides)
    model = model.to(device)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    if cfg.channels_last:
        # The fused stages read their weights in any layout and return contiguous gradients;
        # channels_last strides on their (size-1-dim) weights would only make DDP copy every
        # gradient between stride layouts. The eager stem convolution is what needs NHWC.
        (model.stem if fused else model).to(memory_format=torch.channels_last)
    return model


def _has_backend(backend: str, device: torch.device) -> bool:
    try:
        resolve(backend, device)
    except (RuntimeError, ValueError):
        return False
    return True


def build_optimizer(model, cfg: TrainConfig):
    # As timm does: no weight decay on biases and BatchNorm parameters (the 1-d tensors).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, eps=cfg.opt_eps)


def _amp_dtype(cfg: TrainConfig, device: torch.device):
    amp = cfg.amp or ("bf16" if device.type == "cuda" else "off")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


class _Loader:
    """Batches of uint8 images and labels for one process: in-memory data is indexed
    directly; files are decoded by a DataLoader's workers (which draw no random numbers)."""

    def __init__(self, dataset, batches: EpochBatches, workers: int, device: torch.device):
        self.dataset, self.batches = dataset, batches
        self.loader = None
        if not isinstance(dataset, TensorImages):
            self.loader = DataLoader(
                dataset, batch_sampler=batches, num_workers=workers,
                pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                # its own generator: the global RNG (dropout's) must not depend on the loader
                generator=torch.Generator())

    def __len__(self):
        return len(self.batches)

    def epoch(self, epoch: int):
        self.batches.set_epoch(epoch)
        if self.loader is not None:
            yield from self.loader
            return
        for indices in self.batches:
            yield self.dataset.batch(torch.tensor(indices))


# ---------------------------------------------------------------------------------------------
# The run

class Trainer:
    def __init__(self, cfg: TrainConfig, d: Dist):
        self.cfg = cfg = cfg.resolved()
        self.d = d
        self.out = Path(cfg.out)
        if d.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: the eager stem conv's pick
        if d.main:
            self.out.mkdir(parents=True, exist_ok=True)

        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        data = load_dataset(cfg.dataset, cfg.data, image_size=cfg.image_size,
                            val_fraction=cfg.val_fraction, synthetic_size=cfg.synthetic_size,
                            seed=cfg.seed)
        self.data = data
        self.model = build_model(cfg, data.num_classes, d.device)
        if d.world > 1 and cfg.sync_bn:
            self.model.sync_bn = True
        # Dropout differs between processes; the initial weights (drawn above) do not.
        torch.manual_seed(derive_generator(cfg.seed, "torch", d.rank).initial_seed())

        self.train_loader = _Loader(
            data.train, EpochBatches(len(data.train), cfg.batch_size, seed=cfg.seed,
                                     rank=d.rank, world=d.world), cfg.workers, d.device)
        self.val_loader = None if data.val is None or len(data.val) == 0 else _Loader(
            data.val, EpochBatches(len(data.val), cfg.batch_size, rank=d.rank, world=d.world,
                                   train=False), cfg.workers, d.device)
        ratio = DATASET_DEFAULTS[cfg.dataset]["crop_ratio"]
        self.augment = Augment(cfg.image_size, data.mean, data.std, scale=(cfg.crop_scale, 1.0),
                               ratio=ratio, flip=cfg.flip, randaugment=cfg.randaugment,
                               reprob=cfg.reprob)
        self.steps_per_epoch = len(self.train_loader)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * self.steps_per_epoch,
            pct_start=cfg.pct_start)
        self.amp_dtype = _amp_dtype(cfg, d.device)
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=self.amp_dtype == torch.float16)
        self.epoch = 0
        self.step = 0
        if cfg.resume is not None:
            self._resume(Path(cfg.resume) if cfg.resume != "auto" else self.out / CHECKPOINT)
        self.net = self.model
        if d.world > 1:
            ids = [d.device.index] if d.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    # -----------------------------------------------------------------------------------------

    def run(self) -> list[dict]:
        cfg, d = self.cfg, self.d
        if d.main:
            m = self.model
            arch = (f"ConvMixer-{m.num_features}/{len(m.blocks)} "
                    f"k{m.blocks[0][0].fn[0].kernel_size[0] if len(m.blocks) else '-'} "
                    f"p{m.stem[0].kernel_size[0]} {m.act}")
            amp = str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "off"
            self._log(f"{arch} ({'fused' if m.fused else 'eager'}, {d.world} process(es) on "
                      f"{d.device}, amp {amp}, sync BN {'on' if m.sync_bn else 'off'}): "
                      f"{len(self.data.train)} training images, {self.steps_per_epoch} "
                      f"steps/epoch of {cfg.batch_size}×{d.world}")
        last = cfg.epochs if cfg.stop_after is None else min(cfg.epochs,
                                                              self.epoch + cfg.stop_after)
        if self.epoch >= cfg.epochs and d.main:
            self._log(f"nothing to do: the checkpoint has finished all {cfg.epochs} epochs")
        records = []
        while self.epoch < last:
            record = {"epoch": self.epoch + 1, **self.train_epoch()}
            record.update(self.evaluate())
            self.epoch += 1
            record["step"] = self.step
            records.append(record)
            if d.main:
                with open(self.out / METRICS, "a") as f:
                    f.write(json.dumps(record) + "\n")
                self._log(_summary(record, cfg.epochs))
            self._save()
        return records

    def train_epoch(self) -> dict:
        cfg, d = self.cfg, self.d
        self.net.train()
        g = derive_generator(cfg.seed, "augment", self.epoch)
        sums = torch.zeros(3, dtype=torch.float64, device=d.device)  # loss, correct, images
        bar = _progress(self.steps_per_epoch, f"epoch {self.epoch + 1}/{cfg.epochs}",
                        cfg.progress and d.main)
        start = time.perf_counter()
        for i, (images, labels) in enumerate(self.train_loader.epoch(self.epoch)):
            params = self.augment.sample(cfg.batch_size * d.world, g)
            params = {k: v.tensor_split(d.world)[d.rank] for k, v in params.items()}
            x = self.augment.train(images.to(d.device, non_blocking=True), params)
            y = labels.to(d.device, non_blocking=True)
            with torch.autocast(d.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                logits = self.net(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if cfg.clip_grad > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.step += 1
            with torch.no_grad():
                sums += torch.stack([loss.detach().double() * y.shape[0],
                                     (logits.argmax(1) == y).sum().double(),
                                     torch.tensor(float(y.shape[0]), dtype=torch.float64,
                                                  device=d.device)])
            if bar is not None and (i % 10 == 0 or i + 1 == self.steps_per_epoch):
                loss_sum, correct, n = sums.tolist()  # a device sync, hence only now and then
                seen = n * d.world
                bar.set_postfix(loss=f"{loss_sum / n:.4f}", acc=f"{correct / n:.3f}",
                                img_s=f"{seen / (time.perf_counter() - start):.0f}",
                                refresh=False)
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - start
        loss_sum, correct, n = _all_sum(sums.tolist(), d)
        return {"train_loss": loss_sum / n, "train_acc": correct / n,
                "lr": self.scheduler.get_last_lr()[0], "images_per_s": n / elapsed,
                "epoch_time_s": elapsed}

    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.val_loader is None:
            return {}
        d = self.d
        model = self.model  # not the DDP wrapper: its forward would start collectives
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=d.device)
        for images, labels in self.val_loader.epoch(0):
            x = self.augment.eval(images.to(d.device, non_blocking=True))
            y = labels.to(d.device, non_blocking=True)
            with torch.autocast(d.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                logits = model(x).float()
            sums += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(),
                                 (logits.argmax(1) == y).sum().double(),
                                 torch.tensor(float(y.shape[0]), dtype=torch.float64,
                                              device=d.device)])
        model.train()
        loss_sum, correct, n = _all_sum(sums.tolist(), d)
        return {"val_loss": loss_sum / n, "val_acc": correct / n}

    # -----------------------------------------------------------------------------------------

    def _state(self) -> dict:
        rngs = [rng_state(self.d.device)]
        if self.d.world > 1:
            rngs = [None] * self.d.world
            dist.all_gather_object(rngs, rng_state(self.d.device))
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "step": self.step, "rng": rngs,
                "data": {"seed": self.cfg.seed, "next_epoch": self.epoch,
                         "global_batch": self.cfg.batch_size * self.d.world},
                "config": self.cfg.record()}

    def _save(self) -> None:
        state = self._state()  # every process takes part (its RNG state is gathered)
        if self.d.main:
            save_checkpoint(self.out / CHECKPOINT, state)
        if self.d.world > 1:
            dist.barrier()

    def _resume(self, path: Path) -> None:
        state = load_checkpoint(path)
        saved = state["config"]
        mismatched = [f"--{k.replace('_', '-')} {saved.get(k)!r} (now {getattr(self.cfg, k)!r})"
                      for k in RESUME_KEYS if saved.get(k) != _plain(getattr(self.cfg, k))]
        global_batch = self.cfg.batch_size * self.d.world
        if state["data"]["global_batch"] != global_batch:
            mismatched.append(f"batch size × processes {state['data']['global_batch']} "
                              f"(now {global_batch})")
        if mismatched:
            raise ValueError(f"{path} belongs to another run; resume with the settings it was "
                             f"saved with: {'; '.join(mismatched)}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = state["epoch"], state["step"]
        if len(state["rng"]) == self.d.world:
            set_rng_state(state["rng"][self.d.rank], self.d.device)
        elif self.d.main:
            self._log(f"resuming on {self.d.world} processes from a checkpoint of "
                      f"{len(state['rng'])}: data order and augmentation are unchanged, "
                      "dropout draws differ")
        if self.d.main:
            _truncate_metrics(self.out / METRICS, self.epoch)
            self._log(f"resumed from {path} after epoch {self.epoch} (step {self.step})")

    @staticmethod
    def _log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drops metric lines of epochs after the checkpoint: they are about to be redone."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["epoch"] <= epochs_done:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line torn by the interruption
            continue
    path.write_text("".join(line + "\n" for line in kept))


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=False)


def _summary(r: dict, epochs: int) -> str:
    val = (f", val loss {r['val_loss']:.4f} acc {r['val_acc']:.4f}" if "val_loss" in r else "")
    return (f"epoch {r['epoch']}/{epochs}: train loss {r['train_loss']:.4f} "
            f"acc {r['train_acc']:.4f}{val}, {r['images_per_s']:.0f} img/s, lr {r['lr']:.2e}")


def train(cfg: TrainConfig) -> list[dict]:
    """Runs (or resumes) training; returns this run's per-epoch metrics.

    Under torchrun (WORLD_SIZE > 1) it joins the process group, or uses one already set up.
    """
    d = setup_distributed(cfg.resolved().device)
    try:
        return Trainer(cfg, d).run()
    finally:
        if d.owns_group:
            dist.destroy_process_group()

