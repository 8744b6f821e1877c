"""notebooks/robustness_curves.ipynb runs (nbclient, kernel python3 = this interpreter) on a leaderboard CSV."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from robustbench_conn.evaluation import EvalRecord, merge_records

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "robustness_curves.ipynb"


def _records(run: Path) -> list[EvalRecord]:
    out = []
    for conn, run_id, src, accs in [("residual", "res", "", (0.6, 0.3)),
                                    ("suppression(d0=0.2,R=3)", "sup", str(run), (0.7, 0.4))]:
        for (eps, value), acc in zip([("2/255", 2 / 255), ("8/255", 8 / 255)], accs):
            out.append(EvalRecord(model="wrn-10-1-relu", run_id=run_id, connection=conn, dataset="digits",
                                  split="test", norm="Linf", eps=eps, eps_value=value, attack="pgd-ce", steps=10,
                                  restarts=1, n_examples=100, clean_acc=0.9, robust_acc=acc, n_clean_correct=90,
                                  n_robust=int(acc * 100), ci_low=acc - 0.1, ci_high=acc + 0.1, source=src))
    return out


def test_notebook_runs_on_a_leaderboard(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    run = tmp_path / "sup"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch,decay_d\n1,0.2\n2,0.26\n")
    csv_path = tmp_path / "leaderboard.csv"
    merge_records(csv_path, _records(run))
    monkeypatch.setenv("LEADERBOARD_CSV", str(csv_path))
    monkeypatch.setenv("PLOT_OUT", str(tmp_path / "curves.png"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(REPO)}})
    client.execute()  # raises CellExecutionError on any failing cell
    first = "".join(o.get("text", "") for o in nb.cells[1].outputs)
    assert Path(first.splitlines()[0]).resolve() == Path(sys.executable).resolve()  # the venv's interpreter
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert any("image/png" in o.get("data", {}) for o in nb.cells[3].outputs)
