"""timm interop: checkpoints and modules with timm's ConvMixer layout, and timm's registry.

Most of this needs no timm: a module written here with timm's exact layout (its own Residual
class, a `global_pool` module) stands in for timm's ConvMixer, and the registry hook is checked
against a minimal stand-in `timm` package in a subprocess. The tests marked `timm` run against
the real timm when it is installed.
"""
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from convmixer_kernels import ConvMixer, convmixer_768_32, from_timm, fuse
from convmixer_kernels.activations import NAMES
from convmixer_kernels.interop import infer_config
import convmixer_kernels  # noqa: E402
# Subprocesses start in the directory the package under test was imported from, so they import
# that same copy (the installed one in CI), not a source tree without the built extension.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(convmixer_kernels.__file__))


class Residual(nn.Module):  # timm's, not ours: interop must not depend on the class identity
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


class TimmLikeConvMixer(nn.Module):
    """timm.models.convmixer.ConvMixer's layout (timm >= 0.9: `global_pool`, not `pooling`)."""

    def __init__(self, dim, depth, kernel_size=9, patch_size=7, in_chans=3, num_classes=1000,
                 act_layer=nn.GELU, pool="avg"):
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dim, patch_size, stride=patch_size),
                                  act_layer(), nn.BatchNorm2d(dim))
        self.blocks = nn.Sequential(*[nn.Sequential(
            Residual(nn.Sequential(nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"),
                                   act_layer(), nn.BatchNorm2d(dim))),
            nn.Conv2d(dim, dim, kernel_size=1), act_layer(), nn.BatchNorm2d(dim))
            for _ in range(depth)])
        pooling = nn.AdaptiveAvgPool2d(1) if pool == "avg" else nn.AdaptiveMaxPool2d(1)
        self.global_pool = nn.Sequential(pooling, nn.Flatten(1))
        self.head_drop = nn.Dropout(0.0)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(self.head_drop(self.global_pool(x)))


def _randomise_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("cfg", [
    dict(dim=8, depth=2, kernel_size=5, patch_size=2, in_chans=3, num_classes=7),
    dict(dim=12, depth=3, kernel_size=9, patch_size=4, in_chans=1, num_classes=0),
    dict(dim=6, depth=0, kernel_size=9, patch_size=3, in_chans=3, num_classes=4),
])
def test_infer_config_from_shapes(cfg):
    sd = ConvMixer(**cfg).state_dict()
    assert infer_config(sd).__dict__ == cfg
    # checkpoints as training scripts save them: wrapped, and with DDP's prefix
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}
    assert infer_config(wrapped).__dict__ == cfg


def test_from_timm_state_dict_loads_and_matches_eager():
    src = _randomise_bn(TimmLikeConvMixer(dim=8, depth=2, kernel_size=5, patch_size=2,
                                          num_classes=5, act_layer=nn.ReLU)).double().eval()
    model = from_timm(src.state_dict(), act="relu")
    assert model.fused and model.act == "relu" and model.stem[0].weight.dtype == torch.float64
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64)
    torch.testing.assert_close(model.eval()(x), src(x), rtol=1e-10, atol=1e-10)
    eager = from_timm({"model": src.state_dict()}, act="relu", fused=False).eval()
    assert not eager.fused
    torch.testing.assert_close(eager(x), src(x), rtol=1e-12, atol=1e-12)


def test_activation_from_model_name_or_architecture():
    sd = convmixer_768_32(depth=1, num_classes=3).state_dict()  # ReLU in timm
    assert from_timm(sd, model_name="convmixer_768_32.in1k").act == "relu"
    assert from_timm(sd, model_name="fused_convmixer_768_32").act == "relu"
    assert from_timm(sd, act="relu").act == "relu"
    assert from_timm(sd, act="gelu").act == "gelu"  # the caller's word wins
    full = {k: v.to("meta") for k, v in convmixer_768_32(num_classes=3).state_dict().items()}
    assert infer_config(full).depth == 32
    assert from_timm(full).act == "relu"  # the shapes are timm's convmixer_768_32
    with pytest.raises(ValueError, match="stem.0.weight"):
        from_timm({"encoder.weight": torch.zeros(3)})
    with pytest.raises(TypeError, match="nn.Module or a state_dict"):
        from_timm([1, 2])


def test_from_timm_never_guesses_the_activation():
    # depth 1 matches no known model: the weights cannot tell GELU from ReLU
    sd = convmixer_768_32(depth=1, num_classes=3).state_dict()
    wanted = re.escape(" or ".join(f"act={n!r}" for n in NAMES))
    with pytest.raises(ValueError, match=rf"dim=768, depth=1.*{wanted}"):
        from_timm(sd)
    with pytest.raises(ValueError, match="act must be one of"):
        from_timm(sd, act="tanh")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_from_timm_keeps_the_state_dicts_dtype_and_values(dtype):
    torch.manual_seed(0)
    src = _randomise_bn(TimmLikeConvMixer(dim=8, depth=2, kernel_size=5, patch_size=2,
                                          num_classes=5)).to(dtype)
    with torch.no_grad():  # values float32 cannot hold: a round trip through it would show
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 1e-9)
    sd = src.state_dict()
    model = from_timm(sd, act="gelu")
    for name, value in model.state_dict().items():
        assert value.dtype == sd[name].dtype and torch.equal(value, sd[name]), name
        assert value.data_ptr() != sd[name].data_ptr(), f"{name} shares the caller's storage"
    assert model.pretrained_cfg["crop_pct"] == 0.96


def test_fuse_our_model_in_place():
    model = ConvMixer(dim=8, depth=1, kernel_size=3, patch_size=2, num_classes=3)
    assert fuse(model) is model and model.fused
    assert fuse(model, backend="cpu").backend == "cpu"
    with pytest.raises(ValueError, match="unknown backend"):
        fuse(model, backend="tpu")


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_fuse_timm_layout_module_shares_parameters(pool):
    torch.manual_seed(0)
    src = _randomise_bn(TimmLikeConvMixer(dim=8, depth=2, kernel_size=3, patch_size=2,
                                          num_classes=4, pool=pool)).double()
    reference = TimmLikeConvMixer(dim=8, depth=2, kernel_size=3, patch_size=2, num_classes=4,
                                  pool=pool).double()
    reference.load_state_dict(src.state_dict())
    fused = fuse(src)
    assert isinstance(fused, ConvMixer) and fused.fused and fused.act == "gelu"
    assert {id(p) for p in fused.parameters()} == {id(p) for p in src.parameters()}
    assert fused.state_dict().keys() == src.state_dict().keys()
    x = torch.randn(3, 3, 10, 10, dtype=torch.float64)
    y = torch.randint(0, 4, (3,))
    # one training step through each: same outputs, gradients, and running statistics
    for m in (fused, reference):
        nn.functional.cross_entropy(m(x), y).backward()
    for (name, a), b in zip(fused.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10, msg=name)
    for (name, a), b in zip(fused.named_buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)
    assert torch.equal(src.blocks[1][3].running_mean, fused.blocks[1][3].running_mean)


def test_fuse_rejects_what_the_ops_cannot_run():
    tanh_gelu = TimmLikeConvMixer(dim=4, depth=1, kernel_size=3, patch_size=2, num_classes=2,
                                  act_layer=lambda: nn.GELU(approximate="tanh"))
    with pytest.raises(ValueError, match="exact .erf. nn.GELU"):
        fuse(tanh_gelu)
    mixed = TimmLikeConvMixer(dim=4, depth=1, kernel_size=3, patch_size=2, num_classes=2)
    mixed.blocks[0][2] = nn.ReLU()
    with pytest.raises(ValueError, match="mixes activations"):
        fuse(mixed)
    strided = TimmLikeConvMixer(dim=4, depth=1, kernel_size=3, patch_size=2, num_classes=2)
    strided.blocks[0][0].fn[0] = nn.Conv2d(4, 4, 3, groups=4, padding=1, dilation=1, stride=2)
    with pytest.raises(ValueError, match="blocks.0.0.fn.0"):
        fuse(strided)
    with pytest.raises(ValueError, match="not a timm-style ConvMixer"):
        fuse(nn.Linear(2, 2))


FAKE_TIMM = '''
import sys
_registry = {}
def is_model(name): return name in _registry
def register_model(fn):
    _registry[fn.__name__] = fn
    return fn
def list_models(pattern="*"):
    import fnmatch
    return sorted(n for n in _registry if fnmatch.fnmatch(n, pattern))
def create_model(name, pretrained=False, **kwargs):
    return _registry[name](pretrained=pretrained, **kwargs)
def build_model_with_cfg(model_cls, variant, pretrained, pretrained_cfg=None,
                         pretrained_cfg_overlay=None, feature_cfg=None, cache_dir=None, **kwargs):
    cfg = dict(pretrained_cfg or {}, **(pretrained_cfg_overlay or {}))
    kwargs.setdefault("num_classes", cfg.get("num_classes", 1000))
    model = model_cls(**kwargs)
    model.pretrained_cfg = model.default_cfg = cfg
    return model
'''


@pytest.mark.parametrize("order", ["ours_first", "timm_first"])
def test_registry_hook_with_a_stand_in_timm(tmp_path, order):
    pkg = tmp_path / "timm"
    (pkg / "models").mkdir(parents=True)
    (pkg / "models" / "__init__.py").write_text(FAKE_TIMM)
    (pkg / "__init__.py").write_text("from .models import create_model, list_models\n")
    imports = ("import convmixer_kernels, timm" if order == "ours_first"
               else "import timm, convmixer_kernels")
    script = textwrap.dedent(f"""
        import sys
        {imports}
        assert timm.__file__.startswith({str(tmp_path)!r}), timm.__file__  # never the real one
        print(timm.list_models("fused_*"))
        m = timm.create_model("fused_convmixer_256_8", depth=1, backend="cpu")
        print(type(m).__name__, m.fused, m.backend, len(m.blocks), m.num_classes)
        m = timm.create_model("fused_convmixer_768_32", depth=1, num_classes=3, sync_bn=True)
        print(m.act, m.num_classes, m.sync_bn, m.pretrained_cfg["crop_pct"])
    """)
    env = {"PYTHONPATH": f"{tmp_path}:{':'.join(sys.path)}", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=120, cwd=PACKAGE_PARENT)
    assert out.returncode == 0, out.stderr
    names, built, act = out.stdout.splitlines()
    assert names == str(["fused_convmixer_1024_20_ks9_p14", "fused_convmixer_1536_20",
                         "fused_convmixer_256_8", "fused_convmixer_768_32"])
    assert built == "ConvMixer True cpu 1 10"
    assert act == "relu 3 True 0.96"


def test_importing_us_never_imports_timm():
    script = ("import sys; sys.modules['timm'] = None\n"  # any import of timm would now fail
              "import convmixer_kernels as ck\n"
              "m = ck.from_timm(ck.ConvMixer(8, 1, num_classes=2).state_dict(), act='gelu')\n"
              "print(m.fused)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={"PYTHONPATH": ":".join(sys.path), "OMP_NUM_THREADS": "1"}, cwd=PACKAGE_PARENT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


# ---------------------------------------------------------------------------------------------
# Against the real timm, when it is installed.

def test_real_timm_models_convert_and_register():
    timm = pytest.importorskip("timm")
    from timm.models.convmixer import ConvMixer as TimmConvMixer
    torch.manual_seed(0)
    src = _randomise_bn(TimmConvMixer(dim=8, depth=2, kernel_size=3, patch_size=2,
                                      num_classes=5, act_layer=nn.ReLU)).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    expected = src(x)
    loaded = from_timm(src.state_dict(), act="relu").eval()
    torch.testing.assert_close(loaded(x), expected, rtol=1e-10, atol=1e-10)
    fused = fuse(src)
    assert fused.stem is src.stem and fused.global_pool is src.global_pool
    torch.testing.assert_close(fused(x), expected, rtol=1e-10, atol=1e-10)

    # timm was imported after us (by importorskip): the hook registered our names
    assert "fused_convmixer_768_32" in timm.list_models("fused_*")
    model = timm.create_model("fused_convmixer_768_32", num_classes=3)  # timm's: no overrides
    assert isinstance(model, ConvMixer) and model.fused and model.act == "relu"
    assert model.pretrained_cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    assert "convmixer_768_32" in timm.list_models("convmixer_*")  # timm's own, untouched


def _real_timm():
    timm = pytest.importorskip("timm")
    return timm


@pytest.mark.parametrize("name", ["convmixer_1536_20", "convmixer_768_32",
                                  "convmixer_1024_20_ks9_p14"])
def test_real_timm_pretrained_cfg_on_every_route(name):
    timm = _real_timm()
    import convmixer_kernels as ck
    with torch.device("meta"):
        theirs = timm.create_model(name)
        ours = [getattr(ck, name)(), timm.create_model(f"fused_{name}"), fuse(theirs)]
    for model in ours:
        assert model.pretrained_cfg == theirs.pretrained_cfg
        assert model.default_cfg == theirs.pretrained_cfg
        assert (timm.data.resolve_data_config({}, model=model)
                == timm.data.resolve_data_config({}, model=theirs))


def test_real_timm_layer_decay_groups():
    timm = _real_timm()
    import timm.optim  # noqa: F401  (not imported by `import timm`)
    with torch.device("meta"):
        theirs = timm.create_model("convmixer_768_32")
        ours = [convmixer_768_32(), timm.create_model("fused_convmixer_768_32"), fuse(theirs)]

    def groups(model):
        opt = timm.optim.create_optimizer_v2(model, "sgd", lr=0.1, layer_decay=0.7)
        names = {id(p): n for n, p in model.named_parameters()}
        return sorted((g["lr_scale"], g["weight_decay"], tuple(sorted(names[id(p)]
                       for p in g["params"]))) for g in opt.param_groups)

    expected = groups(theirs)
    assert len(expected) == 68
    for model in ours:
        assert groups(model) == expected


@pytest.mark.parametrize("fused", [False, True])
def test_real_timm_features_only(fused):
    timm = _real_timm()
    torch.manual_seed(0)
    theirs = timm.create_model("convmixer_768_32", features_only=True,
                               out_indices=(0, 15, -1)).double().eval()
    ours = timm.create_model("fused_convmixer_768_32", features_only=True, fused=fused,
                             out_indices=(0, 15, -1)).double().eval()
    ours.load_state_dict(theirs.state_dict())
    assert ours.feature_info.channels() == theirs.feature_info.channels() == [768] * 3
    x = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    for a, b in zip(ours(x), theirs(x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    default = timm.create_model("fused_convmixer_768_32", features_only=True)
    assert default.feature_info.module_name() == ["blocks.29", "blocks.30", "blocks.31"]


@pytest.mark.parametrize("pool", ["", "avg", "max", "avgmax", "catavgmax", "fast"])
@pytest.mark.parametrize("fused", [False, True])
def test_real_timm_classifier_and_intermediates(pool, fused):
    _real_timm()
    from timm.models.convmixer import ConvMixer as TimmConvMixer
    torch.manual_seed(0)
    theirs = _randomise_bn(TimmConvMixer(dim=8, depth=3, kernel_size=3, patch_size=2,
                                         num_classes=5)).double().eval()
    ours = from_timm(theirs.state_dict(), act="gelu", fused=fused).eval()
    classes = 4 if pool else 0  # a head on the unpooled map is no classifier, in timm either
    for m in (theirs, ours):
        m.reset_classifier(classes, global_pool=pool)
    ours.head.load_state_dict(theirs.head.state_dict())
    assert ours.head_hidden_size == theirs.head_hidden_size
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)
    for kw in [{}, dict(indices=2), dict(indices=[0, -1], stop_early=True)]:
        a, b = ours.forward_intermediates(x, **kw), theirs.forward_intermediates(x, **kw)
        torch.testing.assert_close(a[0], b[0], rtol=1e-10, atol=1e-10)
        for u, v in zip(a[1], b[1], strict=True):
            torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)
    assert ours.prune_intermediate_layers(2) == theirs.prune_intermediate_layers(2)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)


def test_real_timm_offline_pretrained_weights_from_a_local_file(tmp_path):
    timm = _real_timm()
    torch.manual_seed(0)
    source = _randomise_bn(timm.create_model("convmixer_768_32"))
    path = str(tmp_path / "convmixer_768_32.in1k.pth")
    torch.save(source.state_dict(), path)
    model = timm.create_model("fused_convmixer_768_32", pretrained=True,
                              pretrained_cfg_overlay=dict(file=path))
    assert model.fused and model.pretrained_cfg["file"] == path
    for name, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    with pytest.raises(RuntimeError, match="no published weights"):
        timm.create_model("fused_convmixer_256_8", pretrained=True)
