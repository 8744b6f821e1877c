"""Forward+backward throughput of each suppression conn_* model divided by its residual twin at the same batch.

    python benchmarks/connection_throughput.py                 # CPU, small batch and resolution, a few minutes
    python benchmarks/connection_throughput.py --device cuda --batch 64 --res 224

Both networks of a pair carry the same weights (the suppression one with its delta at 0.7, so every suppressed
block really computes ``(1 - d) x + e^{-dl} F(e^{dl} x)``); each timed step is one training step's forward and
backward (train mode, loss = mean of the logits squared, gradients of every parameter including delta). The two are
timed in alternation, ``--rounds`` times, in alternating order, and the ratio reported is the median of the
per-round ratios, so a slow spell on a shared machine hits both sides of a round alike. Target: ratio >= 0.95.

On CPU the ratio is taken from the process's CPU time with one torch thread (``--threads 1``): on a machine shared
with other jobs, wall time mostly measures waiting for a core; CPU time measures the work each model costs.
Wall-clock images per second are reported beside it. On CUDA the ratio is taken from wall time.

Prints a table and writes (or replaces) the section
``## Suppression vs residual throughput (benchmarks/connection_throughput.py)`` of benchmarks/RESULTS.md, keeping
every other section; within it, the subsection of the device measured is replaced and others are kept.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

import timm
from _common import RESULTS, machine, read_section, write_section
import robustbench_conn.models  # noqa: F401  (registers the conn_* models in timm)
from robustbench_conn.models.imagenet import CONN_MODELS, load_twin_state_dict, suppressed_blocks

SECTION = "## Suppression vs residual throughput (benchmarks/connection_throughput.py)"
SETTINGS = "ShareExpDecayLearnDecay_AbsExp_Adam_RestaLayerIdx3"


def build_pair(name: str, res: int, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    kw = {"img_size": res} if "levit" in name else {}
    torch.manual_seed(0)
    residual = timm.create_model(name, **kw)
    suppression = timm.create_model(name, connection=SETTINGS, init_decay=0.7, **kw)
    load_twin_state_dict(suppression, residual.state_dict())
    return residual.to(device).train(), suppression.to(device).train()


def step(model: torch.nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    out = model(x)
    if isinstance(out, tuple):
        out = out[0]
    out.float().square().mean().backward()


def timed(model: torch.nn.Module, x: torch.Tensor, iters: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per step over ``iters`` steps."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(iters):
        step(model, x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - wall) / iters, (time.process_time() - cpu) / iters


def measure(name: str, args, device: torch.device) -> dict:
    residual, suppression = build_pair(name, args.res, device)
    x = torch.randn(args.batch, 3, args.res, args.res, device=device)
    for _ in range(args.warmup):
        step(residual, x)
        step(suppression, x)
    # clock: the times the ratio is taken from. On CPU, process CPU time: on a shared machine, time spent waiting
    # for a core is not the model's cost (wall-clock figures are reported beside it). On CUDA, wall time.
    clock = 1 if device.type == "cpu" else 0
    times: dict[str, list[tuple[float, float]]] = {"residual": [], "suppression": []}
    ratios = []
    for r in range(args.rounds):
        order = ["residual", "suppression"] if r % 2 == 0 else ["suppression", "residual"]
        for kind in order:
            times[kind].append(timed(residual if kind == "residual" else suppression, x, args.iters, device))
        ratios.append(times["residual"][-1][clock] / times["suppression"][-1][clock])  # (sup img/s) / (res img/s)

    def ips(kind: str, which: int) -> float:
        return args.batch / statistics.median(t[which] for t in times[kind])

    return dict(model=name, blocks=len(suppressed_blocks(suppression)),
                residual=ips("residual", clock), suppression=ips("suppression", clock),
                residual_wall=ips("residual", 0), suppression_wall=ips("suppression", 0),
                ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                ratio_wall=ips("suppression", 0) / ips("residual", 0))


def table(rows: list[dict], cpu: bool) -> str:
    unit = "img/CPU-s" if cpu else "img/s"
    head = (f"| model | suppressed blocks | residual {unit} | suppression {unit} | ratio (median) | ratio range |"
            + (" residual img/s (wall) | suppression img/s (wall) | wall ratio |" if cpu else ""))
    lines = [head, "| --- |" + " ---: |" * (head.count("|") - 2)]
    for r in rows:
        line = (f"| {r['model']} | {r['blocks']} | {r['residual']:.2f} | {r['suppression']:.2f} | "
                f"{r['ratio']:.3f} | {r['ratio_min']:.3f} - {r['ratio_max']:.3f} |")
        if cpu:
            line += f" {r['residual_wall']:.2f} | {r['suppression_wall']:.2f} | {r['ratio_wall']:.3f} |"
        lines.append(line)
    return "\n".join(lines)


def write_results(path: Path, device_key: str, body: str) -> None:
    """Replace this device's subsection of our section in ``path``, keeping everything else."""
    sub_header = f"### {device_key}"
    intro = ("Forward+backward throughput of each suppression `conn_*` model over its residual twin, same weights, "
             "same batch (target: ratio >= 0.95). Ratio = median over rounds of (suppression throughput) / "
             "(residual throughput), the two timed in alternation; on CPU, throughput per second of process CPU "
             "time with one torch thread (wall-clock figures beside it), on CUDA per second of wall time.\n")
    subsections: dict[str, str] = {}
    for part in re.split(r"^(?=### )", read_section(SECTION, path) or "", flags=re.M):
        if part.startswith("### "):
            subsections[part.splitlines()[0]] = part.rstrip() + "\n"
    subsections[sub_header] = f"{sub_header}\n\n{body.rstrip()}\n"
    write_section(SECTION, f"{SECTION}\n\n{intro}\n" + "\n".join(subsections[k] for k in sorted(subsections)),
                  path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(CONN_MODELS), choices=CONN_MODELS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--res", type=int, default=64, help="input resolution (LeViT is built for it)")
    parser.add_argument("--iters", type=int, default=1, help="steps per timed run")
    parser.add_argument("--rounds", type=int, default=15, help="alternating residual/suppression timed runs")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: per-process CPU time is then the model's cost)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file to update ('' to skip)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    load_before = os.getloadavg()
    started = time.time()
    rows = []
    for name in args.models:
        row = measure(name, args, device)
        rows.append(row)
        print(f"{name}: residual {row['residual']:.2f}, suppression {row['suppression']:.2f} img per "
              f"{'CPU-' if device.type == 'cpu' else ''}second, ratio {row['ratio']:.3f} "
              f"(range {row['ratio_min']:.3f}-{row['ratio_max']:.3f})", flush=True)
    elapsed = time.time() - started
    load_after = os.getloadavg()
    out = table(rows, cpu=device.type == "cpu")
    print()
    print(out)

    if str(args.results):
        command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/connection_throughput.py",
                                                                *(sys.argv[1:] if argv is None else argv)])
        below = [r["model"] for r in rows if r["ratio"] < 0.95]
        body = "\n".join([
            f"Command: `{command}`  ",
            f"Machine: {machine(device)}, timm {timm.__version__}  ",
            f"Setting: batch {args.batch}, {args.res}x{args.res} input, train mode, suppression = `{SETTINGS}` "
            f"with init_decay 0.7 (LeViT: d = |0.1 delta| = 0.07), {args.rounds} rounds x {args.iters} steps after "
            f"{args.warmup} warm-up steps; run took {elapsed:.0f} s on {time.strftime('%Y-%m-%d %H:%M %Z')}.  ",
            f"Load average (1 min) before/after: {load_before[0]:.2f}/{load_after[0]:.2f} "
            f"(a shared machine: other jobs may have run alongside; the alternating rounds pair the two sides).",
            "",
            out,
            "",
            ("All ratios meet the 0.95 target." if not below else
             f"Below the 0.95 target: {', '.join(below)}."),
        ])
        device_key = "CUDA" if device.type == "cuda" else "CPU"
        write_results(args.results, device_key, body)
        print(f"\nwrote the {device_key} part of '{SECTION[3:]}' in {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
