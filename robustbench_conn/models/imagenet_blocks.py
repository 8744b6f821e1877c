"""timm's ImageNet networks with the connection injected as a layer: the blocks and networks.

Each ``Conn*Block`` subclasses a timm block and changes only its residual add: ``x + F(x)`` becomes
``connection(x, F)``, where ``F`` is exactly the residual branch of timm's forward (drop-path included). Each
``Conn*`` network subclasses the timm network and takes one extra argument, ``connection`` (a
:class:`~robustbench_conn.models.connection.ConnectionConfig`).

timm's network constructors hard-code their block classes (``ConvNeXtStage`` builds ``ConvNeXtBlock``,
``LevitStage`` builds ``LevitBlock``, ``ResNetV2`` picks ``PreActBottleneck``), so the network is built by timm
itself -- same modules, same order, same initialisation and random draws, same state-dict keys -- and each block
that carries the connection is then re-classed in place to its ``Conn*`` subclass (:meth:`_ConnectedBlock.adopt`),
which adds the ``connection`` layer (no parameters, no state) and the forward that calls it. Which blocks carry it
is decided by position (stage index, whether the shortcut is the identity), never by matching module names.

The network registers the one shared ``delta`` as ``shared_decay`` (state-dict key ``shared_decay.delta``, present
only for a shared suppression connection), so a timm state dict loads strictly into the residual model and, with
that one key added, into the suppression model.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from timm.models.convnext import ConvNeXt, ConvNeXtBlock
from timm.models.levit import Levit, LevitBlock, LevitDistilled, LevitDownsample
from timm.models.resnetv2 import PreActBottleneck, ResNetV2

from .connection import (ConnectionConfig, ConnectionFactory, SuppressionConnection, resolve_connection,
                         suppression_chain)

__all__ = [
    "ConnConvNeXtBlock", "ConnLevitBlock", "ConnLevitDownsample", "ConnPreActBottleneck",
    "ConnConvNeXt", "ConnLevit", "ConnLevitDistilled", "ConnResNetV2", "suppressed_blocks", "connection_blocks",
]

SHARED_DECAY_KEY = "shared_decay.delta"


class _ConnectedBlock:
    """Mixin for a timm block subclass whose residual add is ``self.connection(x, branch)``."""

    connection: nn.Module

    @classmethod
    def adopt(cls, block: nn.Module, connection: nn.Module) -> nn.Module:
        """Turn a block built by timm into this subclass, in place, and give it ``connection``.

        The block keeps its parameters, buffers and submodules (so its initialisation and state-dict keys are
        timm's); only its forward changes, and only in the residual add.
        """
        timm_cls = cls.__mro__[2]  # (cls, _ConnectedBlock, timm block class, ...)
        if type(block) is not timm_cls:
            raise TypeError(f"{cls.__name__}.adopt expects a {timm_cls.__name__}, got {type(block).__name__}.")
        block.__class__ = cls
        block.connection = connection
        return block


class ConnConvNeXtBlock(_ConnectedBlock, ConvNeXtBlock):
    """timm ``ConvNeXtBlock`` with identity shortcut; ``x + F(x)`` -> ``connection(x, F)``."""

    def residual_branch(self, x: torch.Tensor) -> torch.Tensor:
        """F(x): dwconv, norm, MLP, layer scale, drop-path (timm's forward without the add)."""
        x = self.conv_dw(x)
        if self.use_conv_mlp:
            x = self.mlp(self.norm(x))
        else:
            x = self.mlp(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        if self.gamma is not None:
            x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        return self.drop_path(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.connection(x, self.residual_branch)


class ConnLevitBlock(_ConnectedBlock, LevitBlock):
    """timm ``LevitBlock``: both residuals (attention, then MLP) go through the block's one connection layer,
    so they share its ``l``. With the suppression connection the two are fused (:func:`suppression_chain`)."""

    def attn_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path1(self.attn(x))

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path2(self.mlp(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.connection, SuppressionConnection):
            return suppression_chain(x, [(self.connection, self.attn_branch), (self.connection, self.mlp_branch)])
        x = self.connection(x, self.attn_branch)
        return self.connection(x, self.mlp_branch)


class ConnLevitDownsample(_ConnectedBlock, LevitDownsample):
    """timm ``LevitDownsample``: the attention-subsample changes shape (no residual); the MLP residual after it
    is an identity residual and goes through the connection."""

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path(self.mlp(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.connection(self.attn_downsample(x), self.mlp_branch)


class ConnPreActBottleneck(_ConnectedBlock, PreActBottleneck):
    """timm ``PreActBottleneck`` with identity shortcut (no ``downsample``); ``x + F(x)`` -> ``connection(x, F)``."""

    def residual_branch(self, x: torch.Tensor) -> torch.Tensor:
        """F(x): norm-act, conv1x1, norm-act, conv3x3, norm-act, conv1x1, drop-path."""
        x = self.conv1(self.norm1(x))
        x = self.conv2(self.norm2(x))
        x = self.conv3(self.norm3(x))
        return self.drop_path(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.connection(x, self.residual_branch)


class _ConnectedNet:
    """Mixin for a timm network subclass: builds the timm network, then gives its blocks their connection.

    Subclasses implement :meth:`_connect`, which walks the stages and adopts the blocks that carry a connection.
    """

    def __init__(self, *args, connection: ConnectionConfig | str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        config = connection if isinstance(connection, ConnectionConfig) else resolve_connection(connection)
        factory = ConnectionFactory(config)
        self.connection_config = config
        self._connect(factory)
        if factory.shared_decay is not None:
            self.shared_decay = factory.shared_decay

    def _connect(self, factory: ConnectionFactory) -> None:
        raise NotImplementedError

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """timm's optimizer factory skips weight decay for these names; ``delta`` is never weight-decayed."""
        parent = getattr(super(), "no_weight_decay", None)
        names = set(parent()) if parent is not None else set()
        if hasattr(self, "shared_decay"):
            names.add(SHARED_DECAY_KEY)
        return names


class ConnConvNeXt(_ConnectedNet, ConvNeXt):
    """timm ``ConvNeXt`` whose blocks in ``connection_stages`` carry the connection (the research code: stage 2,
    the deep third stage, only). Every ConvNeXt block has an identity shortcut (downsampling is a separate layer
    at the start of a stage), so every block of those stages carries it; ``l`` = block index in the stage."""

    def __init__(self, *args, connection_stages: Sequence[int] = (2,), **kwargs):
        self.connection_stages = tuple(connection_stages)
        super().__init__(*args, **kwargs)

    def _connect(self, factory: ConnectionFactory) -> None:
        for stage_index in self.connection_stages:
            for i, block in enumerate(self.stages[stage_index].blocks):
                if not isinstance(block.shortcut, nn.Identity):
                    raise ValueError(f"ConvNeXt stage {stage_index} block {i} does not have an identity shortcut.")
                ConnConvNeXtBlock.adopt(block, factory(i))


class _ConnLevitMixin(_ConnectedNet):
    """LeViT: every attention residual and every MLP residual of every stage carries the connection (the two of
    one block share its ``l`` = block index in the stage); with ``suppress_downsample_mlp`` the MLP residual that
    follows each attention-subsample (an identity residual at the start of stages 2 and 3) carries it too, with
    ``l = 0``."""

    def __init__(self, *args, suppress_downsample_mlp: bool = True, **kwargs):
        self.suppress_downsample_mlp = suppress_downsample_mlp
        super().__init__(*args, **kwargs)

    def _connect(self, factory: ConnectionFactory) -> None:
        for stage in self.stages:
            if isinstance(stage.downsample, LevitDownsample):
                ConnLevitDownsample.adopt(stage.downsample, factory(0, self.suppress_downsample_mlp))
            for i, block in enumerate(stage.blocks):
                ConnLevitBlock.adopt(block, factory(i))


class ConnLevit(_ConnLevitMixin, Levit):
    """timm ``Levit`` (one head; LeViT-256-D) with the connection."""


class ConnLevitDistilled(_ConnLevitMixin, LevitDistilled):
    """timm ``LevitDistilled`` (classification + distillation heads; LeViT-128) with the connection."""


class ConnResNetV2(_ConnectedNet, ResNetV2):
    """timm pre-activation ``ResNetV2``: every bottleneck with an identity shortcut (all but the first of each
    stage, which has the projection/avg-pool ``downsample``) carries the connection; ``l`` = block index in the
    stage (so the first suppressed block of a stage has ``l = 1``, as in the research WRN)."""

    def _connect(self, factory: ConnectionFactory) -> None:
        for stage in self.stages:
            for i, block in enumerate(stage.blocks):
                if not isinstance(block, PreActBottleneck):
                    raise TypeError(f"ConnResNetV2 needs pre-activation blocks (preact=True), got "
                                    f"{type(block).__name__}.")
                if block.downsample is None:
                    ConnPreActBottleneck.adopt(block, factory(i))


def connection_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> connection layer of every block that was given one (residual or suppression)."""
    return {name: m.connection for name, m in model.named_modules() if isinstance(m, _ConnectedBlock)}


def suppressed_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks whose connection is the suppression connection, in forward order."""
    return [name for name, conn in connection_blocks(model).items() if isinstance(conn, SuppressionConnection)]

