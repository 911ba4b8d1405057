"""A fused ConvMixer training step captured in a CUDA graph and replayed (issue 15 §4).

Capture fails on anything a graph cannot hold: a host sync (.item(), a pageable copy, a
cudaStreamSynchronize in a launcher), an allocation outside the caching allocator, a kernel on
another stream. Replay must then give what eager execution of the same step gives: the loss, every
parameter's gradient and the BatchNorm running statistics it updates. Needs a GPU and the
extension built with CUDA (skips otherwise, as the "cuda" backend of backends.py does).
"""
from __future__ import annotations

import copy

import pytest
import torch

from backends import BACKENDS
from convmixer_kernels.model import ConvMixer

SKIP = BACKENDS["cuda"].skip
pytestmark = pytest.mark.skipif(SKIP is not None, reason=str(SKIP))

# The same kernels on the same inputs: replay and eager differ only if cuBLAS picks another GEMM
# algorithm under capture, which reorders float32 sums of at most dim * 16 terms (a few ulps of
# float32 relative to the values, far under 1e-5); a wrong or stale buffer is off by order one.
RTOL, ATOL = 1e-5, 1e-5


def _model(act):
    torch.manual_seed(0)
    model = ConvMixer(64, 2, kernel_size=5, patch_size=2, num_classes=10, act=act, fused=True,
                      backend="cuda").cuda()
    return model.to(memory_format=torch.channels_last)


def _step(model, x, y):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss


def _batch(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, 32, 32, generator=gen).cuda().contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (8,), generator=gen).cuda()


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_fused_training_step_replays_as_eager(act):
    model = _model(act)
    static_x, static_y = _batch(0)
    # Warm-up on a side stream, as torch.cuda.graphs asks: the caching allocator and cuBLAS set up
    # their state outside the capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            _step(model, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=True)  # the gradients are allocated in the graph's pool
    with torch.cuda.graph(graph):
        static_loss = _step(model, static_x, static_y)

    for seed in (1, 2):  # new data in the static inputs each time
        x, y = _batch(seed)
        static_x.copy_(x)
        static_y.copy_(y)
        eager = copy.deepcopy(model)  # the state the replay starts from
        eager.zero_grad(set_to_none=True)
        graph.replay()
        loss = _step(eager, x, y)
        torch.cuda.synchronize()
        assert torch.isfinite(loss)
        torch.testing.assert_close(static_loss, loss, rtol=RTOL, atol=ATOL)
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=RTOL, atol=ATOL,
                                       msg=lambda m, name=name: f"grad of {name}: {m}")
        for (name, b), c in zip(model.named_buffers(), eager.buffers()):
            torch.testing.assert_close(b, c, rtol=RTOL, atol=ATOL,
                                       msg=lambda m, name=name: f"buffer {name}: {m}")
