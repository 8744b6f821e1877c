"""train-robust: short real runs on CIFAR-10, the run folder, resume equality, distributed training, bad input."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from robustbench_conn.cli.train_robust import main
from robustbench_conn.io import load_model

REPO = Path(__file__).resolve().parents[1]

# A small network and a short attack keep each run in seconds on 2 CPU cores; the code path is the paper's.
TINY = ["--model", "nrn-16-1-swish", "--init-channels", "4", "--batch-size", "64", "--attack-steps", "3",
        "--eval-attack-steps", "2", "--val-size", "64", "--lr", "0.1", "--scheduler", "cosine", "--progress", "false"]


def _train(out: Path, data: list[str], *extra: str) -> int:
    return main([*data, *TINY, "--out", str(out), *extra])


def _metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def train_0(cifar10_dir) -> list[str]:
    return ["--data", "npz", "--data-dir", str(cifar10_dir / "train_0.npz")]


@pytest.mark.parametrize("method", ["trades", "pgd-at"])
@pytest.mark.parametrize("connection", ["residual", "suppression"])
def test_two_epoch_run_learns_and_writes_every_file(tmp_path, train_0, method, connection):
    run = tmp_path / "run"
    assert _train(run, train_0, "--method", method, "--connection", connection, "--epochs", "2",
                  "--max-train-samples", "512") == 0
    for name in ("config.yaml", "metrics.csv", "checkpoints/last.pt", "checkpoints/best.pt", "model.safetensors",
                 "model_card.json"):
        assert (run / name).is_file(), name
    rows = _metrics(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])
    for key in ("train_clean_acc", "train_adv_acc", "val_clean_acc", "val_pgd_acc", "lr", "seconds"):
        assert rows[-1][key] != "", key
    assert (rows[-1]["decay_d"] != "") == (connection == "suppression")
    card = json.loads((run / "model_card.json").read_text())
    assert card["connection"]["kind"] == connection and card["recipe"]["method"] == method
    assert card["model_kwargs"]["init_channels"] == 4 and card["data"]["num_labeled"] == 512
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["method"] == method and config["epochs"] == 2
    model, card = load_model(run)
    ema = torch.load(run / "checkpoints/last.pt", weights_only=True)["ema"]
    assert all(torch.equal(v, ema[f"module.{k}"]) for k, v in model.state_dict().items())  # final = EMA weights
    assert len(card["weights_sha256"]) == 64


def test_lse_and_aux_data_mix(tmp_path, train_0, cifar10_dir):
    run = tmp_path / "run"
    assert _train(run, train_0, "--method", "trades", "--LSE", "--connection", "suppression", "--epochs", "1",
                  "--max-train-samples", "128", "--aux-data", str(cifar10_dir / "train_1.npz"),
                  "--unsup-fraction", "0.7") == 0
    card = json.loads((run / "model_card.json").read_text())
    assert card["data"]["num_aux"] == 10_000 and card["recipe"]["lse"] is True
    assert float(_metrics(run)[0]["train_robust_loss"]) >= 0


def test_killed_run_resumes_to_the_same_weights(train_0, kill_and_resume):
    args = ["--method", "pgd-at", "--connection", "suppression", "--epochs", "3", "--max-train-samples", "128",
            "--attack-steps", "2", "--seed", "7"]
    _, killed, difference = kill_and_resume(lambda out, *extra: _train(out, train_0, *args, *extra))
    assert difference <= 1e-6
    assert [r["epoch"] for r in _metrics(killed)] == ["1", "2", "3"]


@pytest.mark.parametrize("extra,message", [
    (["--settings", "ShareExpDecayLearnDecay_AbsExpp"], "unknown settings token 'AbsExpp'"),
    (["--attack-eps", "8"], "--attack-eps 8.0 is out of range"),
    (["--batch-size", "4096"], "larger than the 512 labeled training images"),
    (["--data-dir", "/nonexistent/cifar"], "does not exist"),
    (["--unsup-fraction", "0.7"], "needs --aux-data"),
])
def test_bad_input_exits_2_and_leaves_the_run_alone(tmp_path, train_0, capsys, extra, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("previous result")
    argv = [*train_0, *TINY, "--max-train-samples", "512", "--out", str(run), "--overwrite", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0
    assert sorted(p.name for p in run.iterdir()) == ["keep.txt"]


def test_bad_aux_file_is_refused(tmp_path, train_0, capsys):
    import numpy as np
    bad = tmp_path / "aux.npz"
    np.savez(bad, image=np.zeros((10, 32, 32, 3), np.float32), label=np.zeros(10, np.int64))
    assert _train(tmp_path / "run", train_0, "--aux-data", str(bad), "--unsup-fraction", "0.5") == 2
    assert "dtype float32; expected uint8" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_existing_run_is_refused_without_resume_or_overwrite(tmp_path, train_0, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method: trades\n")
    assert _train(run, train_0, "--epochs", "1") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == "method: trades\n"


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, train_0, capsys, monkeypatch):
    from robustbench_conn.trainers import adversarial

    calls = {"n": 0}
    real_loss = adversarial.clean_loss

    def loss_that_diverges(*args, **kwargs):
        calls["n"] += 1
        loss, metrics = real_loss(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 3 else loss), metrics

    monkeypatch.setattr(adversarial, "clean_loss", loss_that_diverges)
    run = tmp_path / "run"
    assert _train(run, train_0, "--method", "clean", "--epochs", "3", "--max-train-samples", "128") == 2
    err = capsys.readouterr().err
    assert "the loss became nan at epoch 2, step 3" in err and "checkpoints/last.pt keeps the last good" in err
    assert torch.load(run / "checkpoints/last.pt", weights_only=True)["epoch"] == 1
    assert not (run / "model.safetensors").exists()


def test_config_file_gives_defaults_and_the_command_line_wins(tmp_path, train_0):
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump({"method": "clean", "epochs": 5, "max-train-samples": 128}))
    run = tmp_path / "run"
    assert _train(run, train_0, "--config", str(config), "--epochs", "1") == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["method"] == "clean" and saved["epochs"] == 1 and saved["max_train_samples"] == 128
    config.write_text(yaml.safe_dump({"metod": "clean"}))
    assert _train(tmp_path / "run2", train_0, "--config", str(config)) == 2


def test_paper_recipes_parse_and_a_pasted_paper_command_resolves(tmp_path):
    from robustbench_conn.cli._config import parse_with_config
    from robustbench_conn.cli.train_robust import build_parser, resolve
    from robustbench_conn.trainers.adversarial import build_connection

    for name, kind in (("wrn58-1_residual", "residual"), ("wrn58-1_suppression", "suppression")):
        args = parse_with_config(build_parser(), ["--config", str(REPO / "configs/paper" / f"{name}.yaml"),
                                                  "--aux-data", "x.npz", "--out", str(tmp_path / name)])
        config = resolve(args)
        assert config["model"] == "nrn-58-1-swish" and config["init_channels"] == 8 and config["lse"]
        assert config["epochs"] == 110 and config["batch_size"] == 512 and config["unsup_fraction"] == 0.7
        with pytest.warns(UserWarning) if kind == "suppression" else _no_warning():
            connection = build_connection(config)
        assert connection.kind == kind
        if kind == "suppression":
            assert connection.init_decay == 0.2 and connection.decay_lr == 0.001 and connection.restart_period == 3
    pasted = ("--data-dir ./datasets/ --log-dir ./log/X --attack-step 0.00784313725490196 --attack-eps "
              "0.03137254901960784 --settings ShareExpDecayLearnDecay_AbsExp_Ini0p5_RestaLayerIdx3 --unsup-fraction "
              "0.7 --LSE --ls 0 --adv-eval-freq 20 --coesB -1 0 --learn False --IniRes False --Mask False --IniCh 8 "
              "--data cifar10 --batch-size 512 --model nrn-58-1-swish-learn --num-adv-epochs 110 --lr 0.2 "
              "--scheduler step --beta 6.0 --attack linf-pgd --IniDecay 0.2 --CoesLR 0.001 --desc X").split()
    config = resolve(parse_with_config(build_parser(), pasted + ["--aux-data", "x.npz"]))
    assert config["out"] == os.path.join("./log/X", "X") and config["epochs"] == 110 and config["init_decay"] == 0.2


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_torchrun_two_ranks_match_the_single_process_gradient(tmp_path, cifar10_dir, free_port):
    """Two gloo ranks: identical weights after training, and the DDP gradient equals the single-process one."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port),
           str(REPO / "tests" / "ddp_check.py"), str(tmp_path), "train-robust", str(cifar10_dir / "train_0.npz")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "ddp_report.json").read_text())
    assert report["grad_max_abs_diff"] < 1e-5, report
    assert report["rank_weight_max_abs_diff"] == 0.0, report
    assert (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize("optimizer", ["adam", "main"])
def test_decay_is_trained_at_its_own_lr_without_weight_decay(optimizer):
    from robustbench_conn.models import ConnectionConfig, create_model
    from robustbench_conn.trainers.common import build_optimizers

    model = create_model("nrn-16-1-swish", connection=ConnectionConfig(kind="suppression", optimizer=optimizer))
    main_opt, decay_opt = build_optimizers(model, lr=0.2, momentum=0.9, weight_decay=5e-4, nesterov=True,
                                           decay_lr=0.001, decay_optimizer=optimizer)
    groups = [g for g in main_opt.param_groups + (decay_opt.param_groups if decay_opt else [])
              if any(p is model.shared_decay.delta for p in g["params"])]
    assert len(groups) == 1 and groups[0]["lr"] == 0.001 and groups[0]["weight_decay"] == 0.0
    assert (decay_opt is not None) == (optimizer == "adam")
