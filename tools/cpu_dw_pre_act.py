#!/usr/bin/env python3
"""The CPU dw stage's forward + backward (gelu, batch statistics, an input norm) with the
pre-activation kept and read back (keep_pre_act / pre_act) against recomputing the conv in the
backward, per kernel size and storage dtype: what ops.dw_stage.keeps_pre_act's CPU threshold
rests on (docs/CUDA.md, "Backward: recompute or save"). One thread; the two variants timed
alternately, the fastest call of each (the least disturbed by other load). Run it on a quiet
machine."""
import argparse
import time

import torch

import convmixer_kernels  # noqa: F401  (registers the ops)

ops = torch.ops.convmixer_kernels


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", type=int, nargs=4, default=[4, 256, 32, 32],
                   metavar=("N", "C", "H", "W"))
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(1)
    n, c, h, w = args.shape
    for dtype in (torch.float32, torch.bfloat16):
        for k in (3, 5, 7, 9):
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(n, c, h, w, generator=gen).to(dtype).contiguous(
                memory_format=torch.channels_last)
            weight = (torch.randn(c, 1, k, k, generator=gen) / k).to(dtype)
            bias = torch.randn(c, generator=gen).to(dtype)
            norm = (torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5,
                    torch.randn(c, generator=gen))
            grad_out = torch.randn(n, c, h, w, generator=gen).to(dtype)
            gm, gv = torch.randn(c, generator=gen), torch.randn(c, generator=gen)

            def step(keep):
                _, pre, mean, *_ = ops.dw_stage(x, *norm, weight, bias, "gelu", True, keep)
                ops.dw_stage_backward(grad_out, gm, gv, x, *norm, weight, bias, mean, "gelu",
                                      None, None, pre if keep else None)

            times = {False: [], True: []}
            for keep in (False, True):
                step(keep)
            for _ in range(args.reps):
                for keep in (False, True):
                    t0 = time.perf_counter()
                    step(keep)
                    times[keep].append(time.perf_counter() - t0)
            r, s = (min(times[v]) * 1e3 for v in (False, True))
            print(f"{str(dtype).split('.')[1]:>8} k={k}: recompute {r:7.2f} ms, keep a {s:7.2f} ms "
                  f"({(s / r - 1) * 100:+.0f}%)", flush=True)


if __name__ == "__main__":
    main()
