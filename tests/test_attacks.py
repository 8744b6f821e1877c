"""Unit tests of robustbench_conn.attacks: exactness on a linear model, constraints, model state, monotonicity,
input checks, autocast and channels_last, AutoAttack's breakdown and the torchattacks backend."""
from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from robustbench_conn.attacks import (FGSM, PGD, AttackError, AutoAttack, AutoAttackResult, TorchAttack,
                                      create_attack, frozen_eval)



@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is fastest, and far faster on a shared, loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- helpers -------------------------------------------------------------------------------------------------------
def small_cnn(channels: int = 3, classes: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.1),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, classes))


class Center(nn.Module):
    """Centres and scales [0, 1] inputs, so that a randomly initialised network's prediction depends on them."""

    def forward(self, x):
        return (x - 0.5) * 4


def sensitive_cnn(seed: int = 0, size: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(Center(), nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * size * size, 10)).eval()


def snapshot(model: nn.Module) -> dict:
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grad_ids": [id(p.grad) if p.grad is not None else None for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "params": [p.detach().clone() for p in model.parameters()],
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
    }


def assert_same_state(before: dict, model: nn.Module) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["grad_ids"] == before["grad_ids"]
    for a, b in zip(after["grads"], before["grads"]):
        assert (a is None and b is None) or torch.equal(a, b)
    for a, b in zip(after["params"], before["params"]):
        assert torch.equal(a, b)
    assert after["buffers"].keys() == before["buffers"].keys()
    for k in before["buffers"]:
        assert torch.equal(after["buffers"][k], before["buffers"][k]), k


def messy_model() -> nn.Module:
    """A model in train mode with one submodule in eval, one frozen parameter and one stale .grad."""
    model = small_cnn()
    model.train()
    model[3].eval()
    model[0].bias.requires_grad_(False)
    model[-1].weight.grad = torch.full_like(model[-1].weight, 0.5)
    return model


def robust_accuracy(model, x_adv, labels) -> float:
    with torch.no_grad():
        return (model.eval()(x_adv).argmax(1) == labels).float().mean().item()


# -- exactness on a linear model -----------------------------------------------------------------------------------
def binary_linear(dim: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    model = nn.Linear(dim, 2)
    with torch.no_grad():
        model.weight.normal_()
        model.bias.zero_()
    return model


@pytest.mark.parametrize("loss", ["ce", "cw"])
@pytest.mark.parametrize("random_start", [False, True])
@pytest.mark.parametrize("targeted", [False, True])
def test_linf_pgd_finds_closed_form_optimum_on_linear_model(loss, random_start, targeted):
    # For two classes, loss(x + delta) grows along sign(w_other - w_label) in every coordinate; the box
    # [x - eps, x + eps] ∩ [0, 1] is separable, so the optimum is the clipped corner.
    dim, n, eps = 40, 32, 8 / 255
    model = binary_linear(dim)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(n, dim, generator=gen)
    x[:, :4] = 0.0   # coordinates where the box bites
    x[:, 4:8] = 1.0
    labels = torch.randint(0, 2, (n,), generator=gen)
    x_adv = PGD(eps=eps, alpha=2 / 255, steps=10, loss=loss, random_start=random_start, targeted=targeted,
                seed=3)(model, x, labels)
    w = model.weight.detach()
    towards = labels if targeted else 1 - labels       # the class the attack pushes towards
    direction = torch.sign(w[towards] - w[1 - towards])
    optimum = torch.clamp(x + eps * direction, 0, 1)
    assert torch.equal(x_adv, optimum)
    # and its margin is the closed-form optimal margin
    margin = lambda z: (model(z) * (2 * nn.functional.one_hot(towards, 2) - 1)).sum(1)   # noqa: E731
    with torch.no_grad():
        assert torch.allclose(margin(x_adv), margin(optimum))


@pytest.mark.parametrize("random_start,alpha,steps", [(False, 0.1, 3), (True, 1.0, 20)])
def test_l2_pgd_finds_closed_form_optimum_on_linear_model(random_start, alpha, steps):
    # The optimum is eps along w_other - w_label. From zero, steps along that constant direction reach the sphere
    # exactly; from a random start, each projected step of size alpha shrinks the angle by ~eps / alpha.
    dim, n, eps = 64, 16, 0.25
    model = binary_linear(dim, seed=2)
    x = torch.full((n, dim), 0.5)                        # box inactive: 0.25 < 0.5 per coordinate
    labels = torch.arange(n) % 2
    x_adv = PGD(eps=eps, alpha=alpha, steps=steps, norm="L2", random_start=random_start, seed=0)(model, x, labels)
    w = model.weight.detach()
    diff = w[1 - labels] - w[labels]
    optimum = x + eps * diff / diff.norm(dim=1, keepdim=True)
    assert torch.allclose(x_adv, optimum, atol=1e-6)


def test_fgsm_is_one_sign_step_and_fgsm_rs_stays_in_ball():
    model = binary_linear(30)
    x = torch.rand(8, 30)
    labels = torch.zeros(8, dtype=torch.long)
    x_adv = FGSM(eps=0.05)(model, x, labels)
    w = model.weight.detach()
    assert torch.equal(x_adv, torch.clamp(x + 0.05 * torch.sign(w[1] - w[0]), 0, 1))
    rs = FGSM(eps=0.05, random_start=True, seed=0)
    assert rs.alpha == pytest.approx(1.25 * 0.05)
    assert (rs(model, x, labels) - x).abs().max() <= 0.05 + 1e-7


# -- property tests: constraints for random shapes, norms and eps --------------------------------------------------
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 3), c=st.integers(1, 3), h=st.integers(1, 6), w=st.integers(1, 6),
       norm=st.sampled_from(["Linf", "L2"]), eps_frac=st.floats(0.0, 1.0),
       loss=st.sampled_from(["ce", "cw", "dlr", "trades_kl"]), steps=st.integers(1, 3),
       restarts=st.integers(1, 2), random_start=st.booleans(), early_stop=st.booleans(),
       targeted=st.booleans(), channels_last=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_output_in_eps_ball_and_unit_box(n, c, h, w, norm, eps_frac, loss, steps, restarts, random_start,
                                         early_stop, targeted, channels_last, seed):
    if loss == "trades_kl":
        early_stop = targeted = False
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, h, w, generator=gen)
    x[:, :, 0, 0] = 0.0
    x[:, :, -1, -1] = 1.0
    labels = torch.randint(0, 5, (n,), generator=gen)
    eps = eps_frac if norm == "Linf" else eps_frac * min(2.0, (c * h * w) ** 0.5)   # at most the box's diameter
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    model = small_cnn(c, 5, seed=seed % 7)
    attack = PGD(eps=eps, alpha=max(eps / 2, 1e-3), steps=steps, norm=norm, restarts=restarts, loss=loss,
                 random_start=random_start, early_stop=early_stop, targeted=targeted, seed=seed)
    x_adv = attack(model, x, labels)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    if norm == "Linf":
        assert delta.abs().max() <= eps + 1e-6
    else:
        assert (delta.norm(dim=1) <= eps * (1 + 1e-5) + 1e-6).all()
    if channels_last and h > 1 and w > 1 and c > 1:
        assert x_adv.is_contiguous(memory_format=torch.channels_last)


# -- the model comes back untouched --------------------------------------------------------------------------------
ATTACKS_FOR_STATE = {
    "pgd": lambda: PGD(steps=3, seed=0),
    "pgd-l2-restarts-early": lambda: PGD(eps=0.5, alpha=0.2, steps=2, norm="L2", restarts=2, early_stop=True),
    "trades": lambda: PGD(steps=2, loss="trades_kl"),
    "fgsm": lambda: FGSM(8 / 255, random_start=True),
    "autoattack": lambda: AutoAttack(eps=4 / 255, version="custom", attacks=["apgd-ce"], seed=0),
    "torchattacks": lambda: TorchAttack("PGD", eps=8 / 255, alpha=2 / 255, steps=2, seed=0),
}


@pytest.mark.parametrize("name", sorted(ATTACKS_FOR_STATE))
def test_attack_leaves_model_state_untouched(name):
    if name == "torchattacks":
        pytest.importorskip("torchattacks")
    model = messy_model()
    x, labels = torch.rand(6, 3, 8, 8), torch.randint(0, 5, (6,))
    before = snapshot(model)
    x_adv = ATTACKS_FOR_STATE[name]()(model, x, labels)
    assert x_adv.shape == x.shape
    assert_same_state(before, model)


class Exploding(nn.Module):
    """Wraps a model and raises on its ``fail_at``-th forward pass."""

    def __init__(self, inner: nn.Module, fail_at: int):
        super().__init__()
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def forward(self, x):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise RuntimeError("boom")
        return self.inner(x)


@pytest.mark.parametrize("name", ["pgd", "autoattack", "torchattacks"])
def test_model_state_restored_after_exception(name):
    if name == "torchattacks":
        pytest.importorskip("torchattacks")
    model = Exploding(messy_model(), fail_at=2)
    model.train()
    model.inner[3].eval()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        ATTACKS_FOR_STATE[name]()(model, torch.rand(4, 3, 8, 8), torch.randint(0, 5, (4,)))
    assert_same_state(before, model)


def test_frozen_eval_restores_on_exception_and_enables_grad():
    model = messy_model()
    before = snapshot(model)
    with pytest.raises(KeyError):
        with torch.no_grad(), frozen_eval(model):
            assert torch.is_grad_enabled()
            assert not any(m.training for m in model.modules())
            assert not any(p.requires_grad for p in model.parameters())
            raise KeyError("x")
    assert_same_state(before, model)


def test_attack_works_inside_no_grad_and_inference_mode():
    model = small_cnn()
    x, labels = torch.rand(4, 3, 8, 8), torch.randint(0, 5, (4,))
    with torch.no_grad():
        a = PGD(steps=2, seed=0)(model, x, labels)
    b = PGD(steps=2, seed=0)(model, x, labels)
    assert torch.equal(a, b)
    with torch.inference_mode():
        xi, li = x.clone(), labels.clone()
        c = PGD(steps=2, seed=0)(model, xi, li)
    assert torch.allclose(c, b)


# -- more effort never helps the model -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fixed_problem():
    model = sensitive_cnn(seed=5)
    torch.manual_seed(11)
    x = torch.rand(64, 3, 8, 8)
    with torch.no_grad():
        labels = model(x).argmax(1)      # clean accuracy 100 %
    return model, x, labels


def test_more_steps_never_raise_robust_accuracy(fixed_problem):
    model, x, labels = fixed_problem
    accs = [robust_accuracy(model, PGD(eps=4 / 255, alpha=2 / 255, steps=k, early_stop=True, seed=7)(
        model, x, labels), labels) for k in (1, 2, 3, 5, 8, 13)]
    assert all(a >= b for a, b in zip(accs, accs[1:])), accs
    assert accs[0] > accs[-1], accs                       # the check is not vacuous


@pytest.mark.parametrize("early_stop", [False, True])
@pytest.mark.parametrize("norm,eps,alpha", [("Linf", 4 / 255, 2 / 255), ("L2", 0.2, 0.08)])
def test_more_restarts_never_raise_robust_accuracy(fixed_problem, early_stop, norm, eps, alpha):
    model, x, labels = fixed_problem
    robust_sets = []
    for restarts in (1, 2, 4):
        x_adv = PGD(eps=eps, alpha=alpha, steps=2, norm=norm, restarts=restarts, early_stop=early_stop,
                    seed=3)(model, x, labels)
        with torch.no_grad():
            robust_sets.append(model(x_adv).argmax(1) == labels)
    for fewer, more in zip(robust_sets, robust_sets[1:]):
        assert not (more & ~fewer).any()                   # nobody becomes robust again
    assert 0 < robust_sets[-1].sum() < len(labels)          # the check is not vacuous


def test_seed_reproducible_and_leaves_global_rng_alone():
    model = small_cnn()
    x, labels = torch.rand(4, 3, 8, 8), torch.randint(0, 5, (4,))
    state = torch.get_rng_state()
    a = PGD(steps=2, seed=123)(model, x, labels)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a, PGD(steps=2, seed=123)(model, x, labels))
    assert not torch.equal(a, PGD(steps=2, seed=124)(model, x, labels))


# -- bad input -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(eps=-0.1), "eps must be >= 0"),
    (dict(eps=1.5), "exceeds 1"),
    (dict(eps=float("nan")), "finite"),
    (dict(alpha=0), "alpha must be"),
    (dict(alpha=-1e-3), "alpha must be"),
    (dict(steps=0), "steps must be"),
    (dict(steps=2.5), "steps must be"),
    (dict(restarts=0), "restarts must be"),
    (dict(norm="L3"), "unknown norm"),
    (dict(loss="hinge"), "unknown loss"),
    (dict(loss="trades_kl", targeted=True), "trades_kl"),
    (dict(seed="x"), "seed"),
])
def test_bad_configuration_raises(kwargs, match):
    with pytest.raises(AttackError, match=match):
        PGD(**kwargs)


@pytest.mark.parametrize("images,labels,match", [
    (torch.rand(4, 3, 8, 8) * 2, torch.zeros(4, dtype=torch.long), r"\[0, 1\]"),
    (torch.rand(4, 3, 8, 8) - 0.5, torch.zeros(4, dtype=torch.long), r"\[0, 1\]"),
    (torch.full((4, 3, 8, 8), float("nan")), torch.zeros(4, dtype=torch.long), "NaN"),
    (torch.rand(4, 3, 8, 8), torch.zeros(3, dtype=torch.long), "different batch sizes"),
    (torch.rand(4, 3, 8, 8), torch.zeros(4), "integer"),
    ((torch.rand(4, 3, 8, 8) * 255).to(torch.uint8), torch.zeros(4, dtype=torch.long), "floating-point"),
    (torch.rand(4), torch.zeros(4, dtype=torch.long), "batch dimension"),
    (torch.rand(4, 3, 8, 8), -torch.ones(4, dtype=torch.long), "non-negative"),
])
def test_bad_call_raises(images, labels, match):
    model = small_cnn()
    before = snapshot(model)
    with pytest.raises(AttackError, match=match):
        PGD(steps=1)(model, images, labels)
    assert_same_state(before, model)


def test_attack_error_is_value_error_and_l2_eps_above_diameter():
    assert issubclass(AttackError, ValueError)
    with pytest.raises(AttackError, match="diameter"):
        PGD(eps=10.0, alpha=1.0, norm="L2")(small_cnn(), torch.rand(2, 3, 4, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(AttackError, match="needs at least 3 classes"):
        PGD(loss="dlr", steps=1)(binary_linear(4), torch.rand(2, 4), torch.zeros(2, dtype=torch.long))


def test_create_attack_names():
    assert isinstance(create_attack("pgd", eps=4 / 255, steps=3), PGD)
    assert isinstance(create_attack("FGSM", eps=4 / 255), FGSM)
    assert isinstance(create_attack("autoattack", eps=4 / 255), AutoAttack)
    for bad in ("pgdd", "foolbox:PGD", "torchattacks:", 3):
        with pytest.raises(AttackError):
            create_attack(bad)
    with pytest.raises(AttackError, match="bad arguments"):
        create_attack("pgd", epsilon=0.1)


def test_torchattacks_backend_by_name_and_errors():
    pytest.importorskip("torchattacks")
    model = small_cnn()
    x, labels = torch.rand(4, 3, 8, 8), torch.randint(0, 5, (4,))
    for spec, kwargs in [("torchattacks:MIFGSM", dict(eps=4 / 255, steps=2)), ("torchattacks:CW", dict(steps=2)),
                         ("torchattacks:PGD", dict(eps=4 / 255, steps=2))]:
        x_adv = create_attack(spec, **kwargs)(model, x, labels)
        assert x_adv.shape == x.shape and x_adv.min() >= 0 and x_adv.max() <= 1
    targeted = TorchAttack("PGD", eps=4 / 255, steps=2, targeted=True, seed=0)(model, x, labels)
    assert (targeted - x).abs().max() <= 4 / 255 + 1e-6
    with pytest.raises(AttackError, match="no attack 'Nope'.*PGD"):
        create_attack("torchattacks:Nope")
    with pytest.raises(AttackError, match="bad arguments"):
        TorchAttack("PGD", not_an_argument=1)


def test_torchattacks_missing_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)     # makes `import torchattacks` raise ImportError
    with pytest.raises(AttackError, match="not installed.*pip install"):
        TorchAttack("CW")


# -- autocast, channels_last, dtypes -------------------------------------------------------------------------------
def test_autocast_bf16_on_cpu_keeps_float32_perturbation():
    model = small_cnn()
    x, labels = torch.rand(8, 3, 8, 8), torch.randint(0, 5, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = PGD(eps=8 / 255, alpha=2 / 255, steps=5, seed=0)(model, x, labels)
    assert x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        ce = lambda z: nn.functional.cross_entropy(model.eval()(z), labels)    # noqa: E731
        assert ce(x_adv) > ce(x)


def test_channels_last_matches_contiguous():
    model = small_cnn().eval()
    x, labels = torch.rand(8, 3, 8, 8), torch.randint(0, 5, (8,))
    a = PGD(steps=3, seed=0)(model, x, labels)
    b = PGD(steps=3, seed=0)(model.to(memory_format=torch.channels_last),
                             x.contiguous(memory_format=torch.channels_last), labels)
    assert b.is_contiguous(memory_format=torch.channels_last)
    assert (a - b).abs().max() <= 2 * 8 / 255 + 1e-6        # in the same ball,
    assert (a - b).abs().gt(1e-6).float().mean() < 0.02     # and the same up to rare flipped gradient signs


def test_half_precision_images_round_trip():
    model = small_cnn()
    x = torch.rand(4, 3, 8, 8).to(torch.bfloat16)
    labels = torch.randint(0, 5, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = PGD(steps=2, seed=0)(model, x, labels)
    assert x_adv.dtype == torch.bfloat16


# -- AutoAttack ----------------------------------------------------------------------------------------------------
def test_autoattack_breakdown_matches_pyautoattack_combined_run():
    pyautoattack = pytest.importorskip("pyautoattack")
    model = sensitive_cnn(seed=1)
    torch.manual_seed(0)
    x = torch.rand(24, 3, 8, 8)
    with torch.no_grad():
        labels = model(x).argmax(1)
    labels[:3] = (labels[:3] + 1) % 10                     # three clean-misclassified points
    eps = 4 / 255
    result = AutoAttack(eps=eps, version="custom", attacks=["APGD-CE", "apgd-t"], seed=0, batch_size=10).run(
        model, x, labels)
    assert isinstance(result, AutoAttackResult)
    assert result.clean_correct.tolist() == [False] * 3 + [True] * 21
    assert len(result.broken_by) == 24 and result.attacks == ("apgd-ce", "apgd-t")
    for i in range(24):
        assert (result.broken_by[i] is None) == (bool(result.robust[i]) or not bool(result.clean_correct[i]))
    assert not (result.robust & ~result.clean_correct).any()
    assert result.robust_accuracy == pytest.approx(result.robust.float().mean().item())
    assert (result.x_adv - x).abs().max() <= eps + 1e-6
    with torch.no_grad():
        pred = model(result.x_adv).argmax(1)
    broken = torch.tensor([b is not None for b in result.broken_by])
    assert (pred[broken] != labels[broken]).all()
    assert torch.equal(result.x_adv[result.robust], x[result.robust])
    assert sum(result.breakdown().values()) == int(broken.sum())
    assert 0 < broken.sum() < 21                            # not vacuous
    # the same as pyautoattack's own combined run with the same seed and batches
    reference = pyautoattack.AutoAttack(model, attacks=["apgd-ce", "apgd-t"], device="cpu", eps=eps, norm="Linf",
                                        seed=0, version="custom")
    _, y_ref = reference.run_standard_evaluation(x, labels, batch_size=10)
    assert torch.equal(y_ref == labels, result.robust)


def test_autoattack_configuration_errors_and_call_shape():
    with pytest.raises(AttackError, match="custom"):
        AutoAttack(version="custom")
    with pytest.raises(AttackError, match="only used with version='custom'"):
        AutoAttack(attacks=["apgd-ce"])
    with pytest.raises(AttackError, match="unknown AutoAttack attack"):
        AutoAttack(version="custom", attacks=["pgd"])
    with pytest.raises(AttackError, match="unknown version"):
        AutoAttack(version="fast")
    with pytest.raises(AttackError, match="unknown norm"):
        AutoAttack(norm="L0")
    with pytest.raises(AttackError, match="exceeds 1"):
        AutoAttack(eps=8)
    AutoAttack(eps=12, norm="L1")                           # L1's usual radius is fine
    model = small_cnn(3, 10).eval()
    x, labels = torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,))
    with pytest.raises(AttackError, match="different batch sizes"):
        AutoAttack(eps=1 / 255).run(model, x, labels[:3])
    x_cl = x.contiguous(memory_format=torch.channels_last)
    x_adv = create_attack("autoattack", eps=1 / 255, version="custom", attacks=["apgd-dlr"])(model, x_cl, labels)
    assert x_adv.shape == x.shape and x_adv.is_contiguous(memory_format=torch.channels_last)
