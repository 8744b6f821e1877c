"""``evaluate``: the one Python entry of the harness (the CLI ``evaluate-robust`` is a thin layer over it)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..attacks import PGD, AutoAttack, frozen_eval
from ..io import CheckpointError, git_commit, load_model, read_model_card, sha256_file
from .eps import Eps, parse_eps
from .leaderboard import (check_leaderboard_file, merge_records, write_model_info, write_pivot)
from .records import FLAG_DESCRIPTIONS, EvalRecord, row_to_record
from .sanity import GateReport, JobOutcome, cross_checks, norm_violations, sanity_gate
from .state import ResumeState, bits, unbits
from .stats import binomial_interval

__all__ = ["evaluate", "ModelEntry", "load_entry", "EvaluationError", "EvaluationWarning", "SUITES", "output_paths",
           "connection_label", "load_robustbench_model"]

SUITES = ("autoattack", "pgd")
PGD_LOSSES = ("ce", "cw", "dlr")


class EvaluationError(ValueError):
    """Input the harness cannot evaluate; the message says what to change."""


class EvaluationWarning(UserWarning):
    """A sanity flag fired: the numbers in the flagged rows may not mean what they seem."""


@dataclass
class ModelEntry:
    """A model to evaluate and what the leaderboard says about it."""

    module: nn.Module
    name: str
    connection: str = ""
    run_id: str = ""
    config_hash: str = ""
    run_seed: str = ""
    checkpoint_sha256: str = ""
    source: str = ""
    num_classes: int | None = None
    card: dict = field(default_factory=dict, repr=False)


def connection_label(connection: dict | None) -> str:
    """``'residual'`` or ``'suppression(d0=0.2,R=3)'`` (plus what differs from the paper's defaults)."""
    if not connection:
        return ""
    if connection.get("kind", "residual") == "residual":
        return "residual"
    parts = [f"d0={connection.get('init_decay', 0.0):g}", f"R={connection.get('restart_period')}"]
    if not connection.get("learnable", True):
        parts.append("fixed")
    if not connection.get("shared", True):
        parts.append("per-block")
    if connection.get("parametrisation", "abs") != "abs":
        parts.append(str(connection["parametrisation"]))
    if float(connection.get("decay_scale", 1.0)) != 1.0:
        parts.append(f"scale={connection['decay_scale']:g}")
    return f"suppression({','.join(parts)})"


def _find_run_dir(path: Path) -> tuple[Path, str]:
    """A run folder and which weights: the folder itself, its model.safetensors, or checkpoints/{best,last}.pt."""
    if path.is_dir():
        return path, "final"
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a run folder (with model_card.json) or a checkpoint "
                              "inside one.")
    if path.name == "model.safetensors" and (path.parent / "model_card.json").exists():
        return path.parent, "final"
    if path.parent.name == "checkpoints" and path.stem in ("best", "last") and \
            (path.parent.parent / "model_card.json").exists():
        return path.parent.parent, path.stem
    raise CheckpointError(f"{path} is not a run folder, nor model.safetensors or checkpoints/best.pt / last.pt "
                          "inside one (a model_card.json beside it says how to rebuild the network).")


def load_entry(path: str | os.PathLike) -> ModelEntry:
    """Rebuild the model of a run folder or checkpoint (via ``robustbench_conn.io.load_model``)."""
    run_dir, which = _find_run_dir(Path(path))
    read_model_card(run_dir)
    model, card = load_model(run_dir, which)
    name = card["model"] if which == "final" else f"{card['model']}[{which}]"
    return ModelEntry(module=model, name=name, connection=connection_label(card.get("connection")),
                      run_id=str(card.get("run_id", "") or ""), config_hash=str(card.get("config_hash", "") or ""),
                      run_seed="" if card.get("seed") is None else str(card.get("seed")),
                      checkpoint_sha256=card.get("weights_sha256", ""), source=str(run_dir),
                      num_classes=card.get("num_classes"), card=card)


def _ensure_autoattack_alias() -> None:
    """robustbench 1.1.1 imports ``autoattack`` (the git package) at import time; point it to pyautoattack."""
    import importlib.util
    import types

    if "autoattack" in sys.modules or importlib.util.find_spec("autoattack") is not None:
        return
    import pyautoattack
    import pyautoattack.state

    alias = types.ModuleType("autoattack")
    alias.AutoAttack = pyautoattack.AutoAttack
    alias.state = pyautoattack.state
    alias.__path__ = []  # a package, so ``autoattack.state`` resolves
    sys.modules["autoattack"] = alias
    sys.modules["autoattack.state"] = pyautoattack.state


def load_robustbench_model(name: str, model_dir: str | os.PathLike, dataset: str = "cifar10",
                           norm: str = "Linf") -> ModelEntry:
    """A RobustBench zoo model from ``model_dir/DATASET/THREAT/NAME.pt`` (offline; the file must be there)."""
    try:
        _ensure_autoattack_alias()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from robustbench.utils import load_model as rb_load_model
    except ImportError as err:
        raise EvaluationError("--robustbench-model needs the optional robustbench extra "
                              f"(pip install 'robustbench-conn[robustbench]'); importing it failed: {err}.") from None
    rb_dataset = {"cifar10": "cifar10", "cifar100": "cifar100", "imagefolder": "imagenet"}.get(dataset)
    if rb_dataset is None:
        raise EvaluationError(f"RobustBench has no models for the dataset {dataset!r}; use cifar10, cifar100 or "
                              "imagefolder (ImageNet).")
    path = Path(model_dir) / rb_dataset / norm / f"{name}.pt"
    if not path.is_file():
        raise EvaluationError(f"RobustBench model file {path} is not there and this harness does not download; "
                              f"put {name}.pt there (or pass --model-dir DIR that holds "
                              f"{rb_dataset}/{norm}/{name}.pt).")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = rb_load_model(model_name=name, model_dir=str(model_dir), dataset=rb_dataset, threat_model=norm)
    except (KeyError, ValueError) as err:
        raise EvaluationError(f"RobustBench does not know the model {name!r} for {rb_dataset}/{norm} ({err}).") \
            from None
    except Exception as err:  # torch.load / state-dict errors from a damaged file
        raise EvaluationError(f"RobustBench could not load {path} ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200] if str(err) else ''}).") from None
    return ModelEntry(module=model.eval(), name=name, connection="robustbench", run_id="robustbench",
                      checkpoint_sha256=sha256_file(path), source=str(path))


def _as_entry(model: Any) -> ModelEntry:
    if isinstance(model, ModelEntry):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_entry(model)
    if isinstance(model, nn.Module):
        conn = getattr(model, "connection_config", None)
        label = connection_label(conn.to_dict()) if hasattr(conn, "to_dict") else ""
        return ModelEntry(module=model, name=getattr(model, "model_name", type(model).__name__), connection=label)
    raise EvaluationError(f"cannot evaluate a {type(model).__name__}: pass a run folder, a checkpoint path, an "
                          "nn.Module or a ModelEntry.")


def _load_points(data, split: str, data_dir, n_examples: int | None, images, labels):
    """The first ``n_examples`` points of the split, in the dataset's fixed order, as CPU float NCHW and int64."""
    if images is not None or labels is not None:
        if images is None or labels is None:
            raise EvaluationError("pass both images= and labels=, or neither.")
        name = data if isinstance(data, str) else "custom"
        n = images.shape[0] if n_examples is None else min(n_examples, images.shape[0])
        return name, images[:n].detach().cpu().float().contiguous(), labels[:n].detach().cpu().long(), None
    from ..data import get_dataset

    dataset = get_dataset(data, split, data_dir) if isinstance(data, str) else data
    name = data if isinstance(data, str) else str(getattr(dataset, "source", "custom")).split("/")[0]
    if name in ("npz", "imagefolder") and data_dir:  # name the files: npz:cifar10 for ../shared/data/cifar10
        first = str(data_dir).split(",")[0].rstrip("/")
        name = f"{name}:{Path(first).stem if Path(first).suffix == '.npz' else Path(first).name}"
    total = len(dataset)
    n = total if n_examples is None else n_examples
    if n > total:
        warnings.warn(f"{getattr(dataset, 'source', name)} has {total} points; evaluating all {total}, "
                      f"not {n_examples}.")
        n = total
    if hasattr(dataset, "batch"):
        x, y = dataset.batch(torch.arange(n))
    else:
        items = [dataset[i] for i in range(n)]
        x = torch.stack([it[0] for it in items])
        y = torch.tensor([int(it[1]) for it in items], dtype=torch.long)
    return name, x.float().contiguous(), y.long(), getattr(dataset, "num_classes", None)


def _versions() -> str:
    from importlib import metadata

    parts = [f"python={platform.python_version()}", f"torch={torch.__version__}"]
    for dist in ("pyautoattack", "robustbench-conn", "numpy"):
        try:
            parts.append(f"{dist}={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return ";".join(parts)


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{platform.processor() or platform.machine()}x{torch.get_num_threads()}threads"


@dataclass
class _Job:
    family: str
    attack: str
    eps: Eps
    steps: int = 0
    restarts: int = 0
    loss: str = ""
    step_size: float = 0.0
    version: str = ""
    aa_attacks: tuple | None = None

    @property
    def key(self) -> str:
        return f"{self.attack}|{self.eps.text}|{self.steps}|{self.restarts}|{self.step_size!r}|{self.version}"


def _aa_name(version: str, attacks) -> str:
    if version == "standard":
        return "autoattack"
    if version == "custom":
        return "autoattack-" + "+".join(attacks)
    return f"autoattack-{version}"


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (str, int, float, Eps)):
        return [value]
    return list(value)


def output_paths(out: str | os.PathLike) -> dict[str, Path]:
    """Where an evaluation writes beside its leaderboard CSV ``out`` (a folder means ``out/leaderboard.csv``)."""
    out = Path(out)
    if out.suffix.lower() != ".csv":
        out = out / "leaderboard.csv"
    stem = out.with_suffix("")
    return {"csv": out, "pivot_csv": Path(f"{stem}_pivot.csv"), "pivot_md": Path(f"{stem}_pivot.md"),
            "model_info": out.parent / "model_info", "state": out.parent / ".evaluate_state"}


def evaluate(models: Any, data: Any = "cifar10", *, split: str = "test", data_dir: str | None = None,
             n_examples: int | None = 1000, batch_size: int = 500, device: str | torch.device = "cpu",
             suites: Sequence[str] = ("autoattack", "pgd"), eps: Iterable = ("8/255",), norm: str = "Linf",
             steps: Iterable[int] = (10,), restarts: Iterable[int] = (1,), losses: Iterable[str] = ("ce",),
             step_size: float = 0.25, version: str = "standard", attacks: Sequence[str] | None = None,
             seed: int = 0, out: str | os.PathLike | None = None, pivot: bool = True, model_info: bool = True,
             plot: str | os.PathLike | None = None, resume: bool = True, state_dir: str | os.PathLike | None = None,
             gate_examples: int = 128, ci_method: str = "clopper-pearson", images: Tensor | None = None,
             labels: Tensor | None = None, progress: Callable[[dict], None] | None = None) -> list[EvalRecord]:
    """Evaluate one or more models; return one :class:`EvalRecord` per (model, attack configuration, eps).

    models: a run folder or checkpoint path, an ``nn.Module``, a :class:`ModelEntry`, or a list of them.
    data: a dataset name for ``robustbench_conn.data.get_dataset`` (``'cifar10'``, ``'digits'``, ...) or a dataset
        object; the first ``n_examples`` points of ``split`` in their fixed order are used (all when None). Or pass
        ``images`` (floats in [0, 1], NCHW) and ``labels`` directly (``data`` then only names them).
    suites: ``'autoattack'`` (``version`` standard/plus/rand, or custom with ``attacks=[...]``) and/or ``'pgd'``
        (every combination of ``eps`` x ``steps`` x ``restarts`` x ``losses``; step size ``step_size * eps``,
        random start, early stop, so more steps never help the model).
    eps: radii as exact fractions (``'8/255'``) or decimals; stored as text and float.
    out: the leaderboard CSV (or a folder for ``leaderboard.csv``): rows are merged in by key under a file lock,
        then the pivot (``*_pivot.csv`` / ``*_pivot.md``), ``model_info/`` JSON and, with ``plot``, a PNG are
        written. Without ``out`` nothing is written (and nothing resumes unless ``state_dir`` is given).
    resume: keep finished (attack, eps, batch) results in ``state_dir`` (default: ``.evaluate_state`` beside the
        CSV) and reuse them when the same evaluation is run again; the file is removed once the rows are merged.
    progress: called with a dict (model, attack, eps, batch, batches, resumed) after every batch.

    The sanity gate runs on each model before any attack, the checks after; flags go into each row's ``flags``
    and an :class:`EvaluationWarning`. Raises :class:`EvaluationError` (or the data / checkpoint / attack error)
    for input it cannot evaluate, before any file is written.
    """
    # -- check everything before computing anything
    suites = _as_list(suites)
    for s in suites:
        if s not in SUITES:
            raise EvaluationError(f"suite {s!r} is unknown: use {' and/or '.join(SUITES)}.")
    if not suites:
        raise EvaluationError("no suite to run: pass autoattack and/or pgd.")
    eps_list = [parse_eps(e) for e in _as_list(eps)]
    if not eps_list:
        raise EvaluationError("no eps given: pass at least one, e.g. 8/255.")
    if len({e.text for e in eps_list}) != len(eps_list):
        raise EvaluationError(f"an eps is listed twice: {[e.text for e in eps_list]}.")
    if norm not in ("Linf", "L2", "L1"):
        raise EvaluationError(f"norm {norm!r} is unknown: use Linf, L2 or L1.")
    if "pgd" in suites and norm == "L1":
        raise EvaluationError("the PGD suite covers Linf and L2; use --suite autoattack for L1.")
    steps_list = [int(s) for s in _as_list(steps)] if "pgd" in suites else []
    restarts_list = [int(r) for r in _as_list(restarts)] if "pgd" in suites else []
    losses_list = [str(l_) for l_ in _as_list(losses)] if "pgd" in suites else []
    if "pgd" in suites:
        if not steps_list or min(steps_list) < 1:
            raise EvaluationError(f"steps must be integers >= 1, got {steps_list}.")
        if not restarts_list or min(restarts_list) < 1:
            raise EvaluationError(f"restarts must be integers >= 1, got {restarts_list}.")
        bad = [l_ for l_ in losses_list if l_ not in PGD_LOSSES]
        if bad or not losses_list:
            raise EvaluationError(f"PGD loss {bad[0] if bad else None!r} is unknown: use {', '.join(PGD_LOSSES)}.")
        if not (isinstance(step_size, (int, float)) and 0 < step_size <= 10):
            raise EvaluationError(f"step_size is the PGD step as a fraction of eps, in (0, 10]; got {step_size!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EvaluationError(f"batch size must be an integer >= 1, got {batch_size!r}.")
    if n_examples is not None and (isinstance(n_examples, bool) or not isinstance(n_examples, int)
                                   or n_examples < 1):
        raise EvaluationError(f"n_examples must be an integer >= 1, got {n_examples!r}.")
    if ci_method not in ("clopper-pearson", "wilson"):
        raise EvaluationError(f"interval method {ci_method!r} is unknown: use clopper-pearson or wilson.")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise EvaluationError(f"device {device!r} is not a torch device ({err}).") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"device {device} was asked for but CUDA is not available here; use --device cpu.")
    jobs: list[_Job] = []
    for e in eps_list:
        if "pgd" in suites:
            for loss in losses_list:
                for st in steps_list:
                    for r in restarts_list:
                        jobs.append(_Job("pgd", f"pgd-{loss}", e, st, r, loss, step_size=float(step_size)))
        if "autoattack" in suites:
            AutoAttack(eps=float(e), norm=norm, version=version, attacks=attacks, seed=seed,
                       batch_size=batch_size)  # checks version / attacks / eps now, before any work
            aa_attacks = tuple(a.lower() for a in attacks) if attacks else None
            jobs.append(_Job("autoattack", _aa_name(version, aa_attacks), e, version=version, aa_attacks=aa_attacks))
    for j in jobs:
        if j.family == "pgd":
            PGD(eps=float(j.eps), alpha=max(float(j.eps) * j.step_size, 1e-12), steps=j.steps, norm=norm,
                restarts=j.restarts, loss=j.loss)  # raises AttackError for eps > 1 (Linf) etc.
    paths = output_paths(out) if out is not None else None
    if paths is not None:
        check_leaderboard_file(paths["csv"])
    entries = [_as_entry(m) for m in (models if isinstance(models, (list, tuple)) else [models])]
    if not entries:
        raise EvaluationError("no model to evaluate.")
    data_name, x_all, y_all, num_classes = _load_points(data, split, data_dir, n_examples, images, labels)
    if x_all.shape[0] == 0:
        raise EvaluationError("there are no points to evaluate.")
    for entry in entries:
        if num_classes is not None and entry.num_classes is not None and entry.num_classes != num_classes:
            raise EvaluationError(f"{entry.source or entry.name} has {entry.num_classes} outputs but {data_name} has "
                                  f"{num_classes} classes.")

    common = dict(dataset=data_name, split=split, versions=_versions(), git_commit=git_commit() or "",
                  device=_device_label(device))
    state_root = Path(state_dir) if state_dir is not None else (paths["state"] if paths is not None else None)
    records: list[EvalRecord] = []
    states: list[ResumeState] = []
    for entry in entries:
        recs, state = _evaluate_one(entry, jobs, x_all, y_all, device=device, batch_size=batch_size, seed=seed,
                                    norm=norm, gate_examples=gate_examples, ci_method=ci_method, common=common,
                                    state_root=state_root if resume else None, progress=progress)
        records.extend(recs)
        states.append(state)
    if paths is not None:
        def derived(rows):
            everything = [row_to_record(r) for r in rows]
            if pivot:
                write_pivot(everything, paths["pivot_csv"], paths["pivot_md"])
            if model_info:
                write_model_info(records, paths["model_info"])
        merge_records(paths["csv"], records, on_merged=derived)
        if plot is not None:
            from .plotting import plot_leaderboard
            plot_leaderboard(paths["csv"], plot)
    elif plot is not None:
        from .plotting import plot_leaderboard
        plot_leaderboard(records, plot)
    for state in states:
        if state.path is not None and (paths is not None or state_dir is not None):
            state.remove()
    return records


def _state_meta(entry: ModelEntry, x: Tensor, y: Tensor, device: torch.device, batch_size: int, seed: int,
                norm: str) -> dict:
    digest = hashlib.sha256()
    digest.update(x.numpy().tobytes())
    digest.update(y.numpy().tobytes())
    return {"model": entry.name, "run_id": entry.run_id, "checkpoint_sha256": entry.checkpoint_sha256,
            "source": entry.source, "points_sha256": digest.hexdigest(), "n": int(x.shape[0]),
            "batch_size": batch_size, "device": str(device), "seed": seed, "norm": norm}


def _evaluate_one(entry: ModelEntry, jobs: list[_Job], x_all: Tensor, y_all: Tensor, *, device, batch_size, seed,
                  norm, gate_examples, ci_method, common, state_root, progress) -> tuple[list[EvalRecord], ResumeState]:
    model = entry.module.to(device)
    n = x_all.shape[0]
    meta = _state_meta(entry, x_all, y_all, device, batch_size, seed, norm)
    state_path = None
    if state_root is not None:
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{entry.name}-{entry.run_id}")
        state_path = Path(state_root) / f"{slug}-{key}.json"
    state = ResumeState(state_path, meta)

    # -- the gate
    gate: GateReport = sanity_gate(model, x_all.to(device), y_all.to(device), gate_examples=gate_examples)
    if "inputs_out_of_range" in gate.flags:
        lo, hi = gate.details["input_range"]
        raise EvaluationError(f"the evaluation images lie in [{lo:.4g}, {hi:.4g}], not [0, 1]; the models normalise "
                              "inside, so pass raw images scaled to [0, 1].")
    with torch.no_grad():
        out = model(x_all[:2].to(device))
    if out.dim() != 2 or out.shape[1] <= int(y_all.max()):
        raise EvaluationError(f"{entry.name} returns outputs of shape {tuple(out.shape)}, which do not cover the "
                              f"labels 0..{int(y_all.max())}.")

    batches = [(i, slice(s, min(s + batch_size, n))) for i, s in enumerate(range(0, n, batch_size))]

    def report(job_label, eps_text, b, resumed):
        if progress is not None:
            progress({"model": entry.name, "run_id": entry.run_id, "attack": job_label, "eps": eps_text,
                      "batch": b + 1, "batches": len(batches), "resumed": resumed})

    # -- clean predictions (scored as the attacks score: frozen, eval mode)
    clean_parts = []
    for b, sl in batches:
        cached = state.get("clean", b)
        if cached is None:
            with frozen_eval(model), torch.no_grad():
                pred = model(x_all[sl].to(device)).argmax(1).cpu()
            cached = {"correct": bits(pred == y_all[sl])}
            state.put("clean", b, cached)
        clean_parts.append(unbits(cached["correct"]))
    clean_correct = torch.cat(clean_parts)

    outcomes: list[JobOutcome] = []
    for job in jobs:
        parts: dict[str, list] = {"robust": [], "reported": [], "square": []}
        seconds = 0.0
        mismatches = violations = 0
        for b, sl in batches:
            cached = state.get(job.key, b)
            resumed = cached is not None
            if cached is None:
                cached = _run_batch(job, model, x_all[sl], y_all[sl], clean_correct[sl], device=device, norm=norm,
                                    seed=seed, batch_index=b, batch_size=batch_size)
                state.put(job.key, b, cached)
            report(job.attack, job.eps.text, b, resumed)
            parts["robust"].append(unbits(cached["robust"]))
            parts["reported"].append(unbits(cached["reported"]))
            if "square" in cached:
                parts["square"].append(unbits(cached["square"]))
            seconds += cached["seconds"]
            mismatches += cached["mismatches"]
            violations += cached["violations"]
        outcome = JobOutcome(job.family, job.attack, float(job.eps.value), job.steps, job.restarts,
                             robust=torch.cat(parts["robust"]), reported_correct=torch.cat(parts["reported"]),
                             square_broken=torch.cat(parts["square"]) if parts["square"] else None)
        outcome.seconds = seconds
        if mismatches:
            outcome.flags.add("rescore_mismatch")
        if violations:
            outcome.flags.add("norm_violation")
        outcome.job = job
        outcomes.append(outcome)
    cross_checks(outcomes, clean_correct)

    from ..models import learned_decay
    decay = learned_decay(model) if isinstance(model, nn.Module) else None
    date = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    n_clean = int(clean_correct.sum())
    records = []
    order = list(FLAG_DESCRIPTIONS)
    for o in outcomes:
        job = o.job
        n_robust = int(o.robust.sum())
        low, high = binomial_interval(n_robust, n, ci_method)
        flags = sorted(set(gate.flags) | o.flags, key=order.index)
        records.append(EvalRecord(
            model=entry.name, run_id=entry.run_id, connection=entry.connection, norm=norm, eps=job.eps.text,
            eps_value=float(job.eps.value), attack=job.attack, steps=job.steps, restarts=job.restarts,
            n_examples=n, clean_acc=n_clean / n, robust_acc=n_robust / n, n_clean_correct=n_clean,
            n_robust=n_robust, ci_low=low, ci_high=high, ci_method=ci_method, flags=";".join(flags),
            seconds=round(o.seconds, 3), loss=job.loss, version=job.version,
            step_size=float(job.eps.value) * job.step_size if job.family == "pgd" else 0.0,
            attack_seed=seed, batch_size=batch_size, decay_d=math.nan if decay is None else decay,
            config_hash=entry.config_hash, run_seed=entry.run_seed, checkpoint_sha256=entry.checkpoint_sha256,
            source=entry.source, date=date, **common))
    fired = sorted({f for r in records for f in r.flag_list}, key=order.index)
    if fired:
        lines = "; ".join(f"{f} ({FLAG_DESCRIPTIONS[f]})" for f in fired)
        warnings.warn(f"{entry.name}{' ' + entry.run_id if entry.run_id else ''}: sanity flags fired: {lines}.",
                      EvaluationWarning, stacklevel=3)
    return records, state


def _run_batch(job: _Job, model, x: Tensor, y: Tensor, clean: Tensor, *, device, norm, seed, batch_index,
               batch_size) -> dict:
    xd, yd = x.to(device), y.to(device)
    eps = float(job.eps.value)
    start = time.perf_counter()
    square = None
    if job.family == "pgd":
        attack = PGD(eps=eps, alpha=max(eps * job.step_size, 1e-12), steps=job.steps, norm=norm,
                     restarts=job.restarts, loss=job.loss, random_start=True, early_stop=True,
                     seed=seed + 7919 * batch_index)
        # Only points the model gets right can be broken: attack those (as AutoAttack does), keep the rest.
        correct = clean.to(device)
        x_adv = xd.clone()
        if correct.any():
            x_adv[correct] = attack(model, xd[correct], yd[correct])
        reported = None
    else:
        aa = AutoAttack(eps=eps, norm=norm, version=job.version, attacks=list(job.aa_attacks) if job.aa_attacks
                        else None, seed=seed, batch_size=batch_size)
        result = aa.run(model, xd, yd)
        x_adv = result.x_adv
        reported = result.robust.cpu()
        square = torch.tensor([b == "square" for b in result.broken_by], dtype=torch.bool)
    # re-score in float32, as the attacks score (frozen, eval mode), and check the norms
    with frozen_eval(model), torch.no_grad():
        adv_correct = (model(x_adv.float()).argmax(1) == yd).cpu()
    violation = norm_violations(x_adv, xd, norm, eps).cpu()
    robust = clean & (adv_correct | violation)
    if reported is None:
        reported = adv_correct
        mismatches = 0
    else:
        mismatches = int((reported != (clean & adv_correct)).sum())
    seconds = time.perf_counter() - start
    result = {"robust": bits(robust), "reported": bits(reported), "seconds": seconds, "mismatches": mismatches,
              "violations": int(violation.sum())}
    if square is not None:
        result["square"] = bits(square)
    return result
