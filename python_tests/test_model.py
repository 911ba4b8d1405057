"""ConvMixer(fused=True) against the eager reference ConvMixer(fused=False).

The two share parameters and buffers, so one state_dict drives both; after three optimizer
steps every output, parameter gradient and buffer must agree. float64 compares at ~1e-10: both
paths compute the same maths, differing only in summation order. float32 compares at 1e-4
relative (scaled by the largest value): three steps of SGD through 2 blocks of reductions over
a few hundred values per channel, each carrying ~1e-6 relative rounding.
"""
import copy

import pytest
import torch

from model_checks import assert_close_scaled, assert_models_agree, train_steps

from convmixer_kernels.activations import NAMES
from convmixer_kernels import (ConvMixer, convmixer_1024_20_ks9_p14, convmixer_1536_20,
                               convmixer_256_8, convmixer_768_32)

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def make_pair(dtype, **kwargs):
    cfg = dict(dim=12, depth=2, kernel_size=5, patch_size=2, num_classes=5, act="gelu")
    cfg.update(kwargs)
    eager = ConvMixer(**cfg).to(dtype)
    fused = ConvMixer(**cfg, fused=True).to(dtype)
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def assert_close(a, b, dtype, what):
    assert_close_scaled(a, b, TOL[dtype], what)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", NAMES)
@pytest.mark.parametrize("kernel_size", [1, 3, 5, 7, 9])
@pytest.mark.parametrize("channels_last", [False, True])
def test_training_matches_eager(dtype, act, kernel_size, channels_last):
    eager, fused = make_pair(dtype, act=act, kernel_size=kernel_size)
    x = torch.randn(3, 3, 18, 14, dtype=dtype)  # 9×7 tokens: odd, non-square
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (3,))
    outs_e, grads_e = train_steps(eager, x, y)
    outs_f, grads_f = train_steps(fused, x, y)
    assert_models_agree(eager, fused, outs_e, outs_f, grads_e, grads_f, TOL[dtype])


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_momentum(momentum):
    eager, fused = make_pair(torch.float64)
    for m in (eager, fused):
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.momentum = momentum
    x, y = torch.randn(2, 3, 10, 12, dtype=torch.float64), torch.randint(0, 5, (2,))
    train_steps(eager, x, y)
    train_steps(fused, x, y)
    for (name, a), b in zip(eager.named_buffers(), fused.buffers()):
        assert_close(a.double(), b.double(), torch.float64, name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eval_matches_eager(dtype):
    eager, fused = make_pair(dtype, act="relu", kernel_size=3)
    x, y = torch.randn(4, 3, 12, 10, dtype=dtype), torch.randint(0, 5, (4,))
    train_steps(eager, x, y, steps=2)  # non-trivial running statistics
    fused.load_state_dict(eager.state_dict())
    eager.zero_grad(set_to_none=True)
    eager.eval()
    fused.eval()
    x = torch.randn(2, 3, 14, 6, dtype=dtype, requires_grad=True)
    xf = x.detach().clone().requires_grad_()
    out_e, out_f = eager(x), fused(xf)
    assert_close(out_e, out_f, dtype, "eval logits")
    out_e.sum().backward()
    out_f.sum().backward()
    assert_close(x.grad, xf.grad, dtype, "eval input gradient")
    for (name, p), q in zip(eager.named_parameters(), fused.parameters()):
        assert_close(p.grad, q.grad, dtype, f"eval grad of {name}")


def test_track_running_stats_false():
    eager, fused = make_pair(torch.float64)
    for m in (eager, fused):
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.track_running_stats = False
                bn.running_mean = bn.running_var = bn.num_batches_tracked = None
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for mode in ("train", "eval"):
        getattr(eager, mode)()
        getattr(fused, mode)()
        assert_close(eager(x), fused(x), torch.float64, f"{mode} without running stats")


def test_state_dict_round_trip_and_timm_keys():
    eager, fused = make_pair(torch.float32, depth=2)
    keys = set(eager.state_dict())
    assert keys == set(fused.state_dict())
    for key in ("stem.0.weight", "stem.2.running_var", "blocks.0.0.fn.0.weight",
                "blocks.0.0.fn.2.num_batches_tracked", "blocks.1.1.bias", "blocks.1.3.weight",
                "head.weight", "head.bias"):
        assert key in keys, key
    back = ConvMixer(dim=12, depth=2, kernel_size=5, patch_size=2, num_classes=5)
    back.load_state_dict(fused.state_dict(), strict=True)
    fused.load_state_dict(back.state_dict(), strict=True)


def test_forward_head_and_reset_classifier():
    eager, fused = make_pair(torch.float64)
    eager.eval()
    fused.eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    feats = fused.forward_features(x)
    assert feats.shape == (2, 12, 4, 4)
    assert_close(eager.forward_features(x), feats, torch.float64, "features")
    assert fused.forward_head(feats, pre_logits=True).shape == (2, 12)
    fused.reset_classifier(3)
    assert fused(x).shape == (2, 3)
    fused.reset_classifier(0)
    assert fused(x).shape == (2, 12)


def test_autocast_bf16_close_to_eager():
    """bf16 autocast: the fused error against a float64 model is at most ~2× eager's (§6)."""
    eager, fused = make_pair(torch.float32, act="gelu", kernel_size=5)
    ref = copy.deepcopy(eager).double()
    x = torch.randn(4, 3, 16, 12)
    with torch.no_grad():
        truth = ref(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_e, out_f = eager(x), fused(x)
    assert out_f.dtype == out_e.dtype
    err_e = (out_e.double() - truth).abs().max().item()
    err_f = (out_f.double() - truth).abs().max().item()
    assert err_f <= 2 * err_e + 1e-3, (err_f, err_e)
    # and the backward runs in bf16 with finite gradients for every parameter
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused(x).float().square().mean().backward()
    for name, p in fused.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_paper_constructors():
    for ctor, dim, k, p, act, classes in [
        (convmixer_1536_20, 1536, 9, 7, "gelu", 1000),
        (convmixer_768_32, 768, 7, 7, "relu", 1000),
        (convmixer_1024_20_ks9_p14, 1024, 9, 14, "gelu", 1000),
        (convmixer_256_8, 256, 5, 2, "gelu", 10),
    ]:
        with torch.device("meta"):
            model = ctor(fused=True)
        assert model.fused and model.num_features == dim and model.act == act
        assert model.stem[0].kernel_size == (p, p)
        assert model.blocks[0][0].fn[0].kernel_size == (k, k)
        assert model.head.out_features == classes
    assert convmixer_256_8(num_classes=4).head.out_features == 4


def test_fused_tiny_cifar_model_runs_on_meta_shapes():
    model = convmixer_256_8(fused=True, depth=1)
    out = model(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 10)


def test_channels_last_model_gets_gradients_in_its_parameters_layout():
    """DDP buckets and foreach optimizers expect each gradient laid out like its parameter."""
    _, fused = make_pair(torch.float32)
    fused = fused.to(memory_format=torch.channels_last)
    fused(torch.randn(2, 3, 8, 8)).sum().backward()
    for name, p in fused.named_parameters():
        assert p.grad.stride() == p.stride(), name
