"""Adversarial training (TRADES, TRADES-LSE/SCORE, PGD-AT, or a clean baseline) of residual and suppression networks.

One function, :func:`train`, in four sections: set up, resume, the epoch loop, and the final model. The config is
the resolved dict of ``train-robust`` (see :mod:`robustbench_conn.cli.train_robust` for every key).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from tqdm import tqdm

from ..attacks import PGD
from ..data import ArrayDataset, DataError, MixedBatchSampler, check_num_classes, get_dataset, load_npz
from ..models import create_model, learned_decay, resolve_connection
from ..models.connection import ConnectionConfig, parse_settings
from .common import (MetricsLog, ModelEma, TrainError, Tracker, autocast_for, build_optimizers, build_scheduler,
                     check_finite, evaluate_accuracy, random_crop_flip, restore_training_state, run_card, start_run,
                     training_state)
from .losses import clean_loss, pgd_at_loss, trades_loss

__all__ = ["train", "METHODS", "build_connection", "load_training_data"]

METHODS = ("trades", "pgd-at", "clean")
RECIPE_KEYS = ("method", "lse", "beta", "attack", "attack_eps", "attack_step", "attack_steps", "epochs",
               "batch_size", "lr", "momentum", "nesterov", "weight_decay", "scheduler", "warmup_epochs",
               "label_smoothing", "clip_grad", "ema_decay", "unsup_fraction", "decay_lr", "amp")


# ---------------------------------------------------------------------------------------------------- set-up

def build_connection(config: Mapping[str, Any]) -> ConnectionConfig:
    """``--settings`` (a paper string) or ``--connection`` (a word), with ``--init-decay`` etc. applied on top."""
    overrides: dict[str, Any] = {}
    if config.get("restart_period") is not None:
        overrides["restart_period"] = int(config["restart_period"])
    if config.get("settings"):
        connection, _ = parse_settings(config["settings"], init_decay=config.get("init_decay"),
                                       decay_lr=config.get("decay_lr"))
        return resolve_connection(connection, **overrides)
    return resolve_connection(config.get("connection") or "residual", init_decay=config.get("init_decay"),
                              decay_lr=config.get("decay_lr"), **overrides)


def load_training_data(config: Mapping[str, Any]) -> tuple[ArrayDataset, ArrayDataset, int]:
    """(train set with the auxiliary data appended, validation split, number of labeled training examples).

    The validation split is carved from the training data with a fixed permutation (independent of the run seed,
    so every run of a comparison is validated on the same images); the test set is never touched here.
    """
    train = get_dataset(config["data"], "train", config.get("data_dir"))
    if not isinstance(train, ArrayDataset):
        raise TrainError(f"train-robust needs an in-memory dataset (cifar10, cifar100, svhn, npz, digits), "
                         f"not {config['data']!r}.")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    val_size = int(config.get("val_size") or 0)
    if val_size >= len(train):
        raise TrainError(f"--val-size {val_size} leaves no training data out of {len(train)} images.")
    val, rest = train.subset(order[:val_size]), order[val_size:]
    if config.get("max_train_samples"):
        rest = rest[:int(config["max_train_samples"])]
    labeled = train.subset(rest)
    if config.get("aux_data"):
        aux = [load_npz(path, num_classes=train.num_classes) for path in str(config["aux_data"]).split(",")]
        if tuple(aux[0].images.shape[1:]) != tuple(labeled.images.shape[1:]):
            raise DataError(f"auxiliary images {config['aux_data']} have shape {tuple(aux[0].images.shape[1:])}, "
                            f"the training images {tuple(labeled.images.shape[1:])}.")
        return ArrayDataset.concat([labeled, *aux], source=f"{labeled.source}+aux"), val, len(labeled)
    return labeled, val, len(labeled)


def _make_attack(config: Mapping[str, Any], loss: str, steps: int) -> PGD:
    norm = {"linf-pgd": "Linf", "l2-pgd": "L2"}[config["attack"]]
    return PGD(eps=config["attack_eps"], alpha=config["attack_step"], steps=steps, norm=norm, loss=loss,
               random_start=True)


# ------------------------------------------------------------------------------------------------ the trainer

def train(config: Mapping[str, Any]) -> Path:
    """Train one network as ``config`` says; returns the run folder. Raises TrainError (and friends) on bad input."""
    config = dict(config)
    if config["method"] not in METHODS:
        raise TrainError(f"method {config['method']!r} is unknown: use one of {', '.join(METHODS)}.")
    dist, device, run = start_run(config)

    # data
    train_set, val_set, num_labeled = load_training_data(config)
    if config["batch_size"] > num_labeled:
        raise TrainError(f"--batch-size {config['batch_size']} is larger than the {num_labeled} labeled training "
                         "images: lower it or use more data.")
    sampler = MixedBatchSampler(num_labeled, config["batch_size"], num_aux=len(train_set) - num_labeled,
                                unsup_fraction=config.get("unsup_fraction") or 0.0, seed=config["seed"],
                                rank=dist.rank, world_size=dist.world_size)

    # model, connection, optimisers
    connection = build_connection(config)
    model_kwargs = {"init_channels": config["init_channels"], "width_factor": config["width_factor"]}
    model = create_model(config["model"], num_classes=train_set.num_classes, connection=connection, **model_kwargs)
    check_num_classes(train_set, model.num_classes)
    memory_format = torch.channels_last if config.get("channels_last") and device.type == "cuda" \
        else torch.preserve_format
    model = model.to(device, memory_format=memory_format)
    if dist.enabled and config.get("sync_bn"):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ema = ModelEma(model, config["ema_decay"]) if config.get("ema_decay") else None
    optimizer, decay_optimizer = build_optimizers(
        model, lr=config["lr"], momentum=config["momentum"], weight_decay=config["weight_decay"],
        nesterov=config["nesterov"], decay_lr=connection.decay_lr, decay_optimizer=connection.optimizer)
    scheduler = build_scheduler(optimizer, config["scheduler"], config["epochs"], len(sampler),
                                config.get("warmup_epochs") or 0.0)
    train_model = nn.parallel.DistributedDataParallel(model) if dist.enabled else model
    method = config["method"]
    attack = None if method == "clean" else _make_attack(
        config, ("trades_se" if config.get("lse") else "trades_kl") if method == "trades" else "ce",
        config["attack_steps"])
    eval_attack = None if method == "clean" else _make_attack(config, "ce", config["eval_attack_steps"])

    # resume
    start_epoch, best = 1, -math.inf
    if run.resume:
        start_epoch, best = restore_training_state(run.load_checkpoint("last"), model=model, optimizer=optimizer,
                                                   scheduler=scheduler, decay_optimizer=decay_optimizer, ema=ema,
                                                   device=device)
    tracker = Tracker(config.get("tracking", "none"), run.path, dist.is_writer)
    run.prepare(config)
    log = MetricsLog(run.path / "metrics.csv", dist.is_writer, keep_until_epoch=start_epoch - 1 if run.resume else 0)

    # the epoch loop
    step = (start_epoch - 1) * len(sampler)
    for epoch in range(start_epoch, config["epochs"] + 1):
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        model.train()
        sums: dict[str, torch.Tensor] = {}
        bar = tqdm(sampler, desc=f"epoch {epoch}/{config['epochs']}", disable=not dist.is_writer or
                   not config.get("progress", True), leave=False, dynamic_ncols=True)
        for batch_indices in bar:
            x, y = train_set.batch(batch_indices)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if config.get("augment", True):
                x = random_crop_flip(x)
            x = x.contiguous(memory_format=memory_format)
            with autocast_for(device, config.get("amp", False)):
                if attack is None:
                    loss, metrics = clean_loss(train_model, x, y, label_smoothing=config["label_smoothing"])
                else:
                    x_adv = attack(model, x, y)
                    if method == "trades":
                        loss, metrics = trades_loss(train_model, x, x_adv, y, beta=config["beta"],
                                                    label_smoothing=config["label_smoothing"],
                                                    squared_error=bool(config.get("lse")))
                    else:
                        loss, metrics = pgd_at_loss(train_model, x, x_adv, y,
                                                    label_smoothing=config["label_smoothing"])
            step += 1
            check_finite(loss, epoch, step, run.checkpoints / "last.pt")
            optimizer.zero_grad(set_to_none=True)
            if decay_optimizer is not None:
                decay_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.get("clip_grad"):
                nn.utils.clip_grad_norm_(model.parameters(), config["clip_grad"])
            optimizer.step()
            if decay_optimizer is not None:
                decay_optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
            if not bar.disable:  # the NaN check above has already synchronised: reading the loss is free
                bar.set_postfix(loss=f"{float(metrics['loss']):.3f}",
                                acc=f"{float(metrics.get('adv_acc', metrics['clean_acc'])):.3f}")
        bar.close()
        dist.average_buffers(model)
        if ema is not None:
            ema.copy_buffers(model)

        # evaluation on the validation split, with the model that gets saved
        eval_model = ema.module if ema is not None else model
        eval_model.eval()
        batch = config.get("eval_batch_size") or config["batch_size"]
        row: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        row.update({f"train_{k}": float(v) / len(sampler) for k, v in sums.items()})
        row["val_clean_acc"] = (evaluate_accuracy(eval_model, val_set, None, batch, device, dist,
                                                  config.get("amp", False)) if len(val_set) else float("nan"))
        robust_now = eval_attack is not None and len(val_set) and (
            epoch % max(1, config.get("adv_eval_freq") or 1) == 0 or epoch == config["epochs"])
        row["val_pgd_acc"] = evaluate_accuracy(eval_model, val_set, eval_attack, batch, device, dist,
                                       config.get("amp", False)) if robust_now else ""
        decay = learned_decay(model)
        row["decay_d"] = "" if decay is None else decay
        row["seconds"] = round(time.perf_counter() - started, 3)
        log.append(row)
        tracker.log(row, epoch)

        score = row["val_pgd_acc"] if robust_now else (row["val_clean_acc"] if eval_attack is None else None)
        is_best = score is not None and not math.isnan(score) and score > best
        best = score if is_best else best
        state = training_state(model=model, optimizer=optimizer, scheduler=scheduler, decay_optimizer=decay_optimizer,
                               ema=ema, epoch=epoch, best=best, device=device, config=config)
        run.save_epoch(state, is_best)

    # the final model: the EMA weights, as safetensors, with a model card
    final = ema.module if ema is not None else model
    card = run_card(config, final, connection.to_dict(), model_kwargs, train_set.num_classes, RECIPE_KEYS,
                    {"name": config["data"], "source": train_set.source, "num_labeled": num_labeled,
                     "num_aux": len(train_set) - num_labeled, "val_size": len(val_set)}, run.path)
    run.save_final(final, card)
    tracker.close()
    dist.barrier()
    return run.path
