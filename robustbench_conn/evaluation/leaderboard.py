"""The CSV leaderboard: merge by key under a file lock through a temporary file, the per-connection pivot (CSV and
Markdown, with mean +- std over seeds), and RobustBench-style model-info JSON files."""
from __future__ import annotations

import csv
import io
import math
import os
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..io import atomic_path, atomic_write_text, write_json
from .records import COLUMNS, KEY, EvalRecord, record_to_row, row_to_record

__all__ = ["LeaderboardError", "merge_records", "read_leaderboard", "read_rows", "check_leaderboard_file",
           "pivot_table", "write_pivot", "pivot_markdown", "write_model_info", "leaderboard_lock"]

LOCK_TIMEOUT_S = 600


class LeaderboardError(ValueError):
    """A leaderboard file that cannot be merged into; the message says why."""


def leaderboard_lock(path: str | os.PathLike):
    from filelock import FileLock

    return FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S)


def read_rows(path: str | os.PathLike) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows (strings, as written) of a leaderboard CSV; checks that it has the key columns."""
    path = Path(path)
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise LeaderboardError(f"{path} is not a text CSV file; pass another --out or move it away.") from None
    if not text.strip():
        return list(COLUMNS), []
    reader = csv.DictReader(io.StringIO(text))
    header = list(reader.fieldnames or [])
    missing = [k for k in KEY if k not in header]
    if missing:
        raise LeaderboardError(f"{path} is not a leaderboard (it lacks the column(s) {', '.join(missing)}); "
                               "pass another --out or move it away.")
    rows = []
    for i, row in enumerate(reader, start=2):
        if None in row or any(v is None for v in row.values()):
            raise LeaderboardError(f"{path} line {i} does not have {len(header)} fields (a damaged file?); "
                                   "repair it or pass another --out.")
        rows.append(row)
    return header, rows


def check_leaderboard_file(path: str | os.PathLike) -> None:
    """Raise :class:`LeaderboardError` when ``path`` exists and is not a leaderboard we can merge into."""
    path = Path(path)
    if path.is_dir():
        raise LeaderboardError(f"{path} is a directory; pass a .csv file (or a folder without a trailing file).")
    if path.exists():
        read_rows(path)
    elif not os.access(_existing_parent(path), os.W_OK):
        raise LeaderboardError(f"cannot write {path}: its folder is not writable.")


def _existing_parent(path: Path) -> Path:
    p = path.parent.resolve()
    while not p.exists():
        p = p.parent
    return p


def read_leaderboard(path: str | os.PathLike) -> list[EvalRecord]:
    """The rows of a leaderboard CSV as :class:`EvalRecord`."""
    return [row_to_record(r) for r in read_rows(path)[1]]


def _sort_key(row: dict[str, str]):
    def num(s):
        try:
            return float(s)
        except (TypeError, ValueError):
            return math.inf
    return (row.get("dataset", ""), row.get("split", ""), row.get("norm", ""), row.get("model", ""),
            row.get("connection", ""), row.get("run_id", ""), row.get("attack", ""), num(row.get("steps")),
            num(row.get("restarts")), num(row.get("eps_value")), row.get("eps", ""), num(row.get("n_examples")))


def merge_records(path: str | os.PathLike, records: Iterable[EvalRecord],
                  on_merged: Callable[[list[dict[str, str]]], None] | None = None) -> list[dict[str, str]]:
    """Merge ``records`` into the CSV at ``path`` by key (new rows replace rows with the same key).

    Under a file lock (``path + '.lock'``) the file is read, merged and written to a temporary file that is then
    renamed over it: concurrent writers serialise and lose nothing; a kill leaves the old file whole. Columns the
    existing file has beyond ours are kept. ``on_merged(rows)`` runs still under the lock (to write files derived
    from the merged table, such as the pivot, from a consistent snapshot). Returns all rows written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new_rows = [record_to_row(r) for r in records]
    with leaderboard_lock(path):
        header, rows = read_rows(path) if path.exists() else (list(COLUMNS), [])
        columns = list(COLUMNS) + [c for c in header if c not in COLUMNS]
        merged: dict[tuple, dict[str, str]] = {}
        for row in rows:
            merged[tuple(row.get(k, "") for k in KEY)] = row
        for row in new_rows:
            merged[tuple(row[k] for k in KEY)] = row
        out = sorted(merged.values(), key=_sort_key)
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", restval="")
                writer.writeheader()
                writer.writerows(out)
                f.flush()
                os.fsync(f.fileno())
        if on_merged is not None:
            on_merged(out)
    return out


# -- pivot ---------------------------------------------------------------------------------------------------------

def _eps_sort(records: Sequence[EvalRecord]) -> list[str]:
    seen = {}
    for r in records:
        seen.setdefault(r.eps, r.eps_value)
    return [e for e, _ in sorted(seen.items(), key=lambda kv: (kv[1], kv[0]))]


def pivot_table(records: Sequence[EvalRecord], attack: str | None = None) -> tuple[list[str], list[dict]]:
    """Rows model x connection (one per run, then mean +- std over seeds), columns clean and each eps.

    A cell is the worst-case robust accuracy at that eps: the minimum over the attacks run there (each attack's
    accuracy is an upper bound on the true robust accuracy), or the accuracy of ``attack`` alone when given.
    Runs that share a ``config_hash`` (the same recipe, differing only in seed) get an extra row with the mean and
    the sample standard deviation over runs. Rows are grouped by dataset, split, norm and n_examples.
    Returns ``(columns, rows)`` with numbers as fractions (``None`` where nothing was run); aggregate rows hold
    ``(mean, std, count)`` tuples.
    """
    if attack is not None:
        records = [r for r in records if r.attack == attack]
    eps_cols = _eps_sort(records)
    runs: dict[tuple, dict] = {}
    for r in records:
        key = (r.dataset, r.split, r.norm, r.n_examples, r.model, r.connection, r.run_id)
        entry = runs.setdefault(key, {"config_hash": r.config_hash, "run_seed": r.run_seed, "clean": r.clean_acc,
                                      "cells": {}, "attacks": defaultdict(set)})
        cell = entry["cells"].get(r.eps)
        entry["cells"][r.eps] = r.robust_acc if cell is None else min(cell, r.robust_acc)
        entry["attacks"][r.eps].add(r.attack)
    columns = ["dataset", "split", "norm", "n_examples", "model", "connection", "run_id", "seeds", "clean"] + eps_cols
    rows: list[dict] = []
    groups: dict[tuple, list] = defaultdict(list)
    for key in sorted(runs, key=lambda k: tuple(str(x) for x in k)):
        entry = runs[key]
        row = dict(zip(columns[:7], key), seeds=entry["run_seed"] or "", clean=entry["clean"])
        for e in eps_cols:
            row[e] = entry["cells"].get(e)
        rows.append(row)
        if entry["config_hash"]:
            groups[key[:6] + (entry["config_hash"],)].append(row)
    for gkey, members in groups.items():
        if len({m["run_id"] for m in members}) < 2:
            continue
        agg = dict(zip(columns[:6], gkey[:6]), run_id=f"mean±std (config {gkey[6][:8]})",
                   seeds=",".join(str(m["seeds"]) for m in members))
        for col in ["clean"] + eps_cols:
            values = [m[col] for m in members if m[col] is not None]
            if len(values) == len(members):
                agg[col] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0,
                            len(values))
            else:
                agg[col] = None
        # place the aggregate right after its last member
        index = max(i for i, row in enumerate(rows) if row in members) + 1
        rows.insert(index, agg)
    return columns, rows


def _cell(value, percent: bool = True) -> str:
    if value is None:
        return ""
    if isinstance(value, tuple):
        mean, std, n = value
        return f"{100 * mean:.2f} ± {100 * std:.2f} (n={n})" if percent else f"{mean!r}±{std!r}"
    return f"{100 * value:.2f}" if percent else repr(value)


def pivot_markdown(columns: list[str], rows: list[dict]) -> str:
    head = [c if c not in ("clean",) and not _is_eps(c) else (c if c == "clean" else f"eps {c}") for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c)
            cells.append(_cell(v) if (c == "clean" or _is_eps(c)) else ("" if v is None else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_EPS_RE = re.compile(r"^[0-9./e+-]+$")


def _is_eps(column: str) -> bool:
    return bool(_EPS_RE.match(column)) and column not in ("n_examples",)


def write_pivot(records: Sequence[EvalRecord], csv_path: str | os.PathLike, md_path: str | os.PathLike | None = None,
                attack: str | None = None) -> tuple[Path, Path | None]:
    """Write the pivot as CSV (accuracies in percent; aggregates as ``mean ± std (n=K)``) and Markdown."""
    columns, rows = pivot_table(records, attack)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) if (c == "clean" or _is_eps(c)) else
                         ("" if row.get(c) is None else row.get(c)) for c in columns])
    atomic_write_text(csv_path, buf.getvalue())
    md = None
    if md_path is not None:
        title = ("Robust accuracy (%), worst case over the attacks run at each eps"
                 if attack is None else f"Robust accuracy (%) under {attack}")
        atomic_write_text(md_path, f"{title}; `clean` is clean accuracy.\n\n" + pivot_markdown(columns, rows))
        md = Path(md_path)
    return Path(csv_path), md


# -- RobustBench-style model info ----------------------------------------------------------------------------------

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def write_model_info(records: Sequence[EvalRecord], folder: str | os.PathLike) -> list[Path]:
    """One JSON per (model, run, dataset, norm) that was evaluated with AutoAttack, in RobustBench's
    ``model_info/DATASET/THREAT/NAME.json`` layout and field names (numbers as percent strings, as theirs).

    ``eps`` is 8/255 when it was evaluated (Linf), else the largest eps; ``autoattack_acc_by_eps`` lists all.
    """
    groups: dict[tuple, list[EvalRecord]] = defaultdict(list)
    for r in records:
        groups[(r.model, r.run_id, r.dataset, r.norm)].append(r)
    written = []
    for (model, run_id, dataset, norm), rs in sorted(groups.items()):
        aa = [r for r in rs if r.attack.startswith("autoattack")]
        if not aa:
            continue
        by_eps = {}
        for r in sorted(aa, key=lambda r: r.eps_value):
            by_eps[r.eps] = min(by_eps.get(r.eps, 1.0), r.robust_acc)
        main = next((r for r in aa if r.eps == "8/255" and norm == "Linf"), max(aa, key=lambda r: r.eps_value))
        name = f"{model}_{run_id}" if run_id else model
        info = {
            "link": "", "name": name, "authors": "", "additional_data": False, "number_forward_passes": 1,
            "dataset": dataset, "venue": "", "architecture": model, "eps": main.eps,
            "clean_acc": f"{100 * main.clean_acc:.2f}", "reported": "",
            "autoattack_acc": f"{100 * by_eps[main.eps]:.2f}", "unreliable": bool(main.flags), "footnote": (
                f"flags: {main.flags}" if main.flags else ""),
            # ours, beyond RobustBench's fields
            "connection": main.connection, "run_id": run_id, "config_hash": main.config_hash,
            "autoattack_version": main.version, "n_examples": main.n_examples,
            "autoattack_acc_by_eps": {e: f"{100 * v:.2f}" for e, v in by_eps.items()},
            "checkpoint_sha256": main.checkpoint_sha256, "git_commit": main.git_commit, "date": main.date,
        }
        # Slugged: a dataset label such as "npz:cifar10" is not a valid folder name on every system.
        path = Path(folder) / _slug(dataset) / norm / f"{_slug(name)}.json"
        write_json(path, info)
        written.append(path)
    return written
