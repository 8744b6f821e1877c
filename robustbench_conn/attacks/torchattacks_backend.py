"""Any attack of the optional ``torchattacks`` package behind our call shape ``attack(model, images, labels)``.

``torchattacks`` binds the model at construction and keeps state (mode flags, device); we build its attack object
afresh inside each call, in the same frozen-eval context as our own attacks, and silence its prints.
"""
from __future__ import annotations

import contextlib
import inspect
import io

import torch
from torch import Tensor

from ._core import AttackError, check_batch, frozen_eval

__all__ = ["TorchAttack", "torchattacks_names"]

_INSTALL_HINT = "install the optional extra: pip install 'robustbench-conn[torchattacks]' (torchattacks>=3.5.1)"


def _import_torchattacks():
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import torchattacks
    except ImportError as exc:
        raise AttackError(f"the torchattacks backend is not installed; {_INSTALL_HINT}.") from exc
    return torchattacks


def torchattacks_names() -> list[str]:
    """The attack classes torchattacks exports (raises :class:`AttackError` when it is not installed)."""
    torchattacks = _import_torchattacks()
    base = torchattacks.attack.Attack
    return sorted(name for name in getattr(torchattacks, "__all__", dir(torchattacks))
                  if inspect.isclass(getattr(torchattacks, name, None))
                  and issubclass(getattr(torchattacks, name), base) and name != "MultiAttack")


class TorchAttack:
    """A ``torchattacks`` attack by class name, e.g. ``TorchAttack('CW', c=1, steps=100)`` or ``'MIFGSM'``.

    Paper, threat model: those of the named attack (see its torchattacks docstring); torchattacks expects images in
    [0, 1] and the model to normalise inside, as ours do.

    ``kwargs`` are the attack's own constructor arguments (checked against its signature here). ``targeted=True``
    makes ``labels`` the target classes (torchattacks' ``set_mode_targeted_by_label``). ``seed``: an int runs the
    attack under a forked, seeded global RNG (torchattacks draws from the global generator); ``None`` uses it as is.
    """

    def __init__(self, name: str, targeted: bool = False, seed: int | None = None, **kwargs):
        torchattacks = _import_torchattacks()
        names = torchattacks_names()
        if name not in names:
            raise AttackError(f"torchattacks has no attack {name!r}; known: {', '.join(names)}.")
        self.name = name
        self._cls = getattr(torchattacks, name)
        try:
            inspect.signature(self._cls).bind(None, **kwargs)
        except TypeError as exc:
            raise AttackError(f"bad arguments for torchattacks.{name}: {exc}.") from exc
        self.kwargs = dict(kwargs)
        self.targeted = bool(targeted)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise AttackError(f"seed must be an int or None, got {seed!r}.")
        self.seed = seed

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"TorchAttack({self.name!r}{', ' + args if args else ''}, targeted={self.targeted}, seed={self.seed})"

    def __call__(self, model, images: Tensor, labels: Tensor) -> Tensor:
        eps = self.kwargs.get("eps", 0.0)
        check_batch(images, labels, float(eps) if isinstance(eps, (int, float)) else 0.0, "any")
        with frozen_eval(model), torch.inference_mode(False), contextlib.redirect_stdout(io.StringIO()):
            attack = self._cls(model, **self.kwargs)
            attack.set_device(images.device)
            if self.targeted:
                try:
                    attack.set_mode_targeted_by_label(quiet=True)
                except ValueError as exc:
                    raise AttackError(f"torchattacks.{self.name} does not support targeted mode.") from exc
            x = images.detach().float()
            if self.seed is None:
                x_adv = attack(x, labels.detach())
            else:
                devices = [images.device] if images.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(self.seed)
                    x_adv = attack(x, labels.detach())
        return x_adv.detach().to(dtype=images.dtype)
