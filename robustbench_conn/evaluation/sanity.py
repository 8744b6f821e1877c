"""The sanity gate run before any attack, and the checks run after them.

Gate (:func:`sanity_gate`), on the first ``gate_examples`` evaluation points, with the model as handed over:

- ``train_mode``: some module has ``training=True``.
- ``nondeterministic``: two identical forward passes differ (relative tolerance ``OUTPUT_RTOL``).
- ``batch_size_dependent``: the first quarter of the batch, run alone, gives other outputs than inside the batch.
- ``probability_outputs``: every output in [0, 1] and every row sums to 1: probabilities, not logits.
- ``inputs_out_of_range``: an evaluation image lies outside [0, 1].
- ``pgd_eps0_mismatch``: PGD with eps 0, scored as the attacks score (frozen, eval mode), changes a prediction.
- ``zero_gradients`` / ``vanishing_gradients``: the input gradient of the cross-entropy (taken as the attacks take
  it) is exactly 0, or below ``VANISHING_GRAD`` in L2 norm, for at least ``GRAD_FRACTION`` of the points.

Buffers (BatchNorm running statistics) are restored after the gate, so a model in train mode is not changed by it.

After (:func:`cross_checks`): robust never above clean; robust accuracy non-increasing in eps and in steps (beyond
``MONOTONE_TOL`` of the points, at least one point); AutoAttack not above the best PGD at that eps; Square breaking
points every gradient attack left robust (``gradient_masking``, beyond ``MASKING_TOL`` of the points, at least two).
Per batch (in the harness): adversarial images re-scored in float32, norms checked against eps.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks import PGD, frozen_eval

__all__ = ["GateReport", "sanity_gate", "cross_checks", "perturbation_norms", "norm_violations",
           "OUTPUT_RTOL", "VANISHING_GRAD", "GRAD_FRACTION", "MONOTONE_TOL", "MASKING_TOL"]

OUTPUT_RTOL = 1e-4        # relative to the largest |output|: differences below are float noise
VANISHING_GRAD = 1e-10    # per-example L2 norm of d loss / d input below which a gradient counts as vanishing
GRAD_FRACTION = 0.01      # fraction of gate points with zero / vanishing gradients that raises the flag
MONOTONE_TOL = 0.005      # fraction of points by which accuracy may rise with eps or steps before a flag
MASKING_TOL = 0.005       # fraction of points Square may break beyond every gradient attack before a flag


@dataclass
class GateReport:
    """What the gate found: ``flags`` (names, in a fixed order) and the numbers behind them."""

    flags: tuple[str, ...] = ()
    details: dict = field(default_factory=dict)


def _max_rel_diff(a: Tensor, b: Tensor) -> float:
    scale = 1.0 + float(a.detach().abs().max())
    return float((a.detach().float() - b.detach().float()).abs().max()) / scale


@torch.no_grad()
def _forward(model, x: Tensor) -> Tensor:
    return model(x)


def sanity_gate(model, images: Tensor, labels: Tensor, gate_examples: int = 128) -> GateReport:
    """Run the gate on ``images[:gate_examples]`` (all images for the range check)."""
    flags: list[str] = []
    details: dict = {}
    x = images[:gate_examples].detach()
    y = labels[:gate_examples].detach()
    buffers = {}
    if isinstance(model, nn.Module):
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        details["train_modules"] = sum(m.training for m in model.modules())
        if details["train_modules"]:
            flags.append("train_mode")
    try:
        out1 = _forward(model, x)
        out2 = _forward(model, x)
        details["repeat_diff"] = _max_rel_diff(out1, out2)
        if details["repeat_diff"] > OUTPUT_RTOL:
            flags.append("nondeterministic")
        k = max(1, x.shape[0] // 4)
        if k < x.shape[0]:
            part = _forward(model, x[:k])
            details["batch_diff"] = _max_rel_diff(out1[:k], part)
            if details["batch_diff"] > OUTPUT_RTOL and "nondeterministic" not in flags:
                flags.append("batch_size_dependent")
            elif details["batch_diff"] > OUTPUT_RTOL:
                # randomness alone could explain it; repeat the sub-batch to tell them apart
                part2 = _forward(model, x[:k])
                if _max_rel_diff(part, part2) * 10 < details["batch_diff"]:
                    flags.append("batch_size_dependent")
        o = out1.float()
        if o.dim() == 2 and float(o.min()) >= -1e-5 and float(o.max()) <= 1 + 1e-5 \
                and bool(((o.sum(1) - 1).abs() < 1e-3).all()):
            flags.append("probability_outputs")
        lo, hi = float(images.min()), float(images.max())
        details["input_range"] = (lo, hi)
        in_range = math.isfinite(lo) and math.isfinite(hi) and lo >= 0 and hi <= 1
        if not in_range:
            flags.append("inputs_out_of_range")
        else:
            clean_pred = out1.argmax(1)
            x0 = PGD(eps=0.0, alpha=1 / 255, steps=1, random_start=False, seed=0)(model, x, y)
            with frozen_eval(model), torch.no_grad():
                pgd_pred = model(x0).argmax(1)
            details["pgd_eps0_changed"] = int((pgd_pred != clean_pred).sum())
            details["pgd_eps0_moved"] = float((x0 - x).abs().max())
            if details["pgd_eps0_changed"] or details["pgd_eps0_moved"] > 0:
                flags.append("pgd_eps0_mismatch")
            with frozen_eval(model):
                xg = x.clone().float().requires_grad_(True)
                loss = F.cross_entropy(model(xg).float(), y, reduction="sum")
                grad, = torch.autograd.grad(loss, xg)
            norms = grad.flatten(1).norm(dim=1)
            n = norms.numel()
            details["grad_zero"] = int((norms == 0).sum())
            details["grad_vanishing"] = int((norms < VANISHING_GRAD).sum())
            details["grad_median_norm"] = float(norms.median())
            if details["grad_zero"] >= max(1, math.ceil(GRAD_FRACTION * n)):
                flags.append("zero_gradients")
            elif details["grad_vanishing"] >= max(1, math.ceil(GRAD_FRACTION * n)):
                flags.append("vanishing_gradients")
    finally:
        if buffers:
            with torch.no_grad():
                for name, b in model.named_buffers():
                    if name in buffers:
                        b.copy_(buffers[name])
    return GateReport(tuple(flags), details)


# -- per batch -----------------------------------------------------------------------------------------------------

def perturbation_norms(x_adv: Tensor, x: Tensor, norm: str) -> Tensor:
    d = (x_adv.float() - x.float()).flatten(1)
    if norm == "Linf":
        return d.abs().amax(1)
    if norm == "L2":
        return d.norm(dim=1)
    return d.abs().sum(1)


def norm_violations(x_adv: Tensor, x: Tensor, norm: str, eps: float) -> Tensor:
    """Per example: outside the eps-ball (relative slack 1e-5 plus 1e-6), outside [0, 1], or not finite."""
    norms = perturbation_norms(x_adv, x, norm)
    flat = x_adv.float().flatten(1)
    outside_box = (flat < -1e-6).any(1) | (flat > 1 + 1e-6).any(1)
    return ~torch.isfinite(flat).all(1) | (norms > eps * (1 + 1e-5) + 1e-6) | outside_box


# -- across rows ---------------------------------------------------------------------------------------------------

@dataclass
class JobOutcome:
    """What the harness knows of one finished (attack configuration, eps) on all points (CPU bool tensors)."""

    family: str            # 'pgd' or 'autoattack'
    attack: str
    eps_value: float
    steps: int
    restarts: int
    robust: Tensor
    reported_correct: Tensor
    square_broken: Tensor | None = None   # AutoAttack: points its Square stage broke
    flags: set = field(default_factory=set)


def cross_checks(outcomes: list[JobOutcome], clean_correct: Tensor) -> None:
    """Add the after-attack flags to each outcome's ``flags`` (in place)."""
    n = int(clean_correct.numel())
    n_clean = int(clean_correct.sum())
    tol = max(1, math.ceil(MONOTONE_TOL * n))
    for o in outcomes:
        if int(o.reported_correct.sum()) > n_clean:
            o.flags.add("robust_above_clean")
    # monotone in eps (same attack, steps, restarts) and in steps (same attack, eps, restarts)
    by_eps = defaultdict(list)
    by_steps = defaultdict(list)
    for o in outcomes:
        by_eps[(o.attack, o.steps, o.restarts)].append(o)
        by_steps[(o.attack, o.eps_value, o.restarts)].append(o)
    for group, attr, flag in ((by_eps, "eps_value", "eps_not_monotone"), (by_steps, "steps", "steps_not_monotone")):
        for members in group.values():
            members = sorted(members, key=lambda o: getattr(o, attr))
            best = None
            for o in members:
                count = int(o.robust.sum())
                if best is not None and count > best + tol:
                    o.flags.add(flag)
                best = count if best is None else min(best, count)
    # AutoAttack against the best PGD, and Square against every gradient attack, at each eps
    by_value = defaultdict(list)
    for o in outcomes:
        by_value[o.eps_value].append(o)
    masking_tol = max(2, math.ceil(MASKING_TOL * n))
    for members in by_value.values():
        pgd = [o for o in members if o.family == "pgd"]
        aa = [o for o in members if o.family == "autoattack"]
        if pgd:
            best_pgd = min(int(o.robust.sum()) for o in pgd)
            for o in aa:
                if int(o.robust.sum()) > best_pgd + tol:
                    o.flags.add("autoattack_above_pgd")
        gradient_robust = clean_correct.clone()
        for o in pgd:
            gradient_robust &= o.robust
        for o in aa:
            if o.square_broken is None:
                continue
            # square only ever sees points the AutoAttack's own gradient attacks left, so these are points no
            # gradient attack (of AutoAttack, nor of the PGD sweep when there is one) could break
            beyond = int((o.square_broken & gradient_robust).sum())
            if beyond >= masking_tol:
                o.flags.add("gradient_masking")
                for p in pgd:
                    p.flags.add("gradient_masking")
