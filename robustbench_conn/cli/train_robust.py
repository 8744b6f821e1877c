"""``train-robust``: adversarial training of a residual or suppression network (TRADES, LSE, PGD-AT, clean).

    train-robust --config configs/paper/wrn58-1_suppression.yaml --data npz --data-dir ../shared/data/cifar10

The paper's spellings are accepted where they differ (``--num-adv-epochs``, ``--IniDecay``, ``--CoesLR``, ``--IniCh``,
``--log-dir`` with ``--desc``, ``--ls``, ``--LSE``), so a pasted paper command runs.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from ..data import DATASETS
from ._config import UsageError, check_one_step_form, default_device, run_training, str2bool

PROG = "train-robust"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="YAML file whose keys are these flags' names; the command line overrides it")
    g = p.add_argument_group("model and connection")
    g.add_argument("--model", default="nrn-58-1-swish", help="wrn|nrn-DEPTH-WIDTH-ACT or preresnet-DEPTH")
    g.add_argument("--init-channels", "--IniCh", type=int, default=16, help="wide-resnet stem width (paper: 8)")
    g.add_argument("--width-factor", type=int, default=1, help="preresnet width multiplier")
    g.add_argument("--connection", choices=("residual", "suppression"), default="residual")
    g.add_argument("--settings", help="a paper settings string, e.g. ShareExpDecayLearnDecay_AbsExp_Adam_"
                   "RestaLayerIdx3 (overrides --connection)")
    g.add_argument("--init-decay", "--IniDecay", type=float, help="initial delta (paper WRN: 0.2)")
    g.add_argument("--decay-lr", "--CoesLR", type=float, help="lr of the decay's own Adam (paper WRN: 0.001)")
    g.add_argument("--restart-period", type=int, help="l restarts every R blocks (RestaLayerIdxR)")
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=DATASETS, default="cifar10")
    g.add_argument("--data-dir", help="dataset folder or npz file(s); torchvision sets download here")
    g.add_argument("--aux-data", help="npz file(s) of generated/pseudo-labeled images mixed into each batch")
    g.add_argument("--unsup-fraction", type=float, default=0.0, help="share of each batch from --aux-data (paper: 0.7)")
    g.add_argument("--max-train-samples", type=int, help="use only the first N labeled training images")
    g.add_argument("--val-size", type=int, default=1024, help="validation images carved from the training set")
    g.add_argument("--augment", type=str2bool, default=True, help="random crop (pad 4) and horizontal flip")
    g = p.add_argument_group("method and attack")
    g.add_argument("--method", choices=("trades", "pgd-at", "clean"), default="trades")
    g.add_argument("--LSE", "--lse", dest="lse", action="store_true", help="TRADES with squared-error losses (SCORE)")
    g.add_argument("--beta", type=float, default=6.0, help="TRADES robustness weight")
    g.add_argument("--attack", choices=("linf-pgd", "l2-pgd"), default="linf-pgd")
    g.add_argument("--attack-eps", type=float, default=8 / 255)
    g.add_argument("--attack-step", type=float, default=2 / 255)
    g.add_argument("--attack-steps", "--attack-iter", type=int, default=10)
    g.add_argument("--eval-attack-steps", type=int, default=10, help="PGD steps of the validation check")
    g.add_argument("--adv-eval-freq", type=int, default=1, help="validation PGD every N epochs (and at the end)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", "--num-adv-epochs", type=int, default=110)
    g.add_argument("--batch-size", type=int, default=512, help="global batch size (split over ranks)")
    g.add_argument("--eval-batch-size", type=int, help="default: --batch-size")
    g.add_argument("--lr", type=float, default=0.2)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--nesterov", type=str2bool, default=True)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--scheduler", choices=("step", "cosine", "cosine-with-warmup", "none"), default="step")
    g.add_argument("--warmup-epochs", type=float, default=0.0, help="for cosine-with-warmup")
    g.add_argument("--label-smoothing", "--ls", type=float, default=0.0)
    g.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value")
    g.add_argument("--ema-decay", type=float, default=0.995, help="EMA of the weights (0: off)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--device", default=default_device())
    g.add_argument("--out", help="run folder (required unless --log-dir/--desc is given)")
    g.add_argument("--log-dir", help="paper spelling: the run folder is LOG_DIR/DESC")
    g.add_argument("--desc", help="paper spelling: run name under --log-dir")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoints/last.pt")
    g.add_argument("--overwrite", action="store_true", help="train again into an existing run folder")
    g.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    g.add_argument("--channels-last", action="store_true", help="channels_last memory format on CUDA")
    g.add_argument("--sync-bn", action="store_true", help="synchronised BatchNorm under torchrun")
    g.add_argument("--tracking", choices=("none", "tensorboard", "comet"), default="none")
    g.add_argument("--progress", type=str2bool, default=True, help="show a progress bar")
    g = p.add_argument_group("research-code flags accepted so a pasted paper command runs")
    g.add_argument("--coesB", "--givenB", dest="coes_b", type=float, nargs=2, help="must be -1 0 (one-step form)")
    g.add_argument("--givenA", dest="coes_a", type=float, nargs=2, help="must be 1 0 (one-step form)")
    g.add_argument("--ConverOrd", dest="conver_ord", type=int, help="must be 1")
    g.add_argument("--learn", "--IniRes", "--Mask", dest="legacy_false", type=str2bool, action="append",
                   help="research switches; only False (their published value) is accepted")
    return p


def resolve(args: argparse.Namespace) -> dict:
    """Check the flags together and return the config dict the trainer takes (and saves)."""
    config = vars(args).copy()
    check_one_step_form(config)
    if any(config.pop("legacy_false") or []):
        raise UsageError("--learn/--IniRes/--Mask True are research switches this suite does not implement; "
                         "the published commands pass False.")
    if not config.get("out"):
        if config.get("log_dir"):
            config["out"] = os.path.join(config["log_dir"], config.get("desc") or "run")
        else:
            raise UsageError("say where the run goes: --out DIR (or the paper's --log-dir DIR --desc NAME).")
    if not 0 <= config["attack_eps"] <= (1 if config["attack"] == "linf-pgd" else 1e3):
        raise UsageError(f"--attack-eps {config['attack_eps']} is out of range: L-inf eps lies in [0, 1] "
                         "(8/255 = 0.0314).")
    if config["attack_step"] <= 0 or config["attack_steps"] < 1:
        raise UsageError("--attack-step must be > 0 and --attack-steps >= 1.")
    for key in ("epochs", "batch_size"):
        if config[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be at least 1, got {config[key]}.")
    if config["lr"] <= 0:
        raise UsageError(f"--lr must be > 0, got {config['lr']}.")
    if not 0 <= config["unsup_fraction"] < 1:
        raise UsageError(f"--unsup-fraction must lie in [0, 1), got {config['unsup_fraction']}.")
    if config["unsup_fraction"] > 0 and not config.get("aux_data"):
        raise UsageError("--unsup-fraction > 0 needs --aux-data FILE.npz (the generated or pseudo-labeled images).")
    if config["data_dir"] and config["data"] in ("npz", "imagefolder"):
        for part in str(config["data_dir"]).split(","):
            if not os.path.exists(part):
                raise UsageError(f"--data-dir {part} does not exist.")
    return config


def main(argv: Sequence[str] | None = None) -> int:
    from ..trainers.adversarial import train

    return run_training(PROG, argv, build_parser, resolve, train)


if __name__ == "__main__":
    sys.exit(main())
