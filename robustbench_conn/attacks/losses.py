"""Per-example losses that an attack maximises, computed in float32 from the logits.

Every function takes ``(logits, labels, targeted)`` and returns a tensor of shape ``(N,)``; larger is better for the
attacker. In targeted mode ``labels`` are the target classes.

- ``ce``: cross-entropy to the label (untargeted), minus cross-entropy to the target (targeted).
- ``cw``: the Carlini-Wagner margin without its confidence clamp, ``max_{j != y} z_j - z_y`` (untargeted) or
  ``z_t - max_{j != t} z_j`` (targeted): Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks",
  2017.
- ``dlr``: Croce & Hein's difference-of-logits ratio, "Reliable evaluation of adversarial robustness with an
  ensemble of diverse parameter-free attacks", 2020: ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)``. Its targeted
  form there needs both the true class and the target; with the target alone (our call shape) we use
  ``(z_t - max_{j != t} z_j) / (z_pi1 - (z_pi3 + z_pi4) / 2)``, the same scale-invariant denominator.
- ``trades_kl``: ``KL(p_clean || p_adv)``, the inner maximisation of TRADES (Zhang et al., "Theoretically
  Principled Trade-off between Robustness and Accuracy", 2019); the clean distribution is passed in.
- ``trades_se``: ``||p_clean - p_adv||^2``, the inner maximisation of TRADES with squared errors (SCORE / LSE:
  Pang et al., "Robustness and Accuracy Could Be Reconcilable by (Proper) Definition", 2022).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ._core import AttackError

__all__ = ["LOSSES", "CLEAN_REFERENCE_LOSSES", "per_example_loss", "min_classes"]

LOSSES = ("ce", "cw", "dlr", "trades_kl", "trades_se")
#: Losses measured against the clean prediction rather than the labels.
CLEAN_REFERENCE_LOSSES = ("trades_kl", "trades_se")


def _label_and_best_other(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    index = labels.unsqueeze(1)
    z_label = logits.gather(1, index).squeeze(1)
    others = logits.scatter(1, index, float("-inf"))
    return z_label, others.amax(1)


def _ce(logits: Tensor, labels: Tensor, targeted: bool) -> Tensor:
    loss = F.cross_entropy(logits, labels, reduction="none")
    return -loss if targeted else loss


def _cw(logits: Tensor, labels: Tensor, targeted: bool) -> Tensor:
    z_label, z_other = _label_and_best_other(logits, labels)
    return z_label - z_other if targeted else z_other - z_label


def _dlr(logits: Tensor, labels: Tensor, targeted: bool) -> Tensor:
    z_label, z_other = _label_and_best_other(logits, labels)
    top = logits.topk(4 if targeted else 3, dim=1).values
    if targeted:
        return (z_label - z_other) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)
    return (z_other - z_label) / (top[:, 0] - top[:, 2] + 1e-12)


def min_classes(loss: str, targeted: bool) -> int:
    """The fewest classes ``loss`` is defined for (DLR needs the third, targeted DLR the fourth largest logit)."""
    if loss == "dlr":
        return 4 if targeted else 3
    return 2


def per_example_loss(name: str, logits: Tensor, labels: Tensor, targeted: bool,
                     clean_log_probs: Tensor | None = None) -> Tensor:
    """The loss ``name`` per example, in float32, to be maximised."""
    logits = logits.float()
    if logits.dim() != 2:
        raise AttackError(f"the model must return logits of shape (N, classes), got {tuple(logits.shape)}.")
    if logits.shape[1] < min_classes(name, targeted):
        raise AttackError(f"the {'targeted ' if targeted else ''}{name} loss needs at least "
                          f"{min_classes(name, targeted)} classes, the model has {logits.shape[1]}.")
    if name == "ce":
        return _ce(logits, labels, targeted)
    if name == "cw":
        return _cw(logits, labels, targeted)
    if name == "dlr":
        return _dlr(logits, labels, targeted)
    if name in CLEAN_REFERENCE_LOSSES:
        if clean_log_probs is None:
            raise AttackError(f"the {name} loss needs the clean log-probabilities.")
        log_p_adv = F.log_softmax(logits, dim=1)
        if name == "trades_se":
            return (clean_log_probs.exp() - log_p_adv.exp()).square().sum(1)
        return (clean_log_probs.exp() * (clean_log_probs - log_p_adv)).sum(1)
    raise AttackError(f"unknown loss {name!r}; choose one of {', '.join(map(repr, LOSSES))}.")
