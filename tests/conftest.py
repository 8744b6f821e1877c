"""Shared test fixtures: the real CIFAR-10 copy in ../shared, and CPU-only determinism."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = REPO.parent / "shared" / "data" / "cifar10"

# Two threads (CI's cores) unless OMP_NUM_THREADS says otherwise: on a loaded machine more threads than free cores
# slow torch down by orders of magnitude.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


@pytest.fixture
def cifar10_dir() -> Path:
    """The shared CIFAR-10 npz files, or a skip that says why."""
    if not (SHARED_CIFAR10 / "test.npz").exists():
        pytest.skip(f"real CIFAR-10 npz files not found at {SHARED_CIFAR10} (clone the project beside ../shared)")
    return SHARED_CIFAR10
collect_ignore = ["ddp_check.py"]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is faster, and far faster when other jobs share the cores (no OpenMP spinning)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def kill_and_resume(tmp_path, monkeypatch):
    """``kill_and_resume(train)`` runs ``train(out, *extra) -> exit status`` three times: straight through into
    ``tmp_path/straight``; into ``tmp_path/killed``, interrupted (exit 130) right after the epoch-1 checkpoint;
    and there again with ``--resume``. Returns the two folders and the largest weight difference between them."""
    from robustbench_conn.io import load_weights
    from robustbench_conn.trainers.common import RunFolder

    def run(train) -> tuple[Path, Path, float]:
        straight, killed = tmp_path / "straight", tmp_path / "killed"
        assert train(straight) == 0
        save = RunFolder.save_checkpoint

        def save_then_die(self, state, name):
            save(self, state, name)
            if name == "last" and state["epoch"] == 1:
                raise KeyboardInterrupt()

        with monkeypatch.context() as patched:
            patched.setattr(RunFolder, "save_checkpoint", save_then_die)
            assert train(killed) == 130
        assert not (killed / "model.safetensors").exists()
        assert train(killed, "--resume") == 0
        a, b = load_weights(straight / "model.safetensors"), load_weights(killed / "model.safetensors")
        assert a.keys() == b.keys()
        return straight, killed, max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    return run


@pytest.fixture
def free_port() -> int:
    """A TCP port nobody listens on now (for torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
