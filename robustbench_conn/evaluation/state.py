"""Resume state for long evaluations: every finished (attack configuration, eps, batch) is kept in a JSON file,
written through a temporary file and a rename after each batch, so a killed evaluation continues where it stopped
(as AutoAttack's own ``state.py`` does for its attacks)."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from ..io import write_json

__all__ = ["ResumeState", "bits", "unbits"]


def bits(mask: torch.Tensor) -> str:
    return "".join("1" if b else "0" for b in mask.detach().cpu().flatten().tolist())


def unbits(text: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in text], dtype=torch.bool)


class ResumeState:
    """A JSON file ``{"meta": ..., "jobs": {job: {batch: result}}}``; ``path=None`` keeps it in memory only.

    ``meta`` identifies the evaluation (model checksum, data, points, batch size, device, seed); a file whose meta
    differs is not reused (a warning says so) and is overwritten.
    """

    def __init__(self, path: str | os.PathLike | None, meta: dict):
        self.path = Path(path) if path is not None else None
        self.meta = json.loads(json.dumps(meta, default=str))
        self.jobs: dict[str, dict[str, dict]] = {}
        self.resumed = 0
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                data = None
            if not isinstance(data, dict) or data.get("meta") != self.meta:
                warnings.warn(f"resume state {self.path} belongs to another evaluation; starting afresh.")
            else:
                self.jobs = data.get("jobs", {})
                self.resumed = sum(len(v) for v in self.jobs.values())

    def get(self, job: str, batch: int) -> dict | None:
        return self.jobs.get(job, {}).get(str(batch))

    def put(self, job: str, batch: int, result: dict) -> None:
        self.jobs.setdefault(job, {})[str(batch)] = result
        if self.path is not None:
            write_json(self.path, {"meta": self.meta, "jobs": self.jobs})

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            try:
                self.path.parent.rmdir()
            except OSError:
                pass
