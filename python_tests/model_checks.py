"""ConvMixer(fused=True) against its eager twin on any backend: the models, the batches and the
comparisons that test_model.py runs over every backend (backends.py).

The two models share parameters and buffers, so one state_dict drives both; after optimizer steps
every output, parameter gradient, parameter and buffer must agree:

* float64 at 1e-10 of the tensor's scale (its largest magnitude, at least 1), and elementwise to
  1e-12 + 1e-9 relative: both paths compute the same maths and differ only in summation order
  (~1e-16 relative to the summed magnitudes), so both bounds keep orders of magnitude of margin;
  the elementwise one also holds the small elements of a tensor with a large scale.
* float32 at 1e-4 of the tensor's scale: three SGD steps through two blocks of reductions over a
  few hundred values per channel, each carrying ~1e-6 relative rounding.
"""
import torch

from convmixer_kernels import ConvMixer

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
F64_ELEMENTWISE = dict(rtol=1e-9, atol=1e-12)


def assert_close_scaled(a, b, tol, what):
    """Max absolute error at most `tol` times the reference's scale (its max, at least 1)."""
    scale = max(a.detach().abs().max().item(), 1.0)
    err = (a.detach().double() - b.detach().double()).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


def assert_close_model(a, b, dtype, what):
    """Eager `a` against fused `b`, model tensors of a `dtype` model (see the module doc).
    A number instead of a dtype is a scale tolerance alone (assert_close_scaled)."""
    if not isinstance(dtype, torch.dtype):
        assert_close_scaled(a, b, dtype, what)
        return
    assert_close_scaled(a, b, TOL[dtype], what)
    if dtype == torch.float64:
        torch.testing.assert_close(b.detach().double(), a.detach().double(), **F64_ELEMENTWISE,
                                   msg=lambda m: f"{what}: {m}")


def make_pair(backend, dtype=torch.float32, **kwargs):
    """(eager, fused) ConvMixers on `backend`'s device with the same parameters and buffers;
    `kwargs` override a small two-block model."""
    cfg = dict(dim=12, depth=2, kernel_size=5, patch_size=2, num_classes=5, act="gelu")
    cfg.update(kwargs)
    torch.manual_seed(0)
    eager = ConvMixer(**cfg).to(device=backend.device, dtype=dtype)
    fused = ConvMixer(**cfg, fused=True, backend=backend.op_backend).to(device=backend.device,
                                                                        dtype=dtype)
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def batch(backend, shape, classes, seed=0, dtype=torch.float32):
    """(images, labels): `shape` = (N, H, W) images of 3 channels, labels below `classes`."""
    gen = torch.Generator().manual_seed(seed)
    n, h, w = shape
    x = torch.randn(n, 3, h, w, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x.to(backend.device), y.to(backend.device)


def train_steps(model, x, y, steps=3):
    """`steps` SGD steps; returns the logits of each step and the last step's gradients."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    outs = []
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        torch.nn.functional.cross_entropy(out, y).backward()
        outs.append(out.detach())
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    return outs, grads


def assert_models_agree(eager, fused, outs_e, outs_f, grads_e, grads_f, dtype):
    """Logits at every step, last gradients, buffers and parameters after training."""
    for step, (a, b) in enumerate(zip(outs_e, outs_f)):
        assert_close_model(a, b, dtype, f"logits at step {step}")
    for name in grads_e:
        assert_close_model(grads_e[name], grads_f[name], dtype, f"grad of {name}")
    assert_same_state(eager, fused, dtype, params=True)


def assert_same_state(eager, fused, dtype, params=False):
    """Every buffer (num_batches_tracked exactly), and with `params` every parameter."""
    fused_buffers = dict(fused.named_buffers())
    for name, buf in eager.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(buf, fused_buffers[name]), name
        else:
            assert_close_model(buf, fused_buffers[name], dtype, f"buffer {name}")
    if params:
        fused_params = dict(fused.named_parameters())
        for name, p in eager.named_parameters():
            assert_close_model(p, fused_params[name], dtype, f"param {name}")


def assert_grads_agree(eager, fused, dtype, what=""):
    for (name, p), q in zip(eager.named_parameters(), fused.parameters()):
        assert_close_model(p.grad, q.grad, dtype, f"{what}grad of {name}")
