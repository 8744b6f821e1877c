"""Command-line plumbing shared by the front ends: YAML files as argparse defaults, and clean exits on bad input."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

import yaml

__all__ = ["parse_with_config", "run_main", "run_training", "check_one_step_form", "default_device", "str2bool",
           "UsageError"]

class UsageError(ValueError):
    """A bad flag or config value."""


def default_device() -> str:
    """``cuda`` when a CUDA device is present, else ``cpu``: the default of every ``--device`` flag."""
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def str2bool(text: str) -> bool:
    """argparse type for the research code's ``--flag False`` spellings."""
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv`` with the keys of ``--config FILE`` (YAML) as defaults; the command line wins.

    Keys are the flags' long names with ``_`` or ``-`` (``attack_eps`` or ``attack-eps``); unknown keys are refused.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            raise UsageError(f"config file {path} does not exist.")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise UsageError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}.") from None
        if not isinstance(data, dict):
            raise UsageError(f"config file {path} must hold a mapping of flag names to values.")
        dests = {a.dest for a in parser._actions}
        defaults = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(k for k in defaults if k not in dests)
        if unknown:
            raise UsageError(f"config file {path} has unknown key(s) {', '.join(unknown)}; run with --help for the "
                             "flags.")
        choices = {a.dest: a.choices for a in parser._actions if a.choices}
        for key, value in defaults.items():
            if key in choices and value not in choices[key]:
                raise UsageError(f"config file {path}: {key} must be one of {', '.join(map(str, choices[key]))}, "
                                 f"got {value!r}.")
        parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def run_main(prog: str, body: Callable[[], int | None]) -> int:
    """Run ``body``; bad input becomes one sentence on stderr and exit status 2."""
    try:
        return int(body() or 0)
    except (ValueError, FileNotFoundError, PermissionError) as err:
        # Our own error types (DataError, SettingsError, TrainError, AttackError, ...) are ValueErrors that say what
        # the user asked for that cannot be done; anything else from deeper down is a bug and keeps its traceback.
        if isinstance(err, ValueError) and not type(err).__module__.startswith("robustbench_conn"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; resume with --resume.", file=sys.stderr)
        return 130


def run_training(prog: str, argv: Sequence[str] | None, build_parser: Callable[[], argparse.ArgumentParser],
                 resolve: Callable[[argparse.Namespace], dict], train: Callable[[dict], Path]) -> int:
    """The body of a training command: flags (with --config defaults) -> resolved config -> run folder."""
    def body() -> int:
        run_dir = train(resolve(parse_with_config(build_parser(), argv)))
        print(f"{prog}: finished; run folder {run_dir}")
        return 0

    return run_main(prog, body)


def check_one_step_form(config: dict) -> None:
    """The research code's multistep flags are accepted only with their published one-step values; pops them."""
    if config.pop("coes_b", None) not in (None, [-1.0, 0.0]) or config.pop("coes_a", None) not in (None, [1.0, 0.0]) \
            or config.pop("conver_ord", None) not in (None, 1):
        raise UsageError("only the one-step form (--givenA 1 0 --givenB -1 0 --ConverOrd 1) of the paper's "
                         "multistep connection is supported.")
