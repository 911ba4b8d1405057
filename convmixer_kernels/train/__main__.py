"""python -m convmixer_kernels.train (see convmixer_kernels/train/cli.py, or --help)."""
from .cli import main

main()
