"""Training ConvMixer the way the paper did, on the fused kernels: a CLI and its parts.

    python -m convmixer_kernels.train --dataset cifar10 --data DIR --out runs/cifar
    torchrun --nproc-per-node 8 -m convmixer_kernels.train --dataset imagefolder --data DIR

From Python: ``train(TrainConfig(dataset="cifar10", data=DIR))``. Needs tqdm, and Pillow for
image folders, numpy for CIFAR-10 (none of which the rest of convmixer_kernels imports).
"""
from .loop import TrainConfig, Trainer, train

__all__ = ["TrainConfig", "Trainer", "train"]
