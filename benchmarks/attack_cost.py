"""What does our PGD cost? Time of PGD-k against its physical floor (k forward+backward passes) and against
torchattacks' PGD-k, on the same model and batch; on CUDA (or with --throughput) also images/s with bf16 autocast
and channels_last.

    python benchmarks/attack_cost.py                      # CPU: nrn-58-1-swish (init 8) and a CIFAR ResNet-18
    python benchmarks/attack_cost.py --batch-size 128 --steps 10 --repeats 5 --device cuda

The floor is k iterations of forward, loss and ``torch.autograd.grad`` with respect to the input only, with the
model in eval mode and its parameters frozen: exactly the work PGD cannot avoid. Targets: ours / floor <= 1.05,
ours / torchattacks <= 1.00. torchattacks is timed as users call it (parameters trainable) and, as a control, with
the parameters frozen as our attack freezes them, so that what the model's autograd graph saves from freezing is
not credited to the attack's own code. The timings are interleaved within each repeat, in a rotating order (so a
load change on a shared machine hits all alike), after warm-up calls; ratios are taken within a repeat and their
median over repeats is reported with a distribution-free 95% interval. On
CPU the clock is process CPU time with one torch thread (robust to other jobs on a shared machine); wall-clock
ratios are given beside.
The figures go to the section "## Attack cost (benchmarks/attack_cost.py)" of benchmarks/RESULTS.md (other sections
are kept) with the command line and a description of the machine, unless --no-write.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from _common import RESULTS, machine, median_interval, write_section
from robustbench_conn.attacks import PGD
from robustbench_conn.models import Normalize, create_model

SECTION = "## Attack cost (benchmarks/attack_cost.py)"
MODELS = ("nrn-58-1-swish", "resnet18", "tiny-cnn")


def resnet18_cifar(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 adapted to 32x32 inputs (3x3 stride-1 stem, no max-pool), normalising inside."""
    import torchvision
    net = torchvision.models.resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    return nn.Sequential(Normalize(), net)


def tiny_cnn(num_classes: int = 10) -> nn.Module:
    """A deliberately tiny network (one 3x3 conv): its fwd+bwd is so cheap that the attack's own per-step
    arithmetic shows up in the ratios, instead of drowning in the model's cost and the timing noise."""
    return nn.Sequential(Normalize(), nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, num_classes))


def build_model(name: str) -> nn.Module:
    if name == "resnet18":
        return resnet18_cifar()
    if name == "tiny-cnn":
        return tiny_cnn()
    if name == "nrn-58-1-swish":
        return create_model("nrn-58-1-swish", connection="suppression", init_channels=8)
    return create_model(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall-clock seconds, process CPU seconds) of one call."""
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def floor_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int):
    """k forward+backward passes w.r.t. the input, parameters frozen: what any PGD-k must pay."""
    def run():
        delta = torch.zeros_like(x, requires_grad=True)
        for _ in range(steps):
            loss = F.cross_entropy(model(x + delta), y, reduction="sum")
            torch.autograd.grad(loss, delta)
    return run


def measure(name: str, args, device: torch.device) -> dict:
    import torchattacks
    torch.manual_seed(args.seed)
    model = build_model(name).to(device).eval()
    x = torch.rand(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    eps, alpha, k = 8 / 255, 2 / 255, args.steps
    ours = PGD(eps=eps, alpha=alpha, steps=k, seed=0)
    with contextlib.redirect_stdout(io.StringIO()):      # torchattacks prints on construction
        theirs = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=k, random_start=True)

    def frozen(fn):
        def run():
            flags = [p.requires_grad for p in model.parameters()]
            for p in model.parameters():
                p.requires_grad_(False)
            try:
                fn()
            finally:
                for p, flag in zip(model.parameters(), flags):
                    p.requires_grad_(flag)
        return run

    runs = {"floor": frozen(floor_fn(model, x, y, k)), "ours": lambda: ours(model, x, y),
            "torchattacks": lambda: theirs(x, y), "torchattacks_frozen": frozen(lambda: theirs(x, y))}
    for _ in range(args.warmup):
        for fn in runs.values():
            fn()
    wall = {key: [] for key in runs}
    cpu = {key: [] for key in runs}
    order = list(runs)
    for repeat in range(args.repeats):
        shift = repeat % len(order)
        for key in order[shift:] + order[:shift]:      # rotate, so no method always runs first
            w, c = timed(runs[key], device)
            wall[key].append(w)
            cpu[key].append(c)
    # On CPU the clock is process CPU time (robust to other jobs on a shared machine), on CUDA wall time.
    times = cpu if device.type == "cpu" else wall
    # Ratios are paired within a repeat (its runs sit side by side in time, so drift cancels), then the
    # median over repeats with a distribution-free 95% interval.
    ratios = {f"{prefix}{label}": [a / b for a, b in zip(source["ours"], source[other])]
              for prefix, source in (("", times), ("wall_", wall))
              for label, other in (("floor_ratio", "floor"), ("ta_ratio", "torchattacks"),
                                   ("ta_frozen_ratio", "torchattacks_frozen"))}
    row = {"model": name, "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "times": times,
           "wall": wall, "median": {key: statistics.median(v) for key, v in times.items()},
           **{key: statistics.median(v) for key, v in ratios.items()},
           **{key + "_ci": median_interval(v) for key, v in ratios.items()}}
    if args.throughput:
        row["img_per_s"] = throughput(model, x, y, ours, args)
    return row


def throughput(model, x, y, attack, args) -> dict:
    """Images/s (wall clock) of our PGD-k in float32 / bf16 autocast, contiguous / channels_last."""
    out = {}
    for bf16 in (False, True):
        for channels_last in (False, True):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            m, xi = model.to(memory_format=fmt), x.contiguous(memory_format=fmt)
            ctx = (lambda: torch.autocast(x.device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

            def run():
                with ctx():
                    attack(m, xi, y)
            for _ in range(args.warmup):
                run()
            t = statistics.median(timed(run, x.device)[0] for _ in range(args.repeats))
            out[("bf16" if bf16 else "fp32") + (" + channels_last" if channels_last else "")] = len(x) / t
    model.to(memory_format=torch.contiguous_format)
    return out


def render(rows: list[dict], args, device: torch.device, command: str, description: str) -> str:
    k = args.steps
    clock = "process CPU time" if device.type == "cpu" else "wall-clock time"
    lines = [SECTION, "",
             f"Command: `{command}`", "",
             f"Machine: {description}.", "",
             f"Device {device}, batch {args.batch_size}, PGD-{k} (Linf, eps 8/255, step 2/255, random start), "
             f"{args.warmup} warm-up call(s), median of {args.repeats} interleaved repeats, timed in {clock}"
             + (" (robust to other jobs on a shared machine; wall-clock ratios beside)" if device.type == "cpu"
                else "") + ". "
             f"Floor: {k} forward+backward passes w.r.t. the input with frozen parameters. "
             "Ratios are taken within each repeat and the median over repeats is given with its distribution-free "
             "95% interval (order statistics; none below 6 repeats). "
             "torchattacks is timed as users call it (parameters trainable) and, as a control, with the parameters "
             "frozen as our attack freezes them. Targets: ours/floor <= 1.05, ours/torchattacks <= 1.00.", "",
             f"| model | params (M) | floor {k} fwd+bwd (s) | ours PGD-{k} (s) | torchattacks PGD-{k} (s) "
             "| torchattacks, frozen (s) | ours / floor | ours / torchattacks | ours / torchattacks, frozen "
             "| wall: ours / floor | wall: ours / torchattacks |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def ratio(r, key):
        ci = r[key + "_ci"]
        return f"{r[key]:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
    for r in rows:
        m = r["median"]
        lines.append(f"| {r['model']} | {r['params_M']:.2f} | {m['floor']:.3f} | {m['ours']:.3f} | "
                     f"{m['torchattacks']:.3f} | {m['torchattacks_frozen']:.3f} | {ratio(r, 'floor_ratio')} | "
                     f"{ratio(r, 'ta_ratio')} | {ratio(r, 'ta_frozen_ratio')} | "
                     f"{ratio(r, 'wall_floor_ratio')} | {ratio(r, 'wall_ta_ratio')} |")
    lines.append("")
    for label, key in ((clock, "times"), ("wall-clock time", "wall")) if device.type == "cpu" else ((clock, "times"),):
        lines.append(f"Raw {label} (s), per repeat: " + "; ".join(
            f"{r['model']}: " + ", ".join(f"{name} [{', '.join(f'{t:.3f}' for t in v)}]"
                                          for name, v in r[key].items()) for r in rows) + ".")
        lines.append("")
    lines.pop()
    if any("img_per_s" in r for r in rows):
        lines += ["", f"Images/s ({device.type}, wall clock) of our PGD-{k}:", "",
                  "| model | " + " | ".join(rows[0]["img_per_s"]) + " |",
                  "| --- |" + " --- |" * len(rows[0]["img_per_s"])]
        for r in rows:
            lines.append(f"| {r['model']} | " + " | ".join(f"{v:.0f}" for v in r["img_per_s"].values()) + " |")
    else:
        lines += ["", "The bf16-autocast / channels_last images/s table is produced on CUDA (or with --throughput)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated: nrn-58-1-swish (init 8), resnet18 (CIFAR-adapted torchvision), "
                             "tiny-cnn (shows the per-step overhead), or any create_model name")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="k of PGD-k")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: 1 on CPU, where CPU time is the clock; torch's on CUDA)")
    parser.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=None,
                        help="also time images/s with bf16 autocast and channels_last (default: on CUDA only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--batch-size, --steps and --repeats must be >= 1, --warmup >= 0")
    try:
        import torchattacks
    except ImportError:
        parser.error("this benchmark compares with torchattacks: pip install -e '.[torchattacks]'")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.throughput is None:
        args.throughput = device.type == "cuda"
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    description = f"{machine(device)}, torchattacks {torchattacks.__version__}"
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        rows.append(measure(name, args, device))
        r = rows[-1]
        print(f"{name}: floor {r['median']['floor']:.3f}s  ours {r['median']['ours']:.3f}s  torchattacks "
              f"{r['median']['torchattacks']:.3f}s  ours/floor {r['floor_ratio']:.3f}  "
              f"ours/torchattacks {r['ta_ratio']:.3f} (frozen {r['ta_frozen_ratio']:.3f})", flush=True)
    text = render(rows, args, device, command, description)
    print()
    print(text)
    if not args.no_write:
        write_section(SECTION, text, args.results)
        print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
