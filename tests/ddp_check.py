"""Run by the trainers' tests under ``torchrun --nproc_per_node 2`` (gloo, CPU); not a test module itself.

    ddp_check.py OUT train-robust DATA_NPZ      # both checks below, for train-robust
    ddp_check.py OUT train-clean ARGS...       # check 2 only, for ``train-clean ARGS... --out OUT/run``

1. One TRADES step through DistributedDataParallel: the all-reduced gradient must equal the single-process gradient
   of the same global batch (each half processed as its rank does, BatchNorm statistics per half, as without
   --sync-bn), computed here on one rank.
2. A short training run under torchrun: both ranks end with identical weights; rank 0 writes the run folder.
Rank 0 writes the figures to ``OUT/ddp_report.json``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from robustbench_conn.attacks import PGD
from robustbench_conn.cli import train_clean, train_robust
from robustbench_conn.data import MixedBatchSampler, load_npz
from robustbench_conn.models import create_model
from robustbench_conn.trainers import common
from robustbench_conn.trainers.losses import trades_loss

out, trainer, rest = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
report = {"world": world}


def fresh_model():
    torch.manual_seed(0)
    return create_model("nrn-16-1-swish", connection="suppression", init_channels=4)


def half_batch_loss(model, data, indices):
    x, y = data.batch(indices)
    x_adv = PGD(eps=8 / 255, alpha=2 / 255, steps=2, loss="trades_kl", seed=0)(model, x, y)
    return trades_loss(model, x, x_adv, y, beta=6.0)[0]


# 1. gradient of one step, DDP vs single process
if trainer == "train-robust":
    data = load_npz(rest[0])
    model = fresh_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    mine = next(iter(MixedBatchSampler(256, 32, seed=0, rank=rank, world_size=world)))
    x, y = data.batch(mine)
    x_adv = PGD(eps=8 / 255, alpha=2 / 255, steps=2, loss="trades_kl", seed=0)(model, x, y)
    trades_loss(ddp, x, x_adv, y, beta=6.0)[0].backward()
    ddp_grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    if rank == 0:
        # Each rank starts from the same weights and BatchNorm statistics: so does each half here.
        halves = [next(iter(MixedBatchSampler(256, 32, seed=0, rank=r, world_size=world))) for r in range(world)]
        ref_grad = 0
        for half in halves:
            reference = fresh_model()
            half_batch_loss(reference, data, half).backward()
            ref_grad = ref_grad + torch.cat([p.grad.flatten() for p in reference.parameters()]) / world
        report["grad_max_abs_diff"] = (ddp_grad - ref_grad).abs().max().item()

# 2. a short training run; keep each rank's final weights
finals = {}
save_final = common.RunFolder.save_final


def keep_final(self, model, card):
    finals["weights"] = torch.cat([t.detach().float().flatten() for t in model.state_dict().values()])
    save_final(self, model, card)


common.RunFolder.save_final = keep_final
if trainer == "train-robust":
    status = train_robust.main(["--data", "npz", "--data-dir", rest[0], "--max-train-samples", "256", "--val-size",
                                "64", "--model", "nrn-16-1-swish", "--init-channels", "4", "--connection",
                                "suppression", "--method", "trades", "--attack-steps", "2", "--eval-attack-steps",
                                "2", "--epochs", "1", "--batch-size", "64", "--out", str(out / "run"),
                                "--progress", "false"])
else:
    status = train_clean.main([*rest, "--out", str(out / "run"), "--progress", "false", "--device", "cpu"])
assert status == 0, status
gathered = [torch.zeros_like(finals["weights"]) for _ in range(world)]
dist.all_gather(gathered, finals["weights"])
if rank == 0:
    report["rank_weight_max_abs_diff"] = (gathered[0] - gathered[1]).abs().max().item()
    (out / "ddp_report.json").write_text(json.dumps(report))
dist.destroy_process_group()
