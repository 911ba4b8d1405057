"""convmixer_kernels: fused kernels that make ConvMixer train fast, as PyTorch ops.

    from convmixer_kernels import ConvMixer
    model = ConvMixer(dim=768, depth=32, kernel_size=7, patch_size=7, act="relu", fused=True)
"""
from . import ops
from ._extension import built_with_cuda
from .model import (ConvMixer, convmixer_1024_20_ks9_p14, convmixer_1536_20, convmixer_256_8,
                    convmixer_768_32)
from .ops import available_backends

__version__ = "0.1.0"

__all__ = ["ConvMixer", "available_backends", "built_with_cuda", "convmixer_1024_20_ks9_p14",
           "convmixer_1536_20", "convmixer_256_8", "convmixer_768_32", "ops"]
