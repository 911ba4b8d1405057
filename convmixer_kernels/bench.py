"""`python -m convmixer_kernels.bench`: the main job, fused ConvMixer training against eager
PyTorch and torch.compile (convmixer_kernels.benchmarking holds it)."""
from .benchmarking.cli import main

if __name__ == "__main__":
    main()
