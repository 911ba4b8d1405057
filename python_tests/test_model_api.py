"""timm's model API on our ConvMixer, fused and eager, without timm installed.

The classifier API, global pooling types, group_matcher, feature_info, forward_intermediates and
prune_intermediate_layers follow timm's ConvMixer contract (test_timm_interop.py compares them
with the real timm when it is installed). Gradient checkpointing must change nothing but memory:
float64 outputs, gradients and buffers are compared bit for bit with the run without it, since
the recompute runs the same deterministic kernels on the same inputs.
"""
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convmixer_kernels import ConvMixer, convmixer_1536_20, convmixer_256_8, convmixer_768_32
from convmixer_kernels.activations import ACTIVATIONS
from convmixer_kernels.pooling import POOL_TYPES

CFG = dict(dim=8, depth=3, kernel_size=3, patch_size=2, num_classes=5)


def _model(fused, **kwargs):
    torch.manual_seed(0)
    model = ConvMixer(**{**CFG, **kwargs}, fused=fused).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def _x(n=2, size=12):
    torch.manual_seed(1)
    return torch.randn(n, 3, size, size, dtype=torch.float64)


def _block_outputs(model, x):
    """Every block's output of the eager path, taken with hooks: the reference."""
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in model.blocks]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return outs


# ---- classifier and pooling ---------------------------------------------------------------

def _pool_reference(x, pool_type):
    kind = pool_type.removeprefix("fast") or ("avg" if pool_type else "")
    avg, mx = F.adaptive_avg_pool2d(x, 1).flatten(1), F.adaptive_max_pool2d(x, 1).flatten(1)
    return {"": x, "avg": avg, "max": mx, "avgmax": 0.5 * (avg + mx),
            "catavgmax": torch.cat((avg, mx), 1)}[kind]


@pytest.mark.parametrize("pool_type", POOL_TYPES)
@pytest.mark.parametrize("fused", [False, True])
def test_reset_classifier_with_every_pool_type(pool_type, fused):
    model = _model(fused).eval()
    x = _x()
    model.reset_classifier(7, global_pool=pool_type)
    mult = 2 if pool_type.endswith("catavgmax") else 1
    assert model.num_classes == 7 and model.head_hidden_size == CFG["dim"] * mult
    assert model.get_classifier() is model.head and model.head.in_features == CFG["dim"] * mult
    assert model.head.weight.dtype == torch.float64 and not model.head.training
    features = model.forward_features(x)
    pooled = model.forward_head(features, pre_logits=True)
    torch.testing.assert_close(pooled, _pool_reference(features, pool_type), rtol=1e-14,
                               atol=1e-14)
    if pool_type:
        assert model(x).shape == (2, 7)
    model.reset_classifier(0)  # keeps the pooling, drops the head
    assert isinstance(model.head, nn.Identity) and model.global_pool.pool_type == pool_type


def test_constructor_global_pool_and_bad_pool_type():
    model = ConvMixer(**{**CFG, "num_classes": 0}, global_pool="")
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, CFG["dim"], 4, 4)  # unpooled
    with pytest.raises(ValueError, match="global_pool must be one of"):
        ConvMixer(**CFG, global_pool="median")
    with pytest.raises(ValueError, match="global_pool must be one of"):
        ConvMixer(**CFG).reset_classifier(3, global_pool="avgpool")


def test_activation_by_timm_spelling():
    for spec in ACTIVATIONS.values():
        assert ConvMixer(**CFG, act_layer=spec.module).act == spec.name
    assert ConvMixer(**CFG, act_layer=nn.ReLU).act == "relu"
    assert ConvMixer(**CFG, act_layer=nn.GELU, act="gelu").act == "gelu"
    assert ConvMixer(**CFG).act == "gelu"  # timm's default
    assert convmixer_768_32(depth=1, act_layer=nn.GELU).act == "gelu"
    with pytest.raises(ValueError, match="disagree"):
        ConvMixer(**CFG, act="relu", act_layer=nn.GELU)
    with pytest.raises(ValueError, match="act_layer must be one of"):
        ConvMixer(**CFG, act_layer=nn.SiLU)


def test_device_and_dtype_arguments():
    model = ConvMixer(**CFG, device="meta", dtype=torch.float64)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.float64}


# ---- what timm's tooling reads ------------------------------------------------------------

def test_group_matcher_gives_one_layer_per_block():
    model = _model(False)
    matcher = model.group_matcher()
    assert matcher == dict(stem=r"^stem", blocks=r"^blocks\.(\d+)")
    for name, _ in model.named_parameters():
        if name.startswith("stem"):
            assert re.match(matcher["stem"], name)
        elif name.startswith("blocks"):
            assert int(re.match(matcher["blocks"], name).group(1)) == int(name.split(".")[1])
        else:
            assert name.startswith("head") and not any(re.match(r, name) for r in matcher.values())


def test_feature_info_and_paper_model_configs():
    model = _model(True)
    assert model.feature_info == [dict(num_chs=8, reduction=2, module=f"blocks.{i}")
                                  for i in range(3)]
    assert model.in_chans == 3 and model.num_features == 8
    m = convmixer_1536_20(depth=1)
    assert m.pretrained_cfg is m.default_cfg
    assert (m.pretrained_cfg["crop_pct"], m.pretrained_cfg["interpolation"]) == (0.96, "bicubic")
    assert m.pretrained_cfg["hf_hub_id"] == "timm/convmixer_1536_20.in1k"
    assert m.pretrained_cfg["first_conv"] == "stem.0" and m.pretrained_cfg["classifier"] == "head"
    cifar = convmixer_256_8(depth=1).pretrained_cfg
    assert cifar["input_size"] == (3, 32, 32) and cifar["num_classes"] == 10
    assert "hf_hub_id" not in cifar  # no published weights
    assert ConvMixer(**CFG).pretrained_cfg["crop_pct"] == 0.96  # the family's defaults


# ---- intermediates ------------------------------------------------------------------------

@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("indices, taken", [(None, [0, 1, 2]), (1, [2]), (2, [1, 2]),
                                            ([0, 2], [0, 2]), ([-1], [2]), ((2, 0), [0, 2])])
def test_forward_intermediates(fused, indices, taken):
    model = _model(fused).train()
    x = _x()
    reference = _block_outputs(_model(False).train(), x)
    final, inter = model.forward_intermediates(x, indices=indices)
    assert len(inter) == len(taken)
    for got, i in zip(inter, taken):
        torch.testing.assert_close(got, reference[i], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, reference[-1], rtol=1e-10, atol=1e-10)
    only = model.forward_intermediates(x, indices=indices, intermediates_only=True)
    assert len(only) == len(taken)
    # stop_early: the final features are those of the last block asked for
    final, _ = model.forward_intermediates(x, indices=indices, stop_early=True)
    torch.testing.assert_close(final, reference[max(taken)], rtol=1e-10, atol=1e-10)


def test_forward_intermediates_bad_arguments():
    model = _model(True)
    x = _x()
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=4)
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[3])
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[-4])
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW'"):
        model.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize("fused", [False, True])
def test_prune_intermediate_layers(fused):
    model = _model(fused)
    x = _x()
    reference = _block_outputs(_model(False), x)
    assert model.prune_intermediate_layers([0, -2]) == [0, 1]
    assert len(model.blocks) == 2 and len(model.feature_info) == 2
    assert isinstance(model.head, nn.Identity) and model.global_pool.is_identity()
    torch.testing.assert_close(model(x), reference[1], rtol=1e-10, atol=1e-10)  # unpooled
    feats = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    torch.testing.assert_close(feats[0], reference[0], rtol=1e-10, atol=1e-10)
    kept = _model(fused)
    kept.prune_intermediate_layers(2, prune_head=False)
    assert len(kept.blocks) == 3 and kept.head.out_features == 5


# ---- gradient checkpointing ---------------------------------------------------------------

def _one_step(model, x, y):
    model.zero_grad(set_to_none=True)
    out = model(x)
    F.cross_entropy(out, y).backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_grad_checkpointing_changes_nothing_but_memory(fused, momentum):
    x, y = _x(3), torch.tensor([0, 3, 4])
    plain, ckpt = _model(fused), _model(fused)
    ckpt.set_grad_checkpointing()
    assert ckpt.grad_checkpointing and not plain.grad_checkpointing
    for m in (plain, ckpt):
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.momentum = momentum
    for _ in range(2):  # the second step normalises eval-free but reads updated buffers' counts
        out_p, grads_p = _one_step(plain, x, y)
        out_c, grads_c = _one_step(ckpt, x, y)
        assert torch.equal(out_p, out_c)
        for name, g in grads_p.items():
            assert torch.equal(g, grads_c[name]), name
        buffers_c = dict(ckpt.named_buffers())
        for name, b in plain.named_buffers():
            assert torch.equal(b, buffers_c[name]), name  # updated once, not twice


def test_grad_checkpointing_keeps_fewer_tensors_for_the_backward():
    def saved_bytes(model):
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(_x(2, 16))
        return sum(sizes)

    plain, ckpt = _model(True, depth=6), _model(True, depth=6)
    ckpt.set_grad_checkpointing()
    assert saved_bytes(ckpt) < 0.6 * saved_bytes(plain)


def test_grad_checkpointing_is_inert_without_grad():
    model = _model(True)
    model.set_grad_checkpointing()
    x = _x()
    with torch.no_grad():
        out = model(x)
    model.set_grad_checkpointing(False)
    with torch.no_grad():
        assert torch.equal(out, model(x))
