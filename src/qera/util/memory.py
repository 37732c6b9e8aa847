"""Memory sizes: parsing budgets, what the machine has, and what a run will need."""

from __future__ import annotations

import ctypes
import os
import re
from typing import Iterable

from qera.util.errors import QeraError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: str | int | float | None, what: str = "memory budget") -> int | None:
    """``"24GiB"``, ``"8GB"``, ``"512MiB"`` or a number of bytes → bytes (None stays None)."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise QeraError(f"{what} must be positive, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise QeraError(f"{what} {value!r} is not a size such as 24GiB, 8GB or 512MiB")
    n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if n <= 0:
        raise QeraError(f"{what} must be positive, got {value!r}")
    return int(n)


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def available_memory() -> int:
    """Bytes of RAM available to this process now (``MemAvailable``; total RAM as a fallback)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 8 * 2**30


def default_budget(env: str = "QERA_MAX_MEMORY") -> int:
    """``$QERA_MAX_MEMORY`` if set, else 60% of the RAM available now."""
    if os.environ.get(env):
        return parse_size(os.environ[env], env)  # type: ignore[return-value]
    return int(0.6 * available_memory())


def stats_bytes(widths: Iterable[int], kinds: Iterable[str]) -> int:
    """float64 accumulator bytes for inputs of the given widths."""
    kinds = set(kinds)
    total = 0
    for d in widths:
        if "xtx" in kinds:
            total += 8 * d * d
        total += 8 * d * len(kinds & {"abs", "sq"})
    return total


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``); a no-op elsewhere.

    Per-block temporaries of tens of MB fall under glibc's dynamic mmap threshold and come from
    the heap, which otherwise keeps growing across blocks (measured: +100 MiB per block).
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def explicit_budget(value: str | int | None, env: str = "QERA_MAX_MEMORY") -> int | None:
    """The budget the user set (``--max-memory`` or ``$QERA_MAX_MEMORY``), or None when neither is set."""
    if value:
        return parse_size(value, "--max-memory")
    if os.environ.get(env):
        return parse_size(os.environ[env], env)
    return None


def check_fits(parts: dict[str, int], budget: int, what: str) -> None:
    """Raise a :class:`QeraError` with the estimate when ``parts`` (bytes) exceed ``budget``."""
    need = sum(parts.values())
    if need > budget:
        detail = " + ".join(f"{k} {format_size(v)}" for k, v in parts.items())
        raise QeraError(f"{what} needs at least {format_size(need)} ({detail}), over the memory budget of "
                        f"{format_size(budget)}; raise --max-memory, or quantize with --pipeline sequential, which "
                        "streams the model one block at a time")
