"""The fused model under torch.compile(fullgraph=True): the ops trace through their fake
implementations and autograd formulas without graph breaks, and the compiled model computes
what the eager reference does (float64, so the comparison is tight)."""
import pytest
import torch

from convmixer_kernels import ConvMixer


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_fused_training_step_matches_eager(backend):
    torch._dynamo.reset()
    cfg = dict(dim=8, depth=2, kernel_size=3, patch_size=2, num_classes=4)
    eager = ConvMixer(**cfg).double()
    fused = ConvMixer(**cfg, fused=True).double()
    fused.load_state_dict(eager.state_dict())
    compiled = torch.compile(fused, backend=backend, fullgraph=True)
    x = torch.randn(2, 3, 10, 6, dtype=torch.float64)
    out_e, out_c = eager(x), compiled(x)
    torch.testing.assert_close(out_c, out_e, rtol=1e-9, atol=1e-10)
    out_e.square().sum().backward()
    out_c.square().sum().backward()
    for (name, p), q in zip(eager.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-8, atol=1e-10, msg=name)
    for (name, a), b in zip(eager.named_buffers(), fused.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=name)


def test_compiled_fused_eval_matches_eager():
    torch._dynamo.reset()
    cfg = dict(dim=8, depth=1, kernel_size=5, patch_size=2, num_classes=4, act="relu")
    eager = ConvMixer(**cfg).double().eval()
    fused = ConvMixer(**cfg, fused=True).double().eval()
    fused.load_state_dict(eager.state_dict())
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 3, 8, 12, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-9, atol=1e-10)
