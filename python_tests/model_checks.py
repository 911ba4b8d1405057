"""Shared checks of a fused model against its eager twin, for every backend's model tests."""
import torch


def assert_close_scaled(a, b, tol, what):
    """Max absolute error at most `tol` times the reference's scale (its max, at least 1)."""
    scale = max(a.detach().abs().max().item(), 1.0)
    err = (a.detach().double() - b.detach().double()).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


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


def assert_models_agree(eager, fused, outs_e, outs_f, grads_e, grads_f, tol):
    """Logits at every step, last gradients, buffers and parameters after training."""
    for step, (a, b) in enumerate(zip(outs_e, outs_f)):
        assert_close_scaled(a, b, tol, f"logits at step {step}")
    for name in grads_e:
        assert_close_scaled(grads_e[name], grads_f[name], tol, f"grad of {name}")
    fused_buffers = dict(fused.named_buffers())
    for name, buf in eager.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(buf, fused_buffers[name]), name
        else:
            assert_close_scaled(buf, fused_buffers[name], tol, f"buffer {name}")
    fused_params = dict(fused.named_parameters())
    for name, p in eager.named_parameters():
        assert_close_scaled(p, fused_params[name], tol, f"param {name}")
