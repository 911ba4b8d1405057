"""The trainer on real dataset formats (written here, small), its data order and augmentation.

A CIFAR-10 python-batches folder and a folder of class images are generated in tmp_path; each
trains a tiny ConvMixer (dim 16, depth 1) for one short epoch through the command line. Bad data
must fail with an error that names the file and says what to do.
"""
import json
import os
import pickle

import numpy as np
import pytest
import torch

from PIL import Image

from convmixer_kernels.train.augment import Augment
from convmixer_kernels.train.cli import config_from_args, main
from convmixer_kernels.train.data import EpochBatches, load_cifar10, load_image_folder
from convmixer_kernels.train.loop import TrainConfig, build_model, train

TINY = ["--dim", "16", "--depth", "1", "--workers", "0", "--no-progress"]


def write_cifar(folder, per_batch=16, seed=0):
    """The python version of CIFAR-10, as the official archive has it (pickle protocol 2)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        labels = rng.integers(0, 10, per_batch).tolist()
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"{i}.png".encode() for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return folder


def write_image_folder(root, classes=("cat", "dog", "emu"), per_class=6, seed=0):
    """Images of assorted sizes, modes and formats, one folder per class."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = int(rng.integers(12, 40)), int(rng.integers(12, 40))
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            pixels[..., c % 3] = 200  # a class colour, so the task is learnable
            img = Image.fromarray(pixels)
            if i % 3 == 1:
                img.convert("L").save(root / name / f"{i}.png")
            elif i % 3 == 2:
                img.convert("RGBA").save(root / name / f"{i}.webp")
            else:
                img.save(root / name / f"{i}.jpg", quality=90)
    return root


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------

def test_cifar10_folder_trains_one_epoch(tmp_path):
    root = tmp_path / "cifar"
    write_cifar(root / "cifar-10-batches-py")  # the extracted archive's layout
    data = load_cifar10(root)
    assert data.train.images.shape == (80, 3, 32, 32) and data.train.images.dtype == torch.uint8
    assert data.val.images.shape == (16, 3, 32, 32) and data.num_classes == 10
    # Row-major 3072 = 3 planes of 32×32, as the CIFAR-10 page documents.
    with open(root / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert torch.equal(data.train.images[0, 1, 0, :], torch.from_numpy(raw[b"data"][0, 1024:1056]))

    out = tmp_path / "run"
    main(["--dataset", "cifar10", "--data", str(root), "--epochs", "1", "--batch-size", "16",
          "--out", str(out), *TINY, "--progress"])
    (record,) = metrics(out)
    assert record["epoch"] == 1 and record["step"] == 5  # 80 images, batches of 16
    assert 0 <= record["val_acc"] <= 1 and np.isfinite(record["val_loss"])
    assert record["images_per_s"] > 0
    assert (out / "checkpoint.pt").is_file()


def test_image_folder_train_val_split_trains(tmp_path):
    write_image_folder(tmp_path / "imgs" / "train")
    write_image_folder(tmp_path / "imgs" / "val", per_class=2, seed=1)
    data = load_image_folder(tmp_path / "imgs", image_size=16)
    assert data.num_classes == 3 and len(data.train) == 18 and len(data.val) == 6
    image, label = data.train[0]
    assert image.shape == (3, 18, 18) and image.dtype == torch.uint8  # 16 / 0.875 ≈ 18
    assert label == 0
    out = tmp_path / "run"
    main(["--dataset", "imagefolder", "--data", str(tmp_path / "imgs"), "--image-size", "16",
          "--patch-size", "4", "--kernel-size", "3", "--epochs", "1", "--batch-size", "6",
          "--out", str(out), *TINY[:4], "--workers", "1", "--no-progress"])
    (record,) = metrics(out)
    assert record["step"] == 3 and 0 <= record["val_acc"] <= 1


def test_image_folder_without_split_holds_out_a_fixed_share(tmp_path):
    write_image_folder(tmp_path, per_class=10)
    data = load_image_folder(tmp_path, image_size=16, val_fraction=0.2)
    assert len(data.train) == 24 and len(data.val) == 6
    train_paths = {p for p, _ in data.train.samples}
    assert not train_paths & {p for p, _ in data.val.samples}
    again = load_image_folder(tmp_path, image_size=16, val_fraction=0.2)
    assert again.val.samples == data.val.samples


def test_loss_falls_on_a_learnable_task(tmp_path):
    cfg = TrainConfig(dataset="synthetic", synthetic_size=384, image_size=16, dim=16, depth=1,
                      epochs=3, batch_size=32, workers=0, progress=False, reprob=0.0,
                      out=str(tmp_path))
    records = train(cfg)
    losses = [r["train_loss"] for r in records]
    assert losses[-1] < losses[0] - 0.3, losses
    assert records[-1]["val_acc"] > 0.5  # chance is 0.1


# ---------------------------------------------------------------------------------------------
# Bad data

def test_missing_cifar_says_where_to_put_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads.*cifar-10-python.tar.gz"):
        main(["--dataset", "cifar10", "--data", str(tmp_path), *TINY, "--out", str(tmp_path)])
    write_cifar(tmp_path)
    os.remove(tmp_path / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="missing data_batch_3"):
        load_cifar10(tmp_path)
    with pytest.raises(ValueError, match="needs --data"):
        main(["--dataset", "cifar10", *TINY, "--out", str(tmp_path)])


@pytest.mark.parametrize("content,match", [
    (b"\x00not a pickle at all", "not a readable CIFAR-10 python batch"),
    (pickle.dumps({b"labels": [1, 2]}, protocol=2), "no 'data'/'labels'"),
    (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),
     r"must be uint8 \[N, 3072\]"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}),
     r"labels must be in \[0, 10\)"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}),
     "1 labels for 2 images"),
    (pickle.dumps(os.system), "refusing to load it"),  # a pickle that would import code
])
def test_corrupt_cifar_batch_names_the_file(tmp_path, content, match):
    write_cifar(tmp_path)
    (tmp_path / "data_batch_2").write_bytes(content)
    with pytest.raises(ValueError, match=match) as info:
        load_cifar10(tmp_path)
    assert "data_batch_2" in str(info.value)


def test_corrupt_image_names_the_file(tmp_path):
    write_image_folder(tmp_path, per_class=2)
    bad = tmp_path / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 truncated jpeg")
    data = load_image_folder(tmp_path, image_size=16, val_fraction=0.0)
    index = next(i for i, (p, _) in enumerate(data.train.samples) if p == str(bad))
    with pytest.raises(ValueError, match=f"cannot decode image {bad}"):
        data.train[index]


def test_empty_or_missing_image_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "nope", image_size=16)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images found"):
        load_image_folder(tmp_path, image_size=16)


def test_val_class_missing_from_train(tmp_path):
    write_image_folder(tmp_path / "train", classes=("a", "b"), per_class=2)
    write_image_folder(tmp_path / "val", classes=("a", "zebra"), per_class=1)
    with pytest.raises(ValueError, match="'zebra' is not among the training classes"):
        load_image_folder(tmp_path, image_size=16)


# ---------------------------------------------------------------------------------------------
# Data order and augmentation

def test_batches_are_a_function_of_seed_and_epoch_and_independent_of_processes():
    def epoch(seed, ep, world):
        per_rank = []
        for rank in range(world):
            b = EpochBatches(100, 8 // world, seed=seed, rank=rank, world=world)
            b.set_epoch(ep)
            per_rank.append(list(b))
        return [sum((r[s] for r in per_rank), []) for s in range(len(per_rank[0]))]

    one = epoch(3, 1, 1)
    assert len(one) == 12 and all(len(b) == 8 for b in one)  # 100 // 8, the rest dropped
    assert len({i for b in one for i in b}) == 96
    assert epoch(3, 1, 2) == one == epoch(3, 1, 1)
    assert epoch(3, 2, 1) != one and epoch(4, 1, 1) != one

    ev = EpochBatches(10, 2, rank=1, world=3, train=False)
    assert list(ev) == [[2, 3], [8]]  # in order, every sample, the last batch split evenly


def test_augment_identity_and_flip_are_exact():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    aug = Augment(8, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4), scale=(1.0, 1.0), flip=False)
    expected = aug.eval(images)
    assert torch.allclose(aug.train(images, aug.sample(4, g)), expected, atol=1e-5)
    params = aug.sample(4, g)
    params["flip"] = torch.tensor([True, False, True, False])
    flipped = aug.train(images, params)
    assert torch.allclose(flipped[0], expected[0].flip(-1), atol=1e-5)
    assert torch.allclose(flipped[1], expected[1], atol=1e-5)
    assert flipped.is_contiguous(memory_format=torch.channels_last)


def test_augment_random_ops_stay_finite_and_vary():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    aug = Augment(12, (0.5,) * 3, (0.25,) * 3, scale=(0.5, 1.0), ratio=(0.75, 4 / 3),
                  randaugment=(2, 9), reprob=0.5)
    params = aug.sample(64, g)
    assert len(set(params["ops"].flatten().tolist())) == 13  # every op drawn at least once
    out = aug.train(images, params)
    assert out.shape == (64, 3, 12, 12) and torch.isfinite(out).all()
    again = aug.train(images, aug.sample(64, torch.Generator().manual_seed(0)))
    assert torch.equal(out, again)  # a function of the generator's seed


def test_cli_options():
    cfg = config_from_args(["--dataset", "cifar10", "--data", "d", "--no-fused",
                            "--randaugment", "2,9", "--amp", "fp16", "--no-sync-bn",
                            "--resume"])
    assert (cfg.fused, cfg.randaugment, cfg.amp, cfg.sync_bn, cfg.resume) == (
        False, (2, 9.0), "fp16", False, "auto")
    resolved = cfg.resolved()
    assert resolved.model == "convmixer_256_8" and resolved.batch_size == 512
    assert config_from_args([]).fused is None
    assert not config_from_args([]).grad_checkpointing
    ckpt = config_from_args(["--grad-checkpointing", "--depth", "2", "--dim", "8"]).resolved()
    assert build_model(ckpt, 10, torch.device("cpu")).grad_checkpointing
    with pytest.raises(SystemExit):
        config_from_args(["--randaugment", "lots"])
    with pytest.raises(SystemExit):
        config_from_args(["--model", "resnet50"])
