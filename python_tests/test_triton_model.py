"""ConvMixer(fused=True, backend="triton") against the eager reference, torch.compile over it,
and how the "triton" backend is chosen, reported and refused.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (triton_setup.py).
The model comparisons follow python_tests/test_model.py: after optimizer steps every output,
parameter gradient, parameter and BatchNorm buffer must agree, float32 at 1e-4 relative to the
largest value (three SGD steps through two blocks of reductions over a few hundred values per
channel, each carrying ~1e-6 relative rounding).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from model_checks import assert_close_scaled, train_steps
from model_checks import assert_models_agree as check_models_agree
from triton_setup import load_kernels

KERNELS, DEVICE = load_kernels()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason=str(DEVICE))

from convmixer_kernels import ConvMixer, available_backends  # noqa: E402
from convmixer_kernels.ops import backend, dw_stage  # noqa: E402
import convmixer_kernels  # noqa: E402
# Subprocesses start in the directory the package under test was imported from, so they import
# that same copy (the installed one in CI), not a source tree without the built extension.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(convmixer_kernels.__file__))

TOL = 1e-4


def make_pair(**kwargs):
    cfg = dict(dim=12, depth=2, kernel_size=5, patch_size=2, num_classes=5, act="gelu")
    cfg.update(kwargs)
    eager = ConvMixer(**cfg).to(DEVICE)
    fused = ConvMixer(**cfg, fused=True, backend="triton").to(DEVICE)
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def assert_close(a, b, what):
    assert_close_scaled(a, b, TOL, what)


def assert_models_agree(eager, fused, outs_e, outs_f, grads_e, grads_f):
    check_models_agree(eager, fused, outs_e, outs_f, grads_e, grads_f, TOL)


@needs_kernels
@pytest.mark.parametrize("act,kernel_size,channels_last", [("gelu", 3, False),
                                                           ("relu", 7, True),
                                                           ("gelu", 9, False)])
def test_training_matches_eager(act, kernel_size, channels_last):
    eager, fused = make_pair(act=act, kernel_size=kernel_size)
    gen = torch.Generator().manual_seed(kernel_size)
    x = torch.randn(2, 3, 18, 14, generator=gen).to(DEVICE)  # 9×7 tokens: odd, non-square
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (2,), generator=gen).to(DEVICE)
    outs_e, grads_e = train_steps(eager, x, y)
    outs_f, grads_f = train_steps(fused, x, y)
    assert_models_agree(eager, fused, outs_e, outs_f, grads_e, grads_f)


@needs_kernels
def test_eval_matches_eager():
    """Eval: both norms come from running statistics, the stages compute no statistics."""
    eager, fused = make_pair(act="relu", kernel_size=3)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 12, 10, generator=gen).to(DEVICE)
    y = torch.randint(0, 5, (3,), generator=gen).to(DEVICE)
    train_steps(eager, x, y, steps=2)  # non-trivial running statistics
    fused.load_state_dict(eager.state_dict())
    eager.zero_grad(set_to_none=True)
    eager.eval()
    fused.eval()
    x = torch.randn(2, 3, 14, 6, generator=gen).to(DEVICE).requires_grad_()
    xf = x.detach().clone().requires_grad_()
    out_e, out_f = eager(x), fused(xf)
    assert_close(out_e, out_f, "eval logits")
    out_e.sum().backward()
    out_f.sum().backward()
    assert_close(x.grad, xf.grad, "eval input gradient")
    for (name, p), q in zip(eager.named_parameters(), fused.parameters()):
        assert_close(p.grad, q.grad, f"eval grad of {name}")


@needs_kernels
def test_compiled_fused_training_step_matches_eager():
    """torch.compile(fullgraph=True) traces the Triton ops through their fake implementations
    and autograd formulas (aot_eager: the ops themselves run the Triton kernels)."""
    torch._dynamo.reset()
    eager, fused = make_pair(dim=8, depth=2, kernel_size=3, num_classes=4)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 10, 6, generator=gen).to(DEVICE)
    out_e, out_c = eager(x), compiled(x)
    assert_close(out_e, out_c, "compiled logits")
    out_e.square().sum().backward()
    out_c.square().sum().backward()
    for (name, p), q in zip(eager.named_parameters(), fused.parameters()):
        assert_close(p.grad, q.grad, f"compiled grad of {name}")
    for (name, a), b in zip(eager.named_buffers(), fused.buffers()):
        assert_close(a.double(), b.double(), f"compiled buffer {name}")


# ---------------------------------------------------------------------------------------------
# Backend choice


@needs_kernels
def test_triton_is_available_here():
    assert "triton" in available_backends()
    assert backend.resolve("triton", torch.device(DEVICE)) == "triton"


def test_auto_prefers_native_kernels():
    assert backend.resolve("auto", torch.device("cpu")) == "cpu"
    # On CUDA tensors: the native CUDA kernels when built, else Triton (device not needed).
    want = "cuda" if "cuda" in backend._AVAILABLE else "triton"
    if want == "triton" and not backend._triton_importable()[0]:
        pytest.skip("triton is not installed")
    assert backend.resolve("auto", torch.device("cuda")) == want


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setattr(backend, "_triton_interpreting", lambda: False)
    if not backend._triton_importable()[0]:
        pytest.skip("triton is not installed")
    x, w = torch.randn(1, 2, 3, 3), torch.randn(2, 1, 3, 3)
    with pytest.raises(RuntimeError, match=r"backend 'triton' runs CPU tensors only under "
                                           r"Triton's interpreter.*TRITON_INTERPRET=1"):
        dw_stage(x, w, backend="triton")
    assert "triton" not in available_backends() or torch.cuda.is_available()


@needs_kernels
def test_raw_triton_op_on_cpu_without_interpreter_is_an_error(monkeypatch):
    from convmixer_kernels.triton import _common
    monkeypatch.setattr(_common, "INTERPRET", False)
    x, w = torch.randn(1, 2, 3, 3), torch.randn(2, 1, 3, 3)
    with pytest.raises(RuntimeError, match="runs CPU tensors only under Triton's interpreter"):
        torch.ops.convmixer_kernels.dw_stage_triton(x, None, None, None, w, None, "gelu", False)


def test_missing_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(backend, "_triton_importable", lambda: (False, "it is not installed"))
    with pytest.raises(RuntimeError, match=r"backend 'triton' needs the triton package.*"
                                           r"pip install triton"):
        ConvMixer(dim=8, depth=1, kernel_size=3, fused=True, backend="triton")
    assert "triton" not in available_backends()


def test_package_imports_without_triton():
    """triton is optional: with it unimportable the package imports, lists no "triton"
    backend, runs the native one, and refuses backend "triton" saying why."""
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # makes `import triton` fail, as when not installed
        import torch
        import convmixer_kernels
        from convmixer_kernels import ConvMixer
        assert "triton" not in convmixer_kernels.available_backends()
        ConvMixer(dim=8, depth=1, kernel_size=3, patch_size=2, fused=True)(torch.randn(2, 3, 8, 8))
        try:
            ConvMixer(dim=8, depth=1, kernel_size=3, fused=True, backend="triton")
        except RuntimeError as exc:
            assert "needs the triton package" in str(exc), exc
        else:
            raise AssertionError("backend='triton' accepted without triton")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, cwd=PACKAGE_PARENT)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr
