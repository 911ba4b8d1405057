"""timm interop: timm ConvMixer checkpoints and modules in, fused ConvMixers out.

Our module tree and state_dict keys are timm's, so a timm checkpoint loads as it is once the
architecture is known; `infer_config` reads dim, depth, kernel, patch, input channels and classes
off the tensor shapes. The activation leaves no trace in the weights: it comes from the caller or
from the known timm model it matches, and is never guessed.

timm stays optional. Nothing here imports it at module level; `register_timm_models` adds
``fused_convmixer_*`` entry points to timm's registry, and `install_timm_hook` arranges for that
to happen as soon as timm is imported (or at once, if it already is).
"""
from __future__ import annotations

import importlib.abc
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import nn

from .activations import ACTIVATIONS, NAMES, activation_of_layer
from .model import ARCHITECTURES, ConvMixer, architecture_args
from .ops.backend import check_backend
from .pretrained import pretrained_cfg

__all__ = ["from_timm", "fuse", "infer_config", "install_timm_hook", "register_timm_models"]

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.0\.fn\.0\.weight$")


@dataclass(frozen=True)
class ConvMixerConfig:
    dim: int
    depth: int
    kernel_size: int
    patch_size: int
    in_chans: int
    num_classes: int


def _unwrap_state_dict(obj: Mapping) -> dict:
    """The bare state_dict of a checkpoint: under 'state_dict'/'model', without DDP's 'module.'."""
    for key in ("state_dict", "model"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def infer_config(state_dict: Mapping) -> ConvMixerConfig:
    """ConvMixer's architecture, read off the shapes of a (timm-keyed) state_dict."""
    sd = _unwrap_state_dict(state_dict)
    stem = sd.get("stem.0.weight")
    if not isinstance(stem, torch.Tensor) or stem.dim() != 4:
        raise ValueError("not a ConvMixer state_dict: no 4-d 'stem.0.weight' (keys look like "
                         f"{sorted(sd)[:4]})")
    dim, in_chans, patch, _ = stem.shape
    blocks = sorted(int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k)))
    if blocks != list(range(len(blocks))):
        raise ValueError(f"ConvMixer state_dict has non-contiguous blocks {blocks}")
    kernel = sd["blocks.0.0.fn.0.weight"].shape[-1] if blocks else 9
    head = sd.get("head.weight")
    return ConvMixerConfig(dim=dim, depth=len(blocks), kernel_size=kernel, patch_size=patch,
                           in_chans=in_chans, num_classes=head.shape[0] if head is not None else 0)


def _known_model(cfg: ConvMixerConfig, model_name: Optional[str]) -> Optional[str]:
    """The paper model a state_dict is, by its timm name ("convmixer_768_32.in1k") or shapes."""
    if model_name is not None:
        base = model_name.split(".")[0].removeprefix("fused_")
        if base in ARCHITECTURES:
            return base
    arch = (cfg.dim, cfg.depth, cfg.kernel_size, cfg.patch_size)
    for name, known in ARCHITECTURES.items():
        if arch == (known["dim"], known["depth"], known["kernel_size"], known["patch_size"]):
            return name
    return None


def _module_act(module: nn.Module) -> str:
    spec = activation_of_layer(module)
    if spec is None:
        implemented = " and ".join(a.description for a in ACTIVATIONS.values())
        raise ValueError(f"unsupported activation {module!r}: the fused ops implement "
                         f"{implemented}")
    return spec.name


def _is_bn(m) -> bool:
    return isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm))


def _check_conv(conv, what: str, channels: tuple, kernel: int, groups: int, stride: int) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"{what} must be an nn.Conv2d, got {type(conv).__name__}")
    pad = kernel // 2
    ok = ((conv.in_channels, conv.out_channels) == channels
          and conv.kernel_size == (kernel, kernel) and conv.groups == groups
          and conv.stride == (stride, stride) and conv.dilation == (1, 1)
          and conv.padding_mode == "zeros"
          and (stride > 1 or conv.padding in ("same", (pad, pad))))
    if not ok:
        raise ValueError(f"{what} is {conv}, not the ConvMixer layer the fused ops implement")


def _structure(model: nn.Module) -> tuple[str, nn.Module]:
    """Checks that `model` is a ConvMixer in timm's layout; returns (act, its pooling module)."""
    # timm >= 0.9 (and we) call it global_pool (SelectAdaptivePool2d), older timm pooling
    pooling = getattr(model, "global_pool", None)
    if pooling is None:
        pooling = getattr(model, "pooling", None)
    missing = [a for a in ("stem", "blocks", "head_drop", "head") if not hasattr(model, a)]
    if missing or pooling is None:
        raise ValueError(f"{type(model).__name__} is not a timm-style ConvMixer: it has no "
                         f"{', '.join(missing) or 'global_pool/pooling'}")
    stem, blocks = model.stem, model.blocks
    if not (isinstance(stem, nn.Sequential) and len(stem) == 3
            and isinstance(stem[0], nn.Conv2d) and _is_bn(stem[2])):
        raise ValueError(f"ConvMixer stem must be Sequential(Conv2d, act, BatchNorm2d), got {stem}")
    dim, in_chans, patch, _ = stem[0].weight.shape
    _check_conv(stem[0], "stem.0", (in_chans, dim), patch, 1, patch)
    act = _module_act(stem[1])
    for i, block in enumerate(blocks):
        # Residual is matched by name: timm has its own class, with the same fn(x) + x.
        shape_ok = (isinstance(block, nn.Sequential) and len(block) == 4
                    and type(block[0]).__name__ == "Residual"
                    and isinstance(getattr(block[0], "fn", None), nn.Sequential)
                    and len(block[0].fn) == 3 and _is_bn(block[0].fn[2]) and _is_bn(block[3]))
        if not shape_ok:
            raise ValueError(f"blocks.{i} is not a ConvMixer block "
                             "Sequential(Residual(Sequential(dwconv, act, BN)), conv1x1, act, BN)")
        if not isinstance(block[0].fn[0], nn.Conv2d):
            raise ValueError(f"blocks.{i}.0.fn.0 must be an nn.Conv2d")
        dw = block[0].fn[0]
        _check_conv(dw, f"blocks.{i}.0.fn.0", (dim, dim), dw.kernel_size[0], dim, 1)
        _check_conv(block[1], f"blocks.{i}.1", (dim, dim), 1, 1, 1)
        for a in (block[0].fn[1], block[2]):
            if _module_act(a) != act:
                raise ValueError(f"blocks.{i} mixes activations; the fused ops use one throughout")
    return act, pooling


def fuse(model: nn.Module, backend: Optional[str] = None) -> ConvMixer:
    """The fused ConvMixer for an eager one, with the very same parameters and buffers.

    Our ConvMixer is switched to the fused path in place and returned. Any other module with
    timm's ConvMixer layout (timm's own, for instance) is checked, then wrapped: the returned
    ConvMixer *is made of its submodules*, so the two share every parameter and buffer (an
    optimizer built for one trains the other) and its pooling (timm's global_pool setting)
    is kept.
    """
    return _adopt(model, fused=True, backend=backend)


def _adopt(model: nn.Module, fused: bool, backend: Optional[str]) -> ConvMixer:
    if isinstance(model, ConvMixer):
        model.fused = fused
        if backend is not None:
            check_backend(backend)
            model.backend = backend
        return model
    act, pooling = _structure(model)
    cfg = infer_config(model.state_dict())
    # depth 0 and no head: the placeholders we are about to replace cost next to nothing.
    out = ConvMixer(dim=cfg.dim, depth=0, kernel_size=cfg.kernel_size, patch_size=cfg.patch_size,
                    in_chans=cfg.in_chans, num_classes=0, act=act, fused=fused,
                    backend=backend or "auto")
    out.stem, out.blocks, out.global_pool = model.stem, model.blocks, pooling
    out.head_drop, out.head = model.head_drop, model.head
    out.num_classes = getattr(model, "num_classes", cfg.num_classes)
    feat_mult = getattr(pooling, "feat_mult", None)
    out.head_hidden_size = cfg.dim * (feat_mult() if callable(feat_mult) else 1)
    out.grad_checkpointing = getattr(model, "grad_checkpointing", False)
    out.refresh_feature_info()
    if hasattr(model, "pretrained_cfg"):
        out.pretrained_cfg = out.default_cfg = model.pretrained_cfg
    return out.train(model.training)


def from_timm(model_or_state_dict, *, act: Optional[str] = None, model_name: Optional[str] = None,
              fused: bool = True, backend: str = "auto", **kwargs) -> ConvMixer:
    """Our ConvMixer from a timm ConvMixer module, or from any timm ConvMixer state_dict.

    A module is adopted as `fuse` does (shared parameters; `act` is read from its layers).
    A state_dict (or a checkpoint holding one under 'state_dict'/'model', with or without
    DDP's 'module.' prefix) gives a new ConvMixer with the inferred architecture, holding the
    state_dict's own values in their own dtype and device (loaded strictly, copied).

    The weights do not say which activation they were trained with. It is the known timm
    model's (named by `model_name`, e.g. "convmixer_768_32.in1k", or matched by the shapes);
    for any other architecture `act` is required. `kwargs` go to ConvMixer (e.g. drop_rate,
    sync_bn).
    """
    if isinstance(model_or_state_dict, nn.Module):
        if act is not None or kwargs:
            raise TypeError("from_timm(module): act and ConvMixer options come from the module")
        return _adopt(model_or_state_dict, fused=fused, backend=backend)
    if not isinstance(model_or_state_dict, Mapping):
        raise TypeError("from_timm expects an nn.Module or a state_dict, got "
                        f"{type(model_or_state_dict).__name__}")
    sd = _unwrap_state_dict(model_or_state_dict)
    cfg = infer_config(sd)
    known = _known_model(cfg, model_name)
    if act is None:
        if known is None:
            names = ", ".join(ARCHITECTURES)
            raise ValueError(
                f"from_timm: a ConvMixer with dim={cfg.dim}, depth={cfg.depth}, "
                f"kernel_size={cfg.kernel_size}, patch_size={cfg.patch_size} is none of the known "
                f"models ({names}), and its weights do not record the activation: pass "
                + " or ".join(f"act={n!r}" for n in NAMES))
        act = ARCHITECTURES[known]["act"]
    # Built on the meta device, then given the state_dict's tensors (copies): no rounding
    # through the default dtype, and no second allocation.
    model = ConvMixer(dim=cfg.dim, depth=cfg.depth, kernel_size=cfg.kernel_size,
                      patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                      num_classes=cfg.num_classes, act=act, fused=fused, backend=backend,
                      device="meta", **kwargs)
    model.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True,
                          assign=True)
    if known is not None:
        model.pretrained_cfg = model.default_cfg = pretrained_cfg(known)
    return model


# ---------------------------------------------------------------------------------------------
# timm registry.

TIMM_NAMES = {f"fused_{name}": name for name in ARCHITECTURES}
_SOURCE_KEYS = ("url", "file", "state_dict", "hf_hub_id")


def _timm_entrypoint(name: str):
    base = TIMM_NAMES[name]

    def create(pretrained: bool = False, **kwargs) -> ConvMixer:
        # timm's own builder does for our class what it does for its ConvMixer: the
        # pretrained_cfg (with any overlay), weights from the hub, a URL or a local file,
        # features_only through forward_intermediates (out_indices: timm's default, the last 3).
        from timm.models import build_model_with_cfg, is_model  # only ever called by timm
        kwargs.setdefault("fused", True)
        out_indices = kwargs.pop("out_indices", 3)
        if not is_model(base):  # the CIFAR model: our configuration, and no published weights
            if not kwargs.get("pretrained_cfg"):
                kwargs["pretrained_cfg"] = pretrained_cfg(base)
            overlay = kwargs.get("pretrained_cfg_overlay") or {}
            if pretrained and not any(overlay.get(k) for k in _SOURCE_KEYS):
                raise RuntimeError(
                    f"{name}: there are no published weights for {base}; pass "
                    "pretrained_cfg_overlay=dict(file=...) to load your own")
        return build_model_with_cfg(
            ConvMixer, base, pretrained,
            feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
            **architecture_args(base, **kwargs))

    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = f"timm entry point: {base} on the fused kernels (convmixer_kernels)."
    return create


def register_timm_models() -> list[str]:
    """Registers ``fused_convmixer_*`` in timm's model registry; returns the names.

    Idempotent. Raises ImportError when timm is not installed.
    """
    from timm.models import is_model, register_model
    module = sys.modules[__name__]
    for name in TIMM_NAMES:
        if not is_model(name):
            entry = _timm_entrypoint(name)
            setattr(module, name, entry)  # register_model looks the function up in its module
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                register_model(entry)
    return list(TIMM_NAMES)


class _TimmImportHook(importlib.abc.MetaPathFinder):
    """Registers our models right after `import timm` finishes, whenever that happens."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from recursing
        spec = None
        for finder in sys.meta_path:  # the finders import would ask next, in the same order
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register_quietly()

        spec.loader.exec_module = exec_then_register
        return spec


def _register_quietly() -> None:
    try:
        register_timm_models()
    except Exception as e:  # timm is optional: a timm we cannot register with must not break it
        warnings.warn(f"convmixer_kernels: could not register fused models with timm: {e}")


def install_timm_hook() -> None:
    """Makes ``timm.create_model("fused_convmixer_768_32")`` work without importing timm now."""
    if sys.modules.get("timm") is not None:
        _register_quietly()
    elif not any(isinstance(f, _TimmImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TimmImportHook())
