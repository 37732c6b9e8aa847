"""Wall time per phase of a run, honest on GPUs.

CUDA work is queued asynchronously, so a phase's wall time is only meaningful once the device has
finished it: each phase ends by waiting for the current stream (a handful per block, never per
layer or per batch).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Iterator

import torch


class PhaseTimer:
    """Accumulates seconds per phase name; ``with timer("record"): ...``."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.seconds: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device.type == "cuda":  # this thread's stream only: a side-stream prefetch keeps running
            torch.cuda.current_stream(self.device).synchronize()

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[phase] += time.perf_counter() - t0

    def total(self, *phases: str) -> float:
        return sum(self.seconds.get(p, 0.0) for p in phases)

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.seconds.items()}


class Stopwatch:
    """The time of one piece of work without a host synchronization: wall time on the CPU, a pair of
    CUDA events on a GPU (read by :meth:`seconds` once the stream has passed the end event)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0, self.t1 = time.perf_counter(), None

    def stop(self) -> "Stopwatch":
        if self.cuda:
            self.end.record()
        else:
            self.t1 = time.perf_counter()
        return self

    def seconds(self) -> float:
        if self.cuda:
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / 1000.0
        return (self.t1 if self.t1 is not None else time.perf_counter()) - self.t0
