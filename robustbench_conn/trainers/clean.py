"""Standard (clean) training of residual and suppression networks, in two worlds with one loop.

- **arrays** (``--data cifar10|cifar100|svhn|npz|digits``, in memory): the paper's CIFAR-100 PreResNet-110 (4x)
  recipe: SGD + momentum, per-step cosine with warmup, pad-4 crop + flip on the whole batch, label smoothing,
  optional SAM/ASAM, optional EMA, the decay on its own Adam (all of it from :mod:`.common`, shared with
  ``train-robust``).
- **folders** (``--data imagefolder``, ImageNet layout ``DATA_DIR/train`` and ``DATA_DIR/val`` (or ``test``)):
  timm's machinery: ``create_transform`` (RandAugment, random erasing, interpolation), ``Mixup``/CutMix with
  ``SoftTargetCrossEntropy``, ``create_optimizer_v2``, ``create_scheduler_v2``, ``ModelEmaV3``,
  ``dispatch_clip_grad`` (AGC), ``distribute_bn``; the models are the ``conn_*`` models of timm's registry.

Both share the run folder, metrics, checkpoints and bit-exact resume, the NaN stop, rank-0 writes and DDP under
``torchrun`` with :func:`robustbench_conn.trainers.adversarial.train`. The final model is the EMA (when on), saved
as safetensors with a model card, after a PGD check (L-inf, ``--eps`` / ``--eps-iter`` / ``--nb-iter``; the paper's
PGD-7 at 8/255) on the test split.

Batch size: ``batch_size`` is GLOBAL (split evenly over the ranks), as in ``train-robust``.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..attacks import PGD
from ..data import MixedBatchSampler, check_num_classes, get_dataset
from ..models import create_model, decay_parameters, learned_decay
from ..models.cifar import Normalize
from ..models.connection import ConnectionConfig
from .adversarial import build_connection, load_training_data
from .common import (Distributed, MetricsLog, ModelEma, TrainError, Tracker, autocast_for,
                     build_optimizers, build_scheduler, check_finite, evaluate_accuracy, random_crop_flip,
                     restore_training_state, run_card, start_run, training_state)
from .sam import SAM

__all__ = ["train", "RECIPE_KEYS"]

RECIPE_KEYS = ("model", "width_factor", "init_channels", "img_size", "drop_path", "epochs", "batch_size", "opt",
               "lr", "momentum", "nesterov", "weight_decay", "opt_eps", "opt_betas", "sched", "warmup_epochs",
               "warmup_lr", "min_lr", "cooldown_epochs", "lr_noise", "lr_noise_pct", "lr_noise_std", "decay_epochs",
               "decay_rate", "smoothing", "aa", "reprob", "remode", "recount", "train_interpolation",
               "color_jitter", "mixup", "cutmix", "mixup_prob", "mixup_switch_prob", "mixup_mode", "clip_grad",
               "clip_mode", "model_ema_decay", "minimizer", "rho", "eta", "amp", "dist_bn", "eps", "eps_iter",
               "nb_iter", "settings", "init_decay", "decay_lr", "notes")


# ------------------------------------------------------------------------------------------------ the worlds

class _Schedule:
    """One interface over the two schedulers: ``after_update(n)`` per optimiser step, ``after_epoch(e, metric)``."""

    def __init__(self, scheduler, per_step: bool):
        self.scheduler, self.per_step = scheduler, per_step

    def after_update(self, num_updates: int) -> None:
        if self.per_step:
            self.scheduler.step()
        else:
            self.scheduler.step_update(num_updates=num_updates)

    def after_epoch(self, epoch: int, metric: float | None) -> None:
        if not self.per_step:
            self.scheduler.step(epoch, metric)

    def resumed_at(self, epoch: int) -> None:
        if not self.per_step and epoch > 0 and not hasattr(self.scheduler, "lr_scheduler"):  # plateau: no metric
            self.scheduler.step(epoch)  # as timm's train.py does on resume

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


class _ArrayWorld:
    """CIFAR-style data held in memory; the shared SGD/cosine machinery of :mod:`.common`."""

    kind = "arrays"

    def __init__(self, config: dict, dist: Distributed, device: torch.device):
        self.config, self.dist, self.device = config, dist, device
        self.train_set, carved_val, self.num_labeled = load_training_data(config)
        # validation: carved from the training set with --val-size, else the test split (as the paper's Train.py)
        self.test_set = get_dataset(config["data"], "test", config.get("data_dir"))
        self.val_set = carved_val if len(carved_val) else self.test_set
        self.num_classes = self.train_set.num_classes
        if config["batch_size"] > self.num_labeled:
            raise TrainError(f"--batch-size {config['batch_size']} is larger than the {self.num_labeled} training "
                             "images: lower it or use more data.")
        self.sampler = MixedBatchSampler(self.num_labeled, config["batch_size"], seed=config["seed"],
                                         rank=dist.rank, world_size=dist.world_size)
        self.steps_per_epoch = _limit(len(self.sampler), config)

    def build_model(self, connection: ConnectionConfig) -> tuple[nn.Module, dict]:
        kwargs = {"init_channels": self.config["init_channels"], "width_factor": self.config["width_factor"] or 1}
        model = create_model(self.config["model"], num_classes=self.num_classes, connection=connection, **kwargs)
        check_num_classes(self.train_set, model.num_classes)
        return model, kwargs

    def make_optimizers(self, model: nn.Module, connection: ConnectionConfig):
        c = self.config
        if c["opt"] != "sgd":
            raise TrainError(f"--opt {c['opt']} is for --data imagefolder (timm's optimizer factory); in-memory "
                             "CIFAR training uses SGD (--opt SGD).")
        return build_optimizers(model, lr=c["lr"], momentum=c["momentum"], weight_decay=c["weight_decay"],
                                nesterov=c["nesterov"], decay_lr=connection.decay_lr,
                                decay_optimizer=connection.optimizer)

    def make_schedule(self, optimizer) -> _Schedule:
        c = self.config
        name = {"cos": "cosine", "cosine": "cosine", "step": "step", "none": "none"}.get(c["sched"])
        if name is None:
            raise TrainError(f"--sched {c['sched']} is for --data imagefolder; in-memory training takes cosine, "
                             "step or none.")
        if name == "cosine" and c["warmup_epochs"]:
            name = "cosine-with-warmup"
        return _Schedule(build_scheduler(optimizer, name, c["epochs"], self.steps_per_epoch, c["warmup_epochs"]),
                         per_step=True)

    def make_ema(self, model: nn.Module):
        decay = self.config.get("model_ema_decay")
        if not decay:
            return None
        ema = ModelEma(model, decay)
        ema.step = lambda m, updates: ema.update(m)
        return ema

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        self.sampler.set_epoch(epoch)
        for i, indices in enumerate(self.sampler):
            if i >= self.steps_per_epoch:
                break
            x, y = self.train_set.batch(indices)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.config.get("augment", True):
                x = random_crop_flip(x)
            yield x, y, y

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target, label_smoothing=self.config["smoothing"])

    def for_eval(self, model: nn.Module) -> nn.Module:
        return model  # the CIFAR networks normalise inside

    def evaluate(self, model: nn.Module, split: str, attack: PGD | None = None, limit: int | None = None) -> dict:
        data = self.val_set if split == "val" else self.test_set
        if limit:
            data = data.subset(torch.arange(min(limit, len(data))))
        batch = self.config.get("eval_batch_size") or self.config["batch_size"]
        acc = evaluate_accuracy(model, data, attack, batch, self.device, self.dist, self.config.get("amp", False))
        return {"acc": acc}

    def data_card(self) -> dict:
        return {"name": self.config["data"], "source": self.train_set.source, "num_labeled": self.num_labeled,
                "val": "carved" if self.val_set is not self.test_set else "test", "val_size": len(self.val_set)}


class _FolderWorld:
    """ImageNet layout on disk; timm's transforms, mixup, optimizer, scheduler and EMA."""

    kind = "folders"

    def __init__(self, config: dict, dist: Distributed, device: torch.device):
        self.config, self.dist, self.device = config, dist, device
        root = Path(config["data_dir"])
        if not (root / "train").is_dir():
            raise TrainError(f"--data imagefolder needs {root}/train/CLASS/IMAGE (and val/ or test/ beside it).")
        if not ((root / "val").is_dir() or (root / "test").is_dir()):
            raise TrainError(f"--data imagefolder needs a held-out split beside {root}/train: {root}/val or "
                             f"{root}/test.")
        self.train_set = get_dataset("imagefolder", "train", str(root))
        self.val_set = get_dataset("imagefolder", "test", str(root))
        self.num_classes = self.train_set.num_classes
        if self.val_set.num_classes != self.num_classes:
            raise TrainError(f"{self.val_set.source} has {self.val_set.num_classes} classes, {self.train_set.source} "
                             f"{self.num_classes}: the two splits must have the same class folders.")
        if config["batch_size"] % dist.world_size:
            raise TrainError(f"--batch-size {config['batch_size']} (global) does not split evenly over "
                             f"{dist.world_size} processes.")
        self.local_batch = config["batch_size"] // dist.world_size
        if self.local_batch > len(self.train_set) // dist.world_size:
            raise TrainError(f"--batch-size {config['batch_size']} is larger than the {len(self.train_set)} training "
                             "images: lower it or use more data.")
        mixing = config["mixup"] > 0 or config["cutmix"] > 0 or config.get("cutmix_minmax") is not None
        if mixing and self.local_batch % 2:
            raise TrainError(f"mixup/cutmix need an even batch per process, got {self.local_batch}.")
        self.sampler = torch.utils.data.DistributedSampler(self.train_set, num_replicas=dist.world_size,
                                                           rank=dist.rank, shuffle=True, seed=config["seed"],
                                                           drop_last=True)
        self.steps_per_epoch = _limit(len(self.sampler) // self.local_batch, config)
        self.mixup = None
        if mixing:
            from timm.data import Mixup
            self.mixup = Mixup(mixup_alpha=config["mixup"], cutmix_alpha=config["cutmix"],
                               cutmix_minmax=config.get("cutmix_minmax"), prob=config["mixup_prob"],
                               switch_prob=config["mixup_switch_prob"], mode=config["mixup_mode"],
                               label_smoothing=config["smoothing"], num_classes=self.num_classes)

    def build_model(self, connection: ConnectionConfig) -> tuple[nn.Module, dict]:
        import timm
        from timm.data import create_transform, resolve_data_config

        c = self.config
        kwargs: dict[str, Any] = {}
        if c.get("img_size") and "levit" in c["model"]:
            kwargs["img_size"] = int(c["img_size"])  # LeViT's attention biases are sized for its input
        fields = connection.to_dict()
        if c.get("decay_scale") is None:
            fields.pop("decay_scale")  # let the family choose (LeViT: d = |0.1 delta|, as the research code)
        else:
            fields["decay_scale"] = float(c["decay_scale"])
        extra = {"drop_path_rate": c["drop_path"]} if c.get("drop_path") else {}
        model = timm.create_model(c["model"], num_classes=self.num_classes, connection=fields, **extra, **kwargs)
        self.connection = model.connection_config
        data_config = resolve_data_config({}, model=model)
        if c.get("img_size"):
            data_config["input_size"] = (3, int(c["img_size"]), int(c["img_size"]))
        if c.get("crop_pct"):
            data_config["crop_pct"] = float(c["crop_pct"])
        self.data_config = data_config
        self.train_set.transform = create_transform(
            data_config["input_size"], is_training=True, scale=_tuple(c.get("scale")), ratio=_tuple(c.get("ratio")),
            hflip=c["hflip"], color_jitter=c["color_jitter"], auto_augment=c.get("aa") or None,
            interpolation=c["train_interpolation"], mean=data_config["mean"], std=data_config["std"],
            re_prob=c["reprob"], re_mode=c["remode"], re_count=c["recount"])
        # evaluation sees [0, 1] pixels and normalises inside a wrapper, so the PGD check works in pixel space
        self.val_set.transform = create_transform(
            data_config["input_size"], is_training=False, interpolation=data_config["interpolation"],
            crop_pct=data_config["crop_pct"], mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        return model, kwargs

    def make_optimizers(self, model: nn.Module, connection: ConnectionConfig):
        from timm.optim import create_optimizer_v2
        from timm.optim.optim_factory import param_groups_weight_decay

        c = self.config
        deltas = {id(p) for p in decay_parameters(model)}
        own_adam = bool(deltas) and self.connection.optimizer == "adam"

        def groups(m: nn.Module) -> list[dict]:
            no_wd = m.no_weight_decay() if hasattr(m, "no_weight_decay") else set()
            out = []
            for group in param_groups_weight_decay(m, c["weight_decay"], no_wd):
                params = [p for p in group["params"] if not (own_adam and id(p) in deltas)]
                if params:
                    out.append(dict(group, params=params))
            return out

        extra = {}
        if c.get("opt_eps") is not None:
            extra["eps"] = c["opt_eps"]
        if c.get("opt_betas"):
            extra["betas"] = tuple(c["opt_betas"])
        optimizer = create_optimizer_v2(model, opt=c["opt"], lr=c["lr"], weight_decay=c["weight_decay"],
                                        momentum=c["momentum"], param_group_fn=groups, **extra)
        decay_opt = None
        if own_adam:
            decay_opt = torch.optim.Adam([p for p in model.parameters() if id(p) in deltas],
                                         lr=self.connection.decay_lr, weight_decay=0.0)
        return optimizer, decay_opt

    def make_schedule(self, optimizer) -> _Schedule:
        from timm.scheduler import create_scheduler_v2

        c = self.config
        sched = "cosine" if c["sched"] == "cos" else c["sched"]
        noise = c.get("lr_noise")
        if noise:
            noise = [n * c["epochs"] for n in noise] if len(noise) > 1 else noise[0] * c["epochs"]
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=sched, num_epochs=c["epochs"], decay_epochs=c["decay_epochs"],
            cooldown_epochs=0, patience_epochs=c["patience_epochs"], decay_rate=c["decay_rate"],
            min_lr=c["min_lr"], warmup_lr=c["warmup_lr"], warmup_epochs=int(c["warmup_epochs"]),
            noise=noise or None, noise_pct=c["lr_noise_pct"], noise_std=c["lr_noise_std"], noise_seed=c["seed"],
            updates_per_epoch=self.steps_per_epoch)
        if scheduler is None:
            raise TrainError(f"--sched {c['sched']} is not one of timm's schedulers (cosine, tanh, step, multistep, "
                             "plateau, poly).")
        return _Schedule(scheduler, per_step=False)

    def make_ema(self, model: nn.Module):
        decay = self.config.get("model_ema_decay")
        if not decay:
            return None
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=decay)
        ema.step = lambda m, updates: ema.update(m, step=updates)
        return ema

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        c = self.config
        self.sampler.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(self.train_set, batch_size=self.local_batch, sampler=self.sampler,
                                             num_workers=c["workers"], pin_memory=bool(c.get("pin_mem")),
                                             drop_last=True)
        mixup_on = self.mixup is not None and not (c.get("mixup_off_epoch") and epoch > c["mixup_off_epoch"])
        for i, (x, y) in enumerate(loader):
            if i >= self.steps_per_epoch:
                break
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if mixup_on:
                x, target = self.mixup(x, y)
                yield x, target, None
            else:
                yield x, y, y

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if target.ndim == 2:  # mixup/cutmix soft targets (label smoothing folded in by Mixup)
            from timm.loss import SoftTargetCrossEntropy
            return SoftTargetCrossEntropy()(logits, target)
        return F.cross_entropy(logits, target, label_smoothing=self.config["smoothing"])

    def for_eval(self, model: nn.Module) -> nn.Module:
        return nn.Sequential(Normalize(self.data_config["mean"], self.data_config["std"]).to(self.device), model)

    def evaluate(self, model: nn.Module, split: str, attack: PGD | None = None, limit: int | None = None) -> dict:
        c = self.config
        n = min(limit, len(self.val_set)) if limit else len(self.val_set)
        shard = torch.utils.data.Subset(self.val_set, range(self.dist.rank, n, self.dist.world_size))
        batch = max(1, (c.get("eval_batch_size") or c["batch_size"]) // self.dist.world_size)
        loader = torch.utils.data.DataLoader(shard, batch_size=batch, num_workers=c["workers"],
                                             pin_memory=bool(c.get("pin_mem")))
        counts = torch.zeros(3, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for x, y in loader:
                x, y = x.to(self.device), y.to(self.device)
                with autocast_for(self.device, c.get("amp", False)):
                    if attack is not None:
                        with torch.enable_grad():
                            x = attack(model, x, y)
                    logits = model(x)
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                counts[0] += (top[:, 0] == y).sum()
                counts[1] += (top == y[:, None]).any(1).sum()
                counts[2] += len(y)
        counts = self.dist.all_reduce_sum(counts)
        total = float(counts[2]) or float("nan")
        return {"acc": float(counts[0]) / total, "top5": float(counts[1]) / total}

    def data_card(self) -> dict:
        d = self.data_config
        return {"name": "imagefolder", "source": self.train_set.source, "val": self.val_set.source,
                "num_train": len(self.train_set), "num_val": len(self.val_set),
                # the saved network is timm-style: it expects inputs normalised with this mean/std
                "input_size": list(d["input_size"]), "mean": list(d["mean"]), "std": list(d["std"]),
                "crop_pct": d["crop_pct"], "interpolation": d["interpolation"], "normalize_outside_model": True}


def _limit(steps: int, config: Mapping[str, Any]) -> int:
    cap = config.get("max_steps_per_epoch")
    steps = min(steps, int(cap)) if cap else steps
    if steps < 1:
        raise TrainError("an epoch would have no optimisation step: lower --batch-size or use more data.")
    return steps


def _tuple(value):
    return tuple(value) if value else None


# ------------------------------------------------------------------------------------------------ the trainer

def train(config: Mapping[str, Any]) -> Path:
    """Train one network as ``config`` says (the resolved dict of ``train-clean``); returns the run folder."""
    config = dict(config)
    dist, device, run = start_run(config)

    world = (_FolderWorld if config["data"] == "imagefolder" else _ArrayWorld)(config, dist, device)
    connection = build_connection(config)
    model, model_kwargs = world.build_model(connection)
    connection = getattr(model, "connection_config", connection)
    memory_format = torch.channels_last if config.get("channels_last") and device.type == "cuda" \
        else torch.preserve_format
    model = model.to(device, memory_format=memory_format)
    if dist.enabled and config.get("sync_bn"):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer, decay_optimizer = world.make_optimizers(model, connection)
    minimizer = None if config["minimizer"] == "none" else SAM(
        optimizer, rho=config["rho"], eta=config["eta"], adaptive=config["minimizer"] == "asam")
    schedule = world.make_schedule(optimizer)
    ema = world.make_ema(model)
    train_model = nn.parallel.DistributedDataParallel(model) if dist.enabled else model
    main_params = [p for g in optimizer.param_groups for p in g["params"]]
    clip_params = main_params
    if config.get("clip_grad") and config["clip_mode"] == "agc":  # as timm's train.py: AGC leaves the classifier out
        heads = model.get_classifier() if hasattr(model, "get_classifier") else ()
        heads = heads if isinstance(heads, tuple) else (heads,)
        head_ids = {id(p) for head in heads if isinstance(head, nn.Module) for p in head.parameters()}
        clip_params = [p for p in main_params if id(p) not in head_ids]

    # resume
    start_epoch, best = 1, -math.inf
    if run.resume:
        start_epoch, best = restore_training_state(run.load_checkpoint("last"), model=model, optimizer=optimizer,
                                                   scheduler=schedule, decay_optimizer=decay_optimizer, ema=ema,
                                                   device=device)
        schedule.resumed_at(start_epoch - 1)
    tracker = Tracker(config.get("tracking", "none"), run.path, dist.is_writer)
    run.prepare(config)
    log = MetricsLog(run.path / "metrics.csv", dist.is_writer, keep_until_epoch=start_epoch - 1 if run.resume else 0)

    updates = (start_epoch - 1) * world.steps_per_epoch
    final_eval: dict[str, Any] = {}
    for epoch in range(start_epoch, config["epochs"] + 1):
        started = time.perf_counter()
        model.train()
        loss_sum, correct, seen, steps = 0.0, 0.0, 0, 0
        bar = tqdm(world.batches(epoch), total=world.steps_per_epoch, desc=f"epoch {epoch}/{config['epochs']}",
                   disable=not dist.is_writer or not config.get("progress", True), leave=False, dynamic_ncols=True)
        for x, target, hard in bar:
            x = x.contiguous(memory_format=memory_format)
            with autocast_for(device, config.get("amp", False)):
                logits = train_model(x)
                loss = world.loss(logits, target)
            check_finite(loss, epoch, updates + 1, run.checkpoints / "last.pt")
            optimizer.zero_grad(set_to_none=True)
            if decay_optimizer is not None:
                decay_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if minimizer is not None:  # SAM/ASAM: the gradient again, at the perturbed weights
                minimizer.first_step()
                optimizer.zero_grad(set_to_none=True)
                if decay_optimizer is not None:
                    decay_optimizer.zero_grad(set_to_none=True)
                with autocast_for(device, config.get("amp", False)):
                    world.loss(train_model(x), target).backward()
            if config.get("clip_grad"):
                from timm.utils import dispatch_clip_grad
                dispatch_clip_grad(clip_params, config["clip_grad"], mode=config["clip_mode"])
            if minimizer is not None:
                minimizer.second_step()
            else:
                optimizer.step()
            if decay_optimizer is not None:
                decay_optimizer.step()
            updates += 1
            schedule.after_update(updates)
            if ema is not None:
                ema.step(model, updates)
            steps += 1
            loss_sum += float(loss.detach())
            if hard is not None:
                correct += float((logits.detach().argmax(1) == hard).sum())
                seen += len(hard)
            if dist.is_writer and steps % 10 == 0:
                bar.set_postfix(loss=f"{loss_sum / steps:.3f}")
        bar.close()

        if dist.enabled and config.get("dist_bn") in ("reduce", "broadcast"):
            from timm.utils import distribute_bn
            distribute_bn(model, dist.world_size, config["dist_bn"] == "reduce")
            if ema is not None:
                distribute_bn(ema.module, dist.world_size, config["dist_bn"] == "reduce")
        saved = ema.module if ema is not None else model
        row: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                               "train_loss": loss_sum / max(1, steps), "train_acc": correct / seen if seen else ""}
        limit = config.get("eval_max_samples")
        saved.eval()
        result = world.evaluate(world.for_eval(saved), "val", limit=limit)
        row["val_acc"] = result["acc"]
        if "top5" in result:
            row["val_top5"] = result["top5"]
        if ema is not None:  # the live weights too: the paper's timm runs reported both
            model.eval()
            row["val_acc_raw"] = world.evaluate(world.for_eval(model), "val", limit=limit)["acc"]
        decay = learned_decay(model)
        row["decay_d"] = "" if decay is None else decay
        if epoch == config["epochs"] and config.get("pgd_check"):
            final_eval = _pgd_check(world, saved, config)
            row.update({f"test_{k}": v for k, v in final_eval.items() if k.endswith("acc")})
        schedule.after_epoch(epoch, row["val_acc"])
        row["seconds"] = round(time.perf_counter() - started, 3)
        log.append(row)
        tracker.log(row, epoch)

        is_best = not math.isnan(row["val_acc"]) and row["val_acc"] > best
        best = row["val_acc"] if is_best else best
        state = training_state(model=model, optimizer=optimizer, scheduler=schedule, decay_optimizer=decay_optimizer,
                               ema=ema, epoch=epoch, best=best, device=device, config=config)
        run.save_epoch(state, is_best)

    final = ema.module if ema is not None else model
    if not final_eval and config.get("pgd_check") and run.resume:  # resumed after the last epoch had finished
        final_eval = _pgd_check(world, final, config)
    card = run_card(config, final, connection.to_dict(), model_kwargs, world.num_classes, RECIPE_KEYS,
                    world.data_card(), run.path)
    card["trainer"] = "train-clean"
    if final_eval:
        card["final_eval"] = final_eval
    run.save_final(final, card)
    tracker.close()
    dist.barrier()
    return run.path


def _pgd_check(world, model: nn.Module, config: Mapping[str, Any]) -> dict:
    """Clean and L-inf PGD accuracy of the final model on the test split (the paper's PGD-7 at 8/255, step 0.01)."""
    model.eval()
    attack = PGD(eps=config["eps"], alpha=config["eps_iter"], steps=config["nb_iter"], norm="Linf", loss="ce",
                 random_start=True)
    limit = config.get("pgd_samples")
    wrapped = world.for_eval(model)
    clean = world.evaluate(wrapped, "test", limit=limit)["acc"]
    robust = world.evaluate(wrapped, "test", attack=attack, limit=limit)["acc"]
    return {"clean_acc": clean, "pgd_acc": robust, "eps": config["eps"], "eps_iter": config["eps_iter"],
            "nb_iter": config["nb_iter"], "samples": limit or "all", "norm": "Linf"}
