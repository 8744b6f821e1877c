"""What every attack shares: the error type, input checks, and the one context manager that freezes the model.

The context manager :func:`frozen_eval` is the only place that touches the model's state. Inside it the model is in
eval mode (so BatchNorm uses, and never updates, its running statistics; dropout is off), every parameter has
``requires_grad=False`` (so gradients are taken with respect to the input only, and nothing accumulates in
``.grad``), and gradient mode is on even when the caller is inside ``torch.no_grad()``. On exit, normal or by an
exception, it restores each module's own ``training`` flag, each parameter's ``requires_grad`` and its ``.grad``
exactly as they were.
"""
from __future__ import annotations

import contextlib
import math
from numbers import Real
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

__all__ = ["AttackError", "frozen_eval", "check_eps", "check_positive", "check_count", "check_batch", "NORMS"]

NORMS = ("Linf", "L2")


class AttackError(ValueError):
    """An attack was configured or called with an invalid argument (the message says which, and why)."""


@contextlib.contextmanager
def frozen_eval(model: Callable) -> Iterator[None]:
    """Run the block with ``model`` in eval mode, its parameters frozen and gradient mode on; restore everything.

    Restored on exit (also when the block raises): every module's ``training`` flag (individually, so a model that
    was half in eval mode comes back that way), every parameter's ``requires_grad`` and ``.grad`` (the very tensor
    that was there, or ``None``). A plain callable that is not an ``nn.Module`` is left alone.
    """
    if not isinstance(model, nn.Module):
        with torch.enable_grad():
            yield
        return
    modes = [(module, module.training) for module in model.modules()]
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _, _ in params:
            p.requires_grad_(False)
        with torch.enable_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training
        for p, requires_grad, grad in params:
            p.requires_grad_(requires_grad)
            p.grad = grad


def _is_real(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def check_eps(eps, norm: str) -> float:
    """``eps`` as a float; L-inf radii above 1 (the whole [0, 1] box) and negative or non-finite radii are errors."""
    if not _is_real(eps) or not math.isfinite(eps):
        raise AttackError(f"eps must be a finite number, got {eps!r}.")
    if eps < 0:
        raise AttackError(f"eps must be >= 0, got {eps}.")
    if norm == "Linf" and eps > 1:
        raise AttackError(f"eps={eps} exceeds 1, the width of the [0, 1] image range, for the Linf norm "
                          "(did you mean eps/255?).")
    return float(eps)


def check_positive(name: str, value) -> float:
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise AttackError(f"{name} must be a finite number > 0, got {value!r}.")
    return float(value)


def check_count(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AttackError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise AttackError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}.")
    return value


def check_batch(images, labels, eps: float = 0.0, norm: str = "Linf") -> None:
    """Check the call: float images in [0, 1] with a batch dimension, integer labels, one per image.

    For the L2 and L1 norms, ``eps`` may not exceed the diameter of the [0, 1] box in that norm (one sync: this and
    the range check read two numbers back from the device once per call).
    """
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise AttackError(f"images must be a floating-point tensor in [0, 1], got "
                          f"{getattr(images, 'dtype', type(images).__name__)}.")
    if images.dim() < 2:
        raise AttackError(f"images must have a batch dimension first (N, ...), got shape {tuple(images.shape)}.")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point() or labels.is_complex() \
            or labels.dtype == torch.bool:
        raise AttackError("labels must be a 1-D integer tensor of class indices, got "
                          f"{getattr(labels, 'dtype', type(labels).__name__)} of shape "
                          f"{tuple(getattr(labels, 'shape', ()))}.")
    if labels.shape[0] != images.shape[0]:
        raise AttackError(f"images and labels have different batch sizes ({images.shape[0]} and {labels.shape[0]}).")
    if labels.device != images.device:
        raise AttackError(f"images are on {images.device} but labels on {labels.device}.")
    if images.shape[0] == 0:
        raise AttackError("the batch is empty.")
    if norm in ("L2", "L1"):
        dim = images[0].numel()
        diameter = math.sqrt(dim) if norm == "L2" else float(dim)
        if eps > diameter:
            raise AttackError(f"eps={eps} exceeds {diameter:.4g}, the {norm} diameter of the [0, 1] box of "
                              f"{dim} values per image.")
    lo, hi = torch.aminmax(images.detach())
    lo, hi, label_min = torch.stack([lo.float(), hi.float(), labels.min().float()]).tolist()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise AttackError("images contain NaN or infinite values.")
    if lo < 0 or hi > 1:
        raise AttackError(f"images must lie in [0, 1] (the models normalise inside), got values in "
                          f"[{lo:.4g}, {hi:.4g}].")
    if label_min < 0:
        raise AttackError("labels must be non-negative class indices.")
