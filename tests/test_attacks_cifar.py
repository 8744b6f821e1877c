"""Our PGD against torchattacks' and AutoAttack on a small CNN trained here on real CIFAR-10 (train_0.npz), evaluated
on 500 images of test.npz. A clean-trained model has ~0 % robust accuracy at 8/255, so the comparison uses
eps = 2/255, where it is clearly non-zero."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustbench_conn.attacks import PGD, AutoAttack
from robustbench_conn.models import Normalize

CIFAR10 = Path(__file__).resolve().parents[2] / "shared/data/cifar10"
EPS = 2 / 255
N_TEST = 500


def load(name: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(CIFAR10 / name) as data:
        images, labels = data["image"][:limit], data["label"][:limit]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255).contiguous()
    return x, torch.from_numpy(labels).long()


def tiny_cnn() -> nn.Module:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(Normalize(), *block(3, 16), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2),
                         *block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


@pytest.fixture(scope="module")
def trained():
    """A small CNN trained for 3 epochs on train_0.npz (about 50 % clean accuracy), and 500 test images."""
    if not (CIFAR10 / "train_0.npz").exists() or not (CIFAR10 / "test.npz").exists():
        pytest.skip(f"real CIFAR-10 npz files not found at {CIFAR10} (the project expects ../shared beside it)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # small convolutions: one thread is fastest, above all on a shared machine
    try:
        torch.manual_seed(0)
        x_train, y_train = load("train_0.npz")
        x_test, y_test = load("test.npz", N_TEST)
        model = tiny_cnn()
        epochs, batch = 3, 128
        steps = epochs * (len(x_train) // batch)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
        gen = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x_train), generator=gen)
            for i in range(len(x_train) // batch):
                idx = order[i * batch:(i + 1) * batch]
                xb = x_train[idx]
                flip = torch.rand(len(idx), generator=gen) < 0.5
                xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
                loss = F.cross_entropy(model(xb), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        for p in model.parameters():
            p.grad = None
        yield model, x_test, y_test
    finally:
        torch.set_num_threads(threads)


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return 100.0 * (model(x).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def pgd20(trained):
    """Robust accuracies (%) of our PGD-20 and torchattacks' PGD-20 (eps 2/255, step eps/4, random start)."""
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = trained
    ours = accuracy(model, PGD(eps=EPS, alpha=EPS / 4, steps=20, seed=0)(model, x, y), y)
    with contextlib.redirect_stdout(io.StringIO()):
        attack = torchattacks.PGD(model, eps=EPS, alpha=EPS / 4, steps=20, random_start=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        theirs = accuracy(model, attack(x, y), y)
    return ours, theirs


def test_trained_model_is_a_meaningful_target(trained, pgd20):
    model, x, y = trained
    clean = accuracy(model, x, y)
    ours, _ = pgd20
    assert clean > 40, clean
    assert 5 < ours < clean - 10, (clean, ours)        # robust accuracy clearly non-zero and clearly below clean


def test_our_pgd20_matches_torchattacks_pgd20(pgd20):
    ours, theirs = pgd20
    assert abs(ours - theirs) <= 1.5, (ours, theirs)


def test_autoattack_apgd_ce_not_above_either_pgd(trained, pgd20):
    # The fast check: AutoAttack's first attack alone (APGD-CE, 100 iterations x 5 restarts in pyautoattack's
    # 'custom' setting); the full standard AutoAttack is the slow test below.
    model, x, y = trained
    result = AutoAttack(eps=EPS, version="custom", attacks=["apgd-ce"], seed=0).run(model, x, y)
    aa = 100.0 * result.robust_accuracy
    assert aa <= min(pgd20), (aa, pgd20)
    assert accuracy(model, result.x_adv, y) == pytest.approx(aa)
    assert (result.x_adv - x).abs().max() <= EPS + 1e-6


@pytest.mark.slow
def test_standard_autoattack_not_above_either_pgd(trained, pgd20):
    model, x, y = trained
    result = AutoAttack(eps=EPS, version="standard", seed=0).run(model, x, y)
    aa = 100.0 * result.robust_accuracy
    assert aa <= min(pgd20), (aa, pgd20)
    assert accuracy(model, result.x_adv, y) == pytest.approx(aa)
    assert set(result.breakdown()) == {"apgd-ce", "apgd-t", "fab-t", "square"}
