#!/usr/bin/env python3
"""What a pw GEMM of our own would pay to form its operand on load, counted (not measured).

The CUDA backend's last passes sit at the cuBLAS boundary (docs/CUDA.md, "The traffic ledger"):
a GEMM of our own could read a and h and form u = BN1(act(a)) + BN2_prev(h) on its A load, and
read grad_out and pre and form dP = act'(pre)·(s·dY + c1 + c2·act(pre)) on the loads of the dU
and dW GEMMs, saving the passes that write u and dP. But a tiled GEMM loads each operand element
once per output tile across the other dimension (C / BLOCK_N times), so that maths runs that
many times per element, on the CUDA cores, beside the tensor cores' work.

This compiles exactly that per-element maths, from the kernels' own headers
(csrc/activation.h, csrc/cuda/kernels/elementwise.cuh), to PTX for sm_90 with nvcc, counts its
instructions (loads, stores and address arithmetic left out: the GEMM's tile loads pay those
anyway), and sets the recomputation's time against the passes it would save and the GEMM's own
time, for the paper's two ledger models. The rates are the H200 datasheet's (override them);
no GPU is used.

    python tools/gemm_operand_cost.py                  # both models, BLOCK_N 256
    python tools/gemm_operand_cost.py --block-n 128
"""
from __future__ import annotations

import argparse
import math
import pathlib
import re
import subprocess
import tempfile

import torch

from convmixer_kernels import model as models
from convmixer_kernels.activations import ACTIVATIONS
from convmixer_kernels.benchmarking.roofline import LEDGER_BATCH, kernel_and_patch

ROOT = pathlib.Path(__file__).resolve().parents[1]

# One kernel per (operand, activation): the maths of one element, as a fused GEMM load would do
# it, from bf16 storage to the bf16 operand the tensor cores take.
SOURCE = r"""
#include <cuda_bf16.h>
#include "cuda/kernels/elementwise.cuh"
using namespace convmixer_kernels;
using namespace convmixer_kernels::cuda;

// u = s1·act(a) + t1 + s2·h + t2: the forward GEMM's A operand (BN1 of act(a), the residual
// BN2_prev(h)), both norms folded to a scale and shift per channel.
template <Act A>
__global__ void form_u(const __nv_bfloat16* a, const __nv_bfloat16* h, const float* st,
                       __nv_bfloat16* u) {
  const int i = threadIdx.x;
  const float g = act_forward<A, float>(__bfloat162float(a[i]));
  u[i] = __float2bfloat16_rn(fmaf(st[0], g, st[1]) + fmaf(st[2], __bfloat162float(h[i]), st[3]));
}

// dP = act'(pre)·(s·dY + c1 + c2·act(pre)): the dU and dW GEMMs' operand, BN2's gradient folded
// to three per-channel coefficients (the statistics see the stored act(pre), hence its rounding).
template <Act A>
__global__ void form_dp(const __nv_bfloat16* pre, const __nv_bfloat16* dy, const float* c,
                        __nv_bfloat16* dp) {
  const int i = threadIdx.x;
  const ActAt<A, float> at(__bfloat162float(pre[i]));
  const float out = __bfloat162float(__float2bfloat16_rn(at.value()));
  dp[i] = __float2bfloat16_rn(
      at.backward(fmaf(c[0], __bfloat162float(dy[i]), fmaf(c[2], out, c[1]))));
}

template __global__ void form_u<Act::GELU>(const __nv_bfloat16*, const __nv_bfloat16*,
                                           const float*, __nv_bfloat16*);
template __global__ void form_u<Act::ReLU>(const __nv_bfloat16*, const __nv_bfloat16*,
                                           const float*, __nv_bfloat16*);
template __global__ void form_dp<Act::GELU>(const __nv_bfloat16*, const __nv_bfloat16*,
                                            const float*, __nv_bfloat16*);
template __global__ void form_dp<Act::ReLU>(const __nv_bfloat16*, const __nv_bfloat16*,
                                            const float*, __nv_bfloat16*);
"""

# Not the operand's maths: parameters, addresses, the element's own loads and stores, the exit.
_NOT_MATHS = re.compile(r"^(ld\.|st\.|cvta|mul\.wide|add\.s64|ret|mov\.u32)")
# The special-function unit (ex2, rcp, ...): 16 lanes a clock per SM on Hopper, not 128.
_MUFU = re.compile(r"^(ex2|lg2|rcp|rsqrt|sqrt\.approx|sin|cos|tanh)")

# The kernels' template arguments: csrc/activation.h's enumerators, by the ops' act strings.
ENUMERATORS = {"gelu": "GELU", "relu": "ReLU"}
IMAGE = 224


def ledger_models() -> list[tuple[str, str, int, int]]:
    """(name, act, rows, channels) of the models the ledger is quoted at, at its batch sizes."""
    out = []
    for name, batch in LEDGER_BATCH.items():
        with torch.device("meta"):
            shape = getattr(models, name)()
        _, patch = kernel_and_patch(shape)
        out.append((name, shape.act, batch * (IMAGE // patch) ** 2, shape.num_features))
    return out


def count_ptx() -> dict[str, tuple[int, int]]:
    """{kernel: (all maths instructions, of which special-function ones)} from nvcc's PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp, "operands.cu")
        src.write_text(SOURCE)
        ptx = pathlib.Path(tmp, "operands.ptx")
        subprocess.run(["nvcc", "-arch=sm_90", "-ptx", "-O3", "-std=c++17",
                        f"-I{ROOT / 'csrc'}", str(src), "-o", str(ptx)], check=True)
        counts: dict[str, tuple[int, int]] = {}
        name = None
        for line in ptx.read_text().splitlines():
            entry = re.search(r"\.entry\s+(\S+)\(", line)
            if entry:
                mangled = entry.group(1)
                op = "form_u" if "form_u" in mangled else "form_dp"
                # The template argument, mangled as the enumerator's value (its code).
                code = int(re.search(r"ActE(\d+)E", mangled).group(1))
                act = next(ENUMERATORS[a.name] for a in ACTIVATIONS.values() if a.code == code)
                name = f"{op}<{act}>"
                counts[name] = (0, 0)
                continue
            if name is None or not line.startswith("\t") or line.strip().startswith(("//", "{", "}", ".")):
                continue
            inst = line.strip().split()[0].lstrip("@")
            if inst.startswith("%") or _NOT_MATHS.match(inst):
                continue
            n, mufu = counts[name]
            counts[name] = (n + 1, mufu + bool(_MUFU.match(inst)))
    return counts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--block-n", type=int, default=256,
                    help="output tile width across the operand's other dimension")
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--clock-ghz", type=float, default=1.98, help="datasheet boost clock")
    ap.add_argument("--hbm-tbs", type=float, default=4.8, help="datasheet HBM3e bandwidth")
    ap.add_argument("--bf16-tflops", type=float, default=989.0, help="datasheet dense bf16")
    args = ap.parse_args(argv)

    counts = count_ptx()
    lanes = args.sms * args.clock_ghz * 1e9          # lane-instructions a second, per lane of 128
    print(f"operand maths, PTX instructions per element (sm_90, -O3): "
          + ", ".join(f"{k} {n} ({m} special-function)" for k, (n, m) in sorted(counts.items())))
    print(f"rates: {args.sms} SMs at {args.clock_ghz} GHz (128 lanes, 16 special-function lanes "
          f"a clock per SM), HBM {args.hbm_tbs} TB/s, bf16 {args.bf16_tflops} TFLOP/s; "
          f"BLOCK_N {args.block_n}\n")
    print(f"{'model':<18} {'operand':<14} {'formed':>7} {'maths ms':>9} {'GEMM ms':>8} "
          f"{'pass ms':>8}")
    for model, act_name, rows, ch in ledger_models():
        act = ENUMERATORS[act_name]
        elements = rows * ch
        gemm_s = 2 * rows * ch * ch / (args.bf16_tflops * 1e12)
        pass_s = elements * 2 / (args.hbm_tbs * 1e12)
        for op in ("form_u", "form_dp"):
            n, mufu = counts[f"{op}<{act}>"]
            times = math.ceil(ch / args.block_n)     # once per output tile across the other dim
            # Issue-bound: every instruction takes a lane-slot of 128; the special-function ones
            # also queue on 16 lanes. The larger of the two is the floor, with no overlap lost.
            per_element = max(n / 128, mufu / 16)
            maths_s = elements * times * per_element / lanes
            print(f"{model:<18} {op + '<' + act + '>':<14} {times:>6}x {maths_s * 1e3:>9.3f} "
                  f"{gemm_s * 1e3:>8.3f} {pass_s * 1e3:>8.3f}")


if __name__ == "__main__":
    main()
