"""Projected gradient descent (PGD) and its one-step case FGSM, for the L-inf and L2 threat models.

Both are plain callables ``attack(model, images, labels) -> adversarial images`` without hidden state: the
configuration is fixed at construction and checked there; everything else lives in the call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._core import NORMS, AttackError, check_batch, check_choice, check_count, check_eps, check_positive, frozen_eval
from .losses import CLEAN_REFERENCE_LOSSES, LOSSES, per_example_loss

__all__ = ["PGD", "FGSM"]

_TINY = 1e-12


def _per_example_norm(t: Tensor) -> Tensor:
    """L2 norm of each example, shaped to broadcast against ``t``."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


class PGD:
    """Projected gradient ascent on a loss, inside an L-inf or L2 ball intersected with the [0, 1] box.

    Paper: Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018
    (https://arxiv.org/abs/1706.06083); the TRADES inner maximisation is Zhang et al., ICML 2019
    (https://arxiv.org/abs/1901.08573).

    Threat model: white-box; ``||x_adv - x||_p <= eps`` (p = inf or 2) and ``0 <= x_adv <= 1``.
    Input range: images are floats in [0, 1] with the batch first (NCHW, channels_last, or any ``(N, ...)``);
    the model normalises inside. The result has the shape, dtype, device and memory format of ``images``.

    Each step: ``delta += alpha * sign(grad)`` (Linf) or ``alpha * grad / ||grad||_2`` (L2), then projection onto the
    ball and the box. The perturbation is kept in float32 whatever the images' dtype or an enclosing
    ``torch.autocast``; the loss is computed in float32 from the logits.

    - ``random_start``: uniform in the L-inf ball, uniform radius times a Gaussian direction in the L2 ball, or
      ``0.001 * N(0, 1)`` for ``loss='trades_kl'`` or ``'trades_se'`` (as TRADES does); then clipped to the box.
    - ``restarts``: independent runs; per example the worst case is kept: a successful run beats an unsuccessful one,
      ties go to the larger loss. The first run's start is the same whatever ``restarts`` is, so with a fixed
      ``seed`` more restarts never make a point robust again.
    - ``early_stop``: an example stops moving once it is misclassified (untargeted) or hits its target (targeted),
      judged at the point evaluated by each step's forward pass; with it, more steps never help the model either.
      Without it the last iterate is returned (Madry's PGD). Frozen examples still ride along in the batch: masks,
      no compaction and no host synchronisation per step.
    - ``loss``: ``'ce'``, ``'cw'`` (margin), ``'dlr'``, ``'trades_kl'`` (KL from the clean prediction, computed
      inside without gradient) or ``'trades_se'`` (squared distance to it, the LSE/SCORE inner loss); for these two
      labels are accepted but unused, so neither ``targeted`` nor ``early_stop`` apply.
    - ``targeted``: ``labels`` are the target classes and the loss is turned towards them.
    - ``seed``: ``None`` draws from torch's global generator; an int uses a private generator on the images' device
      and leaves the global random state alone.
    """

    def __init__(self, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, norm: str = "Linf",
                 restarts: int = 1, loss: str = "ce", random_start: bool = True, early_stop: bool = False,
                 targeted: bool = False, seed: int | None = None):
        self.norm = check_choice("norm", norm, NORMS)
        self.eps = check_eps(eps, norm)
        self.alpha = check_positive("alpha", alpha)
        self.steps = check_count("steps", steps)
        self.restarts = check_count("restarts", restarts)
        self.loss = check_choice("loss", loss, LOSSES)
        self.random_start = bool(random_start)
        self.early_stop = bool(early_stop)
        self.targeted = bool(targeted)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise AttackError(f"seed must be an int or None, got {seed!r}.")
        self.seed = seed
        if loss in CLEAN_REFERENCE_LOSSES and (targeted or early_stop):
            raise AttackError(f"loss={loss!r} ignores labels, so it cannot be targeted or stop early; "
                              "set targeted=False and early_stop=False.")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(eps={self.eps:.6g}, alpha={self.alpha:.6g}, steps={self.steps}, "
                f"norm={self.norm!r}, restarts={self.restarts}, loss={self.loss!r}, "
                f"random_start={self.random_start}, early_stop={self.early_stop}, targeted={self.targeted}, "
                f"seed={self.seed})")

    # -- the call --------------------------------------------------------------------------------------------------
    def __call__(self, model, images: Tensor, labels: Tensor) -> Tensor:
        check_batch(images, labels, self.eps, self.norm)
        with frozen_eval(model), torch.inference_mode(False):
            # Tensors made under torch.inference_mode cannot take part in autograd: use normal copies.
            images = images.clone() if images.is_inference() else images
            labels = labels.clone() if labels.is_inference() else labels
            x = images.detach().float()   # no copy when already float32
            labels = labels.detach()
            generator = None
            if self.seed is not None:
                generator = torch.Generator(device=x.device)
                generator.manual_seed(self.seed)
            clean_log_probs = None
            if self.loss in CLEAN_REFERENCE_LOSSES:
                with torch.no_grad():
                    clean_log_probs = F.log_softmax(model(x.to(images.dtype)).float(), dim=1)
            # The box [0, 1] as bounds on delta; for Linf intersected with the ball (both are per-coordinate boxes,
            # so one clamp is the exact projection onto the intersection).
            if self.norm == "Linf":
                low, high = (-x).clamp_(min=-self.eps), (1 - x).clamp_(max=self.eps)
            else:
                low, high = -x, 1 - x
            best_delta = best_loss = best_success = None
            for _ in range(self.restarts):
                delta = self._run(model, x, images.dtype, labels, low, high, generator, clean_log_probs)
                if self.restarts == 1:
                    best_delta = delta
                    break
                with torch.no_grad():
                    logits = model((x + delta).to(images.dtype))
                    loss = per_example_loss(self.loss, logits, labels, self.targeted, clean_log_probs)
                    success = self._success(logits, labels)
                if best_delta is None:
                    best_delta, best_loss, best_success = delta, loss, success
                    continue
                better = (success & ~best_success) | ((success == best_success) & (loss > best_loss))
                best_delta = torch.where(better.view(-1, *([1] * (x.dim() - 1))), delta, best_delta)
                best_loss = torch.where(better, loss, best_loss)
                best_success = best_success | success
            x_adv = (x + best_delta).clamp_(0, 1)
        return x_adv.to(dtype=images.dtype)

    # -- pieces ----------------------------------------------------------------------------------------------------
    def _success(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.loss in CLEAN_REFERENCE_LOSSES:
            return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        pred = logits.argmax(1)
        return pred == labels if self.targeted else pred != labels

    def _start(self, x: Tensor, low: Tensor, high: Tensor, generator) -> Tensor:
        if not self.random_start or self.eps == 0:
            return torch.zeros_like(x)
        # Drawn in the logical (contiguous) order, so a seed gives the same start whatever the memory format.
        noise = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if self.loss in CLEAN_REFERENCE_LOSSES:
            delta = noise.normal_(generator=generator).mul_(0.001)
            if self.norm == "L2":
                delta = self._project_l2(delta)
        elif self.norm == "Linf":
            delta = noise.uniform_(-self.eps, self.eps, generator=generator)
        else:
            delta = noise.normal_(generator=generator)
            radius = torch.empty(x.shape[0], device=x.device).uniform_(0, 1, generator=generator)
            radius = radius.view(-1, *([1] * (x.dim() - 1)))
            delta.mul_(radius * self.eps / (_per_example_norm(delta) + _TINY))
        if not delta.is_contiguous() or not x.is_contiguous():
            delta = torch.empty_like(x).copy_(delta)    # x's memory format (channels_last stays channels_last)
        return delta.clamp_(min=low, max=high)

    def _project_l2(self, delta: Tensor) -> Tensor:
        factor = (self.eps / (_per_example_norm(delta) + _TINY)).clamp_(max=1.0)
        return delta.mul_(factor)

    def _run(self, model, x: Tensor, model_dtype: torch.dtype, labels: Tensor, low: Tensor, high: Tensor,
             generator, clean_log_probs) -> Tensor:
        """One run from a (random) start; returns the final perturbation (float32)."""
        delta = self._start(x, low, high, generator)
        delta.requires_grad_(True)
        linf = self.norm == "Linf"
        alpha = self.alpha
        active = None
        cast = model_dtype != torch.float32
        for _ in range(self.steps):
            x_in = x + delta
            logits = model(x_in.to(model_dtype) if cast else x_in)
            loss = per_example_loss(self.loss, logits, labels, self.targeted, clean_log_probs).sum()
            grad, = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                if linf:
                    step = grad.sign_()
                else:
                    step = grad.div_(_per_example_norm(grad) + _TINY)
                if self.early_stop:
                    fooled = self._success(logits.detach(), labels)
                    active = ~fooled if active is None else active & ~fooled
                    step.mul_(active.view(-1, *([1] * (x.dim() - 1))).to(step.dtype))
                delta.add_(step, alpha=alpha)
                if not linf:
                    self._project_l2(delta)
                delta.clamp_(min=low, max=high)
        return delta.detach()


class FGSM(PGD):
    """The fast gradient sign method: one step of size ``eps`` (L-inf) or one normalised-gradient step (L2).

    Paper: Goodfellow et al., "Explaining and Harnessing Adversarial Examples", ICLR 2015
    (https://arxiv.org/abs/1412.6572). With ``random_start=True`` it is FGSM with a uniform random start and step
    ``1.25 * eps`` (then projection back into the ball), as in Wong et al., "Fast is better than free", ICLR 2020
    (https://arxiv.org/abs/2001.03994).

    Threat model and input range as :class:`PGD`: images in [0, 1], ``||x_adv - x||_p <= eps``.
    """

    def __init__(self, eps: float = 8 / 255, random_start: bool = False, norm: str = "Linf", loss: str = "ce",
                 targeted: bool = False, seed: int | None = None):
        eps = check_eps(eps, norm if norm in NORMS else "Linf")
        alpha = (1.25 if random_start else 1.0) * eps
        super().__init__(eps=eps, alpha=alpha if alpha > 0 else 1.0, steps=1, norm=norm, restarts=1, loss=loss,
                         random_start=random_start, early_stop=False, targeted=targeted, seed=seed)

    def __repr__(self) -> str:
        return (f"FGSM(eps={self.eps:.6g}, random_start={self.random_start}, norm={self.norm!r}, loss={self.loss!r}, "
                f"targeted={self.targeted}, seed={self.seed})")
