"""What every benchmark here shares: the clock, a description of the machine, and writing its section of RESULTS.md.

Benchmarks are scripts (``python benchmarks/NAME.py``), so this module is imported by its bare name.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def clock(device: torch.device) -> float:
    """Process CPU seconds on CPU (other jobs on a shared machine do not inflate it; use one torch thread), wall
    seconds after synchronisation on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def median_interval(values, confidence: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free confidence interval for the median of ``values``: the order statistics ``(k, n + 1 - k)``
    with the largest ``k`` for which ``2 P(Binomial(n, 1/2) <= k - 1) <= 1 - confidence``. None when ``n`` is too
    small for any such interval (fewer than 6 values at 95%)."""
    ordered = sorted(values)
    n = len(ordered)
    tail, k = 0.0, 0
    while k < n // 2:
        tail += math.comb(n, k) / 2 ** n          # P(Binomial(n, 1/2) <= k)
        if 2 * tail > 1 - confidence:
            break
        k += 1
    return (ordered[k - 1], ordered[n - k]) if k else None


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    """One line: CPU, cores, torch threads and version, Python, the GPU on CUDA, and the load before the run."""
    threads = torch.get_num_threads()
    parts = [cpu_name(), f"{os.cpu_count()} logical cores",
             f"torch {torch.__version__} ({threads} intra-op thread{'s' if threads != 1 else ''})",
             f"Python {platform.python_version()}"]
    if device.type == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}")
    with contextlib.suppress(OSError):
        parts.append("load average before the run {:.2f} / {:.2f} / {:.2f} (1/5/15 min)".format(*os.getloadavg()))
    return ", ".join(parts)


def _bounds(lines: list[str], title: str) -> tuple[int, int] | None:
    start = next((i for i, line in enumerate(lines) if line.rstrip() == title), None)
    if start is None:
        return None
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return start, end


def read_section(title: str, path: Path = RESULTS) -> str | None:
    """The text of the section headed ``title`` (a ``## `` line), or None."""
    if not path.exists():
        return None
    lines = path.read_text().splitlines(keepends=True)
    bounds = _bounds(lines, title)
    return None if bounds is None else "".join(lines[bounds[0]:bounds[1]])


def write_section(title: str, text: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section headed ``title`` with ``text``, keeping every other section; written to a
    temporary file and renamed, under a lock, so two benchmarks finishing at once both keep their figures."""
    from filelock import FileLock

    # The lock lives in the temp folder, so no stray file lands in the repository.
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    with FileLock(os.path.join(tempfile.gettempdir(), f"results-md-{key}.lock")):
        old = path.read_text() if path.exists() else "# Benchmark results\n"
        lines = old.splitlines(keepends=True)
        text = text.rstrip("\n") + "\n"
        bounds = _bounds(lines, title)
        if bounds is None:
            new = old.rstrip("\n") + "\n\n" + text
        else:
            tail = "".join(lines[bounds[1]:])
            new = "".join(lines[:bounds[0]]) + text + ("\n" + tail if tail else "")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(new)
        os.replace(tmp, path)
