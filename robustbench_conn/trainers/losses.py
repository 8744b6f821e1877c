"""Training losses. Each returns ``(loss, metrics)``: a scalar to back-propagate and detached per-batch tensors.

They take the adversarial examples as input (the trainer generates them with an attack from
:mod:`robustbench_conn.attacks`), never call ``zero_grad`` and never move data: the device is the input's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["clean_loss", "pgd_at_loss", "trades_loss", "smoothed_one_hot"]


def _accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.detach().argmax(1) == labels).float().mean()


def smoothed_one_hot(labels: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """One-hot targets with ``smoothing`` mass spread over the other classes."""
    off = smoothing / (num_classes - 1)
    return F.one_hot(labels, num_classes).float() * (1 - smoothing - off) + off


def clean_loss(model: nn.Module, x: Tensor, y: Tensor, *, label_smoothing: float = 0.0) -> tuple[Tensor, dict]:
    """Standard training: cross-entropy on clean inputs."""
    logits = model(x)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    return loss, {"loss": loss.detach(), "clean_acc": _accuracy(logits, y)}


def pgd_at_loss(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, *,
                label_smoothing: float = 0.0) -> tuple[Tensor, dict]:
    """PGD adversarial training (Madry et al., 2018): cross-entropy on the adversarial examples only.

    The clean accuracy reported comes from one extra forward pass without gradient, in eval mode, so that it does
    not touch the BatchNorm statistics.
    """
    logits_adv = model(x_adv)
    loss = F.cross_entropy(logits_adv.float(), y, label_smoothing=label_smoothing)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            clean_acc = _accuracy(model(x), y)
    finally:
        model.train(was_training)
    return loss, {"loss": loss.detach(), "adv_acc": _accuracy(logits_adv, y), "clean_acc": clean_acc}


def trades_loss(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, *, beta: float = 6.0,
                label_smoothing: float = 0.0, squared_error: bool = False) -> tuple[Tensor, dict]:
    """TRADES (Zhang et al., 2019): ``CE(f(x), y) + beta * KL(p(x) || p(x_adv))``.

    With ``squared_error`` it is the SCORE/LSE variant (Pang et al., 2022, "Robustness and Accuracy Could Be
    Reconcilable by (Proper) Definition"): ``||p(x) - onehot_ls(y)||^2 + beta * ||p(x) - p(x_adv)||^2``, the
    paper's ``--LSE``.
    """
    logits_clean = model(x).float()
    logits_adv = model(x_adv).float()
    if squared_error:
        p_clean, p_adv = logits_clean.softmax(1), logits_adv.softmax(1)
        target = smoothed_one_hot(y, logits_clean.shape[1], label_smoothing)
        natural = (p_clean - target).square().sum(1).mean()
        robust = (p_clean - p_adv).square().sum(1).mean()
    else:
        natural = F.cross_entropy(logits_clean, y, label_smoothing=label_smoothing)
        robust = F.kl_div(logits_adv.log_softmax(1), logits_clean.log_softmax(1), reduction="batchmean",
                          log_target=True)
    loss = natural + beta * robust
    return loss, {"loss": loss.detach(), "natural_loss": natural.detach(), "robust_loss": robust.detach(),
                  "clean_acc": _accuracy(logits_clean, y), "adv_acc": _accuracy(logits_adv, y)}
