"""train-clean: every paper recipe trains two steps, pasted paper commands resolve to the recipes, a CIFAR-100-format
run writes its folder with the PGD check, resume, bad input, SAM/ASAM, and two torchrun ranks agree."""
from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from robustbench_conn.cli._config import parse_with_config
from robustbench_conn.cli.train_clean import build_parser, main, resolve
from robustbench_conn.io import load_model, load_weights
from robustbench_conn.trainers.common import RunFolder
from robustbench_conn.trainers.sam import SAM

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "paper"
RECIPES = sorted(p.stem for p in PAPER.glob("*.yaml") if not p.stem.startswith("wrn58-1"))
IMAGENET_RECIPES = [r for r in RECIPES if "cifar" not in r]
CIFAR_RECIPES = [r for r in RECIPES if "cifar" in r]
SMALL = {"levit": "32", "convnext": "32", "preresnet": "32"}
# One recipe per family in the default run (CPU minutes add up: 2 cores); every recipe under `pytest -m slow`.
FAST = {"levit_128_suppression", "convnext_s_n_suppression", "preresnet38_suppression"}


def _marked(names):
    return [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in names]
QUIET = ["--progress", "false", "--device", "cpu"]


def _image_folder(root: Path, classes: int = 2, per_class: int = 4, size: int = 40) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def _cifar100_npz(root: Path, n_train: int = 200, n_test: int = 40) -> Path:
    """CIFAR-100-format npz files (uint8 32x32x3, labels 0..99) with a learnable signal: the class sets the mean."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        label = np.arange(n) % 100
        image = rng.integers(0, 64, (n, 32, 32, 3)) + (label * 1.9).astype(int)[:, None, None, None]
        np.savez(root / f"{split}.npz", image=image.clip(0, 255).astype(np.uint8), label=label.astype(np.int64))
    return root


def _metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return _image_folder(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="module")
def c100(tmp_path_factory) -> Path:
    return _cifar100_npz(tmp_path_factory.mktemp("c100"))


@pytest.fixture
def no_checkpoint_files(monkeypatch):
    """Recipe smoke runs: skip writing the (hundreds of MB) checkpoints of the full-size ImageNet networks."""
    finals = {}
    monkeypatch.setattr(RunFolder, "save_checkpoint", lambda self, state, name: None)
    monkeypatch.setattr(RunFolder, "save_final", lambda self, model, card: finals.update(model=model, card=card))
    return finals


# ------------------------------------------------------------------------------------------------ the recipes

@pytest.mark.parametrize("recipe", _marked(IMAGENET_RECIPES))
def test_imagenet_recipe_builds_and_takes_two_steps(recipe, folder, tmp_path, no_checkpoint_files):
    size = next(v for k, v in SMALL.items() if recipe.startswith(k))
    run = tmp_path / "run"
    argv = ["--config", str(PAPER / f"{recipe}.yaml"), "--data-dir", str(folder), "--img-size", size,
            "--batch-size", "4", "--epochs", "1", "--max-steps-per-epoch", "2", "-j", "0", "--eval-max-samples", "2",
            "--out", str(run), *QUIET]
    assert main(argv) == 0
    row = _metrics(run)[0]
    assert float(row["train_loss"]) > 0 and row["val_acc"] != ""
    card = no_checkpoint_files["card"]
    recipe_yaml = yaml.safe_load((PAPER / f"{recipe}.yaml").read_text())
    assert card["model"] == recipe_yaml["model"] and card["num_classes"] == 2
    assert card["connection"]["kind"] == ("suppression" if recipe.endswith("suppression") else "residual")
    assert (row["decay_d"] != "") == recipe.endswith("suppression")
    if "levit" in recipe and recipe.endswith("suppression"):
        assert card["connection"]["decay_scale"] == 0.1 and abs(float(row["decay_d"]) - 0.07) < 0.01
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["batch_size"] == 4 and saved["lr"] == recipe_yaml["lr"]


@pytest.mark.parametrize("recipe", _marked(CIFAR_RECIPES))
def test_cifar_recipe_builds_and_takes_two_steps(recipe, c100, tmp_path, no_checkpoint_files):
    run = tmp_path / "run"
    argv = ["--config", str(PAPER / f"{recipe}.yaml"), "--data", "npz", "--data-dir", str(c100), "--batch-size", "4",
            "--epochs", "1", "--max-steps-per-epoch", "2", "--eval-max-samples", "4", "--pgd-samples", "2",
            "--nb-iter", "1", "--out", str(run), *QUIET]
    assert main(argv) == 0
    card = no_checkpoint_files["card"]
    assert card["model"] == "preresnet-110" and card["model_kwargs"]["width_factor"] == 4
    assert card["num_classes"] == 100 and "pgd_acc" in card["final_eval"]
    if recipe.endswith("suppression"):
        assert card["connection"]["init_decay"] == 0.07 and card["connection"]["decay_lr"] == 0.04


def _pasted(recipe: str) -> list[str]:
    """The paper command quoted in the recipe's header, without the launcher (``./distributed_train1.sh 8 DIR``
    or ``python3 Train.py``)."""
    lines = [l[4:] for l in (PAPER / f"{recipe}.yaml").read_text().splitlines() if l.startswith("#   ")]
    words = shlex.split(" ".join(lines))
    return words[3:] if words[0].startswith("./distributed_train") else words[2:]


@pytest.mark.parametrize("recipe", RECIPES)
def test_pasted_paper_command_resolves_to_its_recipe(recipe, tmp_path, monkeypatch):
    """The paper's own command line (8 processes for ImageNet: -b is per process) gives the recipe's values."""
    imagenet = recipe in IMAGENET_RECIPES
    if imagenet:
        monkeypatch.setenv("WORLD_SIZE", "8")
    pasted = _pasted(recipe) + ["--data-dir" if not imagenet else "--out", str(tmp_path / "x")]
    if imagenet:
        pasted += ["--data-dir", str(tmp_path)]
    else:
        pasted[pasted.index("--save_path") + 1] = str(tmp_path)
    from_command = resolve(parse_with_config(build_parser(), pasted))
    from_recipe = resolve(parse_with_config(build_parser(), ["--config", str(PAPER / f"{recipe}.yaml"),
                                                             "--data-dir", str(tmp_path), "--out", "y"]))
    keys = ["model", "width_factor", "data", "batch_size", "epochs", "lr", "opt", "opt_eps", "momentum",
            "weight_decay", "sched", "warmup_epochs", "warmup_lr", "min_lr", "model_ema_decay", "clip_grad",
            "clip_mode", "aa", "reprob", "mixup", "cutmix", "drop_path", "train_interpolation", "smoothing",
            "settings", "decay_lr", "minimizer", "rho", "eta", "eps", "eps_iter", "nb_iter", "amp", "dist_bn"]
    if recipe.endswith("suppression"):
        keys.append("init_decay")
    differ = {k: (from_command.get(k), from_recipe.get(k)) for k in keys if from_command.get(k) != from_recipe.get(k)}
    assert not differ, differ
    if not imagenet:
        assert from_command["out"].startswith(str(tmp_path)) and "SumBase_ab1" in from_command["out"]


# ------------------------------------------------------------------------------------- a CIFAR-100-format run

TINY = ["--model", "preresnet-8", "--data", "npz", "--batch-size", "32", "--lr", "0.05", "--pgd-samples", "16",
        "--nb-iter", "2", *QUIET]


def test_cifar100_npz_run_writes_its_folder_and_the_pgd_check(c100, tmp_path):
    run = tmp_path / "run"
    assert main([*TINY, "--data-dir", str(c100), "--epochs", "1", "--connection", "suppression", "--init-decay",
                 "0.07", "--decay-lr", "0.04", "--model-ema-decay", "0.99", "--minimizer", "asam", "--rho", "0.5",
                 "--out", str(run)]) == 0
    for name in ("config.yaml", "metrics.csv", "checkpoints/last.pt", "checkpoints/best.pt", "model.safetensors",
                 "model_card.json"):
        assert (run / name).is_file(), name
    row = _metrics(run)[0]
    for key in ("train_loss", "train_acc", "val_acc", "val_acc_raw", "decay_d", "test_clean_acc", "test_pgd_acc"):
        assert row[key] != "", key
    card = json.loads((run / "model_card.json").read_text())
    assert card["final_eval"]["nb_iter"] == 2 and card["final_eval"]["samples"] == 16
    assert card["num_classes"] == 100 and card["trainer"] == "train-clean" and card["recipe"]["minimizer"] == "asam"
    model, card = load_model(run)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 100)


def test_killed_run_resumes_to_the_same_weights(c100, kill_and_resume):
    args = [*TINY, "--data-dir", str(c100), "--epochs", "2", "--connection", "suppression", "--max-steps-per-epoch",
            "3", "--seed", "3", "--pgd-check", "false"]
    _, killed, difference = kill_and_resume(lambda out, *extra: main([*args, "--out", str(out), *extra]))
    assert difference == 0.0
    assert [r["epoch"] for r in _metrics(killed)] == ["1", "2"]


def test_imagenet_run_loads_for_evaluation_with_its_normalisation_in_front(folder, tmp_path):
    """timm-style weights expect normalised inputs; load_model hands evaluation a model that takes [0, 1] images."""
    from robustbench_conn.io import model_from_card

    run = tmp_path / "run"
    assert main(["--config", str(PAPER / "preresnet38_suppression.yaml"), "--data-dir", str(folder), "--img-size",
                 "32", "--batch-size", "4", "--epochs", "1", "--max-steps-per-epoch", "1", "-j", "0",
                 "--eval-max-samples", "2", "--out", str(run), *QUIET]) == 0
    model, card = load_model(run)
    bare = model_from_card(card)
    bare.load_state_dict(load_weights(run / "model.safetensors"))
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(card["data"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(card["data"]["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), bare.eval()((x - mean) / std), atol=1e-5)


@pytest.mark.slow
def test_killed_imagenet_run_resumes_to_the_same_weights(folder, kill_and_resume):
    """RandAugment and mixup draw from python's and numpy's generators: the checkpoint carries them too."""
    args = ["--config", str(PAPER / "preresnet38_suppression.yaml"), "--data-dir", str(folder), "--img-size", "32",
            "--batch-size", "4", "--epochs", "2", "--max-steps-per-epoch", "2", "-j", "0", "--aa",
            "rand-m9-mstd0.5-inc1", "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25", "--model-ema-decay",
            "0.9", *QUIET]
    _, _, difference = kill_and_resume(lambda out, *extra: main([*args, "--out", str(out), *extra]))
    assert difference == 0.0


@pytest.mark.parametrize("extra,message", [
    (["--settings", "ShareExpDecayLearnDecay_AbsExpp"], "unknown settings token 'AbsExpp'"),
    (["--eps", "8"], "--eps 8.0 is out of range"),
    (["--batch-size", "4096"], "larger than the 200 training images"),
    (["--data-dir", "/nonexistent/c100"], "does not exist"),
    (["--arch", "ZeroSAny56"], "--arch ZeroSAny56 is unknown"),
    (["--givenA", "1", "0.5"], "only the one-step form"),
    (["--model", "conn_levit_128"], "goes with --data imagefolder"),
    (["--opt", "adamw"], "in-memory CIFAR training uses SGD"),
])
def test_bad_input_exits_2_and_leaves_the_run_alone(c100, tmp_path, capsys, extra, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("previous result")
    argv = [*TINY, "--data-dir", str(c100), "--epochs", "1", "--out", str(run), "--overwrite", *extra]
    if "--model" in extra:
        argv = [a for i, a in enumerate(argv) if a != "preresnet-8" and not (a == "--model" and i < 2)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0, err
    assert sorted(p.name for p in run.iterdir()) == ["keep.txt"]


def test_existing_run_is_refused_and_imagefolder_needs_a_val_split(c100, folder, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: x\n")
    assert main([*TINY, "--data-dir", str(c100), "--out", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == "model: x\n"
    lonely = _image_folder(tmp_path / "lonely")
    import shutil
    shutil.rmtree(lonely / "val")
    assert main(["--model", "conn_preresnet38d", "--data-dir", str(lonely), "--out", str(tmp_path / "r2"), *QUIET]) == 2
    assert "val or" in capsys.readouterr().err and not (tmp_path / "r2").exists()


# ------------------------------------------------------------------------------------------------ SAM / ASAM

def _toy():
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0]) + 0.1 * torch.randn(64)
    model = torch.nn.Linear(5, 1)
    return model, lambda m: ((m(x).squeeze(1) - y) ** 2).mean()


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_differs_from_sgd_and_reduces_the_loss(adaptive):
    sgd_model, loss_fn = _toy()
    sam_model, _ = _toy()
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.05)
    sam = SAM(torch.optim.SGD(sam_model.parameters(), lr=0.05), rho=0.5 if adaptive else 0.05, adaptive=adaptive)
    start = loss_fn(sam_model).item()
    before = [p.detach().clone() for p in sam_model.parameters()]
    loss_fn(sgd_model).backward()
    sgd.step()
    loss_fn(sam_model).backward()
    sam.first_step()
    assert any(not torch.equal(p, b) for p, b in zip(sam_model.parameters(), before))  # moved to w + e
    sam.zero_grad()
    loss_fn(sam_model).backward()
    sam.second_step()
    diff = max((a - b).abs().max().item() for a, b in zip(sam_model.parameters(), sgd_model.parameters()))
    assert diff > 1e-4, "SAM took the plain SGD step"
    for _ in range(30):
        sam.zero_grad()
        loss_fn(sam_model).backward()
        sam.first_step()
        sam.zero_grad()
        loss_fn(sam_model).backward()
        sam.second_step()
    assert loss_fn(sam_model).item() < 0.5 * start


# ------------------------------------------------------------------------------------------------ torchrun

def test_torchrun_two_ranks_end_with_identical_weights(folder, tmp_path, free_port):
    """ImageNet path under torchrun (gloo): DDP gradients, dist-bn reduce of the BatchNorm statistics, rank 0 writes."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port),
           str(REPO / "tests" / "ddp_check.py"), str(tmp_path), "train-clean", "--config",
           str(PAPER / "preresnet38_suppression.yaml"), "--data-dir", str(folder), "--img-size", "32", "--batch-size",
           "4", "--epochs", "1", "--max-steps-per-epoch", "2", "-j", "0"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "ddp_report.json").read_text())
    assert report["world"] == 2 and report["rank_weight_max_abs_diff"] == 0.0, report
    card = json.loads((tmp_path / "run" / "model_card.json").read_text())
    assert card["recipe"]["batch_size"] == 4 and card["data"]["normalize_outside_model"]
    assert len(_metrics(tmp_path / "run")) == 1
