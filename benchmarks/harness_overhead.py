"""Harness overhead: the time of ``robustbench_conn.evaluation.evaluate`` (suite autoattack: sanity gate, AutoAttack
through robustbench_conn.attacks, float32 re-score, checks, CSV merge under lock, pivot, model info) divided by the
time of pyautoattack called directly on the same model, points, eps, version and seed. Target: <= 1.03.

    python benchmarks/harness_overhead.py --n 100 --eps 8/255 --repeats 5 --write

The model is a small MLP trained on the embedded digits data for a few seconds (no download). Runs alternate
direct / harness / harness / direct ... so slow drifts of a shared machine hit both sides alike. The clock is
process CPU time with one torch thread (other jobs on the machine do not inflate it); wall time is shown beside.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from _common import machine, write_section

SECTION = "## Harness overhead (benchmarks/harness_overhead.py)"


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    from robustbench_conn.data import get_dataset

    model = nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(192, 64), nn.ReLU(), nn.Linear(64, 10))
    data = get_dataset("digits", "train")
    x, y = data.batch(torch.arange(len(data)))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(30):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 128):
            idx = perm[i:i + 128]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100, help="test points (the first N of digits/test)")
    p.add_argument("--eps", default="8/255")
    p.add_argument("--version", default="standard")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each side")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--write", action="store_true", help="update the section of benchmarks/RESULTS.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("auto-attack").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")

    import pyautoattack

    from robustbench_conn.data import get_dataset
    from robustbench_conn.evaluation import evaluate, parse_eps

    eps = parse_eps(args.eps)
    model = tiny_model()
    x, y = get_dataset("digits", "test").batch(torch.arange(args.n))

    # CPU time spent inside pyautoattack's run_standard_evaluation (the attack work), so each harness run also
    # splits into attack work and the harness's own (gate, re-score, checks, files): a within-run measure that the
    # noise between separate runs does not blur.
    inside = [0.0]
    run_standard_evaluation = pyautoattack.AutoAttack.run_standard_evaluation

    def timed_run_standard_evaluation(self, *a, **kw):
        start = time.process_time()
        try:
            return run_standard_evaluation(self, *a, **kw)
        finally:
            inside[0] += time.process_time() - start

    pyautoattack.AutoAttack.run_standard_evaluation = timed_run_standard_evaluation

    def direct() -> int:
        adversary = pyautoattack.AutoAttack(model, eps=float(eps), norm="Linf", device="cpu", seed=0,
                                            version=args.version)
        adversary.logger.setLevel(logging.ERROR)
        _, y_adv = adversary.run_standard_evaluation(x.clone(), y.clone(), batch_size=args.batch_size)
        return int((y_adv == y).sum())

    def harness() -> int:
        with tempfile.TemporaryDirectory() as tmp:
            (record,) = evaluate(model, "digits", images=x, labels=y, suites=["autoattack"], eps=[eps.text],
                                 version=args.version, seed=0, batch_size=args.batch_size,
                                 out=Path(tmp) / "leaderboard.csv")
            return record.n_robust

    description = machine(torch.device("cpu"))
    times = {"direct": [], "harness": []}
    walls = {"direct": [], "harness": []}
    robust = {"direct": set(), "harness": set()}
    runs = []
    order = []
    for r in range(args.repeats):
        order += ["direct", "harness"] if r % 2 == 0 else ["harness", "direct"]
    for side in order:
        inside[0] = 0.0
        wall, cpu = time.perf_counter(), time.process_time()
        n_robust = (direct if side == "direct" else harness)()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        times[side].append(cpu)
        walls[side].append(wall)
        robust[side].add(n_robust)
        runs.append((side, cpu, wall, cpu - inside[0], n_robust))
        print(f"{side:8s} {cpu:8.2f} CPU s {wall:8.2f} s wall  outside pyautoattack {cpu - inside[0]:6.3f} CPU s  "
              f"robust {n_robust}/{args.n}", flush=True)
    own = [outside / (cpu - outside) for side, cpu, _, outside, _ in runs if side == "harness"]
    ratio_median = statistics.median(times["harness"]) / statistics.median(times["direct"])
    ratio_total = sum(times["harness"]) / sum(times["direct"])
    wall_ratio = statistics.median(walls["harness"]) / statistics.median(walls["direct"])
    result = {"n": args.n, "eps": eps.text, "version": args.version, "repeats": args.repeats,
              "threads": args.threads, "direct_cpu_s": times["direct"], "harness_cpu_s": times["harness"],
              "direct_wall_s": walls["direct"], "harness_wall_s": walls["harness"],
              "ratio_median": ratio_median, "ratio_total": ratio_total, "wall_ratio_median": wall_ratio,
              "harness_own_over_attack": own,
              "same_robust_count": robust["direct"] == robust["harness"] and len(robust["direct"]) == 1,
              "robust": sorted(robust["direct"]), "torch": torch.__version__,
              "pyautoattack": pyautoattack.__version__, "python": platform.python_version(),
              "machine": f"{platform.machine()} {platform.processor()}".strip()}
    print(f"harness / direct (CPU time): {ratio_median:.4f} (medians), {ratio_total:.4f} (totals); wall time "
          f"{wall_ratio:.4f} (medians); harness's own time / its attack time: {max(own):.4f} at most; same robust "
          f"count: {result['same_robust_count']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.write:
        command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/harness_overhead.py"] + sys.argv[1:])
        write_section(SECTION, "\n".join([
            SECTION, "",
            "The time of `robustbench_conn.evaluation.evaluate(..., suites=[\"autoattack\"], out=...)` (sanity gate, "
            "AutoAttack through `robustbench_conn.attacks.AutoAttack`, float32 re-score and norm check, after-checks, "
            "CSV merge under a file lock, pivot and model-info files) divided by the time of "
            "`pyautoattack.AutoAttack(...).run_standard_evaluation` called directly on the same model, points, eps, "
            "version and seed. Target: at most 1.03.", "",
            f"Command: `{command}`  ",
            f"AutoAttack {args.version}, Linf {eps.text}, seed 0, batch {args.batch_size}, {args.threads} torch "
            f"thread(s); a small MLP trained 30 epochs on the embedded digits data; first {args.n} digits test "
            f"points; pyautoattack {pyautoattack.__version__}. Machine: {description}.  ",
            "Clock: process CPU time (other jobs on the machine do not inflate it); wall time beside.", "",
            "| run (in order) | CPU s | wall s | CPU s outside pyautoattack | robust |",
            "| --- | ---: | ---: | ---: | ---: |",
            *[f"| {side} | {cpu:.2f} | {wall:.2f} | {outside:.3f} | {n}/{args.n} |"
              for side, cpu, wall, outside, n in runs], "",
            f"Ratio harness / direct: **{ratio_median:.3f}** (median CPU times; totals {ratio_total:.3f}; median wall "
            f"times {wall_ratio:.3f}). Within each harness run, the time outside pyautoattack's "
            "`run_standard_evaluation` (sanity gate, float32 re-score, checks, files) over the time inside it: "
            f"at most {max(own):.4f}. Same robust count on both sides in every run: "
            f"{'yes' if result['same_robust_count'] else 'no'}."]))


if __name__ == "__main__":
    main()
