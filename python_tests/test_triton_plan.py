"""What a training step makes triton compile (convmixer_kernels.triton.compile_plan), and
warmup(), which compiles it before timing.

compile_plan records the launches of a CPU copy of the model for an H200 and keys them as
triton's JIT cache does, which needs the compiled (not interpreted) kernels: it runs in a
subprocess with TRITON_INTERPRET unset. warmup runs here under the interpreter (where it
compiles nothing) to check that it leaves the model as it found it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from triton_setup import load_kernels

KERNELS, DEVICE = load_kernels()
pytestmark = pytest.mark.skipif(KERNELS is None, reason=str(DEVICE))

import convmixer_kernels  # noqa: E402
from convmixer_kernels import ConvMixer  # noqa: E402

PACKAGE_PARENT = os.path.dirname(os.path.dirname(convmixer_kernels.__file__))
# The budget for one ConvMixer-768/32 training step.
MAX_COMPILATIONS = 20


def test_training_step_compilations():
    """ConvMixer-768/32 (k = 7), one bf16-autocast training step: at most 20 compilations,
    one per kernel variant (no autotuning over several configurations), all for sm_90a."""
    code = textwrap.dedent("""
        import json, torch
        from convmixer_kernels import ConvMixer
        from convmixer_kernels.triton import compile_plan
        model = ConvMixer(dim=768, depth=32, kernel_size=7, patch_size=7, num_classes=1000,
                          act="gelu", fused=True, backend="triton")
        out = {}
        for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
            comps = compile_plan(model, (2, 3, 224, 224), dtype)
            out[name] = [[c.kernel, str(c.config)] for c in comps]
        print(json.dumps(out))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_PARENT, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=900, cwd=PACKAGE_PARENT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    plans = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, comps in plans.items():
        kernels = {k for k, _ in comps}
        assert len(comps) <= MAX_COMPILATIONS, (name, comps)
        # forward and backward of both stages are all there
        assert kernels == {"_dw_conv_kernel", "_dw_wgrad_kernel", "_pw_fwd_kernel",
                           "_pw_dp_kernel", "_pw_wgrad_kernel", "_pw_dgrad_kernel"}, name


def test_warmup_leaves_the_model_as_it_was():
    """warmup runs a step and puts back gradients and BatchNorm buffers (bitwise)."""
    torch.manual_seed(0)
    model = ConvMixer(dim=12, depth=1, kernel_size=3, patch_size=2, num_classes=5, act="gelu",
                      fused=True, backend="triton").to(DEVICE)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    first = next(model.parameters())
    first.grad = torch.full_like(first, 0.5)
    compiled = KERNELS.warmup(model, (2, 3, 8, 8))
    assert compiled >= 0
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    for n, p in model.named_parameters():
        if p is first:
            assert torch.equal(p.grad, torch.full_like(p, 0.5))
        else:
            assert p.grad is None, n
    assert model.training
