"""The connection: residual equivalence at d = 0, the shared decay, restart indices, settings strings."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from robustbench_conn.models import (ConnectionConfig, SettingsError, count_parameters, create_model,
                                     decay_parameters, parameter_groups, parse_settings, resolve_connection)
from robustbench_conn.models.connection import (ConnectionFactory, ResidualConnection, SuppressionConnection,
                                                accepts_output_scale)

PAPER_SETTINGS = [
    "Default",
    "ShareExpDecayLearnDecay_AbsExp_Adam_RestaLayerIdx3",
    "ShareExpDecayLearnDecay_AbsExp_Ini0p5_RestaLayerIdx3",
    "BnReluConv_ConvStride2ResLike",
    "BnReluConv_ConvStride2ResLike_ShareExpDecayLearnDecay_AbsExp_Adam_RestaLayerIdx3",
]


def _pair(name: str, **kw):
    torch.manual_seed(0)
    residual = create_model(name, connection="residual", **kw)
    suppression = create_model(name, connection=ConnectionConfig(kind="suppression", init_decay=0.0,
                                                                 parametrisation="identity"), **kw)
    missing, unexpected = suppression.load_state_dict(residual.state_dict(), strict=False)
    assert missing == ["shared_decay.delta"] and not unexpected
    return residual.eval(), suppression.eval()


@pytest.mark.parametrize("name,kw", [("nrn-16-1-swish", {"init_channels": 8}), ("preresnet-20", {}),
                                     ("wrn-16-2-relu", {})])
def test_suppression_with_zero_decay_is_the_residual_network(name, kw):
    residual, suppression = _pair(name, **kw)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        diff = (residual(x) - suppression(x)).abs().max().item()
    assert diff < 1e-5


def test_nonzero_decay_changes_the_function():
    residual, suppression = _pair("nrn-16-1-swish", init_channels=8)
    with torch.no_grad():
        suppression.shared_decay.delta.fill_(0.3)
        x = torch.rand(2, 3, 32, 32)
        assert (residual(x) - suppression(x)).abs().max().item() > 1e-3


def test_block_formula_matches_the_paper():
    conn = resolve_connection("suppression", init_decay=0.25)
    from robustbench_conn.models.connection import ConnectionFactory
    factory = ConnectionFactory(conn)
    block = factory(block_index=2)  # l = 2
    x = torch.randn(3, 5)
    branch = lambda t: torch.tanh(t) * 2  # noqa: E731
    d = 0.25
    expected = (1 - d) * x + torch.exp(torch.tensor(-d * 2)) * branch(torch.exp(torch.tensor(d * 2)) * x)
    assert torch.allclose(block(x, branch), expected, atol=1e-6)


def _reference_block(x, d, l, branch):
    """The block written with plain autograd ops (what the fused autograd Functions must reproduce)."""
    scale = torch.exp(d * l)
    return (1 - d) * x + branch(x * scale) / scale


@pytest.mark.parametrize("layer_index", [0, 1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("scalable", [False, True], ids=["plain-branch", "branch-takes-output-scale"])
def test_fused_block_gradients_match_plain_autograd(layer_index, channels_last, scalable):
    """x, d (through delta and phi) and the branch's weights get the gradients of the formula, whether the join
    rescales its result or the branch folds the factor into its conv's weight and bias."""
    config = ConnectionConfig(kind="suppression", init_decay=-0.3, restart_period=None)
    from robustbench_conn.models.connection import SharedDecay
    decay = SharedDecay(config).double()
    block = SuppressionConnection(decay, layer_index, owns_decay=False)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1).double()
    calls = []

    def branch(t, output_scale=None):
        calls.append(output_scale)
        if output_scale is None:
            return conv(torch.nn.functional.silu(t))
        return torch.nn.functional.conv2d(torch.nn.functional.silu(t), conv.weight * output_scale,
                                          conv.bias * output_scale, padding=1)
    if scalable:
        branch = accepts_output_scale(branch)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        conv = conv.to(memory_format=torch.channels_last)
    target = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    grads = []
    for fn in (lambda t: block(t, branch), lambda t: _reference_block(t, decay(), layer_index, branch)):
        xi = x.clone().requires_grad_(True)
        out = fn(xi)
        loss = (out * target).sum() + out.square().sum()
        grads.append([g.clone() for g in torch.autograd.grad(loss, [xi, decay.delta, conv.weight])] + [out])
    for fused, plain in zip(*grads):
        assert torch.allclose(fused, plain, rtol=1e-10, atol=1e-10)
    assert grads[0][1].abs() > 1e-3  # the decay's gradient is not trivially zero
    # The factor e^{-dl} goes to the branch exactly when it can take it (and there is one: l > 0).
    assert (calls[0] is not None) == (scalable and layer_index > 0)
    x64 = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t, delta: block(t, branch), (x64, decay.delta))


def test_fused_block_with_a_frozen_decay_gives_input_gradients_only():
    """Inside an attack the parameters are frozen: no gradient reaches delta, the input's is the formula's."""
    block = ConnectionFactory(resolve_connection("suppression", init_decay=0.2))(block_index=1)
    decay = block.decay_module()
    decay.delta.requires_grad_(False)
    x = torch.randn(3, 6, requires_grad=True)
    branch = torch.sin
    (g,) = torch.autograd.grad(block(x, branch).sum(), x)
    (ref,) = torch.autograd.grad(_reference_block(x, decay(), 1, branch).sum(), x)
    assert torch.allclose(g, ref, atol=1e-6) and decay.delta.grad is None


def test_decay_is_one_shared_parameter_with_a_gradient():
    model = create_model("nrn-16-1-swish", connection="suppression", init_channels=8)
    deltas = decay_parameters(model)
    assert len(deltas) == 1
    assert [k for k in model.state_dict() if "delta" in k] == ["shared_decay.delta"]
    blocks = [m for m in model.modules() if isinstance(m, SuppressionConnection)]
    assert len(blocks) == 3 * 1  # (16 - 4) / 6 = 2 blocks per group, the first of each stays residual
    assert all(b.decay_module() is model.shared_decay for b in blocks)
    model(torch.rand(2, 3, 32, 32)).logsumexp(1).sum().backward()
    assert deltas[0].grad is not None and deltas[0].grad.abs().item() > 0


def test_residual_network_has_no_decay():
    model = create_model("nrn-16-1-swish", connection="residual")
    assert decay_parameters(model) == []
    assert not any(isinstance(m, SuppressionConnection) for m in model.modules())


def test_restart_period_gives_the_design_indices():
    model = create_model("nrn-58-1-swish", connection="suppression", restart_period=3, init_channels=8)
    for stage in model.stages:
        ls = [b.connection.layer_index if isinstance(b.connection, SuppressionConnection) else None for b in stage]
        assert ls == [None, 1, 2, 0, 1, 2, 0, 1, 2]  # l = index in stage mod 3; the first block stays residual
    no_restart = ConnectionConfig(kind="suppression", restart_period=None)
    assert [no_restart.layer_index(i) for i in range(5)] == [0, 1, 2, 3, 4]


def test_blocks_that_change_shape_stay_residual():
    model = create_model("preresnet-20", connection="suppression")
    for stage in model.stages:
        for block in stage:
            if block.shortcut is not None:
                assert isinstance(block.connection, ResidualConnection)
            else:
                assert isinstance(block.connection, SuppressionConnection)
    # preresnet: stage 1 starts with an identity block (suppressed); stages 2 and 3 start by downsampling
    assert [isinstance(s[0].connection, SuppressionConnection) for s in model.stages] == [True, False, False]


@pytest.mark.parametrize("settings", PAPER_SETTINGS)
def test_every_paper_settings_string_parses(settings):
    config, arch = parse_settings(settings, init_decay=0.2)
    if "ShareExpDecay" in settings:
        assert config.kind == "suppression" and config.shared and config.learnable
        assert config.parametrisation == "abs" and config.restart_period == 3
    else:
        assert config.kind == "residual"
    assert arch.pre_activation == ("BnReluConv" in settings)


def test_paper_wrn_command_settings():
    with pytest.warns(UserWarning, match="Ini0.5 disagrees with init_decay=0.2"):
        config, _ = parse_settings("ShareExpDecayLearnDecay_AbsExp_Ini0p5_RestaLayerIdx3", init_decay=0.2,
                                   decay_lr=0.001)
    assert config.init_decay == 0.2 and config.decay_lr == 0.001
    config, _ = parse_settings("ShareExpDecayLearnDecay_AbsExp_Adam_RestaLayerIdx3", init_decay=0.07, decay_lr=0.04)
    assert config.optimizer == "adam" and config.decay_lr == 0.04 and config.init_decay == 0.07


def test_misspelt_settings_fail_listing_known_tokens():
    with pytest.raises(SettingsError) as err:
        parse_settings("ShareExpDecayLearnDecay_AbsExpp_RestaLayerIdx3")
    message = str(err.value)
    assert "'AbsExpp'" in message and "AbsExp" in message and "RestaLayerIdx" in message and "Default" in message


def test_zero_init_abs_decay_warns_that_it_cannot_move():
    with pytest.warns(UserWarning, match="never leaves 0"):
        resolve_connection("ShareExpDecayLearnDecay_AbsExp_Adam_RestaLayerIdx3", init_decay=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_connection(ConnectionConfig(kind="suppression", init_decay=0.0, parametrisation="identity"))


def test_bad_names_and_depths_are_refused():
    with pytest.raises(ValueError, match="unknown"):
        create_model("resnet-18")
    with pytest.raises(ValueError, match="6n \\+ 4"):
        create_model("wrn-29-1-relu")
    with pytest.raises(ValueError, match="6n \\+ 2"):
        create_model("preresnet-111")
    with pytest.raises(ValueError, match="activation"):
        create_model("wrn-16-1-gelu")


def test_parameter_groups_give_the_decay_its_own_group():
    model = create_model("nrn-10-1-swish", connection="suppression")
    main, decay = parameter_groups(model, weight_decay=5e-4)
    assert len(decay) == 1 and decay[0]["weight_decay"] == 0.0 and decay[0]["params"] == [model.shared_decay.delta]
    n_main = sum(p.numel() for g in main for p in g["params"])
    assert n_main + 1 == count_parameters(model)
    assert all(p.ndim > 1 for p in main[0]["params"]) and main[0]["weight_decay"] == 5e-4


def _wrn_block(c_in: int, c: int) -> int:
    """BN(c_in) + conv3x3(c_in->c) + BN(c) + conv3x3(c->c) [+ 1x1 projection]."""
    return 2 * c_in + 9 * c_in * c + 2 * c + 9 * c * c + (c_in * c if c_in != c else 0)


def test_parameter_counts_of_the_paper_models():
    wrn = create_model("nrn-58-1-swish", connection="suppression", init_channels=8)
    # stem 3->8; groups (8, 16, 32) of 9 blocks; final BN(32); linear 32->10; the shared delta
    hand_wrn = (3 * 8 * 9 + _wrn_block(8, 8) * 9 + _wrn_block(8, 16) + _wrn_block(16, 16) * 8
                + _wrn_block(16, 32) + _wrn_block(32, 32) * 8 + 2 * 32 + 32 * 10 + 10 + 1)
    pre = create_model("preresnet-110", connection="suppression", width_factor=4, num_classes=100)
    # stem 3->64; stages (64, 128, 256) of 18 blocks; final BN(256); linear 256->100; the shared delta
    hand_pre = (3 * 64 * 9 + _wrn_block(64, 64) * 18 + _wrn_block(64, 128) + _wrn_block(128, 128) * 17
                + _wrn_block(128, 256) + _wrn_block(256, 256) * 17 + 2 * 256 + 256 * 100 + 100 + 1)
    print(f"\nnrn-58-1-swish (init 8): {count_parameters(wrn):,} parameters (hand count {hand_wrn:,})")
    print(f"preresnet-110 (4x, 100 classes): {count_parameters(pre):,} parameters (hand count {hand_pre:,})")
    assert count_parameters(wrn) == hand_wrn == 215_187
    assert count_parameters(pre) == hand_pre


def test_normalisation_is_a_buffer_and_inputs_are_in_unit_range():
    model = create_model("wrn-16-1-relu", num_classes=100)
    buffers = dict(model.named_buffers())
    assert torch.allclose(buffers["normalize.mean"].flatten(), torch.tensor([0.5071, 0.4865, 0.4409]))
    assert "normalize.mean" not in dict(model.named_parameters())


def test_connection_config_round_trips_through_a_dict():
    config = ConnectionConfig(kind="suppression", init_decay=0.7, decay_scale=0.1, restart_period=None)
    assert ConnectionConfig.from_dict(config.to_dict()) == config
    assert resolve_connection(config.to_dict()) == config
    with pytest.raises(SettingsError, match="unknown connection field"):
        ConnectionConfig.from_dict({"kind": "suppression", "inital_decay": 0.1})


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "mixed"])
def test_dot_of_the_fused_gradients_matches_sum_of_products(layout):
    from robustbench_conn.models.connection import _dot
    a, b = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(2, 3, 4, 5, dtype=torch.float64)
    if layout != "contiguous":
        a = a.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last":
        b = b.contiguous(memory_format=torch.channels_last)
    assert torch.allclose(_dot(a, b), (a * b).sum(), rtol=1e-12)


@pytest.mark.parametrize("overrides", [{}, {"restart_period": None}, {"shared": False}])
@pytest.mark.parametrize("init_channels,batch", [(4, 4), (16, 1)], ids=["weights-scaled", "some-outputs-scaled"])
def test_chained_network_equals_the_blocks_applied_one_by_one(overrides, init_channels, batch):
    """A network's groups run their suppressed blocks as one scaled-domain chain; outputs and gradients (input,
    every delta, weights) equal those of the paper's formula applied block by block. With 16 channels and one image
    the last group's conv2 weight (64x64x3x3) outweighs its output, so that group scales outputs instead."""
    config = dataclasses.replace(resolve_connection("suppression", init_decay=0.3), **overrides)
    torch.manual_seed(0)
    model = create_model("nrn-28-1-swish", init_channels=init_channels, connection=config).double().train()
    with torch.no_grad():  # distinct decays per block when not shared, so a mix-up of blocks would show
        for i, delta in enumerate(decay_parameters(model)):
            delta.add_(0.05 * i)

    def reference(x):
        x = model.stem(model.normalize(x))
        for group in model.stages:
            for block in group:
                conn = block.connection
                x = (_reference_block(x, conn.decay_module()(), conn.layer_index, block.residual_branch)
                     if isinstance(conn, SuppressionConnection) else block(x))
        return model.fc(model.pool(model.act(model.bn(x))).flatten(1))

    x = torch.rand(batch, 3, 32, 32, dtype=torch.float64)
    params = decay_parameters(model) + [model.stem.weight, model.stages[2][3].conv1.weight,
                                        model.stages[1][2].conv2.weight, model.stages[2][2].conv2.weight]
    results = []
    for forward in (model, reference):
        torch.manual_seed(1)
        xi = x.clone().requires_grad_(True)
        out = forward(xi)
        results.append([out, *torch.autograd.grad(out.logsumexp(1).sum() + out[:, 0].sum(), [xi, *params])])
    for chained, plain in zip(*results):
        assert torch.allclose(chained, plain, rtol=1e-9, atol=1e-12)


def test_gradient_for_the_input_only_skips_the_decay_dot_products(monkeypatch):
    """An attack library that leaves the parameters trainable asks autograd for the images' gradient only: the
    decay's dot products are skipped and that gradient is unchanged; a backward that wants the decay computes them."""
    from robustbench_conn.models import connection
    calls = []
    real_dot = connection._dot
    monkeypatch.setattr(connection, "_dot", lambda a, b: calls.append(a.shape) or real_dot(a, b))
    torch.manual_seed(0)
    model = create_model("nrn-28-1-swish", init_channels=4, connection="suppression", init_decay=0.3)
    model = model.double().eval()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    (input_only,) = torch.autograd.grad(model(x).logsumexp(1).sum(), x)
    assert calls == []
    with_decay = torch.autograd.grad(model(x).logsumexp(1).sum(), [x, *decay_parameters(model)])
    assert calls and torch.equal(input_only, with_decay[0])
