"""Datasets for the trainer: CIFAR-10 python batches, folders of class images, a synthetic task.

Every dataset gives uint8 images [3, S, S] (all of one size S) and integer labels. Nothing here
is random: the order of samples and the augmentation are functions of (seed, epoch) drawn in the
training loop (see EpochBatches), never in data-loading workers, so a resumed run sees exactly
the batches an uninterrupted one would, whatever --workers is. Nothing is ever downloaded.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils.data import Dataset

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
                    ".gif")
# Train/eval images are decoded at image_size / CROP_PCT and centre-cropped to image_size in
# evaluation (the usual 224 of 256); training crops at random from the same decoded square.
CROP_PCT = 0.875


class TensorImages(Dataset):
    """Images held in memory as one uint8 tensor [N, 3, S, S]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def batch(self, indices: torch.Tensor):
        return self.images[indices], self.labels[indices]


class ImageFiles(Dataset):
    """Image files decoded with Pillow: shorter side resized to `size`, centre square of `size`."""

    def __init__(self, samples: Sequence[tuple[str, int]], size: int):
        self.samples, self.size = list(samples), size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return decode_image(path, self.size), label


def decode_image(path: str, size: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at the smallest scale still >= size
            im = im.convert("RGB")
            w, h = im.size
            scale = size / min(w, h)
            im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                           Image.Resampling.BILINEAR)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
            data = im.tobytes()
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image {path}: {e}") from e
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)


@dataclass
class Data:
    train: Dataset
    val: Optional[Dataset]
    num_classes: int
    mean: tuple
    std: tuple
    image_size: int  # the side of the stored (decoded) images


# ---------------------------------------------------------------------------------------------
# CIFAR-10

class _CifarUnpickler(pickle.Unpickler):
    """Loads the numpy arrays and builtins a CIFAR batch holds, and refuses anything else.

    The batches are pickles; an arbitrary pickle can run code when loaded, so only the globals
    numpy needs to rebuild an array are allowed, resolved through numpy itself (its module path
    differs between the Python 2 era numpy that wrote the files and numpy 2).
    """

    def find_class(self, module, name):
        import numpy as np
        if (module, name) == ("_codecs", "encode"):  # how Python 3 writes bytes at protocol 2
            import codecs
            return codecs.encode
        if module.startswith("numpy"):
            if name == "_reconstruct":
                return np.ndarray.__reduce__(np.zeros(0))[0]
            if name == "_frombuffer":
                return np.zeros(1).__reduce_ex__(5)[0]
            if name in ("ndarray", "dtype"):
                return getattr(np, name)
        raise pickle.UnpicklingError(
            f"{module}.{name} is not something a CIFAR-10 batch contains; refusing to load it")


def _cifar_dir(root: Path) -> Path:
    nested = root / "cifar-10-batches-py"  # what extracting the official archive gives
    return nested if nested.is_dir() else root


def _read_cifar_batch(path: Path):
    import numpy as np
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError) as e:
        raise ValueError(f"{path} is not a readable CIFAR-10 python batch ({e}); re-extract it "
                         f"from {CIFAR10_URL}") from e
    if not isinstance(batch, dict):
        raise ValueError(f"{path} is not a CIFAR-10 python batch: it holds a "
                         f"{type(batch).__name__}, not a dict")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path} is not a CIFAR-10 python batch: no 'data'/'labels' entries "
                         f"(keys: {sorted(map(str, batch))})")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be uint8 [N, 3072], got {data.dtype} "
                         f"{list(data.shape)}")
    labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {labels.numel()} labels for {data.shape[0]} images")
    if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < 10):
        raise ValueError(f"{path}: labels must be in [0, 10), got [{int(labels.min())}, "
                         f"{int(labels.max())}]")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), labels


def load_cifar10(root) -> Data:
    root = Path(root)
    folder = _cifar_dir(root)
    missing = [n for n in (*CIFAR10_TRAIN, CIFAR10_TEST) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 not found in {root}: missing {', '.join(missing)}. This trainer never "
            f"downloads; fetch the python version ({CIFAR10_URL}), then "
            f"`tar xzf cifar-10-python.tar.gz -C {root}` (which creates "
            "cifar-10-batches-py/ with data_batch_1 … data_batch_5 and test_batch) and pass "
            f"--data {root}")
    parts = [_read_cifar_batch(folder / n) for n in CIFAR10_TRAIN]
    train = TensorImages(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    val = TensorImages(*_read_cifar_batch(folder / CIFAR10_TEST))
    return Data(train, val, 10, CIFAR10_MEAN, CIFAR10_STD, 32)


# ---------------------------------------------------------------------------------------------
# Folders of class images

def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _scan(root: Path, classes: Optional[list[str]] = None):
    """(classes, [(path, class index)]) for root/<class>/**/<image>, in sorted order."""
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if classes is None:
        classes = folders
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for entry in folders:
        if entry not in index:
            raise ValueError(f"{root / entry}: class {entry!r} is not among the training classes "
                             f"({len(classes)} in the train split)")
        for dirpath, dirnames, files in os.walk(root / entry, followlinks=True):
            dirnames.sort()
            samples += [(os.path.join(dirpath, f), index[entry]) for f in sorted(files)
                        if _is_image(f)]
    return classes, samples


def load_image_folder(root, image_size: int, val_fraction: float = 0.1) -> Data:
    """Images in root/train/<class>/ and root/val/<class>/, or root/<class>/ minus a held-out
    share for validation."""
    root = Path(root)
    layout = (f"expected {root}/<class>/<image> or {root}/train/<class>/<image> with "
              f"{root}/val/<class>/<image> (images: {', '.join(IMAGE_EXTENSIONS)})")
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; {layout}")
    size = round(image_size / CROP_PCT)
    if (root / "train").is_dir():
        classes, train = _scan(root / "train")
        val = []
        for name in ("val", "validation"):
            if (root / name).is_dir():
                val = _scan(root / name, classes)[1]
                break
    else:
        classes, samples = _scan(root)
        # A fixed hold-out, independent of --seed, so that runs with other seeds are comparable.
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0)).tolist()
        n_val = int(len(samples) * val_fraction)
        val = [samples[i] for i in sorted(order[:n_val])]
        train = [samples[i] for i in sorted(order[n_val:])]
    if not classes or not train:
        raise ValueError(f"no images found under {root}; {layout}")
    return Data(ImageFiles(train, size), ImageFiles(val, size) if val else None, len(classes),
                IMAGENET_MEAN, IMAGENET_STD, size)


# ---------------------------------------------------------------------------------------------
# Synthetic: a learnable task that needs no files

def make_synthetic(num_train: int, num_classes: int = 10, image_size: int = 32,
                   seed: int = 0) -> Data:
    """Each class is a smooth random colour pattern; a sample is its pattern plus noise.

    Learnable in a few steps (the loss must fall), yet not trivially: a random crop and flip
    change the pattern. Deterministic in `seed`; a fifth as many validation images.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, 3, 4, 4, generator=g)
    patterns = torch.nn.functional.interpolate(coarse, size=(image_size, image_size),
                                               mode="bilinear", align_corners=False)

    def split(n):
        labels = torch.randint(0, num_classes, (n,), generator=g)
        noise = torch.randn(n, 3, image_size, image_size, generator=g)
        images = (128 + 48 * patterns[labels] + 24 * noise).round().clamp(0, 255)
        return TensorImages(images.to(torch.uint8), labels)

    train = split(num_train)
    val = split(max(1, num_train // 5))
    return Data(train, val, num_classes, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), image_size)


def load_dataset(name: str, root=None, *, image_size: int, val_fraction: float = 0.1,
                 synthetic_size: int = 10000, seed: int = 0) -> Data:
    if name == "synthetic":
        return make_synthetic(synthetic_size, image_size=image_size, seed=seed)
    if root is None:
        raise ValueError(f"--dataset {name} needs --data DIR")
    if name == "cifar10":
        return load_cifar10(root)
    if name == "imagefolder":
        return load_image_folder(root, image_size, val_fraction)
    raise ValueError(f"unknown dataset {name!r}: choose cifar10, imagefolder or synthetic")


# ---------------------------------------------------------------------------------------------
# Which samples each step sees

class EpochBatches:
    """The batches of one epoch for one process, as a function of (seed, epoch) alone.

    Step s of an epoch takes global batch s (batch_size · world consecutive entries of a
    permutation drawn from (seed, epoch)); process r takes the r-th slice of it. So the sequence
    of global batches does not depend on the number of processes, and a run resumed at an epoch
    boundary sees the same batches as an uninterrupted one. Training drops the incomplete last
    batch (every process must run the same number of synchronising steps); evaluation keeps
    every sample, in order, and splits the last batch as evenly as it can.

    Iterating yields lists of indices (a DataLoader batch_sampler); `set_epoch` picks the epoch.
    """

    def __init__(self, size: int, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world: int = 1, train: bool = True):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world, self.train = rank, world, train
        self.epoch = 0
        self.global_batch = batch_size * world
        if train and size < self.global_batch:
            raise ValueError(f"{size} training samples cannot fill one batch of "
                             f"{batch_size} × {world} processes; lower --batch-size")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.train:
            return self.size // self.global_batch
        return -(-self.size // self.global_batch)

    def __iter__(self):
        if self.train:
            order = torch.randperm(self.size, generator=derive_generator(self.seed, "order",
                                                                         self.epoch))
        else:
            order = torch.arange(self.size)
        for step in range(len(self)):
            batch = order[step * self.global_batch:(step + 1) * self.global_batch]
            mine = batch.tensor_split(self.world)[self.rank].tolist()
            if mine:  # only evaluation's last batch can leave a process without samples
                yield mine


def derive_generator(seed: int, *stream) -> torch.Generator:
    """A CPU generator for one named stream of randomness, e.g. ("order", epoch)."""
    digest = hashlib.sha256(repr((seed, *stream)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
