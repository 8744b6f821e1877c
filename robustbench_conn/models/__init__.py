"""Models: the connection (residual or suppression), the paper's CIFAR networks, and its ImageNet networks in timm.

    >>> from robustbench_conn.models import create_model
    >>> model = create_model("nrn-58-1-swish", connection="suppression", init_decay=0.2, init_channels=8)
"""
from __future__ import annotations

import warnings
from typing import Mapping

from torch import nn

from .cifar import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, Normalize, PreActResNet,
                    PreActWideResNet, parse_cifar_name)
from .connection import (ArchOptions, ConnectionConfig, SettingsError, SharedDecay, count_parameters,
                         decay_parameters, learned_decay, parameter_groups, parse_settings, resolve_connection)
with warnings.catch_warnings():
    # timm 1.0's hrnet module calls torch.jit.interface, which torch 2.14 deprecates: a warning at every import
    # that users of this package cannot act on.
    warnings.filterwarnings("ignore", message="`torch.jit.interface` is deprecated", category=FutureWarning)
    from . import imagenet  # registers the conn_* models in timm

__all__ = [
    "create_model", "ConnectionConfig", "ArchOptions", "SettingsError", "SharedDecay", "parse_settings",
    "resolve_connection", "decay_parameters", "parameter_groups", "learned_decay", "count_parameters",
    "PreActWideResNet", "PreActResNet", "Normalize", "dataset_stats",
]

_STATS = {10: (CIFAR10_MEAN, CIFAR10_STD), 100: (CIFAR100_MEAN, CIFAR100_STD)}


def dataset_stats(num_classes: int) -> tuple[tuple, tuple]:
    """Normalisation constants: CIFAR-100's for 100 classes, CIFAR-10's otherwise."""
    return _STATS.get(num_classes, _STATS[10])


def create_model(name: str, num_classes: int = 10, connection: "ConnectionConfig | str | Mapping | None" = None, *,
                 init_decay: float | None = None, restart_period: "int | None | str" = "keep",
                 init_channels: int = 16, width_factor: int = 1, mean=None, std=None) -> nn.Module:
    """Build a CIFAR network by name with its connection.

    name: ``wrn-DEPTH-WIDTH-ACT`` / ``nrn-DEPTH-WIDTH-ACT`` (pre-activation wide-resnet; the paper's model is
        ``nrn-58-1-swish`` with ``init_channels=8``) or ``preresnet-DEPTH`` (the paper's: ``preresnet-110``,
        ``width_factor=4``).
    connection: a :class:`ConnectionConfig`, a mapping of its fields, ``'residual'``, ``'suppression'`` or a paper
        settings string; ``init_decay`` and ``restart_period`` override it.
    mean, std: input normalisation inside the model (default: CIFAR-100's for 100 classes, else CIFAR-10's).
    """
    config = resolve_connection(connection, init_decay=init_decay, restart_period=restart_period)
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
    default_mean, default_std = dataset_stats(num_classes)
    mean, std = mean or default_mean, std or default_std
    family, args = parse_cifar_name(name)
    if family == "wrn":
        model = PreActWideResNet(num_classes=num_classes, connection=config, init_channels=init_channels,
                                 mean=mean, std=std, **args)
    else:
        model = PreActResNet(num_classes=num_classes, connection=config, width_factor=width_factor,
                             mean=mean, std=std, **args)
    model.model_name = name
    return model
