"""AutoAttack through ``pyautoattack`` (the PyPI distribution of the original code), with a per-attack breakdown.

Nothing of AutoAttack is reimplemented here. ``pyautoattack.AutoAttack.run_standard_evaluation`` runs its attacks
one after the other, each on the points still robust; we call it once per attack on exactly those points (its own
``attacks_to_run`` set to that one attack, as its ``run_standard_evaluation_individual`` does), which gives the same
batches, the same seeds and so the same result as one combined call, and tells which attack broke which point.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._core import AttackError, check_batch, check_choice, check_count, check_eps, frozen_eval

__all__ = ["AutoAttack", "AutoAttackResult", "AUTOATTACK_ATTACKS", "AUTOATTACK_VERSIONS"]

AUTOATTACK_VERSIONS = ("standard", "plus", "rand", "custom")
AUTOATTACK_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
AUTOATTACK_NORMS = ("Linf", "L2", "L1")

#: pyautoattack's messages (its own logger 'auto-attack' is replaced on the instances we build) go here.
logger = logging.getLogger(__name__)


@dataclass
class AutoAttackResult:
    """What :meth:`AutoAttack.run` found, per example (all tensors on the images' device, except ``broken_by``).

    - ``x_adv``: adversarial images (the clean image where no attack succeeded), shape and dtype of the input.
    - ``robust``: correctly classified after the attack (False for clean-misclassified points).
    - ``clean_correct``: correctly classified without attack.
    - ``broken_by``: per example, the name of the attack that first broke it (``'apgd-ce'``, ...), ``None`` if it is
      robust or was already misclassified.
    - ``robust_accuracy``: ``robust.float().mean()``.
    - ``accuracy_after``: accuracy on the whole batch, clean (key ``'clean'``) and after each attack in run order.
    """

    x_adv: Tensor
    robust: Tensor
    clean_correct: Tensor
    broken_by: list
    robust_accuracy: float
    accuracy_after: dict = field(default_factory=dict)
    attacks: tuple = ()
    eps: float = 0.0
    norm: str = "Linf"
    version: str = "standard"
    seed: int | None = None

    @property
    def clean_accuracy(self) -> float:
        return float(self.clean_correct.float().mean())

    def breakdown(self) -> dict:
        """How many points each attack broke (the attacks that broke none included), in run order."""
        counts = {name: 0 for name in self.attacks}
        for name in self.broken_by:
            if name is not None:
                counts[name] = counts.get(name, 0) + 1
        return counts


def _import_pyautoattack():
    try:
        import pyautoattack
    except ImportError as exc:  # it is a core dependency, but say clearly what is missing
        raise AttackError("AutoAttack needs the 'pyautoattack' package (pip install 'pyautoattack>=0.2,<0.3').") \
            from exc
    return pyautoattack


class AutoAttack:
    """AutoAttack (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
    parameter-free attacks", ICML 2020, https://arxiv.org/abs/2003.01690), run by ``pyautoattack`` 0.2.

    Threat model: white-box (APGD-CE, APGD-T, FAB-T) plus black-box Square; ``||x_adv - x||_p <= eps`` for
    p in Linf, L2, L1, inside [0, 1]. Input range: images are floats in [0, 1], batch first; the model normalises
    inside and returns logits.

    ``version``: ``'standard'`` (APGD-CE, APGD-T, FAB-T, Square), ``'plus'``, ``'rand'`` (for randomised defenses)
    or ``'custom'`` with ``attacks`` a list from ``apgd-ce, apgd-dlr, apgd-t, fab, fab-t, square`` (upper case also
    accepted). ``seed`` is passed to every attack (``None``: pyautoattack seeds from the clock, not reproducible).
    ``batch_size``: how many points each attack processes at once.

    ``aa.run(model, images, labels)`` returns an :class:`AutoAttackResult`; ``aa(model, images, labels)`` returns
    its ``x_adv`` alone (the common attack call shape). The model is frozen in eval mode during the run as by every
    attack here; pyautoattack's log messages go to the logger ``robustbench_conn.attacks.autoattack``.
    """

    def __init__(self, eps: float = 8 / 255, norm: str = "Linf", version: str = "standard", attacks=None,
                 seed: int | None = 0, batch_size: int = 500):
        self.norm = check_choice("norm", norm, AUTOATTACK_NORMS)
        self.eps = check_eps(eps, norm)
        self.version = check_choice("version", version, AUTOATTACK_VERSIONS)
        if attacks is not None and isinstance(attacks, str):
            attacks = [attacks]
        if version == "custom":
            if not attacks:
                raise AttackError("version='custom' needs attacks=[...], a list from "
                                  f"{', '.join(AUTOATTACK_ATTACKS)}.")
            attacks = tuple(check_choice("AutoAttack attack", str(a).lower(), AUTOATTACK_ATTACKS) for a in attacks)
            if len(set(attacks)) != len(attacks):
                raise AttackError(f"attacks lists an attack twice: {list(attacks)}.")
        elif attacks is not None:
            raise AttackError(f"attacks=... is only used with version='custom' (version {version!r} fixes its own).")
        self.attacks = attacks
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise AttackError(f"seed must be an int or None, got {seed!r}.")
        self.seed = seed
        self.batch_size = check_count("batch_size", batch_size)

    def __repr__(self) -> str:
        return (f"AutoAttack(eps={self.eps:.6g}, norm={self.norm!r}, version={self.version!r}, "
                f"attacks={self.attacks!r}, seed={self.seed}, batch_size={self.batch_size})")

    def __call__(self, model, images: Tensor, labels: Tensor) -> Tensor:
        return self.run(model, images, labels).x_adv

    def _build(self, model, device: torch.device):
        pyautoattack = _import_pyautoattack()
        adversary = pyautoattack.AutoAttack(model, attacks=list(self.attacks) if self.attacks else None,
                                            device=device, eps=self.eps, norm=self.norm, seed=self.seed,
                                            version=self.version)
        # Route its messages (it logs through logging.getLogger('auto-attack')) into our namespace.
        for part in (adversary, adversary.apgd, adversary.apgd_targeted):
            part.logger = logger
        return adversary

    def run(self, model, images: Tensor, labels: Tensor) -> AutoAttackResult:
        """Attack ``images`` (floats in [0, 1]) with true ``labels``; return per-example results."""
        check_batch(images, labels, self.eps, self.norm)
        with frozen_eval(model), torch.inference_mode(False):
            # pyautoattack's DLR attacks need contiguous NCHW float32 tensors (a .view inside).
            x = images.detach().to(dtype=torch.float32, memory_format=torch.contiguous_format)
            y = labels.detach().long().contiguous()
            # Tensors made under torch.inference_mode cannot take part in autograd: use normal copies.
            x = x.clone() if x.is_inference() else x
            y = y.clone() if y.is_inference() else y
            adversary = self._build(model, x.device)
            attacks = tuple(adversary.attacks_to_run)
            n = x.shape[0]
            clean_correct = torch.empty(n, dtype=torch.bool, device=x.device)
            with torch.no_grad():
                for start in range(0, n, self.batch_size):
                    stop = min(start + self.batch_size, n)
                    clean_correct[start:stop] = model(x[start:stop]).argmax(1) == y[start:stop]
            x_adv = x.clone()
            broken_by: list = [None] * n
            remaining = clean_correct.nonzero().flatten()
            accuracy_after = {"clean": float(clean_correct.float().mean())}
            for name in attacks:
                if remaining.numel() == 0:
                    logger.debug("no robust points left; skipping %s", name)
                    accuracy_after[name] = 0.0
                    continue
                adversary.attacks_to_run = [name]
                sub_adv, sub_pred = adversary.run_standard_evaluation(x[remaining], y[remaining],
                                                                      batch_size=self.batch_size)
                broken = sub_pred.to(y.device) != y[remaining]
                hit = remaining[broken]
                x_adv[hit] = sub_adv[broken].to(x_adv.device, x_adv.dtype)
                for index in hit.tolist():
                    broken_by[index] = name
                remaining = remaining[~broken]
                accuracy_after[name] = remaining.numel() / n
                logger.info("%s: robust accuracy %.2f%% (%d of %d)", name, 100 * remaining.numel() / n,
                            remaining.numel(), n)
            robust = torch.zeros(n, dtype=torch.bool, device=x.device)
            robust[remaining] = True
        x_adv = x_adv.to(dtype=images.dtype, memory_format=torch.preserve_format)
        if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous() \
                and images.dim() == 4:
            x_adv = x_adv.contiguous(memory_format=torch.channels_last)
        return AutoAttackResult(x_adv=x_adv, robust=robust, clean_correct=clean_correct, broken_by=broken_by,
                                robust_accuracy=float(robust.float().mean()), accuracy_after=accuracy_after,
                                attacks=attacks, eps=self.eps, norm=self.norm, version=self.version, seed=self.seed)
