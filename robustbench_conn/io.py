"""Files: atomic writes, safe loading of user-supplied checkpoints, model cards, and rebuilding a model from a run.

Files a user hands us are data, not code: weights load with safetensors or ``torch.load(weights_only=True)``, and a
file that is empty, truncated or an HTML page is named as such.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import yaml
from torch import nn

__all__ = ["CheckpointError", "atomic_path", "atomic_write_text", "atomic_save", "load_checkpoint",
           "save_weights", "load_weights", "sha256_file", "git_commit", "write_json", "read_json",
           "write_model_card", "read_model_card", "model_from_card", "load_model", "MODEL_CARD", "FINAL_WEIGHTS"]

MODEL_CARD = "model_card.json"
_UMASK = os.umask(0)
os.umask(_UMASK)
FINAL_WEIGHTS = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint or run folder that cannot be used; the message says why."""


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on failure remove it.

    A kill mid-write leaves the previous file intact (rename is atomic on POSIX).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes the file private (0600); a result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist.")
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a directory; pass the file (or a run folder where a run is expected).")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes).")
    with open(path, "rb") as f:
        head = f.read(512).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        raise CheckpointError(f"{what} {path} is an HTML page, not weights (a failed download?).")


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a torch checkpoint as data (``weights_only=True``) and check that it is a dict."""
    path = Path(path)
    _check_file(path, "checkpoint")
    if path.suffix == ".safetensors":
        return {"state_dict": load_weights(path)}
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is not a torch zip archive (truncated or another format?).")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} could not be loaded as plain data ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200]}); it may be truncated or hold pickled code.") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict of tensors.")
    return obj


def save_weights(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                 metadata: Mapping[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata or {}))


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    _check_file(path, "weights file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"weights file {path} is not valid safetensors (truncated?): {err}.") from None


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """The commit of the checkout holding this package (``+dirty`` when it has changes), or None."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if sha.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def write_model_card(run_dir: str | os.PathLike, card: Mapping[str, Any]) -> None:
    write_json(Path(run_dir) / MODEL_CARD, dict(card))


def read_model_card(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / MODEL_CARD
    if not path.exists():
        raise CheckpointError(f"{run_dir} has no {MODEL_CARD}: pass a run folder written by train-robust or "
                              "train-clean.")
    card = read_json(path)
    for key in ("model", "num_classes", "connection"):
        if key not in card:
            raise CheckpointError(f"{path} lacks the field {key!r}; it cannot say how to rebuild the network.")
    return card


def model_from_card(card: Mapping[str, Any]) -> torch.nn.Module:
    """Build the (untrained) network a model card describes: CIFAR names via create_model, others via timm."""
    from .models import ConnectionConfig, create_model
    from .models.cifar import parse_cifar_name

    connection = ConnectionConfig.from_dict(card["connection"])
    kwargs = dict(card.get("model_kwargs", {}))
    try:
        parse_cifar_name(card["model"])
    except ValueError:
        import timm

        from . import models  # noqa: F401  (registers the conn_* models in timm)
        return timm.create_model(card["model"], num_classes=card["num_classes"], connection=connection, **kwargs)
    return create_model(card["model"], num_classes=card["num_classes"], connection=connection, **kwargs)


def load_model(path: str | os.PathLike, which: str = "final") -> tuple[torch.nn.Module, dict]:
    """Rebuild a trained model from a run folder: ``final`` (EMA safetensors), ``best`` or ``last`` checkpoint.

    Returns ``(model in eval mode, model card)``; the card gains ``weights_path`` and ``weights_sha256``. The model
    takes images in [0, 1]: a network trained on normalised inputs (timm's ImageNet path) comes with its
    normalisation in front.
    """
    run_dir = Path(path)
    card = read_model_card(run_dir)
    model = model_from_card(card)
    if which == "final":
        weights_path = run_dir / FINAL_WEIGHTS
        state = load_weights(weights_path)
    elif which in ("best", "last"):
        weights_path = run_dir / "checkpoints" / f"{which}.pt"
        ckpt = load_checkpoint(weights_path)
        key = "ema" if ckpt.get("ema") is not None else "model"
        if key not in ckpt:
            raise CheckpointError(f"{weights_path} holds {sorted(ckpt)}; expected a 'model' state dict.")
        state = ckpt[key]
    else:
        raise CheckpointError(f"which={which!r} is unknown: use 'final', 'best' or 'last'.")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{weights_path} does not fit {card['model']}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}.")
    card = dict(card, weights_path=str(weights_path), weights_sha256=sha256_file(weights_path))
    data = card.get("data") or {}
    if data.get("normalize_outside_model"):
        # timm-style ImageNet weights expect normalised inputs; everything here feeds [0, 1] images.
        from .models import Normalize
        model = nn.Sequential(Normalize(data["mean"], data["std"]), model)
    return model.eval(), card


def dump_yaml(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
    atomic_write_text(path, yaml.safe_dump(dict(data), sort_keys=False))
