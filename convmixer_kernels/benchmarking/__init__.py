"""The training-step comparison behind `python -m convmixer_kernels.bench`: contenders, interleaved
timing, memory, the roofline floor, the convergence check and their plots."""
from .contenders import (COMPILED, EAGER, all_contenders, build_model, default_contenders,
                         make_step, setup, synthetic_batch)
from .contenders import fused_contenders as fused_contenders_for
from .throughput import Result, run, saved_activation_bytes

__all__ = ["COMPILED", "EAGER", "Result", "all_contenders", "build_model", "default_contenders",
           "fused_contenders_for", "make_step", "run", "saved_activation_bytes", "setup",
           "synthetic_batch"]
