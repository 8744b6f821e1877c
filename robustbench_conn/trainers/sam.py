"""SAM and ASAM as a small wrapper around any optimizer (the paper's CIFAR ``--minimizer`` / ``--rho`` / ``--eta``).

SAM (Foret et al., 2021) takes the gradient at the worst point of a ``rho``-ball around the weights::

    e = rho * g / ||g||                 w + e  ->  gradient there  ->  w  ->  base optimizer step

ASAM (Kwon et al., 2021) makes the ball adaptive to the weights' scale, ``T_w = |w| + eta``::

    e = rho * T_w^2 g / ||T_w g||

One training step is two forward/backward passes::

    loss_fn().backward(); sam.first_step()        # climb to w + e
    optimizer.zero_grad(); loss_fn().backward(); sam.second_step()   # back to w, step with the gradient at w + e

Only the base optimizer's parameters are perturbed (the connection's ``delta``, on its own Adam, is not).
The wrapper keeps no state worth saving: checkpoint ``sam.base`` as usual.
"""
from __future__ import annotations

import torch

__all__ = ["SAM", "MINIMIZERS"]

MINIMIZERS = ("none", "sam", "asam")


class SAM:
    """Sharpness-aware minimisation around ``base``; ``adaptive=True`` is ASAM."""

    def __init__(self, base: torch.optim.Optimizer, rho: float = 0.05, eta: float = 0.01, adaptive: bool = False):
        if rho <= 0:
            raise ValueError(f"SAM rho must be > 0, got {rho}.")
        if eta < 0:
            raise ValueError(f"ASAM eta must be >= 0, got {eta}.")
        self.base, self.rho, self.eta, self.adaptive = base, float(rho), float(eta), bool(adaptive)
        self._perturbation: dict[torch.Tensor, torch.Tensor] = {}

    def _params(self):
        for group in self.base.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    yield p

    @torch.no_grad()
    def first_step(self) -> None:
        """Move every parameter to ``w + e`` (the gradient must be the one at ``w``)."""
        params = list(self._params())
        if not params:
            return
        if self.adaptive:
            scales = [p.abs() + self.eta for p in params]
            scaled = [s * p.grad for s, p in zip(scales, params)]
        else:
            scales, scaled = [None] * len(params), [p.grad for p in params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in scaled]))
        factor = self.rho / (norm + 1e-12)
        for p, s, g in zip(params, scales, scaled):
            e = (g * s if s is not None else g) * factor.to(g.dtype)
            p.add_(e)
            self._perturbation[p] = e

    @torch.no_grad()
    def second_step(self) -> None:
        """Return to ``w`` and let the base optimizer step with the gradient taken at ``w + e``."""
        for p, e in self._perturbation.items():
            p.sub_(e)
        self._perturbation.clear()
        self.base.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self):
        return self.base.param_groups

    def state_dict(self) -> dict:
        return self.base.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state)
