"""Cost of one adversarial training step, as ratios measured in one run on the same machine.

For each network and connection it times, on the same batch:
  * one forward+backward pass (cross-entropy, train mode): the unit;
  * one TRADES step and one PGD-AT step with a k-step attack (attack, loss, backward, SGD step, EMA update),
and reports
  * step time / ((k + 2) x forward+backward)   target <= 1.10 (k attack passes, plus the loss's two forwards and
    its backward: TRADES runs clean and adversarial forwards, PGD-AT one forward plus the clean-accuracy forward);
  * suppression step time / residual step time   target <= 1.05.
Measurements alternate between the variants round by round so that drift on a shared machine hits all of them.
On CPU the times are process CPU seconds with one torch thread (robust to other jobs on the machine); on CUDA,
wall seconds after synchronisation.

    python benchmarks/train_step.py                 # nrn-58-1-swish (init 8) and a WRN-28-10-sized network, CPU
    python benchmarks/train_step.py --write         # also update benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from _common import clock, machine, median_interval, write_section
from robustbench_conn.attacks import PGD
from robustbench_conn.models import create_model
from robustbench_conn.trainers.common import ModelEma
from robustbench_conn.trainers.losses import pgd_at_loss, trades_loss

SECTION = "## Training step cost (benchmarks/train_step.py)"
NETWORKS = {  # name -> (create_model kwargs, batch size on CPU)
    "nrn-58-1-swish (init 8)": ({"name": "nrn-58-1-swish", "init_channels": 8}, 64),
    "wrn-28-10 (relu)": ({"name": "wrn-28-10-relu"}, 4),
}


def _timed(fn, device) -> float:
    start = clock(device)
    fn()
    return clock(device) - start


def build(kwargs: dict, connection: str, device: torch.device):
    torch.manual_seed(0)
    model = create_model(**kwargs, connection=connection, init_decay=0.2).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return model, optimizer, ModelEma(model, 0.995)


def measure(kwargs: dict, batch: int, k: int, rounds: int, device: torch.device) -> dict:
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    trades_attack = PGD(eps=8 / 255, alpha=2 / 255, steps=k, loss="trades_kl")
    ce_attack = PGD(eps=8 / 255, alpha=2 / 255, steps=k, loss="ce")
    setups = {c: build(kwargs, c, device) for c in ("residual", "suppression")}

    def pass_fn(model, optimizer, ema):
        def run():
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
        return run

    def step_fn(method):
        def make(model, optimizer, ema):
            def run():
                if method == "trades":
                    loss, _ = trades_loss(model, x, trades_attack(model, x, y), y, beta=6.0)
                else:
                    loss, _ = pgd_at_loss(model, x, ce_attack(model, x, y), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                ema.update(model)
            return run
        return make

    kinds = {"pass": pass_fn, "trades": step_fn("trades"), "pgd-at": step_fn("pgd-at")}
    times = {(c, kind): [] for c in setups for kind in kinds}
    for c, setup in setups.items():  # warm-up: allocator, oneDNN primitives
        for make in kinds.values():
            make(*setup)()
    for r in range(rounds):
        for kind, make in kinds.items():  # which variant goes first alternates, so position effects cancel
            for c in (list(setups) if r % 2 == 0 else list(setups)[::-1]):
                times[(c, kind)].append(_timed(make(*setups[c]), device))
    med = {key: statistics.median(v) for key, v in times.items()}
    out = {}
    for c in setups:
        out[c] = {"pass_s": med[(c, "pass")],
                  "trades_s": med[(c, "trades")], "trades_ratio": med[(c, "trades")] / ((k + 2) * med[(c, "pass")]),
                  "pgdat_s": med[(c, "pgd-at")], "pgdat_ratio": med[(c, "pgd-at")] / ((k + 2) * med[(c, "pass")])}
    # suppression / residual, paired round by round
    for kind, key in (("trades", "trades_supp_over_res"), ("pgd-at", "pgdat_supp_over_res")):
        paired = [s / r for s, r in zip(times[("suppression", kind)], times[("residual", kind)])]
        out[key], out[key + "_ci"] = statistics.median(paired), median_interval(paired)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--k", type=int, default=10, help="attack steps")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--write", action="store_true", help="update the section of benchmarks/RESULTS.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    started = time.perf_counter()
    rows, missed = [], []
    for name in args.networks:
        kwargs, batch = NETWORKS[name]
        r = measure(kwargs, batch, args.k, args.rounds, device)
        missed += [f"{name} {c} {label} {r[c][key]:.3f} (> 1.10)" for c in ("residual", "suppression")
                   for label, key in (("TRADES / (k+2)", "trades_ratio"), ("PGD-AT / (k+2)", "pgdat_ratio"))
                   if r[c][key] > 1.10]
        missed += [f"{name} suppression / residual {label} {r[key]:.3f} (> 1.05)"
                   for label, key in (("TRADES", "trades_supp_over_res"), ("PGD-AT", "pgdat_supp_over_res"))
                   if r[key] > 1.05]
        paired = [f"{r[key]:.3f}" + (" ({:.3f}-{:.3f})".format(*r[key + "_ci"]) if r[key + "_ci"] else "")
                  for key in ("trades_supp_over_res", "pgdat_supp_over_res")]
        for c in ("residual", "suppression"):
            rows.append(f"| {name} | {c} | {batch} | {r[c]['pass_s']:.3f} | {r[c]['trades_s']:.2f} | "
                        f"{r[c]['trades_ratio']:.3f} | {r[c]['pgdat_s']:.2f} | {r[c]['pgdat_ratio']:.3f} | "
                        f"{paired[0]} | {paired[1]} |")
        print("\n".join(rows[-2:]), flush=True)
    unit = "CPU s" if device.type == "cpu" else "s"
    text = "\n".join([
        SECTION, "",
        f"One TRADES step and one PGD-AT step (k = {args.k}) against (k + 2) forward+backward passes of the same model "
        "and batch (target <= 1.10), and the suppression step over the residual step (target <= 1.05); medians of "
        f"{args.rounds} alternating rounds after a warm-up. Suppression / residual is paired round by round, with "
        "the distribution-free 95% interval of its median (order statistics; none below 6 rounds).", "",
        f"Command: `python benchmarks/train_step.py{' --device ' + args.device if args.device != 'cpu' else ''} "
        f"--rounds {args.rounds} --write`  ",
        f"Machine: {machine(device)}  ",
        f"Run: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{time.perf_counter() - started:.0f} s wall; times in {unit} (process CPU time on CPU, so other jobs on the "
        "machine do not inflate them).", "",
        f"| network | connection | batch | fwd+bwd ({unit}) | TRADES step ({unit}) | TRADES / (k+2) passes | "
        f"PGD-AT step ({unit}) | PGD-AT / (k+2) passes | suppression / residual (TRADES) | "
        "suppression / residual (PGD-AT) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", *rows, "",
        "Every ratio meets its target." if not missed else "Targets missed in this run: " + "; ".join(missed) + ".",
        ""])
    print(text)
    if args.write:
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
