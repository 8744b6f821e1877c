"""Shared test fixtures: the real CIFAR-10 copy in ../shared, and CPU-only determinism."""
from __future__ import annotations

import os
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
