"""The fused ConvMixer ops (docs/OPS.md): functional, differentiable, torch.compile-ready."""
from .backend import BACKENDS, available_backends
from .block import mixer_block
from .batch_norm import PendingUpdates, apply_norm, bn_norm, folded_norm, uses_batch_stats
from .checks import FoldedNorm, Norm
from .dw_stage import dw_stage
from .pw_stage import pw_stage

__all__ = ["BACKENDS", "FoldedNorm", "Norm", "PendingUpdates", "apply_norm",
           "available_backends", "bn_norm", "dw_stage", "folded_norm", "mixer_block", "pw_stage",
           "uses_batch_stats"]
