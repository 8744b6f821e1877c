"""The sanity gate fires on models built to trip it and stays silent on a normal one; the harness's AutoAttack
equals pyautoattack called directly on the same points and seed."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustbench_conn.data import get_dataset
from robustbench_conn.evaluation import EvaluationError, EvaluationWarning, evaluate, sanity_gate
from robustbench_conn.evaluation import harness


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(bn: bool = False) -> nn.Module:
    layers = [nn.AvgPool2d(4), nn.Flatten(), nn.Linear(192, 64)]
    if bn:
        layers.append(nn.BatchNorm1d(64))
    layers += [nn.ReLU(), nn.Linear(64, 10)]
    return nn.Sequential(*layers)


def train(model: nn.Module, epochs: int = 30) -> nn.Module:
    torch.manual_seed(0)
    data = get_dataset("digits", "train")
    x, y = data.batch(torch.arange(len(data)))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 128):
            idx = perm[i:i + 128]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


class Randomized(nn.Module):
    """Gaussian noise on the input at every call: a randomised defence."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner((x + 0.1 * torch.randn_like(x)).clamp(0, 1))


class Softmax(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).softmax(1)


class Saturated(nn.Module):
    """Logits times 1e4: softmax saturates, so the cross-entropy gradient is exactly 0 at most points (gradient
    masking); the decision, and so a gradient-free attack, is unchanged."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * 1e4


@pytest.fixture(scope="module")
def normal() -> nn.Module:
    return train(tiny())


@pytest.fixture(scope="module")
def points():
    return get_dataset("digits", "test").batch(torch.arange(200))


def test_gate_is_silent_on_a_normal_model(normal, points):
    report = sanity_gate(normal, *points)
    assert report.flags == (), report.details


def test_normal_model_evaluates_without_any_flag(normal, points):
    x, y = points
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvaluationWarning)
        records = evaluate(normal, "digits", images=x[:60], labels=y[:60], batch_size=30,
                           suites=["pgd", "autoattack"], eps=["16/255", "48/255"], steps=[5, 20],
                           version="custom", attacks=["apgd-ce", "square"])
    assert all(r.flags == "" for r in records), [(r.attack, r.eps, r.flags) for r in records]
    by = {(r.attack, r.eps, r.steps): r.robust_acc for r in records}
    assert by[("pgd-ce", "48/255", 20)] <= by[("pgd-ce", "16/255", 20)] <= by[("pgd-ce", "16/255", 5)] <= 1


def test_train_mode_batchnorm_model_is_flagged(points):
    model = train(tiny(bn=True)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = sanity_gate(model, *points)
    assert {"train_mode", "batch_size_dependent"} <= set(report.flags)
    assert "nondeterministic" not in report.flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the gate changed nothing
    assert model.training


def test_randomised_model_is_flagged(normal, points):
    report = sanity_gate(Randomized(normal).eval(), *points)
    assert "nondeterministic" in report.flags


def test_softmax_model_is_flagged(normal, points):
    report = sanity_gate(Softmax(normal).eval(), *points)
    assert "probability_outputs" in report.flags


def test_inputs_outside_the_unit_box_are_flagged_and_refused(normal, points):
    x, y = points
    assert "inputs_out_of_range" in sanity_gate(normal, x * 255, y).flags
    with pytest.raises(EvaluationError, match=r"not \[0, 1\]"):
        evaluate(normal, "digits", images=x * 255, labels=y, suites=["pgd"])


def test_gradient_masking_model_high_pgd_low_square_is_flagged(normal, points):
    x, y = points
    masked = Saturated(normal).eval()
    assert "zero_gradients" in sanity_gate(masked, x, y).flags
    with pytest.warns(EvaluationWarning, match="gradient_masking"):
        records = evaluate(masked, "digits", images=x[:100], labels=y[:100], batch_size=100,
                           suites=["pgd", "autoattack"], eps=["32/255"], steps=[20], version="custom",
                           attacks=["square"])
    pgd, aa = sorted(records, key=lambda r: r.attack.startswith("autoattack"))
    assert pgd.robust_acc > 0.8 and aa.robust_acc < 0.2           # PGD high, Square low
    assert "gradient_masking" in aa.flag_list and "gradient_masking" in pgd.flag_list
    assert "zero_gradients" in aa.flag_list


def test_rescore_disagreeing_with_the_attack_is_flagged(normal, points, monkeypatch):
    x, y = points

    class Lying:
        """An AutoAttack whose verdict says every point was broken while its images are the clean ones."""

        def __init__(self, **kw):
            pass

        def run(self, model, images, labels):
            from robustbench_conn.attacks import AutoAttackResult

            n = len(labels)
            correct = model(images).argmax(1) == labels
            return AutoAttackResult(x_adv=images.clone(), robust=torch.zeros(n, dtype=torch.bool),
                                    clean_correct=correct, broken_by=["apgd-ce" if c else None for c in correct],
                                    robust_accuracy=0.0)

    monkeypatch.setattr(harness, "AutoAttack", Lying)
    monkeypatch.setattr(harness, "sanity_gate", lambda *a, **k: harness.GateReport())
    (record,) = evaluate(normal, "digits", images=x[:50], labels=y[:50], suites=["autoattack"], eps=["2/255"])
    assert "rescore_mismatch" in record.flag_list
    assert record.robust_acc == record.clean_acc  # the float32 re-score decides


def test_norm_violations_are_checked(normal, points, monkeypatch):
    x, y = points

    class Escaping:
        """An 'attack' that leaves the eps-ball: the harness must not count its points as broken."""

        def __init__(self, eps, **kw):
            self.eps = eps

        def __call__(self, model, images, labels):
            return (images + 0.5).clamp(0, 1)

    monkeypatch.setattr(harness, "PGD", Escaping)
    monkeypatch.setattr(harness, "sanity_gate", lambda *a, **k: harness.GateReport())
    (record,) = evaluate(normal, "digits", images=x[:50], labels=y[:50], suites=["pgd"], eps=["2/255"], steps=[1])
    assert "norm_violation" in record.flag_list
    assert record.robust_acc == record.clean_acc  # points moved out of the ball are not counted as broken


def test_harness_autoattack_equals_pyautoattack_called_directly(normal, points):
    x, y = points
    eps = 16 / 255
    (record,) = evaluate(normal, "digits", images=x, labels=y, batch_size=500, suites=["autoattack"],
                         eps=["16/255"], version="custom", attacks=["apgd-ce", "apgd-t"], seed=0)
    import pyautoattack

    adversary = pyautoattack.AutoAttack(normal, attacks=["apgd-ce", "apgd-t"], version="custom", eps=eps,
                                        norm="Linf", device="cpu", seed=0)
    _, y_adv = adversary.run_standard_evaluation(x.clone(), y.clone(), batch_size=500)
    direct = (y_adv == y).sum().item()
    assert record.n_examples == 200 and record.n_robust == direct
    assert 0 < direct < 200 and record.robust_acc == direct / 200
    assert record.flags == ""


@pytest.mark.slow
def test_harness_standard_autoattack_equals_pyautoattack(normal, points):
    x, y = points
    (record,) = evaluate(normal, "digits", images=x, labels=y, batch_size=500, suites=["autoattack"],
                         eps=["16/255"], seed=0)
    import pyautoattack

    adversary = pyautoattack.AutoAttack(normal, eps=16 / 255, norm="Linf", device="cpu", seed=0,
                                        version="standard")
    _, y_adv = adversary.run_standard_evaluation(x.clone(), y.clone(), batch_size=500)
    assert record.n_robust == (y_adv == y).sum().item()
