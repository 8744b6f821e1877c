"""The typed row of a leaderboard: :class:`EvalRecord`, its CSV columns and key."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["EvalRecord", "COLUMNS", "KEY", "FLAG_DESCRIPTIONS", "record_to_row", "row_to_record"]

#: What each flag means (the ``flags`` column joins the names that fired with ``;``).
FLAG_DESCRIPTIONS = {
    # the gate, before any attack
    "train_mode": "the model was handed over in train mode (some module has training=True)",
    "nondeterministic": "two identical forward passes gave different outputs (randomness inside the model)",
    "batch_size_dependent": "outputs change with the batch size (e.g. BatchNorm using batch statistics)",
    "probability_outputs": "outputs look like probabilities (in [0, 1], rows sum to 1), not logits",
    "inputs_out_of_range": "evaluation images lie outside [0, 1]",
    "pgd_eps0_mismatch": "PGD with eps 0 does not reproduce the clean predictions",
    "zero_gradients": "the input gradient of the loss is exactly zero for some points (gradient masking?)",
    "vanishing_gradients": "the input gradient of the loss is vanishingly small for some points (gradient masking?)",
    # the checks after the attacks
    "robust_above_clean": "the attack reported more correct points than the clean evaluation",
    "eps_not_monotone": "robust accuracy rose with eps for this attack",
    "steps_not_monotone": "robust accuracy rose with the number of steps for this attack",
    "autoattack_above_pgd": "AutoAttack found a higher robust accuracy than the best PGD at this eps",
    "gradient_masking": "Square (gradient-free) broke points every gradient attack left robust",
    "rescore_mismatch": "re-scoring the adversarial images in float32 disagrees with the attack's verdict",
    "norm_violation": "some adversarial images lie outside the eps-ball or the [0, 1] box (counted as robust)",
}


@dataclass
class EvalRecord:
    """One leaderboard row: one model, one attack configuration, one eps. Accuracies are fractions in [0, 1].

    Key: ``(model, run_id, connection, dataset, split, norm, eps, attack, steps, restarts, n_examples)``; a model is
    an architecture name together with the run that trained it. ``steps`` and ``restarts`` are 0 for AutoAttack
    (its attacks fix their own). ``eps`` is the exact text (``'8/255'``), ``eps_value`` its float.
    """

    model: str
    run_id: str
    connection: str
    dataset: str
    split: str
    norm: str
    eps: str
    eps_value: float
    attack: str
    steps: int
    restarts: int
    n_examples: int
    clean_acc: float
    robust_acc: float
    n_clean_correct: int
    n_robust: int
    ci_low: float
    ci_high: float
    ci_method: str = "clopper-pearson"
    flags: str = ""
    seconds: float = 0.0
    loss: str = ""
    version: str = ""
    step_size: float = 0.0
    attack_seed: int = 0
    batch_size: int = 0
    decay_d: float = math.nan
    config_hash: str = ""
    run_seed: str = ""
    checkpoint_sha256: str = ""
    source: str = ""
    git_commit: str = ""
    versions: str = ""
    device: str = ""
    date: str = ""
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def key(self) -> tuple[str, ...]:
        row = record_to_row(self)
        return tuple(row[k] for k in KEY)

    @property
    def flag_list(self) -> list[str]:
        return [f for f in self.flags.split(";") if f]


COLUMNS = [f.name for f in dataclasses.fields(EvalRecord) if f.name != "extra"]
KEY = ("model", "run_id", "connection", "dataset", "split", "norm", "eps", "attack", "steps", "restarts",
       "n_examples")
_INT = {f.name for f in dataclasses.fields(EvalRecord) if f.type in ("int", int)}
_FLOAT = {f.name for f in dataclasses.fields(EvalRecord) if f.type in ("float", float)}


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def record_to_row(record: EvalRecord) -> dict[str, str]:
    """The CSV row (strings) of a record; floats are written with ``repr`` so they read back exactly."""
    return {name: _fmt(getattr(record, name)) for name in COLUMNS}


def row_to_record(row: Mapping[str, str]) -> EvalRecord:
    """A record from a CSV row (missing columns take their defaults)."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(EvalRecord):
        if f.name == "extra" or f.name not in row:
            continue
        text = row[f.name]
        text = "" if text is None else str(text)
        if f.name in _INT:
            kwargs[f.name] = int(float(text)) if text else 0
        elif f.name in _FLOAT:
            kwargs[f.name] = float(text) if text else math.nan
        else:
            kwargs[f.name] = text
    return EvalRecord(**kwargs)
