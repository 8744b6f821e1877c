"""Plots of a leaderboard: robust accuracy against eps (one curve per model x connection, with its 95% interval
band) and, in a second panel, the learned decay ``d`` over training epochs read from each run's ``metrics.csv``."""
from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Mapping

from .records import EvalRecord

__all__ = ["plot_leaderboard", "read_decay_history"]


def read_decay_history(metrics_csv: str | os.PathLike) -> tuple[list[float], list[float]]:
    """``(epochs, d)`` from a run's ``metrics.csv`` (rows whose ``decay_d`` is empty, as for residual runs, skipped)."""
    epochs, values = [], []
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            d, e = (row.get("decay_d") or "").strip(), (row.get("epoch") or "").strip()
            if not d or not e:
                continue
            try:
                epochs.append(float(e))
                values.append(float(d))
            except ValueError:
                continue
    return epochs, values


def _records(source) -> list[EvalRecord]:
    if isinstance(source, (str, os.PathLike)):
        from .leaderboard import read_leaderboard

        return read_leaderboard(source)
    if hasattr(source, "to_dict") and hasattr(source, "columns"):  # a pandas DataFrame
        from .records import row_to_record

        return [row_to_record({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
                               for k, v in row.items()}) for row in source.to_dict("records")]
    return list(source)


def plot_leaderboard(source, out: str | os.PathLike | None = None, *, norm: str | None = None,
                     dataset: str | None = None, attack: str | None = None,
                     metrics: Mapping[str, str | os.PathLike] | None = None, title: str | None = None):
    """Draw a leaderboard (CSV path, DataFrame or records) and return the matplotlib figure; save it to ``out``.

    Left: robust accuracy (%) against eps, one curve per (model, connection) run, the worst case over the attacks
    run at each eps (or ``attack`` alone), with a band for its 95% interval; eps 0 is the clean accuracy. Only one
    threat model is drawn: ``norm`` / ``dataset`` (default: the most common in the table).
    Right: learned ``d`` over epochs from each run's ``metrics.csv`` (the ``source`` column names the run folder),
    or from ``metrics``: ``{label: path to metrics.csv}``.
    """
    import matplotlib.pyplot as plt

    records = _records(source)
    if not records:
        raise ValueError("the leaderboard is empty: nothing to plot.")

    def most_common(values):
        counts = defaultdict(int)
        for v in values:
            counts[v] += 1
        return max(counts, key=counts.get)

    norm = norm or most_common(r.norm for r in records)
    dataset = dataset or most_common(r.dataset for r in records)
    rows = [r for r in records if r.norm == norm and r.dataset == dataset]
    if attack is not None:
        rows = [r for r in rows if r.attack == attack]
    if not rows:
        raise ValueError(f"no rows for norm {norm} on {dataset}{' with ' + attack if attack else ''}.")

    curves: dict[tuple, dict] = defaultdict(dict)
    clean: dict[tuple, EvalRecord] = {}
    sources: dict[tuple, str] = {}
    for r in rows:
        key = (r.model, r.connection, r.run_id)
        best = curves[key].get(r.eps)
        if best is None or r.robust_acc < best.robust_acc:
            curves[key][r.eps] = r
        if key not in clean or r.n_examples > clean[key].n_examples:
            clean[key] = r
        if r.source:
            sources[key] = r.source
    runs_per_pair = defaultdict(set)
    for model, conn, run in curves:
        runs_per_pair[(model, conn)].add(run)

    from .stats import binomial_interval

    fig, (ax, ax_d) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    ticks = {0.0: "0"}
    for i, key in enumerate(sorted(curves, key=lambda k: tuple(map(str, k)))):
        model, conn, run = key
        label = f"{model} · {conn or '?'}" + (f" · {run}" if len(runs_per_pair[(model, conn)]) > 1 and run else "")
        base = clean[key]
        lo0, hi0 = binomial_interval(base.n_clean_correct, base.n_examples, base.ci_method or "clopper-pearson")
        pts = [(0.0, base.clean_acc, lo0, hi0)]
        for e, r in curves[key].items():
            pts.append((r.eps_value, r.robust_acc, r.ci_low, r.ci_high))
            ticks[r.eps_value] = e
        pts.sort()
        xs = [p[0] for p in pts]
        color = f"C{i % 10}"
        style = "-" if "suppression" in conn else ("--" if conn == "residual" else ":")
        ax.plot(xs, [100 * p[1] for p in pts], style, marker="o", color=color, label=label)
        ax.fill_between(xs, [100 * p[2] for p in pts], [100 * p[3] for p in pts], color=color, alpha=0.18,
                        linewidth=0)
    tick_values = sorted(ticks)
    ax.set_xticks(tick_values)
    ax.set_xticklabels([ticks[v] for v in tick_values], rotation=45 if len(tick_values) > 6 else 0)
    ax.set_xlabel(f"eps ({norm})")
    ax.set_ylabel("robust accuracy (%)  [eps 0: clean]")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(title or f"{dataset}: robust accuracy vs eps (worst case over attacks; band: 95% interval)",
                 fontsize=9)

    histories = {}
    if metrics:
        for label, path in metrics.items():
            if Path(path).is_file():
                histories[label] = read_decay_history(path)
    else:
        for key in sorted(sources, key=lambda k: tuple(map(str, k))):
            path = Path(sources[key]) / "metrics.csv"
            if path.is_file():
                epochs, values = read_decay_history(path)
                if values:
                    model, conn, run = key
                    histories[f"{model} · {conn} · {run}" if run else f"{model} · {conn}"] = (epochs, values)
    drawn = 0
    for i, (label, (epochs, values)) in enumerate(histories.items()):
        if values:
            ax_d.plot(epochs, values, marker=".", label=label, color=f"C{i % 10}")
            drawn += 1
    ax_d.set_xlabel("epoch")
    ax_d.set_ylabel("learned decay d")
    ax_d.set_title("suppression: learned d over training", fontsize=9)
    ax_d.grid(alpha=0.3)
    if drawn:
        ax_d.legend(fontsize=7)
    else:
        ax_d.text(0.5, 0.5, "no learned d to show\n(residual runs, or no metrics.csv in the runs' folders)",
                  ha="center", va="center", transform=ax_d.transAxes, fontsize=9, color="0.4")
    fig.tight_layout()
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        from ..io import atomic_path

        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=120, format=Path(out).suffix.lstrip(".") or "png")
    return fig
