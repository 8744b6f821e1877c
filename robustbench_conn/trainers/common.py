"""What every trainer shares: the run folder, checkpoints and resume, EMA, schedules, distributed setup, metrics.

A run folder holds::

    config.yaml           the resolved configuration (every flag, after the YAML file and the command line)
    metrics.csv           one row per epoch
    checkpoints/last.pt   everything needed to resume (weights, optimizers, scheduler, EMA, RNG, epoch)
    checkpoints/best.pt   the same, at the epoch with the best validation robust (or clean) accuracy
    model.safetensors     the final EMA weights, what evaluation reads
    model_card.json       how to rebuild the network, the recipe, the data, the git commit

Only rank 0 writes. Every file is written to a temporary name and renamed.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn

from ..io import (FINAL_WEIGHTS, CheckpointError, atomic_path, atomic_save, atomic_write_text, git_commit,
                  load_checkpoint, save_weights, write_model_card)
from ..models import learned_decay, parameter_groups

__all__ = ["TrainError", "NonFiniteLoss", "check_finite", "Tracker", "evaluate_accuracy", "RunFolder", "ModelEma",
           "Distributed", "start_run", "build_optimizers", "build_scheduler", "random_crop_flip", "config_hash",
           "capture_rng", "restore_rng", "training_state", "restore_training_state", "autocast_for", "MetricsLog"]

# Fields that do not change what a run computes: two runs that differ only in these share a config hash.
_NON_RECIPE_KEYS = {"seed", "out", "log_dir", "desc", "device", "resume", "overwrite", "config", "tracking",
                    "data_dir", "aux_data", "num_workers"}


class TrainError(ValueError):
    """A training run that cannot start or go on; the message says why and what to do."""


class NonFiniteLoss(TrainError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def check_finite(loss: torch.Tensor, epoch: int, step: int, checkpoint: Path) -> None:
    """Stop before a NaN or infinite loss updates the weights, saying where, and what to try."""
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"the loss became {float(loss.detach())} at epoch {epoch}, step {step}; training stopped "
                            f"and {checkpoint} keeps the last good epoch: lower --lr or --decay-lr, or set "
                            "--clip-grad.")


def config_hash(config: Mapping[str, Any]) -> str:
    """A short hash of the recipe: the config without the seed, paths and device."""
    recipe = {k: v for k, v in sorted(config.items()) if k not in _NON_RECIPE_KEYS}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunFolder:
    """The folder of one run; refuses to reuse an existing run unless told to resume or overwrite."""

    def __init__(self, path: str | os.PathLike, *, resume: bool, overwrite: bool, is_writer: bool = True):
        self.path = Path(path)
        self.is_writer = is_writer
        has_run = (self.path / "config.yaml").exists() or (self.path / "checkpoints").exists()
        if resume and overwrite:
            raise TrainError("--resume and --overwrite exclude each other: resume continues a run, overwrite "
                             "starts it again.")
        if resume and not (self.path / "checkpoints" / "last.pt").exists():
            raise TrainError(f"--resume: {self.path} holds no checkpoints/last.pt to resume from.")
        if has_run and not (resume or overwrite):
            raise TrainError(f"{self.path} already holds a run: pass --resume to continue it, --overwrite to train "
                             "it again in place, or another --out.")
        if self.path.exists() and not self.path.is_dir():
            raise TrainError(f"--out {self.path} is a file, not a folder.")
        self.resume = resume

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def prepare(self, config: Mapping[str, Any]) -> None:
        if not self.is_writer:
            return
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(dict(config), sort_keys=False))

    def save_checkpoint(self, state: Mapping[str, Any], name: str) -> None:
        if self.is_writer:
            atomic_save(dict(state), self.checkpoints / f"{name}.pt")

    def save_epoch(self, state: Mapping[str, Any], is_best: bool) -> None:
        """``last.pt`` after every epoch, and the same state as ``best.pt`` when this epoch is the best so far."""
        self.save_checkpoint(state, "last")
        if is_best:
            self.save_checkpoint(state, "best")

    def load_checkpoint(self, name: str = "last") -> dict:
        state = load_checkpoint(self.checkpoints / f"{name}.pt")
        for key in ("model", "optimizer", "epoch", "rng"):
            if key not in state:
                raise CheckpointError(f"{self.checkpoints / (name + '.pt')} lacks {key!r}: not a training "
                                      "checkpoint of this project.")
        return state

    def save_final(self, model: nn.Module, card: Mapping[str, Any]) -> None:
        if not self.is_writer:
            return
        save_weights(model.state_dict(), self.path / FINAL_WEIGHTS,
                     metadata={"model": str(card.get("model")), "run_id": str(card.get("run_id"))})
        write_model_card(self.path, card)


class MetricsLog:
    """``metrics.csv``, one row per epoch; on resume, rows after the resumed epoch are dropped."""

    def __init__(self, path: Path, is_writer: bool, keep_until_epoch: int | None = None):
        self.path, self.is_writer = path, is_writer
        self.rows: list[dict] = []
        if keep_until_epoch is not None and path.exists():
            with open(path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= keep_until_epoch]

    def append(self, row: Mapping[str, Any]) -> None:
        self.rows.append(dict(row))
        if not self.is_writer:
            return
        fields = list(dict.fromkeys(k for r in self.rows for k in r))
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)


class ModelEma(nn.Module):
    """Exponential moving average of the weights; buffers (BatchNorm statistics) are copied.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, as in the unlabeled-data
    adversarial-training code this follows, so early averages are not dominated by the random init.
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        n = int(self.updates)
        decay = min(self.decay, (1 + n) / (10 + n))
        for ema_p, p in zip(self.module.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1 - decay)
        self.copy_buffers(model)

    @torch.no_grad()
    def copy_buffers(self, model: nn.Module) -> None:
        for ema_b, b in zip(self.module.buffers(), model.buffers()):
            ema_b.copy_(b)


@dataclass
class Distributed:
    """The process group under ``torchrun`` (or a single process); only rank 0 writes files."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, device: str) -> "Distributed":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        return cls(rank, world_size, local_rank)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> torch.device:
        if requested.startswith("cuda") and self.enabled:
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device(requested)

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(values)
        return values

    @torch.no_grad()
    def average_buffers(self, module: nn.Module) -> None:
        """Average floating-point buffers (BatchNorm running statistics) over ranks, as timm's ``--dist-bn reduce``:
        each rank's statistics come from its own shard, and the saved model must not depend on which rank saved it."""
        if not self.enabled:
            return
        for buffer in module.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer.div_(self.world_size)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def start_run(config: Mapping[str, Any]) -> tuple[Distributed, torch.device, RunFolder]:
    """How every trainer opens: the process group, the device (checked), the run folder (which refuses to clobber a
    previous run unless resuming or overwriting), and the torch, Python and NumPy seeds."""
    distributed = Distributed.from_env(config["device"])
    device = distributed.device(config["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda was asked for but no CUDA device is available: use --device cpu.")
    run = RunFolder(config["out"], resume=config.get("resume", False), overwrite=config.get("overwrite", False),
                    is_writer=distributed.is_writer)
    torch.manual_seed(config["seed"])
    random.seed(config["seed"])
    np.random.seed(config["seed"] % 2**32)
    return distributed, device, run


def build_optimizers(model: nn.Module, *, lr: float, momentum: float, weight_decay: float, nesterov: bool,
                     decay_lr: float, decay_optimizer: str
                     ) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    """SGD for the weights (no weight decay on biases and norms); the connection's decay always at ``decay_lr``:
    by its own Adam (``decay_optimizer='adam'``) or as its own group of the SGD optimizer (``'main'``)."""
    main_groups, decay_groups = parameter_groups(model, weight_decay=weight_decay)
    if decay_groups and decay_optimizer == "main":
        main_groups += [dict(group, lr=decay_lr) for group in decay_groups]
        decay_groups = []
    optimizer = torch.optim.SGD(main_groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    decay_opt = torch.optim.Adam(decay_groups, lr=decay_lr, weight_decay=0.0) if decay_groups else None
    return optimizer, decay_opt


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, epochs: int, steps_per_epoch: int,
                    warmup_epochs: float = 0.0) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedules: ``step`` (x0.1 at 50% and 75% of training), ``cosine``, ``cosine-with-warmup``, ``none``."""
    total = max(1, epochs * steps_per_epoch)
    warmup = int(warmup_epochs * steps_per_epoch) if name == "cosine-with-warmup" else 0

    def factor(step: int) -> float:
        if name == "none":
            return 1.0
        if name == "step":
            return 0.01 if step >= 0.75 * total else 0.1 if step >= 0.5 * total else 1.0
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    if name not in ("step", "cosine", "cosine-with-warmup", "none"):
        raise TrainError(f"scheduler {name!r} is unknown: use step, cosine, cosine-with-warmup or none.")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def random_crop_flip(images: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """The standard CIFAR augmentation on a whole batch: random crop from a zero-padded image, random h-flip."""
    n, c, h, w = images.shape
    padded = nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=images.device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=images.device)
    rows = dy + torch.arange(h, device=images.device).view(1, h, 1)
    cols = dx + torch.arange(w, device=images.device).view(1, 1, w)
    flip = torch.rand(n, 1, 1, device=images.device) < 0.5
    cols = torch.where(flip, dx + (w - 1) - torch.arange(w, device=images.device).view(1, 1, w), cols)
    batch = torch.arange(n, device=images.device).view(n, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def capture_rng(device: torch.device) -> dict:
    """Every generator a step may draw from, as plain data: torch's (CPU and CUDA), Python's and numpy's (timm's
    RandAugment and Mixup draw from the last two)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))


def training_state(*, model: nn.Module, optimizer, scheduler, decay_optimizer, ema: "ModelEma | None", epoch: int,
                   best: float, device: torch.device, config: Mapping[str, Any]) -> dict:
    """Everything a resumed run needs to continue bit for bit, as a checkpoint dict."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "decay_optimizer": decay_optimizer.state_dict() if decay_optimizer is not None else None,
            "ema": ema.state_dict() if ema is not None else None, "epoch": epoch, "best": best,
            "rng": capture_rng(device), "config": dict(config)}


def restore_training_state(state: Mapping[str, Any], *, model: nn.Module, optimizer, scheduler, decay_optimizer,
                           ema: "ModelEma | None", device: torch.device) -> tuple[int, float]:
    """Load a :func:`training_state` checkpoint into the live objects; returns (next epoch, best score so far)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if decay_optimizer is not None:
        decay_optimizer.load_state_dict(state["decay_optimizer"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    restore_rng(state["rng"], device)
    return int(state["epoch"]) + 1, float(state["best"])


def autocast_for(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when asked; a no-op elsewhere (CPU runs stay in float32)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def run_card(config: Mapping[str, Any], model: nn.Module, connection: Mapping[str, Any], model_kwargs: Mapping,
             num_classes: int, recipe_keys: Iterable[str], data: Mapping[str, Any], run_dir: Path) -> dict:
    """The model card: how to rebuild the network, what recipe and data trained it, and where it came from."""
    return {
        "model": config["model"],
        "num_classes": num_classes,
        "model_kwargs": dict(model_kwargs),
        "connection": dict(connection),
        "learned_decay": learned_decay(model),
        "recipe": {k: config[k] for k in recipe_keys if k in config},
        "data": dict(data),
        "run_id": run_dir.name,
        "config_hash": config_hash(config),
        "seed": config.get("seed"),
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
    }


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, data, attack, batch_size: int, device: torch.device,
              dist: Distributed, amp: bool) -> float:
    """Accuracy (under ``attack`` when given) on this rank's shard of ``data``, summed over ranks."""
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    indices = torch.arange(dist.rank, len(data), dist.world_size)
    for start in range(0, len(indices), batch_size):
        x, y = data.batch(indices[start:start + batch_size])
        x, y = x.to(device), y.to(device)
        with autocast_for(device, amp):
            if attack is not None:
                with torch.enable_grad():
                    x = attack(model, x, y)
            counts[0] += (model(x).argmax(1) == y).sum()
        counts[1] += len(y)
    counts = dist.all_reduce_sum(counts)
    return float(counts[0] / counts[1]) if counts[1] else float("nan")


class Tracker:
    """Metrics to TensorBoard or comet_ml when asked for and installed (the ``tracking`` extra)."""

    def __init__(self, kind: str, run_dir: Path, is_writer: bool):
        self.kind, self.writer, self.experiment = kind, None, None
        if not is_writer or kind in (None, "none"):
            return
        try:
            if kind == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            elif kind == "comet":
                import comet_ml
                self.experiment = comet_ml.Experiment(project_name="robustbench-conn")
            else:
                raise TrainError(f"--tracking {kind!r} is unknown: use none, tensorboard or comet.")
        except ImportError:
            raise TrainError(f"--tracking {kind} needs the tracking extra: pip install 'robustbench-conn[tracking]'.") \
                from None

    def log(self, row: Mapping[str, Any], epoch: int) -> None:
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "epoch"}
        if self.writer is not None:
            for key, value in numbers.items():
                self.writer.add_scalar(key, value, epoch)
        if self.experiment is not None:
            self.experiment.log_metrics(numbers, epoch=epoch)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.experiment is not None:
            self.experiment.end()
