"""The paper's ImageNet networks, registered in timm's model registry.

After ``import robustbench_conn``::

    model = timm.create_model("conn_levit_128", connection="ShareExpDecayLearnDecay_AbsExp_Adam_RestaLayerIdx3",
                              init_decay=0.7)

==============================  =========================================  ====================================
name                            timm twin (same function when residual)    blocks carrying the connection
==============================  =========================================  ====================================
``conn_convnext_small``         ``convnext_small``                         the 27 blocks of stage 3
``conn_convnext_small_narrow``  ``convnext_small`` with dims 48..384        the 27 blocks of stage 3
``conn_levit_128``              ``levit_128``                              12 blocks (attn + MLP) + 2 subsample MLPs
``conn_levit_256d``             ``levit_256d``                             18 blocks (attn + MLP) + 2 subsample MLPs
``conn_preresnet50d``           ``resnetv2_50d``                           12 identity-shortcut bottlenecks
``conn_preresnet38d``           ``resnetv2_50d`` with layers 3,3,3,3       8 identity-shortcut bottlenecks
==============================  =========================================  ====================================

Connection keyword arguments (besides timm's own: ``num_classes``, ``drop_path_rate``, ``img_size`` ...):

- ``connection``: ``'residual'`` (default), ``'suppression'``, a paper settings string, a mapping of
  :class:`ConnectionConfig` fields or a config.
- ``init_decay``, ``decay_lr``, ``decay_scale`` and any other :class:`ConnectionConfig` field (``parametrisation``,
  ``learnable``, ``shared``, ``optimizer``, ``kind``): override the config's fields.
- ``restart_period``: ``l`` restarts every R blocks; ``0`` or ``'none'`` for no restart (``timm.create_model``
  drops keyword arguments whose value is ``None``, so ``None`` cannot be passed through it).

LeViT's default ``decay_scale`` is 0.1 (the research code's ``d = |0.1 * delta|``), applied unless the connection
is given as a :class:`ConnectionConfig` or a mapping that sets ``decay_scale``, or ``decay_scale=`` is passed.
The initial decay is never chosen per family: pass the paper's ``init_decay`` (0.7 LeViT and PreResNet, 0 ConvNeXt).

Where the research code was silent we chose, and say so here: PreResNet-50/38 carry the connection on every
identity-shortcut bottleneck; LeViT carries it also on the MLP residual that follows each attention-subsample
(``suppress_downsample_mlp=False`` leaves those two residual). ``l`` is the block's index in its stage (0-based,
modulo the restart period); the subsample MLP has ``l = 0``.

``features_only=True`` works for every residual model and for suppression LeViT (timm's getter wrapper keeps the
shared delta); for suppression ConvNeXt/PreResNet it raises, since timm's FeatureListNet would drop the delta.

``pretrained=True`` loads the twin's timm weights where the twin has them (ConvNeXt-S: ``fb_in1k``, LeViT-128:
``fb_dist_in1k``); a suppression model keeps its own initial ``delta``.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable, Mapping

import timm
from timm.layers import BatchNormAct2d, create_conv2d
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models import convnext as _convnext
from timm.models import levit as _levit
from torch import nn

from .connection import ConnectionConfig, resolve_connection
from .imagenet_blocks import (SHARED_DECAY_KEY, ConnConvNeXt, ConnLevit, ConnLevitDistilled, ConnResNetV2,
                              connection_blocks, suppressed_blocks)

__all__ = ["CONN_MODELS", "TWINS", "create_twin", "load_twin_state_dict", "suppressed_blocks", "connection_blocks",
           "connection_from_kwargs", "SHARED_DECAY_KEY"]

# conn_* name -> (timm model name, keyword arguments that give the twin this model's shape)
TWINS: dict[str, tuple[str, dict]] = {
    "conn_convnext_small": ("convnext_small", {}),
    "conn_convnext_small_narrow": ("convnext_small", {"dims": (48, 96, 192, 384)}),
    "conn_levit_128": ("levit_128", {}),
    "conn_levit_256d": ("levit_256d", {}),
    "conn_preresnet50d": ("resnetv2_50d", {}),
    "conn_preresnet38d": ("resnetv2_50d", {"layers": (3, 3, 3, 3)}),
}
CONN_MODELS = tuple(TWINS)


def _twin_cfg(twin: str, **overrides) -> dict:
    """The twin's pretrained config (input size, mean/std, classifier name, weights where it has them)."""
    cfg = get_pretrained_cfg(twin).to_dict()
    for key in ("architecture", "tag"):
        cfg.pop(key, None)
    cfg.update(overrides)
    return cfg


_UNTRAINED = dict(url="", hf_hub_id=None)
default_cfgs = generate_default_cfgs({
    "conn_convnext_small.fb_in1k": _twin_cfg("convnext_small.fb_in1k"),
    "conn_convnext_small_narrow.untrained": _twin_cfg("convnext_small.fb_in1k", **_UNTRAINED),
    "conn_levit_128.fb_dist_in1k": _twin_cfg("levit_128.fb_dist_in1k"),
    "conn_levit_256d.untrained": _twin_cfg("levit_256d"),
    "conn_preresnet50d.untrained": _twin_cfg("resnetv2_50d"),
    "conn_preresnet38d.untrained": _twin_cfg("resnetv2_50d"),
})


_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(ConnectionConfig)
                       if f.name not in ("init_decay", "decay_lr", "restart_period"))


def connection_from_kwargs(kwargs: dict, default_decay_scale: float = 1.0) -> ConnectionConfig:
    """Pop the connection keyword arguments from ``kwargs`` and resolve them into a config (see module doc)."""
    connection = kwargs.pop("connection", None)
    init_decay = kwargs.pop("init_decay", None)
    decay_lr = kwargs.pop("decay_lr", None)
    restart_period = kwargs.pop("restart_period", "keep")
    if restart_period in (0, "none", "None"):
        restart_period = None
    overrides: dict[str, Any] = {name: kwargs.pop(name) for name in _CONFIG_FIELDS if name in kwargs}
    if "decay_scale" not in overrides and not (
            isinstance(connection, ConnectionConfig)
            or (isinstance(connection, Mapping) and "decay_scale" in connection)):
        overrides["decay_scale"] = default_decay_scale
    return resolve_connection(connection, init_decay=init_decay, restart_period=restart_period, decay_lr=decay_lr,
                              **overrides)


def _keep_own_decay(twin_filter: Callable | None, state_dict: dict, model: nn.Module) -> dict:
    """Pretrained filter: the twin's own filter, then the model's initial ``delta`` where the checkpoint has none."""
    if twin_filter is not None:
        state_dict = twin_filter(state_dict, model)
    own = model.state_dict()
    if SHARED_DECAY_KEY in own and SHARED_DECAY_KEY not in state_dict:
        state_dict = dict(state_dict)
        state_dict[SHARED_DECAY_KEY] = own[SHARED_DECAY_KEY]
    return state_dict


@dataclasses.dataclass(frozen=True)
class _Family:
    twin_filter: Callable | None
    feature_cfg: dict
    decay_scale: float = 1.0


_FAMILIES = {
    "convnext": _Family(_convnext.checkpoint_filter_fn, dict(out_indices=(0, 1, 2, 3), flatten_sequential=True)),
    "levit": _Family(_levit.checkpoint_filter_fn, dict(flatten_sequential=True), decay_scale=0.1),
    "resnetv2": _Family(None, dict(flatten_sequential=True)),
}


def _create(family: str, model_cls: type, variant: str, pretrained: bool, **kwargs) -> nn.Module:
    """The one builder per family: resolve the connection, then timm's ``build_model_with_cfg``."""
    spec = _FAMILIES[family]
    config = connection_from_kwargs(kwargs, spec.decay_scale)
    feature_cfg = dict(spec.feature_cfg)
    if family == "levit":  # as timm's create_levit
        feature_cfg["out_indices"] = kwargs.pop("out_indices", (0, 1, 2))
    if kwargs.get("features_only", False):
        if family == "levit":  # timm's getter wrapper keeps the whole network, shared delta included
            kwargs.setdefault("feature_cls", "getter")
        elif config.is_suppression and config.shared:
            # timm's FeatureListNet re-wraps the network's children up to the last feature layer, which would
            # leave the shared delta out of the feature model's parameters (used but never trained).
            raise ValueError(f"features_only with a shared suppression decay is not supported for {variant}; "
                             "build the full model and use forward_features instead.")
    return build_model_with_cfg(model_cls, variant, pretrained, connection=config,
                                pretrained_filter_fn=partial(_keep_own_decay, spec.twin_filter),
                                feature_cfg=feature_cfg, **kwargs)


_PREACT_D = dict(conv_layer=create_conv2d, norm_layer=BatchNormAct2d, stem_type="deep", avg_down=True)


@register_model
def conn_convnext_small(pretrained: bool = False, **kwargs) -> ConnConvNeXt:
    """ConvNeXt-S (depths 3,3,27,3, dims 96..768); the connection on the 27 blocks of stage 3."""
    model_args = dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), connection_stages=(2,))
    return _create("convnext", ConnConvNeXt, "conn_convnext_small", pretrained, **dict(model_args, **kwargs))


@register_model
def conn_convnext_small_narrow(pretrained: bool = False, **kwargs) -> ConnConvNeXt:
    """ConvNeXt-S-N (depths 3,3,27,3, dims 48..384); the connection on the 27 blocks of stage 3."""
    model_args = dict(depths=(3, 3, 27, 3), dims=(48, 96, 192, 384), connection_stages=(2,))
    return _create("convnext", ConnConvNeXt, "conn_convnext_small_narrow", pretrained, **dict(model_args, **kwargs))


@register_model
def conn_levit_128(pretrained: bool = False, **kwargs) -> ConnLevitDistilled:
    """LeViT-128 (distilled heads, as timm's levit_128); the connection on every attention and MLP residual."""
    model_args = dict(embed_dim=(128, 256, 384), key_dim=16, num_heads=(4, 8, 12), depth=(4, 4, 4))
    return _create("levit", ConnLevitDistilled, "conn_levit_128", pretrained, **dict(model_args, **kwargs))


@register_model
def conn_levit_256d(pretrained: bool = False, **kwargs) -> ConnLevit:
    """LeViT-256-D (one head, as timm's levit_256d); the connection on every attention and MLP residual."""
    model_args = dict(embed_dim=(256, 384, 512), key_dim=32, num_heads=(4, 6, 8), depth=(4, 8, 6), act_layer="silu")
    return _create("levit", ConnLevit, "conn_levit_256d", pretrained, **dict(model_args, **kwargs))


@register_model
def conn_preresnet50d(pretrained: bool = False, **kwargs) -> ConnResNetV2:
    """Pre-activation ResNet-50-D (timm's resnetv2_50d); the connection on every identity-shortcut bottleneck."""
    model_args = dict(layers=(3, 4, 6, 3), **_PREACT_D)
    return _create("resnetv2", ConnResNetV2, "conn_preresnet50d", pretrained, **dict(model_args, **kwargs))


@register_model
def conn_preresnet38d(pretrained: bool = False, **kwargs) -> ConnResNetV2:
    """Pre-activation ResNet-38-D (layers 3,3,3,3); the connection on every identity-shortcut bottleneck."""
    model_args = dict(layers=(3, 3, 3, 3), **_PREACT_D)
    return _create("resnetv2", ConnResNetV2, "conn_preresnet38d", pretrained, **dict(model_args, **kwargs))


def create_twin(name: str, **kwargs) -> nn.Module:
    """timm's own model of the same shape as ``name`` (a ``conn_*`` model), e.g. to compare or to take weights from."""
    if name not in TWINS:
        raise ValueError(f"{name!r} is not one of {', '.join(CONN_MODELS)}.")
    twin, twin_kwargs = TWINS[name]
    return timm.create_model(twin, **dict(twin_kwargs, **kwargs))


def load_twin_state_dict(model: nn.Module, state_dict: Mapping) -> None:
    """Load a state dict of the timm twin into a ``conn_*`` model: strictly, except that a suppression model keeps
    its own ``shared_decay.delta`` (the only key a timm checkpoint lacks)."""
    if SHARED_DECAY_KEY not in model.state_dict():
        model.load_state_dict(state_dict, strict=True)
        return
    result = model.load_state_dict(state_dict, strict=False)
    if list(result.missing_keys) != [SHARED_DECAY_KEY] or result.unexpected_keys:
        raise RuntimeError(f"state dict does not fit: missing {result.missing_keys}, "
                           f"unexpected {result.unexpected_keys}.")
