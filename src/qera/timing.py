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
