"""`python -m convmixer_kernels.roofline`: a ConvMixer step's work, its floor and, with --ledger,
the CUDA backend's traffic ledger (convmixer_kernels.benchmarking.roofline and .ledger hold them)."""
from .benchmarking.roofline import main

if __name__ == "__main__":
    main()
