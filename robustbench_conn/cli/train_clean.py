"""``train-clean``: standard training of a residual or suppression network, CIFAR in memory or ImageNet on timm.

    train-clean --config configs/paper/preresnet110x4_cifar100_suppression.yaml --data-dir CIFAR100_DIR --out RUN
    torchrun --nproc_per_node 8 -m robustbench_conn.cli.train_clean \\
        --config configs/paper/levit_128_suppression.yaml --data-dir /data/imagenet --out RUN

``--batch-size`` is the GLOBAL batch (split over the ranks, as in ``train-robust``); ``-b`` is timm's per-process
batch (the paper's ``-b 128`` on 8 GPUs is ``--batch-size 1024``). The paper's spellings are accepted so a pasted
command runs: the CIFAR ``Train.py`` flags (``--arch ZeroSAny110settings``, ``--bs``, ``--sche cos``, ``--epoch``,
``--warm``, ``--dataset``, ``--minimizer None --rho --eta``, ``--eps --eps_iter --nb_iter``, ``--save_path``,
``--notes``, ``--IniDecay``, ``--CoesLR``, ``--givenA 1 0 --givenB -1 0 --ConverOrd 1``, ``--steps``,
``--ini_stepsize``) and timm's ``train.py`` flags of the ImageNet commands (positional data folder, ``-b``, ``--aa``,
``--reprob``, ``--mixup``, ``--cutmix``, ``--model-ema-decay``, ``--opt-eps``, ``--clip-grad --clip-mode agc``,
``--lr-noise-pct``, ``--warmup-lr``, ``--min-lr``, ``--amp --native-amp``, ``--dist-bn``, ``--pin-mem``, ``-j``,
``--checkpoint-hist``, ``--drop-path``), with the paper's model names (``convnext_conver_small``, ``levit_128``,
``convernetv2_50d`` ...) mapped onto the ``conn_*`` models.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from ..data import DATASETS
from ..trainers.sam import MINIMIZERS
from ._config import UsageError, check_one_step_form, default_device, run_training, str2bool

PROG = "train-clean"

# the research code's model names -> ours (timm registry names or CIFAR names with a width factor)
PAPER_MODELS = {
    "convnext_conver_small": "conn_convnext_small",
    "convnext_conver_small_narrow": "conn_convnext_small_narrow",
    "levit_128": "conn_levit_128",
    "levit_256d": "conn_levit_256d",
    "convernetv2_50d": "conn_preresnet50d",
    "convernetv2_38d": "conn_preresnet38d",
}
PAPER_ARCHS = {"ZeroSAny110settings": ("preresnet-110", 4)}

# Values the paper's ImageNet commands leave to timm train.py's defaults of its time (timm 0.5.x), and the CIFAR
# defaults of the usual SGD recipe; each world takes its own where a flag is not given.
WORLD_DEFAULTS = {
    "folders": {"smoothing": 0.1, "weight_decay": 2e-5, "pgd_check": False},
    "arrays": {"smoothing": 0.0, "weight_decay": 5e-4, "pgd_check": True},
}


def _lower(text: str) -> str:
    return str(text).strip().lower()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="YAML file whose keys are these flags' names; the command line overrides it")
    p.add_argument("data_dir_positional", nargs="?", metavar="DATA_DIR", help="timm's spelling of --data-dir")
    g = p.add_argument_group("model and connection")
    g.add_argument("--model", help="conn_* (ImageNet, timm registry), preresnet-DEPTH or wrn/nrn-DEPTH-WIDTH-ACT "
                   "(CIFAR); the paper's names (convnext_conver_small, levit_128, convernetv2_50d ...) are mapped")
    g.add_argument("--arch", help="paper spelling: ZeroSAny110settings = --model preresnet-110 --width-factor 4")
    g.add_argument("--width-factor", type=int, help="CIFAR preresnet width multiplier (paper: 4)")
    g.add_argument("--init-channels", "--IniCh", type=int, default=16, help="CIFAR wide-resnet stem width")
    g.add_argument("--drop-path", type=float, help="stochastic depth rate (timm models)")
    g.add_argument("--img-size", type=int, help="training/eval resolution (default: the model's, 224 on ImageNet)")
    g.add_argument("--crop-pct", type=float, help="eval centre-crop fraction (default: the model's)")
    g.add_argument("--connection", choices=("residual", "suppression"), default="residual")
    g.add_argument("--settings", help="a paper settings string, e.g. ShareExpDecayLearnDecay_AbsExp_Adam_"
                   "RestaLayerIdx3; architecture tokens BnReluConv_ConvStride2ResLike are accepted (overrides "
                   "--connection)")
    g.add_argument("--init-decay", "--IniDecay", type=float, help="initial delta (paper: 0.07 CIFAR-100, 0.7 LeViT/"
                   "PreResNet, 0 ConvNeXt)")
    g.add_argument("--decay-lr", "--CoesLR", type=float, help="lr of the decay's own Adam (paper CIFAR-100: 0.04)")
    g.add_argument("--decay-scale", type=float, help="d = phi(scale * delta); default: the family's (LeViT 0.1)")
    g.add_argument("--restart-period", type=int, help="l restarts every R blocks (RestaLayerIdxR)")
    g = p.add_argument_group("data")
    g.add_argument("--data", "--dataset", type=_lower, choices=DATASETS,
                   help="default: imagefolder for conn_* models, else cifar10")
    g.add_argument("--data-dir", help="dataset folder or npz file(s); imagefolder: DIR/train and DIR/val (or test)")
    g.add_argument("--max-train-samples", type=int, help="in-memory data: use only the first N training images")
    g.add_argument("--val-size", type=int, default=0,
                   help="in-memory data: validate on N images carved from the training set (0: the test split)")
    g.add_argument("--eval-max-samples", type=int, help="validate on the first N images only")
    g.add_argument("--augment", type=str2bool, default=True, help="in-memory data: random crop (pad 4) and flip")
    g.add_argument("-j", "--workers", type=int, default=4, help="imagefolder: data-loading processes per rank")
    g.add_argument("--pin-mem", action="store_true", help="imagefolder: pinned host memory")
    g = p.add_argument_group("ImageNet augmentation (timm)")
    g.add_argument("--aa", help="RandAugment/AutoAugment policy, e.g. rand-m9-mstd0.5-inc1")
    g.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")
    g.add_argument("--remode", default="pixel", help="random erasing mode")
    g.add_argument("--recount", type=int, default=1, help="random erasing count")
    g.add_argument("--train-interpolation", default="random", help="training resize interpolation")
    g.add_argument("--color-jitter", type=float, default=0.4)
    g.add_argument("--scale", type=float, nargs=2, help="random-resized-crop scale (default 0.08 1)")
    g.add_argument("--ratio", type=float, nargs=2, help="random-resized-crop aspect ratio (default 3/4 4/3)")
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha")
    g.add_argument("--cutmix-minmax", type=float, nargs=2)
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", choices=("batch", "pair", "elem"), default="batch")
    g.add_argument("--mixup-off-epoch", type=int, default=0, help="no mixup after this epoch (0: never off)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", "--epoch", type=int, default=200)
    g.add_argument("--batch-size", "--bs", type=int, default=128, help="GLOBAL batch size (split over ranks)")
    g.add_argument("-b", dest="batch_size_per_process", type=int,
                   help="timm's per-process batch; the global batch is this times the number of processes")
    g.add_argument("--eval-batch-size", type=int, help="global; default: --batch-size")
    g.add_argument("--opt", type=_lower, default="sgd", help="sgd (CIFAR: SGD+momentum, --nesterov); imagefolder: "
                   "any timm optimizer (adamw, sgd = nesterov SGD, momentum ...)")
    g.add_argument("--opt-eps", type=float, help="optimizer epsilon (timm)")
    g.add_argument("--opt-betas", type=float, nargs=2, help="optimizer betas (timm)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--nesterov", type=str2bool, default=False, help="CIFAR SGD with Nesterov momentum")
    g.add_argument("--weight-decay", type=float, help="default: 5e-4 CIFAR, 2e-5 imagefolder (timm 0.5 train.py)")
    g.add_argument("--lr", type=float, default=0.1)
    g.add_argument("--sched", "--sche", type=_lower, default="cosine", help="cosine (cos), step, none; imagefolder: "
                   "any timm scheduler")
    g.add_argument("--warmup-epochs", "--warm", type=float, default=0.0)
    g.add_argument("--warmup-lr", type=float, default=1e-4, help="timm: lr at the start of warmup")
    g.add_argument("--min-lr", type=float, default=1e-6, help="timm: lower bound of the cosine")
    g.add_argument("--cooldown-epochs", type=int, default=0, help="accepted; only 0 (the paper's value) is supported")
    g.add_argument("--lr-noise", type=float, nargs="+", help="timm: lr noise on/off epoch fractions")
    g.add_argument("--lr-noise-pct", type=float, default=0.67)
    g.add_argument("--lr-noise-std", type=float, default=1.0)
    g.add_argument("--decay-epochs", type=float, default=100, help="timm step schedule")
    g.add_argument("--decay-rate", type=float, default=0.1, help="timm step/plateau schedule")
    g.add_argument("--patience-epochs", type=int, default=10, help="timm plateau schedule")
    g.add_argument("--smoothing", "--label-smoothing", "--ls", type=float,
                   help="label smoothing (default: 0.1 imagefolder as timm, 0 CIFAR)")
    g.add_argument("--clip-grad", type=float, help="gradient clipping value (off by default)")
    g.add_argument("--clip-mode", choices=("norm", "value", "agc"), default="norm")
    g.add_argument("--model-ema-decay", "--ema-decay", type=float, default=0.0, help="EMA of the weights (0: off)")
    g.add_argument("--model-ema", action="store_true", help="accepted (timm spelling); EMA is on when "
                   "--model-ema-decay > 0")
    g.add_argument("--minimizer", type=_lower, choices=MINIMIZERS, default="none", help="SAM/ASAM around SGD")
    g.add_argument("--rho", type=float, default=0.05, help="SAM/ASAM radius (paper command: 0.5, ASAM's value)")
    g.add_argument("--eta", type=float, default=0.01, help="ASAM: T_w = |w| + eta")
    g = p.add_argument_group("PGD check of the final model (L-inf, on the test split)")
    g.add_argument("--pgd-check", type=str2bool, help="default: on for in-memory data, off for imagefolder")
    g.add_argument("--eps", type=float, default=8 / 255, help="paper: 0.031")
    g.add_argument("--eps-iter", "--eps_iter", type=float, default=0.01, help="PGD step (paper: 0.01)")
    g.add_argument("--nb-iter", "--nb_iter", type=int, default=7, help="PGD steps (paper: 7)")
    g.add_argument("--pgd-samples", type=int, help="attack only the first N test images (default: all)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--device", default=default_device())
    g.add_argument("--out", help="run folder (or --save_path DIR, the run named after model, settings, --notes)")
    g.add_argument("--save_path", "--save-path", "--output", dest="save_path", help="paper/timm spelling: parent "
                   "folder of the run")
    g.add_argument("--notes", "--experiment", dest="notes", help="paper spelling: a label, part of the run name")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoints/last.pt")
    g.add_argument("--overwrite", action="store_true", help="train again into an existing run folder")
    g.add_argument("--max-steps-per-epoch", type=int, help="cut each epoch after N optimisation steps (smoke tests)")
    g.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    g.add_argument("--native-amp", action="store_true", help="accepted (timm spelling); --amp is native bf16")
    g.add_argument("--dist-bn", choices=("", "broadcast", "reduce"), default="reduce",
                   help="under torchrun: average (reduce) or broadcast BatchNorm statistics before evaluation")
    g.add_argument("--checkpoint-hist", type=int, default=1, help="accepted; the run keeps last.pt and best.pt")
    g.add_argument("--channels-last", action="store_true", help="channels_last memory format on CUDA")
    g.add_argument("--sync-bn", action="store_true", help="synchronised BatchNorm under torchrun")
    g.add_argument("--tracking", choices=("none", "tensorboard", "comet"), default="none")
    g.add_argument("--progress", type=str2bool, default=True, help="show a progress bar")
    g = p.add_argument_group("research-code flags accepted so a pasted paper command runs")
    g.add_argument("--givenB", "--coesB", dest="coes_b", type=float, nargs=2, help="must be -1 0 (one-step form)")
    g.add_argument("--givenA", dest="coes_a", type=float, nargs=2, help="must be 1 0 (one-step form)")
    g.add_argument("--ConverOrd", dest="conver_ord", type=int, help="must be 1")
    g.add_argument("--steps", dest="multistep_steps", type=int, help="steps of the multistep form (1 or 2; with "
                   "givenA 1 0 / givenB -1 0 the form is one-step either way)")
    g.add_argument("--ini_stepsize", "--ini-stepsize", dest="ini_stepsize", type=float, help="h of the multistep "
                   "form; must be 1")
    return p


def resolve(args: argparse.Namespace) -> dict:
    """Check the flags together and return the config dict the trainer takes (and saves)."""
    config = vars(args).copy()
    check_one_step_form(config)
    if config.get("multistep_steps") not in (None, 1, 2) or config.get("ini_stepsize") not in (None, 1.0):
        raise UsageError("--steps must be 1 or 2 and --ini_stepsize 1 (the published one-step form).")
    for key in ("multistep_steps", "ini_stepsize", "model_ema", "native_amp"):
        config.pop(key, None)

    # model
    arch = config.pop("arch", None)
    if arch:
        if arch not in PAPER_ARCHS:
            raise UsageError(f"--arch {arch} is unknown: the paper's CIFAR arch is {', '.join(PAPER_ARCHS)} "
                             "(or use --model preresnet-DEPTH --width-factor N).")
        model, width = PAPER_ARCHS[arch]
        if config.get("model") not in (None, model):
            raise UsageError(f"--arch {arch} and --model {config['model']} disagree: give one of them.")
        config["model"] = model
        config["width_factor"] = config.get("width_factor") or width
    if not config.get("model"):
        raise UsageError("say which network: --model NAME (e.g. conn_levit_128, preresnet-110) or --arch "
                         "ZeroSAny110settings.")
    config["model"] = PAPER_MODELS.get(config["model"], config["model"])
    imagenet_model = config["model"].startswith("conn_")

    # data
    positional = config.pop("data_dir_positional", None)
    if positional:
        if config.get("data_dir") not in (None, positional):
            raise UsageError(f"the data folder is given twice ({positional} and --data-dir {config['data_dir']}).")
        config["data_dir"] = positional
    if not config.get("data"):
        config["data"] = "imagefolder" if imagenet_model else "cifar10"
    world = "folders" if config["data"] == "imagefolder" else "arrays"
    if imagenet_model != (world == "folders"):
        raise UsageError(f"--model {config['model']} goes with " + ("--data imagefolder (ImageNet layout)."
                         if imagenet_model else "in-memory data (cifar10, cifar100, svhn, npz, digits), not "
                         "imagefolder: use a conn_* model for ImageNet."))
    if config["data_dir"] and config["data"] in ("npz", "imagefolder"):
        for part in str(config["data_dir"]).split(","):
            if not os.path.exists(part):
                raise UsageError(f"--data-dir {part} does not exist.")
    if config["data"] == "imagefolder" and not config.get("data_dir"):
        raise UsageError("--data imagefolder needs --data-dir DIR (DIR/train and DIR/val).")
    for key, value in WORLD_DEFAULTS[world].items():
        if config.get(key) is None:
            config[key] = value

    # batch: global; timm's -b is per process
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    per_process = config.pop("batch_size_per_process", None)
    if per_process is not None:
        config["batch_size"] = per_process * world_size
    for key in ("epochs", "batch_size"):
        if config[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be at least 1, got {config[key]}.")
    if config["batch_size"] % world_size:
        raise UsageError(f"--batch-size {config['batch_size']} (global) does not split over {world_size} processes.")
    if config["lr"] <= 0:
        raise UsageError(f"--lr must be > 0, got {config['lr']}.")
    if config["weight_decay"] < 0 or config["momentum"] < 0:
        raise UsageError("--weight-decay and --momentum must be >= 0.")
    if not 0 <= config["smoothing"] < 1:
        raise UsageError(f"--smoothing must lie in [0, 1), got {config['smoothing']}.")
    if not 0 <= config["reprob"] <= 1 or config["mixup"] < 0 or config["cutmix"] < 0:
        raise UsageError("--reprob must lie in [0, 1] and --mixup/--cutmix be >= 0.")
    if config["cooldown_epochs"]:
        raise UsageError("--cooldown-epochs other than 0 is not supported (every paper command passes 0).")
    if config["minimizer"] != "none" and (config["rho"] <= 0 or config["eta"] < 0):
        raise UsageError("--rho must be > 0 and --eta >= 0 for SAM/ASAM.")
    if config["pgd_check"]:
        if not 0 < config["eps"] <= 1:
            raise UsageError(f"--eps {config['eps']} is out of range: L-inf eps lies in (0, 1] (8/255 = 0.0314).")
        if config["eps_iter"] <= 0 or config["nb_iter"] < 1:
            raise UsageError("--eps-iter must be > 0 and --nb-iter >= 1.")
    if config.get("warmup_epochs", 0) < 0:
        raise UsageError("--warmup-epochs must be >= 0.")

    config["sched"] = {"cos": "cosine"}.get(config["sched"], config["sched"])

    # the run folder
    if not config.get("out"):
        if not config.get("save_path"):
            raise UsageError("say where the run goes: --out DIR (or the paper's --save_path DIR).")
        label = "_".join(str(v) for v in (config.get("notes"), config.get("settings") or config["connection"]) if v)
        config["out"] = os.path.join(config["save_path"], f"{config['model']}_{label}_seed{config['seed']}")
    return config


def main(argv: Sequence[str] | None = None) -> int:
    from ..trainers.clean import train

    return run_training(PROG, argv, build_parser, resolve, train)


if __name__ == "__main__":
    sys.exit(main())
