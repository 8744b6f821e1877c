"""``make quickstart``: the whole pipeline on the embedded digits data, offline, in a few minutes on 2 CPU cores.

It trains a residual and a suppression network with TRADES (same seed, same recipe), evaluates both with a PGD sweep
and AutoAttack (APGD-CE and APGD-DLR), and writes ``OUT/leaderboard.csv``, its pivot (CSV and Markdown) and
``OUT/curves.png``.

    python -m robustbench_conn.cli.quickstart --out results/quickstart
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from ._config import run_main

PROG = "quickstart"
EPS = ("1/255", "2/255", "4/255", "8/255", "16/255")

# One recipe for both networks; only the connection differs.
RECIPE = {
    "model": "nrn-16-1-swish", "init_channels": 8, "width_factor": 1, "settings": None, "restart_period": None,
    "init_decay": 0.2, "decay_lr": 0.01, "data": "digits", "data_dir": None, "aux_data": None, "unsup_fraction": 0.0,
    "max_train_samples": None, "val_size": 200, "augment": False, "method": "trades", "lse": False, "beta": 6.0,
    "attack": "linf-pgd", "attack_eps": 8 / 255, "attack_step": 2 / 255, "attack_steps": 5, "eval_attack_steps": 5,
    "adv_eval_freq": 5, "epochs": 15, "batch_size": 128, "eval_batch_size": 256, "lr": 0.1, "momentum": 0.9,
    "nesterov": True, "weight_decay": 5e-4, "scheduler": "cosine", "warmup_epochs": 0.0, "label_smoothing": 0.0,
    "clip_grad": None, "ema_decay": 0.99, "seed": 0, "device": "cpu", "resume": False, "overwrite": True,
    "amp": False, "channels_last": False, "sync_bn": False, "tracking": "none", "progress": True,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/quickstart", help="folder for the runs and the leaderboard")
    parser.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    parser.add_argument("--n-examples", type=int, default=300, help="test images to evaluate")
    args = parser.parse_args(argv)

    def body() -> int:
        import torch

        from ..evaluation import evaluate
        from ..trainers.adversarial import train

        torch.set_num_threads(min(2, torch.get_num_threads()))
        out = Path(args.out)
        runs = []
        for connection in ("residual", "suppression"):
            started = time.perf_counter()
            run = train(dict(RECIPE, connection=connection, epochs=args.epochs, out=str(out / "runs" / connection)))
            print(f"{PROG}: trained {connection} in {time.perf_counter() - started:.0f} s -> {run}")
            runs.append(run)
        started = time.perf_counter()
        board = out / "leaderboard.csv"
        common = dict(n_examples=args.n_examples, batch_size=args.n_examples, out=board)
        evaluate(runs, "digits", suites=["pgd"], eps=list(EPS), steps=[10, 50], **common)
        # AutoAttack's two APGD attacks (cross-entropy and DLR) at the training radius: the standard version's APGD-T,
        # FAB-T and Square take tens of minutes on CPU for models this robust (see results/README.md).
        evaluate(runs, "digits", suites=["autoattack"], eps=["8/255"], version="custom",
                 attacks=["apgd-ce", "apgd-dlr"], plot=out / "curves.png", **common)
        print(f"{PROG}: evaluated in {time.perf_counter() - started:.0f} s")
        print((out / "leaderboard_pivot.md").read_text())
        print(f"{PROG}: wrote {board}, its pivot and {out / 'curves.png'}")
        return 0

    return run_main(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
