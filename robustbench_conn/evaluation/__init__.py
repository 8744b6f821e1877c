"""The evaluation harness: AutoAttack and PGD sweeps behind a sanity gate, with checks after, into a CSV leaderboard.

    >>> from robustbench_conn.evaluation import evaluate
    >>> records = evaluate(["runs/residual", "runs/suppression"], "cifar10", n_examples=1000,
    ...                    suites=["autoattack", "pgd"], eps=["2/255", "4/255", "8/255"], steps=[10, 50],
    ...                    out="results/cifar10/leaderboard.csv", plot="results/cifar10/curves.png")  # doctest: +SKIP

Command line: ``evaluate-robust`` (:mod:`robustbench_conn.cli.evaluate_robust`).
"""
from __future__ import annotations

from .eps import Eps, EpsError, parse_eps
from .harness import (SUITES, EvaluationError, EvaluationWarning, ModelEntry, connection_label, evaluate,
                      load_entry, load_robustbench_model, output_paths)
from .leaderboard import (LeaderboardError, merge_records, pivot_markdown, pivot_table, read_leaderboard,
                          write_model_info, write_pivot)
from .records import COLUMNS, FLAG_DESCRIPTIONS, KEY, EvalRecord
from .sanity import GateReport, sanity_gate
from .stats import binomial_interval, clopper_pearson, wilson

__all__ = ["evaluate", "EvalRecord", "ModelEntry", "load_entry", "load_robustbench_model", "EvaluationError",
           "EvaluationWarning", "SUITES", "COLUMNS", "KEY", "FLAG_DESCRIPTIONS", "Eps", "EpsError", "parse_eps",
           "merge_records", "read_leaderboard", "pivot_table", "pivot_markdown", "write_pivot", "write_model_info",
           "LeaderboardError", "sanity_gate", "GateReport", "binomial_interval", "clopper_pearson", "wilson",
           "connection_label", "output_paths", "plot_leaderboard"]


def plot_leaderboard(*args, **kwargs):
    """Robust accuracy vs eps per model x connection, and learned d over epochs (see :mod:`.plotting`)."""
    from .plotting import plot_leaderboard as _plot

    return _plot(*args, **kwargs)
