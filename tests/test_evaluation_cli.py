"""``evaluate-robust`` and run folders: the happy path, bad input (one sentence, exit 2, results untouched), and
resume after a kill (in-process and a real SIGKILL of the command)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from robustbench_conn.cli.evaluate_robust import main
from robustbench_conn.evaluation import evaluate, load_entry, read_leaderboard
from robustbench_conn.io import save_weights, write_model_card
from robustbench_conn.models import ConnectionConfig, create_model

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_run(folder: Path, kind: str, seed: int = 0, config_hash: str | None = None) -> Path:
    """A run folder as train-robust writes it: model card, final weights, metrics.csv with decay_d per epoch."""
    torch.manual_seed(seed)
    connection = ConnectionConfig(kind=kind, init_decay=0.2 if kind == "suppression" else 0.0)
    model = create_model("wrn-10-1-relu", num_classes=10, connection=connection, init_channels=4)
    folder.mkdir(parents=True)
    save_weights(model.state_dict(), folder / "model.safetensors")
    write_model_card(folder, {"model": "wrn-10-1-relu", "num_classes": 10, "model_kwargs": {"init_channels": 4},
                              "connection": connection.to_dict(), "recipe": {"method": "trades", "epochs": 3},
                              "data": {"name": "digits"}, "git_commit": "test", "run_id": folder.name,
                              "config_hash": config_hash or f"hash-{kind}", "seed": seed})
    decay = ["0.2", "0.23", "0.27"] if kind == "suppression" else ["", "", ""]
    (folder / "metrics.csv").write_text("epoch,train_loss,decay_d\n" +
                                        "".join(f"{i + 1},{2.0 - i * 0.3},{d}\n" for i, d in enumerate(decay)))
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    return [make_run(root / "res-s0", "residual"), make_run(root / "sup-s0", "suppression"),
            make_run(root / "sup-s1", "suppression", seed=1, config_hash="hash-suppression")]


def stable(rows):
    """Rows without the columns that legitimately differ between two runs of the same evaluation."""
    return [{k: v for k, v in r.__dict__.items() if k not in ("seconds", "date", "extra")} for r in rows]


def test_load_entry_reads_the_card(runs):
    entry = load_entry(runs[1])
    assert entry.name == "wrn-10-1-relu" and entry.connection == "suppression(d0=0.2,R=3)"
    assert entry.run_id == "sup-s0" and entry.config_hash == "hash-suppression" and entry.run_seed == "0"
    assert len(entry.checkpoint_sha256) == 64 and not entry.module.training
    assert load_entry(runs[1] / "model.safetensors").checkpoint_sha256 == entry.checkpoint_sha256


def test_cli_writes_leaderboard_pivot_model_info_and_plot(runs, tmp_path, capsys):
    out = tmp_path / "res" / "leaderboard.csv"
    rc = main([*map(str, runs), "--data", "digits", "--n-examples", "48", "--batch-size", "24", "--suite", "pgd",
               "--eps", "2/255", "8/255", "--steps", "2", "--out", str(out), "--plot", str(tmp_path / "p.png"),
               "--quiet"])
    assert rc == 0
    rows = read_leaderboard(out)
    assert len(rows) == 3 * 2
    r = rows[0]
    assert r.n_examples == 48 and r.dataset == "digits" and r.split == "test" and r.norm == "Linf"
    assert {x.eps for x in rows} == {"2/255", "8/255"} and r.attack == "pgd-ce" and r.steps == 2
    assert r.ci_low <= r.robust_acc <= r.ci_high and r.robust_acc <= r.clean_acc
    assert r.checkpoint_sha256 and r.versions.startswith("python=") and r.device.startswith("cpu") and r.date
    sup = [x for x in rows if x.run_id == "sup-s0"][0]
    assert sup.decay_d == pytest.approx(0.2)
    md = (tmp_path / "res" / "leaderboard_pivot.md").read_text()
    assert "mean±std" in md and "(n=2)" in md            # sup-s0 and sup-s1 share a config hash
    assert (tmp_path / "res" / "leaderboard_pivot.csv").exists()
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert not (tmp_path / "res" / ".evaluate_state").exists()   # resume state removed once merged
    printed = capsys.readouterr().out
    assert "| eps 2/255 | eps 8/255 |" in printed


@pytest.mark.parametrize("argv, words", [
    (["RUN", "--eps", "8/0"], "divides by zero"),
    (["RUN", "--eps", "eight"], "not a number"),
    (["RUN", "--suite", "fgsm"], "invalid choice"),
    (["RUN", "--n-examples", "0"], "n_examples"),
    (["RUN", "--steps", "0"], "steps"),
    (["RUN", "--norm", "L1", "--suite", "pgd"], "L1"),
    (["RUN", "--version", "standard", "--attacks", "square"], "--attacks"),
    (["RUN", "--data", "nope"], "unknown"),
    (["RUN", "--eps", "2"], "exceeds 1"),
    (["MISSING"], "does not exist"),
    (["RUN", "--out", "BADCSV"], "not a leaderboard"),
    (["RUN", "--config", "MISSINGCFG"], "does not exist"),
    (["RUN", "--config", "BADCFG"], "unknown key"),
    (["--robustbench-model", "Standard", "--model-dir", "EMPTY", "--data", "cifar10"], "not there"),
    ([], "no model"),
    (["RUN", "--device", "cuda:0"], "CUDA"),
])
def test_bad_input_exits_2_with_one_sentence_and_touches_nothing(runs, tmp_path, capsys, argv, words):
    if "cuda" in words.lower() and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    res = tmp_path / "res"
    res.mkdir()
    existing = res / "leaderboard.csv"
    existing.write_text("model,run_id\nkeep,me\n")   # deliberately not ours: must stay byte-identical
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("x,y\n1,2\n")
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("epz: [8/255]\n")
    subst = {"RUN": str(runs[0]), "MISSING": str(tmp_path / "nowhere"), "BADCSV": str(bad_csv),
             "MISSINGCFG": str(tmp_path / "none.yaml"), "BADCFG": str(bad_cfg), "EMPTY": str(tmp_path / "models")}
    argv = [subst.get(a, a) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "res" / "new.csv")]
    if "--data" not in argv:
        argv += ["--data", "digits"]
    rc = main(argv + ["--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("evaluate-robust: error: ") and err[0].endswith(".")
    assert words.lower() in err[0].lower()
    assert existing.read_text() == "model,run_id\nkeep,me\n" and bad_csv.read_text() == "x,y\n1,2\n"
    assert not (tmp_path / "res" / "new.csv").exists()


def test_config_yaml_gives_defaults_and_the_command_line_wins(runs, tmp_path):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("data: digits\nn-examples: 16\nbatch_size: 16\nsuite: pgd\neps: [1/255, 3/255]\nsteps: 2\n")
    out = tmp_path / "lb.csv"
    assert main([str(runs[0]), "--config", str(cfg), "--eps", "4/255", "--out", str(out), "--quiet"]) == 0
    rows = read_leaderboard(out)
    assert [(r.eps, r.n_examples, r.steps) for r in rows] == [("4/255", 16, 2)]


SWEEP = dict(data="digits", n_examples=96, batch_size=16, suites=["pgd"], eps=["2/255", "8/255"], steps=[2, 4],
             losses=["ce", "cw"])


def test_killed_and_resumed_sweep_gives_the_same_table(runs, tmp_path):
    reference = evaluate(runs[:2], out=tmp_path / "a" / "lb.csv", **SWEEP)
    calls = []

    def killer(info):
        calls.append(info)
        if len(calls) == 40:
            raise KeyboardInterrupt  # a kill between two batches: the state file holds 40 finished batches

    with pytest.raises(KeyboardInterrupt):
        evaluate(runs[:2], out=tmp_path / "b" / "lb.csv", progress=killer, **SWEEP)
    assert not (tmp_path / "b" / "lb.csv").exists()
    assert list((tmp_path / "b" / ".evaluate_state").glob("*.json"))
    seen = []
    resumed = evaluate(runs[:2], out=tmp_path / "b" / "lb.csv", progress=seen.append, **SWEEP)
    # models x eps x losses x steps x batches
    assert sum(s["resumed"] for s in seen) == 40 and len(seen) == 2 * 2 * 2 * 2 * 6
    assert stable(resumed) == stable(reference)
    assert stable(read_leaderboard(tmp_path / "b" / "lb.csv")) == stable(read_leaderboard(tmp_path / "a" / "lb.csv"))


def test_sigkilled_command_resumes_to_the_same_table(runs, tmp_path):
    args = [str(runs[1]), "--data", "digits", "--n-examples", "96", "--batch-size", "8", "--suite", "pgd",
            "--eps", "2/255", "8/255", "--steps", "3", "6", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "ref.csv")]) == 0
    out = tmp_path / "killed" / "lb.csv"
    state_dir = out.parent / ".evaluate_state"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "robustbench_conn.cli.evaluate_robust", *args, "--out", str(out)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    import json
    done = 0
    while time.time() < deadline and proc.poll() is None:
        files = list(state_dir.glob("*.json"))
        if files:
            try:
                done = sum(len(v) for v in json.loads(files[0].read_text())["jobs"].values())
            except (ValueError, OSError):
                done = 0
            if done >= 20:
                break
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.fail(f"the evaluation ended before it could be killed: {proc.stderr.read().decode()[-500:]}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert main(args + ["--out", str(out)]) == 0
    assert stable(read_leaderboard(out)) == stable(read_leaderboard(tmp_path / "ref.csv"))
