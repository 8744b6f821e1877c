"""The evaluation harness's bookkeeping: eps as fractions, intervals, the CSV leaderboard (merge by key, concurrent
writers), the pivot with mean +- std over seeds, model-info JSON, the plot, and the checks after the attacks."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import multiprocessing as mp
from fractions import Fraction

import pytest
import torch

from robustbench_conn.evaluation import (COLUMNS, EpsError, EvalRecord, LeaderboardError, binomial_interval,
                                         merge_records, parse_eps, pivot_table, read_leaderboard, write_model_info,
                                         write_pivot)
from robustbench_conn.evaluation.sanity import JobOutcome, cross_checks, norm_violations


def make_record(**kw) -> EvalRecord:
    base = dict(model="wrn-10-1-relu", run_id="run0", connection="residual", dataset="digits", split="test",
                norm="Linf", eps="8/255", eps_value=8 / 255, attack="pgd-ce", steps=10, restarts=1, n_examples=100,
                clean_acc=0.9, robust_acc=0.5, n_clean_correct=90, n_robust=50, ci_low=0.4, ci_high=0.6,
                config_hash="abc", run_seed="0")
    base.update(kw)
    return EvalRecord(**base)


# -- eps and intervals ---------------------------------------------------------------------------------------------

def test_eps_fractions_are_exact_and_distinct_from_decimals():
    e = parse_eps("8/255")
    assert e.text == "8/255" and e.value == Fraction(8, 255) and float(e) == 8 / 255
    assert parse_eps("16/510").text == "8/255" and parse_eps("48/255").text == "48/255"
    assert parse_eps("1/2").text == "0.5" == parse_eps(0.5).text and parse_eps("1/7").text == "1/7"
    assert parse_eps(Fraction(8, 255)).text == "8/255" and parse_eps("2.50").text == "2.5"
    assert parse_eps(" 0.031 ").text == "0.031" and parse_eps("0.031").value == Fraction(31, 1000)
    assert parse_eps("0.0310").text == "0.031"
    assert parse_eps("0.031") != parse_eps("8/255")
    assert parse_eps(0.5).text == "0.5" and parse_eps(0).text == "0" and parse_eps("1.0").text == "1"
    for bad in ("abc", "8/0", "-1/255", "nan", "", True, None):
        with pytest.raises(EpsError):
            parse_eps(bad)


@pytest.mark.parametrize("method", ["clopper-pearson", "wilson"])
def test_intervals_contain_the_estimate(method):
    for k, n in [(0, 10), (10, 10), (3, 7), (500, 1000)]:
        lo, hi = binomial_interval(k, n, method)
        assert 0 <= lo <= k / n <= hi <= 1
    lo, hi = binomial_interval(0, 10, "clopper-pearson")
    assert lo == 0 and hi == pytest.approx(1 - 0.025 ** (1 / 10), rel=1e-6)  # exact CP upper bound at k = 0


# -- the CSV leaderboard -------------------------------------------------------------------------------------------

def test_merge_replaces_by_key_and_keeps_other_rows_and_columns(tmp_path):
    path = tmp_path / "lb.csv"
    merge_records(path, [make_record(), make_record(eps="4/255", eps_value=4 / 255, robust_acc=0.7)])
    # a column someone added by hand survives a merge
    rows = list(csv.DictReader(path.open()))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["note"])
        w.writeheader()
        for r in rows:
            w.writerow(dict(r, note="hand"))
    merge_records(path, [make_record(robust_acc=0.25), make_record(run_id="run1")])
    recs = read_leaderboard(path)
    assert len(recs) == 3
    by_key = {(r.run_id, r.eps): r for r in recs}
    assert by_key[("run0", "8/255")].robust_acc == 0.25          # replaced
    assert by_key[("run0", "4/255")].robust_acc == 0.7           # kept
    assert by_key[("run0", "4/255")].eps_value == 4 / 255        # floats read back exactly
    header = next(csv.reader(path.open()))
    assert header[:len(COLUMNS)] == COLUMNS and header[-1] == "note"


def test_merge_refuses_a_file_that_is_not_a_leaderboard(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(LeaderboardError, match="not a leaderboard"):
        merge_records(path, [make_record()])
    assert path.read_text() == "a,b\n1,2\n"


def _writer(path, worker, count):
    for i in range(count):
        merge_records(path, [make_record(run_id=f"w{worker}", eps=f"{i}/255", eps_value=i / 255)])


def test_two_concurrent_writers_keep_every_row(tmp_path):
    path = tmp_path / "lb.csv"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), w, 25)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    recs = read_leaderboard(path)
    assert sorted((r.run_id, r.eps) for r in recs) == sorted((f"w{w}", f"{i}/255") for w in range(2)
                                                             for i in range(25))
    assert not list(tmp_path.glob(".lb.csv.*.tmp"))  # no temporary file left behind


# -- pivot, model info, plot ---------------------------------------------------------------------------------------

def test_pivot_worst_case_per_eps_and_mean_std_over_seeds(tmp_path):
    recs = []
    for seed, (a, b) in enumerate([(0.5, 0.4), (0.7, 0.6)]):
        recs.append(make_record(run_id=f"s{seed}", run_seed=str(seed), robust_acc=a, clean_acc=0.9))
        recs.append(make_record(run_id=f"s{seed}", run_seed=str(seed), robust_acc=b, attack="autoattack", steps=0,
                                restarts=0, clean_acc=0.9))
    recs.append(make_record(run_id="other", connection="suppression(d0=0.2,R=3)", config_hash="zzz",
                            robust_acc=0.8))
    columns, rows = pivot_table(recs)
    assert columns[-1] == "8/255"
    by_run = {r["run_id"]: r for r in rows}
    assert by_run["s0"]["8/255"] == 0.4 and by_run["s1"]["8/255"] == 0.6  # minimum over attacks
    agg = [r for r in rows if r["run_id"].startswith("mean±std")]
    assert len(agg) == 1
    mean, std, k = agg[0]["8/255"]
    assert mean == pytest.approx(0.5) and std == pytest.approx(math.sqrt(0.02)) and k == 2
    csv_path, md_path = write_pivot(recs, tmp_path / "p.csv", tmp_path / "p.md")
    md = md_path.read_text()
    assert "50.00 ± 14.14 (n=2)" in md and "| eps 8/255 |" in md
    assert "50.00 ± 14.14 (n=2)" in csv_path.read_text()


def test_model_info_json_has_robustbench_fields(tmp_path):
    recs = [make_record(attack="autoattack", steps=0, restarts=0, robust_acc=0.4123),
            make_record(attack="autoattack", steps=0, restarts=0, eps="4/255", eps_value=4 / 255, robust_acc=0.6)]
    (path,) = write_model_info(recs, tmp_path)
    assert path == tmp_path / "digits" / "Linf" / "wrn-10-1-relu_run0.json"
    info = json.loads(path.read_text())
    for field in ("name", "architecture", "eps", "clean_acc", "autoattack_acc", "additional_data", "venue",
                  "number_forward_passes", "dataset", "unreliable"):
        assert field in info
    assert info["eps"] == "8/255" and info["autoattack_acc"] == "41.23" and info["clean_acc"] == "90.00"
    assert info["autoattack_acc_by_eps"] == {"4/255": "60.00", "8/255": "41.23"}
    (path,) = write_model_info([dataclasses.replace(recs[0], dataset="npz:cifar10")], tmp_path / "npz")
    assert path == tmp_path / "npz" / "npz_cifar10" / "Linf" / "wrn-10-1-relu_run0.json"  # no ':' in a path


def test_plot_draws_curves_and_learned_decay(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch,loss,decay_d\n1,2.0,0.2\n2,1.5,0.25\n3,1.2,0.31\n")
    recs = [make_record(eps=e, eps_value=v, robust_acc=a, source=str(run), connection="suppression(d0=0.2,R=3)")
            for e, v, a in [("2/255", 2 / 255, 0.8), ("8/255", 8 / 255, 0.5)]]
    recs.append(make_record(run_id="r2", connection="residual", robust_acc=0.4))
    merge_records(tmp_path / "lb.csv", recs)
    from robustbench_conn.evaluation import plot_leaderboard

    fig = plot_leaderboard(tmp_path / "lb.csv", tmp_path / "plot.png")
    ax, ax_d = fig.axes[:2]
    assert len(ax.get_lines()) == 2
    (line,) = ax_d.get_lines()
    assert list(line.get_ydata()) == [0.2, 0.25, 0.31]
    assert (tmp_path / "plot.png").stat().st_size > 1000
    import matplotlib.pyplot as plt
    plt.close(fig)


# -- the checks after the attacks ----------------------------------------------------------------------------------

def _outcome(family, attack, eps, robust, steps=10, square=None):
    robust = torch.tensor(robust, dtype=torch.bool)
    return JobOutcome(family, attack, eps, steps, 1 if family == "pgd" else 0, robust=robust,
                      reported_correct=robust.clone(),
                      square_broken=None if square is None else torch.tensor(square, dtype=torch.bool))


def test_cross_checks_fire_on_inconsistent_tables_and_stay_silent_on_consistent_ones():
    n = 20
    clean = torch.ones(n, dtype=torch.bool)
    ok = [_outcome("pgd", "pgd-ce", 0.01, [1] * 15 + [0] * 5), _outcome("pgd", "pgd-ce", 0.03, [1] * 10 + [0] * 10),
          _outcome("pgd", "pgd-ce", 0.03, [1] * 9 + [0] * 11, steps=50),
          _outcome("autoattack", "autoattack", 0.03, [1] * 8 + [0] * 12, square=[0] * n)]
    cross_checks(ok, clean)
    assert all(not o.flags for o in ok)

    bad = [_outcome("pgd", "pgd-ce", 0.01, [1] * 10 + [0] * 10), _outcome("pgd", "pgd-ce", 0.03, [1] * 15 + [0] * 5),
           _outcome("pgd", "pgd-ce", 0.03, [1] * 18 + [0] * 2, steps=50),
           _outcome("autoattack", "autoattack", 0.03, [0] * 2 + [1] * 18, square=[1, 1] + [0] * 18)]
    cross_checks(bad, clean)
    assert "eps_not_monotone" in bad[1].flags
    assert "steps_not_monotone" in bad[2].flags
    assert "autoattack_above_pgd" in bad[3].flags
    assert "gradient_masking" in bad[3].flags  # square broke points 0 and 1, which every PGD left robust

    above = [_outcome("pgd", "pgd-ce", 0.01, [1] * n)]
    cross_checks(above, torch.tensor([1] * 10 + [0] * 10, dtype=torch.bool))
    assert "robust_above_clean" in above[0].flags


def test_norm_violations():
    x = torch.full((3, 1, 2, 2), 0.5)
    adv = x.clone()
    adv[1, 0, 0, 0] += 0.1        # outside an 8/255 Linf ball
    adv[2, 0, 0, 0] = float("nan")
    assert norm_violations(adv, x, "Linf", 8 / 255).tolist() == [False, True, True]
    assert norm_violations(adv[:2], x[:2], "L2", 0.2).tolist() == [False, False]
    out_of_box = x.clone()
    out_of_box[0] = 1.2
    assert norm_violations(out_of_box, x, "L2", 100.0).tolist() == [True, False, False]
