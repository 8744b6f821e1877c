"""The paper's CIFAR networks: pre-activation wide-resnets (WRN-58-1) and pre-activation ResNets (PreResNet-110 4x).

Each network takes images in [0, 1] and normalises them with buffers inside the model, as RobustBench expects.
The connection is injected: every block receives its connection layer from a :class:`ConnectionFactory`.

Which blocks are suppressed:
- wide-resnet: every block but the first of each group, as in the research code (the first block of a group is the
  one that changes width or stride there, and it keeps its projection shortcut);
- preresnet: every block whose shortcut is the identity (all but the downsampling ones), since the research code
  of the suppression connection applies it wherever the residual is an identity.
``l`` is the block's index inside its group (0 for the first block), modulo the restart period.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .connection import (ConnectionConfig, ConnectionFactory, SuppressionConnection, accepts_output_scale,
                         suppression_chain)

__all__ = ["PreActWideResNet", "PreActResNet", "Normalize", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN",
           "CIFAR100_STD", "parse_cifar_name"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "swish": nn.SiLU,
    "silu": nn.SiLU,
}


class Normalize(nn.Module):
    """``(x - mean) / std`` with mean and std as buffers, so checkpoints carry them and inputs stay in [0, 1]."""

    def __init__(self, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-act-conv3x3-BN-act-conv3x3, joined to its input by ``connection``.

    A block that changes shape applies its 1x1 projection to the pre-activated input and stays residual.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, act_layer: Callable[[], nn.Module],
                 connection: nn.Module):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.act1 = act_layer()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act2 = act_layer()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
                         if stride != 1 or in_channels != out_channels else None)
        self.connection = connection

    def _hidden(self, preactivated: torch.Tensor) -> torch.Tensor:
        return self.act2(self.bn2(self.conv1(preactivated)))

    def _convs(self, preactivated: torch.Tensor) -> torch.Tensor:
        return self.conv2(self._hidden(preactivated))

    @accepts_output_scale
    def residual_branch(self, x: torch.Tensor, output_scale: torch.Tensor | None = None) -> torch.Tensor:
        """F(x) of the connection formula, times ``output_scale`` (0-dim) when given: applied to conv2's weight
        when that is the smaller tensor (narrow networks, large batches), else to the output (WRN-28-10's
        640x640x3x3 weight outweighs its last stage's output at a small batch)."""
        hidden = self._hidden(self.act1(self.bn1(x)))
        conv = self.conv2  # bias-free, stride 1, zero padding (built above): the output has hidden's size
        if output_scale is None:
            return conv(hidden)
        if conv.weight.numel() > hidden.numel():
            return conv(hidden) * output_scale
        return F.conv2d(hidden, conv.weight * output_scale.to(conv.weight.dtype), None, conv.stride, conv.padding,
                        conv.dilation, conv.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut is not None:
            out = self.act1(self.bn1(x))
            return self.shortcut(out) + self._convs(out)
        return self.connection(x, self.residual_branch)


class BlockGroup(nn.Sequential):
    """A group of blocks. Consecutive suppressed blocks run as one :func:`suppression_chain`: the same function
    as calling them in turn, with fewer full-size passes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chain = []
        for block in self:
            if isinstance(block.connection, SuppressionConnection):
                chain.append((block.connection, block.residual_branch))
                continue
            if chain:
                x, chain = suppression_chain(x, chain), []
            x = block(x)
        return suppression_chain(x, chain) if chain else x


@dataclass(frozen=True)
class _Stage:
    channels: int
    blocks: int
    stride: int


class _PreActNet(nn.Module):
    """Stem conv, stages of :class:`PreActBlock`, final BN-act, global average pool, linear head."""

    def __init__(self, stem_channels: int, stages: list[_Stage], num_classes: int, act: str,
                 connection: ConnectionConfig, suppress_first_block: bool, mean, std):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"activation {act!r} is unknown: use one of {', '.join(ACTIVATIONS)}.")
        act_layer = ACTIVATIONS[act]
        factory = ConnectionFactory(connection)
        self.connection_config = connection
        self.normalize = Normalize(mean, std)
        self.stem = nn.Conv2d(3, stem_channels, 3, 1, 1, bias=False)
        layers, in_channels = [], stem_channels
        for stage in stages:
            blocks = []
            for i in range(stage.blocks):
                stride = stage.stride if i == 0 else 1
                identity = stride == 1 and in_channels == stage.channels
                suppressible = identity and (i > 0 or suppress_first_block)
                blocks.append(PreActBlock(in_channels, stage.channels, stride, act_layer, factory(i, suppressible)))
                in_channels = stage.channels
            layers.append(BlockGroup(*blocks))
        self.stages = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_channels)
        self.act = act_layer()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        if factory.shared_decay is not None:
            self.shared_decay = factory.shared_decay
        self.num_classes = num_classes
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(self.normalize(x)))
        return self.pool(self.act(self.bn(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


class PreActWideResNet(_PreActNet):
    """Pre-activation wide-resnet ``WRN-depth-width``: 3 groups of (depth - 4) / 6 blocks.

    ``init_channels`` is the stem width and the base of the group widths ``init * width * (1, 2, 4)``: 16 gives
    the usual WRN (16, 32, 64)k; the paper's WRN-58-1 uses 8 (groups of 8, 16, 32 channels).
    """

    def __init__(self, depth: int = 28, width: int = 10, num_classes: int = 10, act: str = "relu",
                 connection: ConnectionConfig = ConnectionConfig(), init_channels: int = 16,
                 mean=CIFAR10_MEAN, std=CIFAR10_STD):
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"wide-resnet depth must be 6n + 4 with n >= 1 (e.g. 28, 34, 58, 70), got {depth}.")
        if width < 1 or init_channels < 1:
            raise ValueError(f"width and init_channels must be positive, got {width} and {init_channels}.")
        n = (depth - 4) // 6
        stages = [_Stage(init_channels * width * m, n, s) for m, s in ((1, 1), (2, 2), (4, 2))]
        super().__init__(init_channels, stages, num_classes, act, connection, False, mean, std)


class PreActResNet(_PreActNet):
    """CIFAR pre-activation ResNet ``depth`` = 6n + 2 with basic blocks: 3 stages of n blocks.

    Widths are ``16 * width_factor * (1, 2, 4)``; stride-2 convolutions with 1x1 projection shortcuts downsample
    (the paper's ``BnReluConv_ConvStride2ResLike``). The paper's PreResNet-110 (4x) is depth 110, width factor 4.
    """

    def __init__(self, depth: int = 110, width_factor: int = 1, num_classes: int = 10, act: str = "relu",
                 connection: ConnectionConfig = ConnectionConfig(), mean=CIFAR10_MEAN, std=CIFAR10_STD):
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"preresnet depth must be 6n + 2 with n >= 1 (e.g. 20, 56, 110), got {depth}.")
        if width_factor < 1:
            raise ValueError(f"width_factor must be a positive integer, got {width_factor}.")
        n = (depth - 2) // 6
        base = 16 * width_factor
        stages = [_Stage(base * m, n, s) for m, s in ((1, 1), (2, 2), (4, 2))]
        super().__init__(base, stages, num_classes, act, connection, True, mean, std)


_WRN_NAME = re.compile(r"^(?:wrn|nrn)-(\d+)-(\d+)(?:-([a-z]+?))?(?:-learn)?$")
_PRERESNET_NAME = re.compile(r"^preresnet-(\d+)$")


def parse_cifar_name(name: str) -> tuple[str, dict]:
    """``nrn-58-1-swish`` -> ('wrn', {depth, width, act}); ``preresnet-110`` -> ('preresnet', {depth}).

    The research code's ``-learn`` suffix (``nrn-58-1-swish-learn``) is accepted: the connection config says
    whether the decay is learned.
    """
    m = _WRN_NAME.match(name)
    if m:
        return "wrn", {"depth": int(m.group(1)), "width": int(m.group(2)), "act": m.group(3) or "relu"}
    m = _PRERESNET_NAME.match(name)
    if m:
        return "preresnet", {"depth": int(m.group(1))}
    raise ValueError(f"model name {name!r} is unknown: use wrn-DEPTH-WIDTH-ACT or nrn-DEPTH-WIDTH-ACT "
                     f"(ACT relu or swish, e.g. nrn-58-1-swish) or preresnet-DEPTH (e.g. preresnet-110).")
