"""The residual and suppression connections, their typed config and the paper's settings-string parser.

A residual block computes ``x + F(x)``. The suppression block of "Exploring Basic Connections: Robust Alternative
to Residual Connection" computes::

    (1 - d) * x + exp(-d * l) * F(exp(d * l) * x)

with ``d = phi(scale * delta)`` for one learnable scalar ``delta`` shared by every suppressed block of a network,
``phi`` a non-negative map (``abs`` in the paper), and ``l`` the block's index in its stage modulo a restart
period. With ``d = 0`` the suppression block is the residual block.

Blocks receive their connection as a layer (as timm blocks receive ``act_layer``/``norm_layer``) and call
``connection(x, branch)``; the network owns the shared ``delta`` (:class:`SharedDecay`).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.autograd.graph import get_gradient_edge

__all__ = [
    "ConnectionConfig", "ArchOptions", "SettingsError", "parse_settings", "resolve_connection",
    "SharedDecay", "ResidualConnection", "SuppressionConnection", "ConnectionFactory", "suppression_chain",
    "accepts_output_scale",
    "decay_parameters", "parameter_groups", "learned_decay", "count_parameters", "PARAMETRISATIONS",
]

ConnectionKind = Literal["residual", "suppression"]
PARAMETRISATIONS = ("abs", "relu", "gelu", "sigmoid", "square", "identity")
_PHI: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "abs": torch.abs,
    "relu": F.relu,
    "gelu": F.gelu,
    "sigmoid": torch.sigmoid,
    "square": torch.square,
    "identity": lambda t: t,
}


class SettingsError(ValueError):
    """A connection setting that cannot be understood; the message says what to write instead."""


@dataclass(frozen=True)
class ConnectionConfig:
    """What connection a network uses. Parse user input into this once, at the edge.

    kind: ``residual`` (x + F(x)) or ``suppression`` ((1-d) x + e^{-dl} F(e^{dl} x)).
    init_decay: initial value of ``delta`` (paper: 0.2 WRN-58-1, 0.07 PreResNet-110, 0.7 LeViT/PreResNet, 0 ConvNeXt).
    learnable: whether ``delta`` is trained.
    shared: one ``delta`` for every suppressed block (the paper's ``ShareExpDecay``) or one per block.
    parametrisation: ``d = phi(decay_scale * delta)``; ``abs`` is the paper's ``AbsExp``.
    decay_scale: the research LeViT used ``d = |0.1 * delta|``; 1.0 everywhere else.
    restart_period: ``l`` = block index in its stage modulo this (``RestaLayerIdx3`` means 3); None: no restart.
    optimizer: ``adam`` trains ``delta`` with its own Adam (the paper's ``Adam`` token); ``main`` puts it in the main
        optimizer as a group of its own. Either way at ``decay_lr`` (the paper's ``CoesLR``), without weight decay.
    """

    kind: ConnectionKind = "residual"
    init_decay: float = 0.2
    learnable: bool = True
    shared: bool = True
    parametrisation: str = "abs"
    decay_scale: float = 1.0
    restart_period: int | None = 3
    optimizer: Literal["adam", "main"] = "adam"
    decay_lr: float = 1e-3

    def __post_init__(self) -> None:
        if self.kind not in ("residual", "suppression"):
            raise SettingsError(f"connection kind {self.kind!r} is unknown: use 'residual' or 'suppression'.")
        if self.parametrisation not in PARAMETRISATIONS:
            raise SettingsError(f"decay parametrisation {self.parametrisation!r} is unknown: "
                                f"use one of {', '.join(PARAMETRISATIONS)}.")
        if self.restart_period is not None and self.restart_period < 1:
            raise SettingsError(f"restart_period must be a positive integer or None, got {self.restart_period}.")
        if not math.isfinite(self.init_decay):
            raise SettingsError(f"init_decay must be a finite number, got {self.init_decay}.")
        if self.decay_lr < 0:
            raise SettingsError(f"decay_lr must be >= 0, got {self.decay_lr}.")
        if self.optimizer not in ("adam", "main"):
            raise SettingsError(f"decay optimizer {self.optimizer!r} is unknown: use 'adam' or 'main'.")

    @property
    def is_suppression(self) -> bool:
        return self.kind == "suppression"

    @property
    def frozen_at_zero(self) -> bool:
        """True when ``delta`` can never leave 0: phi has zero gradient there (abs, relu, square)."""
        return (self.is_suppression and self.learnable and self.init_decay == 0.0
                and self.parametrisation in ("abs", "relu", "square"))

    def layer_index(self, block_index: int) -> int:
        """``l`` of the block at ``block_index`` (0-based) inside its stage."""
        return block_index if self.restart_period is None else block_index % self.restart_period

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "ConnectionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise SettingsError(f"unknown connection field(s) {sorted(unknown)}; known: {sorted(known)}.")
        return cls(**dict(data))


@dataclass(frozen=True)
class ArchOptions:
    """Architecture tokens of the paper's CIFAR PreResNet settings (``BnReluConv_ConvStride2ResLike``)."""

    pre_activation: bool = False   # BnReluConv: BN-ReLU-Conv blocks
    conv_downsample: bool = False  # ConvStride2ResLike: stride-2 conv downsampling with a ResNet-like shortcut


# Token -> what it sets. Every token of the paper's published settings strings is here.
_SETTINGS_TOKENS: dict[str, str] = {
    "Default": "the residual connection",
    "ShareExpDecay": "suppression with one shared decay",
    "ShareExpDecayLearnDecay": "suppression with one shared, learnable decay",
    "LearnDecay": "the decay is learnable",
    "AbsExp": "d = |delta|",
    "RLExp": "d = relu(delta)",
    "GLExp": "d = gelu(delta)",
    "PowExp": "d = delta^2",
    "SigExp": "d = sigmoid(delta)",
    "Adam": "delta has its own Adam optimizer (lr from CoesLR / decay_lr)",
    "BnReluConv": "pre-activation blocks (architecture)",
    "ConvStride2ResLike": "stride-2 conv downsampling (architecture)",
}
_PARAM_TOKENS = {"AbsExp": "abs", "RLExp": "relu", "GLExp": "gelu", "PowExp": "square", "SigExp": "sigmoid"}


def _known_tokens() -> str:
    return ", ".join(list(_SETTINGS_TOKENS) + ["Ini<value> (e.g. Ini0p5)", "RestaLayerIdx<R> (e.g. RestaLayerIdx3)"])


def _parse_ini(token: str) -> float:
    body = token[len("Ini"):]
    try:
        return float(body.replace("p", ".").replace("m", "-"))
    except ValueError:
        raise SettingsError(f"settings token {token!r} is not Ini<number> (write Ini0p5 for 0.5).") from None


def parse_settings(settings: str, init_decay: float | None = None, decay_lr: float | None = None,
                   ) -> tuple[ConnectionConfig, ArchOptions]:
    """Parse one of the paper's ``--settings`` strings into a typed config.

    ``init_decay`` is the paper's ``--IniDecay`` flag and wins over an ``Ini...`` token in the string, which was only
    a label in the research code; a disagreement is reported with a warning. ``decay_lr`` is ``--CoesLR``.
    Unknown tokens raise :class:`SettingsError` listing the known ones.
    """
    tokens = [t for t in settings.strip().split("_") if t]
    if not tokens:
        raise SettingsError(f"empty settings string; known tokens: {_known_tokens()}.")
    fields: dict = {}
    arch = ArchOptions()
    ini_token: float | None = None
    shared = False
    for token in tokens:
        if token == "Default":
            continue
        if token in ("ShareExpDecay", "ShareExpDecayLearnDecay"):
            fields["kind"] = "suppression"
            shared = True
            fields["learnable"] = token.endswith("LearnDecay")
        elif token == "LearnDecay":
            fields["learnable"] = True
        elif token in _PARAM_TOKENS:
            fields["parametrisation"] = _PARAM_TOKENS[token]
        elif token == "Adam":
            fields["optimizer"] = "adam"
        elif token == "BnReluConv":
            arch = dataclasses.replace(arch, pre_activation=True)
        elif token == "ConvStride2ResLike":
            arch = dataclasses.replace(arch, conv_downsample=True)
        elif token.startswith("RestaLayerIdx") and token[len("RestaLayerIdx"):].isdigit():
            fields["restart_period"] = int(token[len("RestaLayerIdx"):])
        elif token.startswith("Ini") and len(token) > 3:
            ini_token = _parse_ini(token)
        else:
            raise SettingsError(f"unknown settings token {token!r} in {settings!r}; known tokens: {_known_tokens()}.")
    if fields.get("kind") != "suppression":
        # Residual: decay-related tokens have nothing to act on.
        return ConnectionConfig(kind="residual"), arch
    if "restart_period" not in fields:
        fields["restart_period"] = None
    if "optimizer" not in fields:
        fields["optimizer"] = "main"
    fields["shared"] = shared
    if init_decay is not None:
        if ini_token is not None and ini_token != init_decay:
            warnings.warn(f"settings token Ini{ini_token:g} disagrees with init_decay={init_decay:g}; "
                          f"using {init_decay:g} (the token was only a label in the research code).", stacklevel=2)
        fields["init_decay"] = float(init_decay)
    elif ini_token is not None:
        fields["init_decay"] = ini_token
    if decay_lr is not None:
        fields["decay_lr"] = float(decay_lr)
    return ConnectionConfig(**fields), arch


def resolve_connection(connection: "ConnectionConfig | str | Mapping | None" = None, *,
                       init_decay: float | None = None, restart_period: int | None | str = "keep",
                       decay_lr: float | None = None, **overrides) -> ConnectionConfig:
    """Turn any user-facing form of a connection into a :class:`ConnectionConfig`.

    ``connection`` is a config, a mapping of its fields, the word ``residual``/``suppression``, or a paper settings
    string. Keyword overrides apply on top (``restart_period=None`` means no restart; leave it out to keep).
    """
    if connection is None:
        connection = "residual"
    if isinstance(connection, ConnectionConfig):
        config = connection
    elif isinstance(connection, Mapping):
        config = ConnectionConfig.from_dict(connection)
    elif isinstance(connection, str):
        word = connection.strip().lower()
        if word in ("residual", "suppression"):
            config = ConnectionConfig(kind=word)
        else:
            config, _ = parse_settings(connection, init_decay=init_decay, decay_lr=decay_lr)
    else:
        raise SettingsError(f"connection must be a ConnectionConfig, a mapping, 'residual', 'suppression' or a "
                            f"settings string, got {type(connection).__name__}.")
    if init_decay is not None:
        overrides["init_decay"] = float(init_decay)
    if decay_lr is not None:
        overrides["decay_lr"] = float(decay_lr)
    if restart_period != "keep":
        overrides["restart_period"] = restart_period
    if overrides:
        config = dataclasses.replace(config, **overrides)
    if config.frozen_at_zero:
        warnings.warn(f"suppression with parametrisation {config.parametrisation!r} and init_decay 0: phi has "
                      "gradient 0 at 0, so delta never leaves 0 and the network trains as a residual one "
                      "(as in the paper's ConvNeXt commands). Use a non-zero init_decay or "
                      "parametrisation='identity' for a decay that can move.", stacklevel=2)
    return config


class SharedDecay(nn.Module):
    """The learnable scalar ``delta`` of the suppression connection and its map ``d = phi(scale * delta)``."""

    def __init__(self, config: ConnectionConfig):
        super().__init__()
        self.parametrisation = config.parametrisation
        self.scale = config.decay_scale
        self.delta = nn.Parameter(torch.tensor(float(config.init_decay)), requires_grad=config.learnable)

    def forward(self) -> torch.Tensor:
        return _PHI[self.parametrisation](self.delta * self.scale)

    def extra_repr(self) -> str:
        return f"parametrisation={self.parametrisation}, scale={self.scale}"


class ResidualConnection(nn.Module):
    """``x + F(x)``."""

    def forward(self, x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return x + branch(x)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) in one reduction, without materialising ``a * b`` when both share a dense layout."""
    if a.is_contiguous() and b.is_contiguous():
        return torch.dot(a.view(-1), b.view(-1))
    if a.dim() == 4 and all(t.is_contiguous(memory_format=torch.channels_last) for t in (a, b)):
        return torch.dot(a.permute(0, 2, 3, 1).reshape(-1), b.permute(0, 2, 3, 1).reshape(-1))
    return (a * b).sum()


def _gradient_node(t: torch.Tensor | None):
    """The autograd node that a gradient for ``t`` goes to; None when ``t`` takes none."""
    return get_gradient_edge(t).node if t is not None and t.requires_grad else None


def _scalar_grad_wanted(ctx, index: int, node) -> bool:
    """Whether this backward pass uses the gradient of scalar input ``index`` (a decay). ``needs_input_grad`` is
    fixed at forward time; an attack library that leaves the parameters trainable and calls
    ``autograd.grad(loss, images)`` never uses the decay's gradient, and the engine knows it, so the dot products
    are skipped. (``_will_engine_execute_node`` is private; where it is missing or refuses, compute.)"""
    if not ctx.needs_input_grad[index]:
        return False
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):
        return True


class _Rescale(torch.autograd.Function):
    """``z * exp(log_scale)`` for a 0-dim ``log_scale``; its gradient is one dot product with the output
    (autograd's ``z * exp(a)`` would build the full-size ``grad * z`` and then reduce it)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
        scale = torch.exp(log_scale)
        out = z * scale
        ctx.save_for_backward(out, scale)
        ctx.log_scale_node = _gradient_node(log_scale)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        out, scale = ctx.saved_tensors
        grad_z = grad * scale if ctx.needs_input_grad[0] else None
        grad_log_scale = (_dot(grad, out).to(scale.dtype) if _scalar_grad_wanted(ctx, 1, ctx.log_scale_node)
                          else None)
        return grad_z, grad_log_scale


class _Join(torch.autograd.Function):
    """``(y + keep * z) * exp(log_scale)`` for 0-dim ``keep`` and ``log_scale`` (None: no rescaling), in one output
    buffer; the scalars' gradients are dot products (no full-size temporaries)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, z: torch.Tensor, keep: torch.Tensor,
                log_scale: torch.Tensor | None) -> torch.Tensor:
        out = torch.addcmul(y, z, keep)
        ctx.scalar_nodes = (_gradient_node(keep), _gradient_node(log_scale))
        if log_scale is None:
            ctx.save_for_backward(z, keep)
            return out
        scale = torch.exp(log_scale)
        out.mul_(scale)
        ctx.save_for_backward(z, keep, scale, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        z, keep, *rescaled = ctx.saved_tensors  # rescaled = (scale, out) when log_scale was given
        scale = rescaled[0] if rescaled else None
        grad_y = grad_z = grad_keep = grad_log_scale = None
        if ctx.needs_input_grad[0]:
            grad_y = grad if scale is None else grad * scale
        if ctx.needs_input_grad[1]:
            grad_z = grad * (keep if scale is None else keep * scale)
        if _scalar_grad_wanted(ctx, 2, ctx.scalar_nodes[0]):
            grad_keep = _dot(grad, z) if scale is None else _dot(grad, z) * scale
            grad_keep = grad_keep.to(keep.dtype)
        if _scalar_grad_wanted(ctx, 3, ctx.scalar_nodes[1]):
            grad_log_scale = _dot(grad, rescaled[1]).to(scale.dtype)
        return grad_y, grad_z, grad_keep, grad_log_scale


def _join(y: torch.Tensor, z: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``y + keep * z``: with a frozen ``keep`` (inside an attack) autograd's own ``addcmul`` does the same work as
    :class:`_Join` without a Python backward; a trained ``keep`` needs :class:`_Join`'s dot-product gradient."""
    return _Join.apply(y, z, keep, None) if keep.requires_grad else torch.addcmul(y, z, keep)


class SuppressionConnection(nn.Module):
    """``(1 - d) x + exp(-d l) F(exp(d l) x)`` for the block at stage index ``l``."""

    def __init__(self, decay: SharedDecay, layer_index: int, owns_decay: bool):
        super().__init__()
        self.layer_index = int(layer_index)
        if owns_decay:
            self.decay = decay
        else:
            # A tuple keeps the shared module out of this block's submodules: the network registers it once, so
            # ``parameters()``, ``state_dict()`` and safetensors see one ``delta``, not one alias per block.
            self._shared_decay = (decay,)

    def decay_module(self) -> SharedDecay:
        return self.decay if hasattr(self, "decay") else self._shared_decay[0]

    def forward(self, x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return suppression_chain(x, [(self, branch)])

    def extra_repr(self) -> str:
        return f"l={self.layer_index}"


def accepts_output_scale(branch: Callable) -> Callable:
    """Mark a branch ``F(x, output_scale=None)`` that returns ``F(x) * output_scale`` (a 0-dim tensor), by scaling
    a tensor smaller than its output (such as its last convolution's weight) where it has one.
    :func:`suppression_chain` then hands each block's rescaling to the branch, which saves one full-size multiply
    forward and one backward per block wherever the branch can fold it."""
    branch.accepts_output_scale = True
    return branch


def suppression_chain(x: torch.Tensor,
                      steps: Sequence[tuple[SuppressionConnection, Callable[[torch.Tensor], torch.Tensor]]]
                      ) -> torch.Tensor:
    """Consecutive suppression blocks ``x -> (1 - d) x + s^-1 F(s x)`` (``s = e^{dl}``), in the scaled domain.

    With ``z = s x`` a block is ``z -> keep * z + F(z)`` (``keep = 1 - d``), whose result is the block's output
    times ``s``. So the chain scales the input once, and each block's join also moves its result to the next
    block's scale (a factor ``r = e^d`` while ``l`` counts up, none where the scale stays) or, after the last block,
    back to scale 1: ``z -> (keep r) z + r F(z)``. A branch marked :func:`accepts_output_scale` folds ``r`` into
    its last layer's weight, so the join is one ``addcmul`` as cheap as the residual add; otherwise the join
    multiplies its result by ``r``. Exact algebra; with ``d = 0`` every factor is 1 and the result is bit for bit
    the residual chain. Each decay and each factor is evaluated once.
    """
    decays: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    log_scales: dict[tuple[int, int], torch.Tensor] = {}

    def scale_of(connection: SuppressionConnection):
        """(key, log scale) of the block's scale; (None, None) for scale 1 (l = 0)."""
        module = connection.decay_module()
        if id(module) not in decays:
            d = module().to(x.dtype)
            decays[id(module)] = (d, 1 - d)
        l = connection.layer_index
        key = (id(module), l)
        if l and key not in log_scales:
            log_scales[key] = decays[id(module)][0] * l
        return (key, log_scales[key]) if l else (None, None)

    def log_ratio(source, target):
        """log(target scale / source scale), or None where the two are the same scale."""
        (source_key, source_log), (target_key, target_log) = source, target
        if source_key == target_key:
            return None
        if source_log is None:
            return target_log
        return -source_log if target_log is None else target_log - source_log

    scales = [scale_of(connection) for connection, _ in steps] + [(None, None)]
    entry = log_ratio((None, None), scales[0])
    z = x if entry is None else _Rescale.apply(x, entry)
    factors: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (r, keep * r) per decay and pair of scales
    for i, (connection, branch) in enumerate(steps):
        decay_key = id(connection.decay_module())
        keep = decays[decay_key][1]
        source, target = scales[i], scales[i + 1]
        if source[0] == target[0]:
            z = _join(branch(z), z, keep)
        elif not getattr(branch, "accepts_output_scale", False):
            z = _Join.apply(branch(z), z, keep, log_ratio(source, target))
        else:
            key = (decay_key, source[0], target[0])
            if key not in factors:
                r = torch.exp(log_ratio(source, target))
                factors[key] = (r, keep * r)
            r, keep_r = factors[key]
            z = _join(branch(z, output_scale=r), z, keep_r)
    return z


class ConnectionFactory:
    """Hands each block its connection layer; owns the shared decay (register :attr:`shared_decay` on the network).

    ``factory(block_index, suppressible)`` returns a :class:`ResidualConnection` for blocks that change shape
    (``suppressible=False``) or when the config is residual, else a :class:`SuppressionConnection`.
    """

    def __init__(self, config: ConnectionConfig):
        self.config = config
        self.shared_decay = SharedDecay(config) if config.is_suppression and config.shared else None

    def __call__(self, block_index: int, suppressible: bool = True) -> nn.Module:
        if not (self.config.is_suppression and suppressible):
            return ResidualConnection()
        l = self.config.layer_index(block_index)
        if self.shared_decay is not None:
            return SuppressionConnection(self.shared_decay, l, owns_decay=False)
        return SuppressionConnection(SharedDecay(self.config), l, owns_decay=True)


def decay_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every ``delta`` of the model (one when shared)."""
    return [m.delta for m in model.modules() if isinstance(m, SharedDecay)]


def learned_decay(model: nn.Module) -> float | None:
    """The current ``d`` (mean over blocks when not shared), or None for a residual network."""
    decays = [m for m in model.modules() if isinstance(m, SharedDecay)]
    if not decays:
        return None
    with torch.no_grad():
        return float(torch.stack([m().float() for m in decays]).mean())


def parameter_groups(model: nn.Module, weight_decay: float = 0.0,
                     no_decay_1d: bool = True) -> tuple[list[dict], list[dict]]:
    """Split parameters into (main groups, decay groups) for two optimizers.

    Main groups: weights with ``weight_decay`` and, when ``no_decay_1d``, biases/norm parameters without it.
    Decay groups: the connection's ``delta`` parameters, never weight-decayed; give them to ``torch.optim.Adam``
    at the config's ``decay_lr`` (or, when its ``optimizer`` is ``main``, to the main optimizer with that lr).
    """
    decay_ids = {id(p) for p in decay_parameters(model)}
    with_wd, without_wd, deltas = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in decay_ids:
            deltas.append(p)
        elif no_decay_1d and p.ndim <= 1:
            without_wd.append(p)
        else:
            with_wd.append(p)
    main = [g for g in ({"params": with_wd, "weight_decay": weight_decay},
                        {"params": without_wd, "weight_decay": 0.0}) if g["params"]]
    return main, ([{"params": deltas, "weight_decay": 0.0}] if deltas else [])


def count_parameters(model: nn.Module) -> int:
    """Number of scalars in the model's parameters (``parameters()`` already lists a shared one once)."""
    return sum(p.numel() for p in model.parameters())
