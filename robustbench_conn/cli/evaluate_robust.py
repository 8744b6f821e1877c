"""``evaluate-robust``: AutoAttack and PGD sweeps of trained runs into a CSV leaderboard, its pivot and a plot.

    evaluate-robust runs/residual runs/suppression --data cifar10 --n-examples 1000 \\
        --suite autoattack pgd --eps 2/255 4/255 8/255 --steps 10 50 --out results/cifar10_cpu/leaderboard.csv \\
        --plot results/cifar10_cpu/robustness.png

Bad input (a missing run folder, an unreadable eps, a damaged leaderboard ...) ends with one sentence on stderr and
exit status 2, before anything is written. A killed evaluation continues where it stopped when run again with the
same arguments (finished batches are kept in ``.evaluate_state/`` beside the CSV).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Sequence

__all__ = ["main", "build_parser"]

DEFAULT_OUT = "results/leaderboard.csv"


class _ArgError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one sentence, exit 2 (argparse would print usage first)
        raise _ArgError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="evaluate-robust", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="*", help="run folders (with model_card.json) or checkpoints inside them")
    p.add_argument("--config", help="YAML file whose keys (option names, - or _) give defaults; the command line "
                                    "wins")
    p.add_argument("--data", default="cifar10", help="dataset name: cifar10, cifar100, svhn, npz, imagefolder, "
                                                     "digits")
    p.add_argument("--data-dir", default=None, help="where the dataset lives (a file or folder for npz)")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--n-examples", type=int, default=1000, help="the first N points of the split, in fixed order")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="cpu")
    p.add_argument("--suite", nargs="+", default=["autoattack", "pgd"], choices=["autoattack", "pgd"])
    p.add_argument("--eps", nargs="+", default=["8/255"], help="radii as fractions (8/255) or decimals")
    p.add_argument("--norm", default="Linf", choices=["Linf", "L2", "L1"])
    p.add_argument("--steps", nargs="+", type=int, default=[10], help="PGD step counts")
    p.add_argument("--restarts", nargs="+", type=int, default=[1], help="PGD restarts")
    p.add_argument("--loss", nargs="+", default=["ce"], choices=["ce", "cw", "dlr"], help="PGD losses")
    p.add_argument("--step-size", type=float, default=0.25, help="PGD step as a fraction of eps")
    p.add_argument("--version", default="standard", choices=["standard", "plus", "rand", "custom"],
                   help="AutoAttack version")
    p.add_argument("--attacks", nargs="+", default=None,
                   help="AutoAttack attacks for --version custom (apgd-ce apgd-dlr apgd-t fab fab-t square)")
    p.add_argument("--seed", type=int, default=0, help="attack seed")
    p.add_argument("--out", default=DEFAULT_OUT, help="leaderboard CSV (or a folder for leaderboard.csv)")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="also draw robust accuracy vs eps and learned d")
    p.add_argument("--robustbench-model", nargs="+", default=[], metavar="NAME",
                   help="also evaluate RobustBench zoo models (optional robustbench extra; offline)")
    p.add_argument("--model-dir", default="models", help="RobustBench model folder (DATASET/THREAT/NAME.pt)")
    p.add_argument("--no-resume", action="store_true", help="ignore and do not keep resume state")
    p.add_argument("--ci", default="clopper-pearson", choices=["clopper-pearson", "wilson"],
                   help="95%% interval method")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def _config_defaults(parser: argparse.ArgumentParser, path: str) -> None:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise _ArgError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise _ArgError(f"config file {path} is not readable YAML ({type(err).__name__})") from None
    if data is None:
        return
    if not isinstance(data, dict):
        raise _ArgError(f"config file {path} must hold a mapping of option names to values")
    known = {a.dest: a for a in parser._actions}
    defaults = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in known or dest in ("help", "config"):
            raise _ArgError(f"config file {path} has the unknown key {key!r}")
        action = known[dest]
        if action.nargs in ("+", "*") and not isinstance(value, list):
            value = [value]
        if action.nargs in ("+", "*"):
            value = [str(v) if action.type is None else v for v in value]
        if action.choices is not None:
            for v in (value if isinstance(value, list) else [value]):
                if v not in action.choices:
                    raise _ArgError(f"config file {path}: {key} {v!r} is not one of "
                                    f"{', '.join(map(str, action.choices))}")
        defaults[dest] = value
    parser.set_defaults(**defaults)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if "--config" in argv:
            i = argv.index("--config")
            if i + 1 >= len(argv):
                raise _ArgError("--config needs a YAML file")
            config = argv[i + 1]
        else:
            config = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
        if config is not None:
            _config_defaults(parser, config)
        args = parser.parse_args(argv)
    except _ArgError as err:
        return _fail(str(err))
    except SystemExit as err:  # --help
        return int(err.code or 0)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("evaluate-robust: interrupted; run the same command again to continue where it stopped.",
              file=sys.stderr)
        return 130


def _fail(message: str) -> int:
    message = " ".join(str(message).split())
    if not message.endswith("."):
        message += "."
    print(f"evaluate-robust: error: {message}", file=sys.stderr)
    return 2


def _run(args) -> int:
    from ..attacks import AttackError
    from ..data.datasets import DataError
    from ..evaluation import EpsError, EvaluationError, LeaderboardError, evaluate, output_paths
    from ..evaluation.harness import load_entry, load_robustbench_model
    from ..io import CheckpointError
    from ..models import SettingsError

    bad_input = (AttackError, DataError, EpsError, EvaluationError, LeaderboardError, CheckpointError,
                 SettingsError)
    if not args.runs and not args.robustbench_model:
        return _fail("no model to evaluate: pass run folders (or checkpoints) and/or --robustbench-model NAME")
    if args.version != "custom" and args.attacks:
        return _fail("--attacks is only used with --version custom")
    if args.plot is not None and Path(args.plot).suffix.lower() not in (".png", ".pdf", ".svg"):
        return _fail(f"--plot {args.plot} must end in .png, .pdf or .svg")
    try:
        from ..evaluation.leaderboard import check_leaderboard_file
        from ..evaluation.eps import parse_eps

        for e in args.eps:
            parse_eps(e)
        paths = output_paths(args.out)
        check_leaderboard_file(paths["csv"])
        entries = [load_entry(r) for r in args.runs]
        zoo_data = Path(str(args.data_dir)).name if args.data == "npz" and args.data_dir else args.data
        entries += [load_robustbench_model(name, args.model_dir, zoo_data, args.norm)
                    for name in args.robustbench_model]

        def progress(info):
            if not args.quiet:
                print(f"\r{info['model']} {info['run_id']}: {info['attack']} eps {info['eps']} "
                      f"batch {info['batch']}/{info['batches']}{' (resumed)' if info['resumed'] else ''}   ",
                      end="" if info["batch"] < info["batches"] else "\n", file=sys.stderr, flush=True)

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = _show_warning
            records = evaluate(entries, args.data, split=args.split, data_dir=args.data_dir,
                               n_examples=args.n_examples, batch_size=args.batch_size, device=args.device,
                               suites=args.suite, eps=args.eps, norm=args.norm, steps=args.steps,
                               restarts=args.restarts, losses=args.loss, step_size=args.step_size,
                               version=args.version, attacks=args.attacks, seed=args.seed, out=args.out,
                               plot=args.plot, resume=not args.no_resume, ci_method=args.ci, progress=progress)
    except bad_input as err:
        return _fail(str(err))
    except FileNotFoundError as err:
        return _fail(f"{err.filename or err} does not exist")
    md = paths["pivot_md"]
    if md.exists():
        print(md.read_text())
    print(f"{len(records)} rows merged into {paths['csv']}; pivot {paths['pivot_csv']} and {md}"
          + (f"; plot {args.plot}" if args.plot else ""))
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"evaluate-robust: warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
