"""A small fused ConvMixer training step for NVIDIA's compute-sanitizer.

    compute-sanitizer --tool memcheck python tools/gpu/sanitize.py --backend cuda
    bash tools/gpu/run_sanitizers.sh OUT_DIR            # memcheck, racecheck, initcheck, synccheck
                                                    # x cuda, triton; exits non-zero on errors

Runs, on one backend, every kernel of the fused path at least once: a training step (forward
with batch statistics, backward, SGD update) of a tiny ConvMixer (dim 64, depth 2, k 5, patch 2
on 2x3x32x32 images) in float32 and under bfloat16 autocast, an eval forward (no statistics),
and both stages forward and backward on odd shapes (37 and 24 channels, 7x9 tokens), because
dim 64 fills every vector and channel block exactly and out-of-bounds bugs live in the
partial ones. Small on purpose: the sanitizers slow kernels down 10-100x. Triton's autotuner
runs every configuration once under the sanitizer, so all of them are checked.
"""
from __future__ import annotations

import argparse
import os

# PyTorch's caching allocator hands out slices of larger cached blocks, so an access past the
# end of a tensor usually lands in memory the process owns and memcheck cannot see it; with
# caching off every tensor is its own cudaMalloc. Read when CUDA is initialised, so set first.
os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")

import torch  # noqa: E402

from convmixer_kernels import ConvMixer  # noqa: E402
from convmixer_kernels.ops import Norm, dw_stage, pw_stage  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def model_steps(backend: str, dtypes: list[torch.dtype]) -> None:
    torch.manual_seed(0)
    model = ConvMixer(dim=64, depth=2, kernel_size=5, patch_size=2, num_classes=10, fused=True,
                      backend=backend).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(2, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (2,), device="cuda")
    for dtype in dtypes:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        for dtype in dtypes:
            with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                model(x)


def _norm(c: int) -> Norm:
    return Norm(torch.randn(c, device="cuda"), torch.rand(c, device="cuda") + 0.5,
                torch.randn(c, device="cuda"))


def odd_stages(backend: str, dtype: torch.dtype) -> None:
    """Both stages, forward and backward, with partial channel vectors and spatial tiles."""
    n, c, c_out, h, w, k = 2, 37, 24, 7, 9, 5
    x = torch.randn(n, c, h, w, device="cuda", dtype=dtype, requires_grad=True)
    dw_w = (torch.randn(c, 1, k, k, device="cuda", dtype=dtype) / k).requires_grad_()
    dw_b = torch.randn(c, device="cuda", dtype=dtype, requires_grad=True)
    g, mean, var = dw_stage(x, dw_w, dw_b, act="gelu", x_norm=_norm(c), backend=backend)
    norm1 = Norm(mean, torch.rsqrt(var + 1e-5), torch.zeros_like(mean))
    pw_w = (torch.randn(c_out, c, 1, 1, device="cuda", dtype=dtype) * c ** -0.5).requires_grad_()
    out, m2, v2 = pw_stage(g, pw_w, None, act="relu", x_norm=norm1, residual=x,
                           residual_norm=_norm(c), backend=backend)
    (out.float().square().mean() + m2.sum() + v2.sum()).backward()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="cuda", choices=["cuda", "triton"])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    args = p.parse_args(argv)
    dtypes = [DTYPES[d] for d in args.dtypes]
    model_steps(args.backend, dtypes)
    for dtype in dtypes:
        odd_stages(args.backend, dtype)
    torch.cuda.synchronize()
    print(f"sanitize.py: {args.backend} {' '.join(args.dtypes)} ok")


if __name__ == "__main__":
    main()
