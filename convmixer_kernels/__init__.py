"""convmixer_kernels: fused kernels that make ConvMixer train fast, as PyTorch ops.

    from convmixer_kernels import ConvMixer
    model = ConvMixer(dim=768, depth=32, kernel_size=7, patch_size=7, act="relu", fused=True)
"""
from . import ops
from ._extension import built_with_cuda
from .sync_batchnorm import SyncBatchNorm2d, convert_sync_batchnorm, revert_sync_batchnorm
from .interop import from_timm, fuse, install_timm_hook, register_timm_models
from .model import (ConvMixer, convmixer_1024_20_ks9_p14, convmixer_1536_20, convmixer_256_8,
                    convmixer_768_32)
from .ops import available_backends

__version__ = "0.1.0"

__all__ = ["ConvMixer", "SyncBatchNorm2d", "available_backends", "built_with_cuda",
           "convert_sync_batchnorm", "convmixer_1024_20_ks9_p14", "convmixer_1536_20",
           "convmixer_256_8", "convmixer_768_32", "from_timm", "fuse", "ops",
           "register_timm_models", "revert_sync_batchnorm"]

# timm.create_model("fused_convmixer_768_32") works once timm is imported, before or after us;
# timm itself is never imported here.
install_timm_hook()
