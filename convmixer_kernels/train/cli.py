"""`python -m convmixer_kernels.train` / `convmixer-train`: the command line of the trainer."""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ..activations import NAMES as ACTIVATIONS
from ..ops.backend import BACKENDS
from .loop import DATASET_DEFAULTS, MODELS, TrainConfig, train

EPILOG = """\
examples:
  convmixer-train --dataset cifar10 --data ~/data/cifar10 --out runs/cifar
  torchrun --nproc-per-node 8 -m convmixer_kernels.train --dataset imagefolder \\
      --data /data/imagenet --model convmixer_1536_20 --batch-size 64 --epochs 150 \\
      --randaugment 2,9 --out runs/in1k
  convmixer-train ... --out runs/cifar --resume      # continue from runs/cifar/checkpoint.pt

--batch-size is per process; under torchrun the global batch is batch-size × processes and
BatchNorm statistics are synchronised across processes (--no-sync-bn to keep them local).
"""


def _randaugment(text: str):
    try:
        n, m = text.split(",")
        n, m = int(n), float(m)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N,M (ops per image, magnitude), got {text!r}")
    if n < 1 or not 0 <= m <= 10:
        raise argparse.ArgumentTypeError("RandAugment needs N >= 1 and a magnitude M in [0, 10]")
    return n, m


def _opt(group, defaults, flag: str, **kw) -> None:
    """group.add_argument(flag, **kw) defaulting to the TrainConfig field of the flag's name, with
    that default shown in the help."""
    kw["help"] = (kw.get("help", "") + " (default: %(default)s)").lstrip()
    group.add_argument(flag, default=getattr(defaults, flag[2:].replace("-", "_")), **kw)


def parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="convmixer-train", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train ConvMixer with the paper's recipe (AdamW, one-cycle LR, label "
                    "smoothing, gradient clipping, AMP, channels_last) on the fused kernels.")
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=sorted(DATASET_DEFAULTS), default=d.dataset,
                      help="cifar10: the CIFAR-10 python batches in --data; imagefolder: "
                           "--data/<class>/<image> or --data/{train,val}/<class>/<image>; "
                           "synthetic: generated, no files (default: %(default)s)")
    data.add_argument("--data", metavar="DIR", help="dataset folder (never downloaded)")
    _opt(data, d, "--workers", type=int, help="image-decoding processes (imagefolder)")
    data.add_argument("--image-size", type=int,
                      help="training resolution (default: 32 for cifar10/synthetic, 224 for "
                           "imagefolder)")
    _opt(data, d, "--val-fraction", type=float, help="imagefolder without val/: share held out")
    _opt(data, d, "--synthetic-size", type=int, help="synthetic training images")

    m = p.add_argument_group("model")
    m.add_argument("--model", choices=MODELS,
                   help="default: convmixer_256_8 for cifar10/synthetic, convmixer_1536_20 for "
                        "imagefolder")
    m.add_argument("--dim", type=int, help="override the model's width")
    m.add_argument("--depth", type=int, help="override the model's depth")
    m.add_argument("--kernel-size", type=int, help="override the depthwise kernel size")
    m.add_argument("--patch-size", type=int, help="override the patch size")
    m.add_argument("--act", choices=ACTIVATIONS, help="override the activation")
    _opt(m, d, "--drop-rate", type=float, help="dropout before the head")
    m.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                   help="run the fused kernels (default: when a backend runs on the device)")
    _opt(m, d, "--backend", choices=BACKENDS, help="kernel backend for --fused")
    m.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=d.sync_bn,
                   help="synchronise BatchNorm statistics across processes (default: on)")
    m.add_argument("--grad-checkpointing", action="store_true", default=d.grad_checkpointing,
                   help="recompute each block in the backward: less activation memory, same "
                        "results")

    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, help="default: 25 cifar10, 5 synthetic, 150 imagefolder")
    o.add_argument("--batch-size", type=int,
                   help="per process (default: 512 cifar10, 128 synthetic, 64 imagefolder)")
    _opt(o, d, "--lr", type=float, help="peak of the one-cycle schedule")
    _opt(o, d, "--weight-decay", type=float,
         help="AdamW decoupled weight decay, not on biases/BatchNorm")
    _opt(o, d, "--opt-eps", type=float, help="AdamW epsilon")
    _opt(o, d, "--pct-start", type=float, help="share of the steps spent raising the LR")
    _opt(o, d, "--label-smoothing", type=float)
    _opt(o, d, "--clip-grad", type=float, help="max gradient norm, 0 for none")
    o.add_argument("--amp", choices=("bf16", "fp16", "off"),
                   help="autocast dtype; fp16 uses a GradScaler (default: bf16 on CUDA, off on "
                        "CPU)")
    o.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   default=d.channels_last, help="NHWC memory format (default: on)")

    a = p.add_argument_group("augmentation (on tensors, on the device)")
    a.add_argument("--crop-scale", type=float,
                   help="smallest area share of the random-resized crop (default: 0.75 "
                        "cifar10/synthetic, 0.08 imagefolder)")
    a.add_argument("--flip", action=argparse.BooleanOptionalAction, default=d.flip,
                   help="random horizontal flip (default: on)")
    a.add_argument("--randaugment", type=_randaugment, metavar="N,M",
                   help="RandAugment: N ops per image at magnitude M (0-10), e.g. 2,9 "
                        "(default: off)")
    _opt(a, d, "--reprob", type=float, help="random-erasing probability")

    r = p.add_argument_group("run")
    _opt(r, d, "--out", metavar="DIR", help="checkpoint.pt and metrics.jsonl go here")
    r.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                   help="continue a run: from CHECKPOINT, or --out/checkpoint.pt if none given")
    r.add_argument("--stop-after", type=int, metavar="N",
                   help="stop after N epochs of this invocation (e.g. a job time limit); "
                        "continue with --resume")
    _opt(r, d, "--seed", type=int)
    r.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available; under "
                                    "torchrun each process takes cuda:LOCAL_RANK)")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d.progress,
                   help="a progress bar per epoch (default: on)")
    return p


def config_from_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    args = vars(parser().parse_args(argv))
    return TrainConfig(**args)


def main(argv: Optional[Sequence[str]] = None) -> None:
    train(config_from_args(argv))


if __name__ == "__main__":
    main()
