"""Shared helpers of the benchmarks: machine description, timing, table printing."""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any, Callable

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {dev}"


def peak_rss_gib() -> float:
    """This process's peak RSS (``VmHWM``). Unlike ``ru_maxrss`` it is not inherited across exec,
    so a benchmark child does not report its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn: Callable[[], Any], repeat: int = 1, sync: bool = False) -> tuple[float, Any]:
    """Best wall time of ``repeat`` calls and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        if sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def emit(bench: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Print a table (columns: key, header, format) and one JSON line per row."""
    print(f"# {machine()}")
    print("  ".join(f"{h:>{max(len(h), 8)}}" for _, h, _ in columns))
    for r in rows:
        cells = []
        for key, h, fmt in columns:
            v = r.get(key)
            cells.append(f"{(format(v, fmt) if v is not None else '-'):>{max(len(h), 8)}}")
        print("  ".join(cells))
    for r in rows:
        print(json.dumps({"bench": bench, **r}))
