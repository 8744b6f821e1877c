"""The ImageNet conn_* models in timm's registry: same function as timm's twins, one shared delta, the right blocks.

CPU only, no download: twins are built with pretrained=False and their state dicts loaded into the conn_* models.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import timm

import robustbench_conn.models  # noqa: F401  (registers the conn_* models in timm)
from robustbench_conn.models.connection import ResidualConnection, SuppressionConnection
from robustbench_conn.models.imagenet import (CONN_MODELS, SHARED_DECAY_KEY, connection_blocks, create_twin,
                                              load_twin_state_dict, suppressed_blocks)

SETTINGS = "ShareExpDecayLearnDecay_AbsExp_Adam_RestaLayerIdx3"
RES = 64  # every model accepts 64x64; LeViT is built for it with img_size=64

# name -> (number of blocks carrying the suppression connection, which ones, by prefix of their module name)
EXPECTED = {
    "conn_convnext_small": (27, ["stages.2.blocks."]),
    "conn_convnext_small_narrow": (27, ["stages.2.blocks."]),
    # 4+4+4 blocks, both residuals each, plus the MLP residual after the subsample of stages 2 and 3
    "conn_levit_128": (14, ["stages.0.blocks.", "stages.1.blocks.", "stages.2.blocks.",
                            "stages.1.downsample", "stages.2.downsample"]),
    "conn_levit_256d": (20, ["stages.0.blocks.", "stages.1.blocks.", "stages.2.blocks.",
                             "stages.1.downsample", "stages.2.downsample"]),
    # every bottleneck but the first (projection) one of each stage: 2+3+5+2 and 2+2+2+2
    "conn_preresnet50d": (12, ["stages.0.blocks.", "stages.1.blocks.", "stages.2.blocks.", "stages.3.blocks."]),
    "conn_preresnet38d": (8, ["stages.0.blocks.", "stages.1.blocks.", "stages.2.blocks.", "stages.3.blocks."]),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small tensors: one intra-op thread is as fast, and far faster on a machine shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _shape_kwargs(name: str) -> dict:
    return {"img_size": RES} if "levit" in name else {}


@pytest.fixture(scope="module", params=CONN_MODELS)
def models(request):
    """(name, twin, residual conn model, suppression conn model) with the twin's weights loaded, in eval mode."""
    name = request.param
    kw = _shape_kwargs(name)
    torch.manual_seed(0)
    twin = create_twin(name, pretrained=False, **kw).eval()
    state = twin.state_dict()
    residual = timm.create_model(name, pretrained=False, **kw)
    load_twin_state_dict(residual, state)
    suppression = timm.create_model(name, pretrained=False, connection=SETTINGS, init_decay=0.7, **kw)
    assert suppression.shared_decay.delta.item() == pytest.approx(0.7)
    load_twin_state_dict(suppression, state)
    assert suppression.shared_decay.delta.item() == pytest.approx(0.7)  # the twin has no delta: ours is kept
    return name, twin, residual.eval(), suppression.eval()


def _input(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, RES, RES, generator=torch.Generator().manual_seed(1))


def test_registered_in_timm():
    names = set(timm.list_models("conn_*"))
    assert names == set(CONN_MODELS)


def test_residual_same_function_as_timm(models):
    name, twin, residual, _ = models
    assert list(residual.state_dict()) == list(twin.state_dict())
    assert not suppressed_blocks(residual)
    x = _input()
    with torch.no_grad():
        diff = (residual(x) - twin(x)).abs().max().item()
    assert diff < 1e-5, f"{name}: residual differs from timm by {diff}"


def test_suppression_with_zero_decay_is_residual(models):
    name, twin, _, suppression = models
    x = _input()
    with torch.no_grad():
        suppression.shared_decay.delta.fill_(0.0)
        try:
            diff = (suppression(x) - twin(x)).abs().max().item()
        finally:
            suppression.shared_decay.delta.fill_(0.7)
        moved = (suppression(x) - twin(x)).abs().max().item()
    assert diff < 1e-5, f"{name}: suppression with d=0 differs from timm by {diff}"
    assert moved > 1e-6, f"{name}: suppression with d>0 is still the residual network"


def test_one_shared_delta_receives_gradient(models):
    name, _, _, suppression = models
    deltas = [(n, p) for n, p in suppression.named_parameters() if n.endswith("delta")]
    assert [n for n, _ in deltas] == [SHARED_DECAY_KEY]
    assert [k for k in suppression.state_dict() if k.endswith("delta")] == [SHARED_DECAY_KEY]
    assert SHARED_DECAY_KEY in suppression.no_weight_decay()
    suppression.zero_grad(set_to_none=True)
    out = suppression(_input())
    out.square().mean().backward()
    grad = suppression.shared_decay.delta.grad
    assert grad is not None and torch.isfinite(grad) and grad.abs() > 0, f"{name}: delta got gradient {grad}"
    suppression.zero_grad(set_to_none=True)


def test_suppressed_blocks_are_the_designed_ones(models):
    name, _, _, suppression = models
    count, prefixes = EXPECTED[name]
    blocks = suppressed_blocks(suppression)
    assert len(blocks) == count, f"{name}: {len(blocks)} suppressed blocks, expected {count}: {blocks}"
    for prefix in prefixes:
        assert any(b.startswith(prefix) for b in blocks), f"{name}: nothing suppressed under {prefix}"
    assert all(any(b.startswith(p) for p in prefixes) for b in blocks)
    # every connection shares the network's one decay module; l restarts every 3 blocks of a stage
    decay = suppression.shared_decay
    for block_name, conn in connection_blocks(suppression).items():
        assert isinstance(conn, SuppressionConnection)
        assert conn.decay_module() is decay
        if ".blocks." in block_name:
            assert conn.layer_index == int(block_name.rsplit(".", 1)[1]) % 3
        else:  # LeViT's subsample MLP: first residual of its stage
            assert conn.layer_index == 0


def test_designed_blocks_by_architecture():
    """Independent of naming: ConvNeXt-S stage 3 has 27 blocks; in PreResNet the projection blocks stay residual."""
    m = timm.create_model("conn_preresnet38d", connection="suppression", init_decay=0.7)
    for stage in m.stages:
        first, *rest = stage.blocks
        assert first.downsample is not None and not isinstance(getattr(first, "connection", None),
                                                                SuppressionConnection)
        assert all(b.downsample is None and isinstance(b.connection, SuppressionConnection) for b in rest)
    assert sum(len(s.blocks) for s in m.stages) == 12


def test_settings_string_and_family_defaults():
    kw = _shape_kwargs("conn_levit_256d")
    m = timm.create_model("conn_levit_256d", connection=SETTINGS, init_decay=0.7, **kw)
    c = m.connection_config
    assert (c.kind, c.parametrisation, c.restart_period, c.optimizer, c.init_decay) == (
        "suppression", "abs", 3, "adam", 0.7)
    assert c.decay_scale == 0.1  # research LeViT: d = |0.1 delta|
    assert m.shared_decay().item() == pytest.approx(0.07)
    # explicit decay_scale wins; restart_period 0 means no restart (timm.create_model drops None values)
    m = timm.create_model("conn_levit_256d", connection="suppression", decay_scale=1.0, restart_period=0, **kw)
    assert m.connection_config.decay_scale == 1.0 and m.connection_config.restart_period is None
    assert max(c.layer_index for c in connection_blocks(m).values()) == 7  # 8 blocks in stage 2
    # a config object is taken as given
    m = timm.create_model("conn_levit_256d", connection=c.__class__(kind="suppression", init_decay=0.3), **kw)
    assert m.connection_config.decay_scale == 1.0
    # ResNet/ConvNeXt families keep scale 1; residual by default
    m = timm.create_model("conn_preresnet38d")
    assert m.connection_config.kind == "residual" and not hasattr(m, "shared_decay")
    assert all(isinstance(c, ResidualConnection) for c in connection_blocks(m).values())


def test_unknown_settings_token_is_rejected():
    with pytest.raises(ValueError, match="known tokens"):
        timm.create_model("conn_preresnet38d", connection="ShareExpDecay_Bogus")


def test_zero_abs_decay_warns():
    with pytest.warns(UserWarning, match="never leaves 0"):
        timm.create_model("conn_preresnet38d", connection=SETTINGS, init_decay=0.0)


def test_pretrained_loads_twin_weights_from_file(tmp_path):
    """timm's own pretrained path (here a local file in place of the hub) loads twin weights, delta kept."""
    torch.manual_seed(3)
    twin = create_twin("conn_preresnet38d").eval()
    path = tmp_path / "twin.pth"
    torch.save(twin.state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = timm.create_model("conn_preresnet38d", pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                              connection="suppression", init_decay=0.0, parametrisation="identity").eval()
    assert m.shared_decay.delta.item() == 0.0
    x = _input(1)
    with torch.no_grad():
        assert (m(x) - twin(x)).abs().max().item() < 1e-5


def test_train_mode_drop_path_matches_twin():
    """With drop-path and BN in training mode, the residual model still draws and computes as timm's does."""
    kw = dict(drop_path_rate=0.2, **_shape_kwargs("conn_levit_128"))
    torch.manual_seed(0)
    twin = create_twin("conn_levit_128", **kw).train()
    m = timm.create_model("conn_levit_128", connection="suppression", init_decay=0.0, parametrisation="identity",
                          **kw).train()
    load_twin_state_dict(m, twin.state_dict())
    x = _input()
    torch.manual_seed(5)
    a = twin(x)
    torch.manual_seed(5)
    b = m(x)
    assert (a - b).abs().max().item() < 1e-5


def test_levit_fused_block_equals_two_connection_calls():
    """The fused LeViT block (scale once, two residuals, unscale once) is the two suppression residuals in turn."""
    torch.manual_seed(0)
    m = timm.create_model("conn_levit_128", connection=SETTINGS, init_decay=3.0, img_size=RES).eval()
    with torch.no_grad():  # timm zero-inits the last BN of each branch: make the branches non-zero
        for bn in (mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm1d)):
            bn.weight.normal_()
    x = torch.randn(2, 16, 128)
    for i in (0, 1, 2):
        block = m.stages[0].blocks[i]
        conn = block.connection
        assert conn.layer_index == i
        with torch.no_grad():
            fused = block(x)
            unfused = conn(conn(x, block.attn_branch), block.mlp_branch)
        assert (unfused - x).abs().max() > 0.1  # the branches and the decay do something
        assert torch.allclose(fused, unfused, rtol=1e-5, atol=1e-5), (i, (fused - unfused).abs().max())


def test_features_only():
    """LeViT's feature wrapper keeps the shared delta; ResNetV2/ConvNeXt refuse rather than drop it silently."""
    m = timm.create_model("conn_levit_256d", features_only=True, connection="suppression", img_size=RES).eval()
    assert [n for n, _ in m.named_parameters() if n.endswith("delta")] == ["model." + SHARED_DECAY_KEY]
    assert len(m(_input())) == 3
    assert len(timm.create_model("conn_preresnet38d", features_only=True)(_input())) == 5
    with pytest.raises(ValueError, match="features_only"):
        timm.create_model("conn_preresnet38d", features_only=True, connection="suppression")
