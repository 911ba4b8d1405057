"""timm's pretrained configurations for the ConvMixer models, so that ours carry them without timm.

`pretrained_cfg` is what timm's data pipeline reads (`timm.data.resolve_data_config`: input size,
interpolation, crop_pct, mean/std) and what its loaders use to find weights. A model that lacks
it gets timm's generic defaults (crop_pct 0.875 instead of ConvMixer's 0.96), so every model we
build carries the dict that timm 1.0 gives its own model of the same name (the values are
timm's, from timm/models/convmixer.py; python_tests/test_timm_interop.py compares them with the
real timm when it is installed). The CIFAR-10 model is ours: timm has no entry for it.
"""
from __future__ import annotations

from typing import Optional

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# The keys and values timm's PretrainedCfg.to_dict() keeps for ConvMixer (None-valued fields
# are dropped except pool_size/first_conv/classifier, which timm always keeps).
_FAMILY = dict(
    url="", custom_load=False, input_size=(3, 224, 224), fixed_input_size=False,
    interpolation="bicubic", crop_pct=0.96, crop_mode="center", mean=IMAGENET_DEFAULT_MEAN,
    std=IMAGENET_DEFAULT_STD, num_classes=1000, pool_size=None, first_conv="stem.0",
    classifier="head", license="mit")


def _hub(arch: str, tag: str = "in1k") -> dict:
    return dict(_FAMILY, hf_hub_id=f"timm/{arch}.{tag}", architecture=arch, tag=tag)


PRETRAINED_CFGS = {
    "convmixer_1536_20": _hub("convmixer_1536_20"),
    "convmixer_768_32": _hub("convmixer_768_32"),
    "convmixer_1024_20_ks9_p14": _hub("convmixer_1024_20_ks9_p14"),
    # the paper's CIFAR-10 recipe: 32×32 inputs, no resize crop, no published weights
    "convmixer_256_8": dict(_FAMILY, architecture="convmixer_256_8", input_size=(3, 32, 32),
                            crop_pct=1.0, mean=CIFAR10_MEAN, std=CIFAR10_STD, num_classes=10),
}


def pretrained_cfg(architecture: Optional[str] = None) -> dict:
    """A fresh copy of the configuration for `architecture` (None: the family's defaults)."""
    if architecture is None:
        return dict(_FAMILY)
    return dict(PRETRAINED_CFGS[architecture])
