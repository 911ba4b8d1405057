#!/usr/bin/env python3
"""The CPU pw stage's float32 GEMM, p = u Wᵀ, through the two BLAS paths torch offers: MKL's
sgemm via aten::mm on a transposed view (what csrc/cpu/pw_stage.cpp calls) and oneDNN's matmul
via mkldnn::_linear_pointwise (what Inductor calls). One thread, the chunk shape of the fused
pipeline (512 rows at C = 256), a whole ConvMixer-256/8 matrix (32·32·32 rows) and a small
model's chunk; median of 30 calls each, mm timed before and after the other (the better kept).
Run it on a quiet machine (docs/CPU.md)."""
import statistics
import time

import torch


def median_seconds(fn, reps=30):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    linear = torch.ops.mkldnn._linear_pointwise
    for rows, c in [(512, 256), (32768, 256), (2048, 64)]:
        u, w = torch.randn(rows, c), torch.randn(c, c)

        def mm():
            return torch.mm(u, w.t())

        def onednn():
            return linear(u, w, None, "none", [], "")
        torch.testing.assert_close(mm(), onednn(), rtol=1e-4, atol=1e-3)
        t_mm = median_seconds(mm)
        t_dnn = median_seconds(onednn)
        t_mm = min(t_mm, median_seconds(mm))
        print(f"rows {rows:>6} C {c:>4}: aten::mm(u, w.t()) {1e6 * t_mm:8.0f} us   "
              f"mkldnn::_linear_pointwise {1e6 * t_dnn:8.0f} us   mm / oneDNN {t_mm / t_dnn:.2f}")


if __name__ == "__main__":
    main()
