"""Adversarial attacks with one call shape: ``attack(model, images, labels) -> adversarial images``.

Images are floats in [0, 1], batch first; models normalise inside. Every attack runs inside
:func:`frozen_eval`, so the model comes back with its train/eval mode, BatchNorm statistics, ``requires_grad``
flags and ``.grad`` untouched.

    >>> from robustbench_conn.attacks import PGD, AutoAttack, create_attack
    >>> x_adv = PGD(eps=8/255, alpha=2/255, steps=10)(model, images, labels)          # doctest: +SKIP
    >>> result = AutoAttack(eps=8/255, norm='Linf').run(model, images, labels)        # doctest: +SKIP
    >>> result.robust_accuracy, result.breakdown()                                    # doctest: +SKIP
    >>> cw = create_attack('torchattacks:CW', c=1.0, steps=100)                       # doctest: +SKIP

- :class:`PGD` (L-inf / L2; losses ce, cw, dlr, trades_kl; restarts; early stop; targeted), :class:`FGSM`.
- :class:`AutoAttack` through ``pyautoattack`` with a per-attack breakdown (:class:`AutoAttackResult`).
- :class:`TorchAttack`: any ``torchattacks`` attack by name (optional extra ``torchattacks``).
"""
from __future__ import annotations

from ._core import AttackError, frozen_eval
from .autoattack import AUTOATTACK_ATTACKS, AUTOATTACK_VERSIONS, AutoAttack, AutoAttackResult
from .losses import LOSSES, per_example_loss
from .pgd import FGSM, PGD
from .torchattacks_backend import TorchAttack, torchattacks_names

__all__ = ["PGD", "FGSM", "AutoAttack", "AutoAttackResult", "TorchAttack", "create_attack", "AttackError",
           "frozen_eval", "ATTACKS", "LOSSES", "per_example_loss", "torchattacks_names", "AUTOATTACK_ATTACKS",
           "AUTOATTACK_VERSIONS"]

#: Our attacks by name (case-insensitive); ``'torchattacks:NAME'`` reaches the torchattacks backend.
ATTACKS = {"pgd": PGD, "fgsm": FGSM, "autoattack": AutoAttack}


def create_attack(name: str, **kwargs):
    """Build an attack by name: ``'pgd'``, ``'fgsm'``, ``'autoattack'`` or ``'torchattacks:NAME'`` (e.g.
    ``'torchattacks:CW'``, ``'torchattacks:MIFGSM'``), with that attack's keyword arguments.

    The result is called as ``attack(model, images, labels)`` and returns adversarial images.
    Raises :class:`AttackError` for an unknown name or arguments the attack does not take.
    """
    if not isinstance(name, str):
        raise AttackError(f"attack name must be a string, got {name!r}.")
    prefix, sep, rest = name.partition(":")
    if sep:
        if prefix.strip().lower() != "torchattacks" or not rest.strip():
            raise AttackError(f"unknown attack {name!r}; use one of {', '.join(ATTACKS)} or 'torchattacks:NAME'.")
        return TorchAttack(rest.strip(), **kwargs)
    key = name.strip().lower()
    if key not in ATTACKS:
        raise AttackError(f"unknown attack {name!r}; use one of {', '.join(ATTACKS)} or 'torchattacks:NAME'.")
    try:
        return ATTACKS[key](**kwargs)
    except TypeError as exc:
        raise AttackError(f"bad arguments for attack {name!r}: {exc}.") from exc
