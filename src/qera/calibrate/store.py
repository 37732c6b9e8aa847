"""Statistics files: :class:`CalibrationStats` (statistics per distinct layer input), saved to and
read from one safetensors file, eagerly or lazily (:class:`LazyStats`, one input at a time).

:class:`StatsFileWriter` writes each block's statistics to a part file as the block finishes and
merges the parts into one safetensors file (raw bytes, constant memory; atomic) with the usual
header, which :meth:`CalibrationStats.load` reads back lazily.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, MutableMapping

import torch

from qera.core.statistics import ActivationStats, check_kinds
from qera.util.atomic import check_parent, cleanup_stale, write_file
from qera.util.errors import QeraError

log = logging.getLogger(__name__)
plan_log = logging.getLogger("qera.plan")


class StatsFileWriter:
    """Block statistics → part files beside ``path`` → one safetensors file at ``path`` on :meth:`finish`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        check_parent(self.path)
        cleanup_stale(self.path)  # part folders of a killed run
        self.parts_dir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-{os.getpid()}-parts-", dir=self.path.parent))
        self.parts: list[Path] = []
        self.meta: dict[str, dict] = {}
        self.groups: dict[str, str] = {}

    def add(self, stats: CalibrationStats) -> None:
        from qera.io.checkpoint.files import write_safetensors

        tensors = {}
        for key, st in stats.stats.items():
            st.finish()
            self.meta[key] = {"dim": st.dim, "kinds": sorted(st.kinds), "count": st.count}
            for kind, value in st.sums.items():
                tensors[f"{key}::{kind}"] = value.detach().to("cpu").contiguous()
        self.groups.update(stats.groups)
        part = self.parts_dir / f"{len(self.parts):05d}.safetensors"
        write_safetensors(tensors, part)
        self.parts.append(part)

    def finish(self, extra: Mapping[str, str] | None = None) -> Path:
        from qera.io.checkpoint.files import merge_safetensors

        header = {"qera_stats": json.dumps({"layers": self.meta,
                                            "extra": {**(extra or {}), "groups": json.dumps(self.groups)}})}
        try:
            write_file(self.path, lambda tmp: merge_safetensors(self.parts, tmp, metadata=header))
        finally:
            self.abort()
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.parts_dir, ignore_errors=True)


class LazyStats(MutableMapping):
    """Statistics kept in a safetensors file, read and checked one input at a time.

    ``meta`` (from the file's header) answers what is there without reading any tensor; an entry
    is loaded on first access and held until it is popped (released), so a solve loop over a
    model whose statistics exceed memory holds one input's statistics at a time.
    """

    def __init__(self, path: Path, meta: Mapping[str, Mapping], device: str | torch.device = "cpu") -> None:
        self.path, self.meta, self.device = Path(path), {k: dict(v) for k, v in meta.items()}, device
        self._cache: dict[str, ActivationStats] = {}
        self._gone: set[str] = set()

    def __contains__(self, key: object) -> bool:
        return key in self.meta and key not in self._gone

    def __getitem__(self, key: str) -> ActivationStats:
        if key in self._cache:
            return self._cache[key]
        if key not in self:
            raise KeyError(key)
        from safetensors import safe_open

        m = self.meta[key]
        st = ActivationStats(int(m["dim"]), frozenset(m["kinds"]), key, int(m["count"]))
        with safe_open(str(self.path), framework="pt", device=str(self.device)) as f:
            names = set(f.keys())
            for kind in st.kinds:
                if f"{key}::{kind}" in names:
                    st.sums[kind] = f.get_tensor(f"{key}::{kind}")
        self._cache[key] = st.validate(str(self.path))
        return st

    def __setitem__(self, key: str, value: ActivationStats) -> None:
        self._cache[key] = value
        self.meta[key] = {"dim": value.dim, "kinds": sorted(value.kinds), "count": value.count}
        self._gone.discard(key)

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        self._cache.pop(key, None)
        self._gone.add(key)

    def pop(self, key, default=None):  # never reads a tensor just to drop it
        if key not in self:
            return default
        value = self._cache.pop(key, None)
        self._gone.add(key)
        return value

    def evict(self, key: str) -> None:
        """Drop the loaded copy (the file keeps the data: a later access reads it again)."""
        self._cache.pop(key, None)

    def __iter__(self) -> Iterator[str]:
        return (k for k in self.meta if k not in self._gone)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    @property
    def loaded_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for st in self._cache.values() for t in st.sums.values())


@dataclass
class CalibrationStats:
    """Statistics per distinct layer input; ``groups`` maps every layer name to its input's key.

    Layers fed the same tensor (q/k/v, gate/up) share one :class:`ActivationStats`.
    """

    stats: MutableMapping[str, ActivationStats]
    groups: dict[str, str]
    extra: dict = field(default_factory=dict)

    @property
    def lazy(self) -> bool:
        """Whether the statistics live in a file and are read one input at a time."""
        return isinstance(self.stats, LazyStats)

    def _meta(self) -> list[Mapping]:
        if isinstance(self.stats, LazyStats):
            return [self.stats.meta[k] for k in self.stats]
        return [{"dim": s.dim, "kinds": s.kinds, "count": s.count} for s in self.stats.values()]

    def __getitem__(self, layer: str) -> ActivationStats:
        try:
            return self.stats[self.groups[layer]]
        except KeyError:
            raise QeraError(f"no calibration statistics for layer {layer}") from None

    def __contains__(self, layer: str) -> bool:
        return layer in self.groups and self.groups[layer] in self.stats

    def info(self, layer: str) -> ActivationStats:
        """The layer's statistics without reading tensors from a lazy file (dim, kinds, count; for checks)."""
        key = self.groups.get(layer)
        if isinstance(self.stats, LazyStats) and key in self.stats:
            m = self.stats.meta[key]
            return ActivationStats(int(m["dim"]), frozenset(m["kinds"]), key, int(m["count"]))
        return self[layer]

    @property
    def kinds(self) -> frozenset[str]:
        metas = self._meta()
        return frozenset.intersection(*(frozenset(m["kinds"]) for m in metas)) if metas else frozenset()

    @property
    def tokens(self) -> int:
        return max((int(m["count"]) for m in self._meta()), default=0)

    @property
    def nbytes(self) -> int:
        """Bytes the statistics take when all are in memory (float64 sums)."""
        return stats_bytes_of(self._meta())

    def release(self, layer: str, done: set[str]) -> None:
        """Free a statistic once every layer sharing it is in ``done``."""
        key = self.groups.get(layer)
        if key is not None and all(l in done for l, k in self.groups.items() if k == key):
            if isinstance(self.stats, LazyStats):
                self.stats.evict(key)  # memory freed, the file keeps it (statistics reused across settings)
            else:
                self.stats.pop(key, None)

    def update(self, other: "CalibrationStats") -> "CalibrationStats":
        """Add the layers of ``other`` (e.g. one block's statistics) to this collection."""
        self.stats.update(other.stats)
        self.groups.update(other.groups)
        return self

    def save(self, path: str | os.PathLike) -> None:
        if isinstance(self.stats, LazyStats) and not self.stats._gone and not self.stats._cache:
            import shutil

            from qera.util.atomic import write_file

            write_file(path, lambda tmp: shutil.copyfile(self.stats.path, tmp))  # already a file: copy it
            return
        save_stats(dict(self.stats.items()), path, extra={**self.extra, "groups": json.dumps(self.groups)})

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu", lazy: bool = False) -> "CalibrationStats":
        """Read a statistics file; ``lazy`` reads only its header now and each input when first used."""
        stats = lazy_stats(path, device) if lazy else load_stats(path, device)
        extra = load_stats_extra(path)
        try:
            groups = json.loads(extra.pop("groups", "{}")) or {k: k for k in stats}
        except (TypeError, json.JSONDecodeError):
            raise QeraError(f"{path}: the layer groups in its header are not valid JSON") from None
        if not isinstance(groups, dict):
            raise QeraError(f"{path}: the layer groups in its header are not a table")
        dangling = sorted(k for k, v in groups.items() if v not in stats)
        if dangling:
            raise QeraError(f"{path}: layer(s) {dangling[:3]} point to statistics that are not in the file")
        return cls(stats, groups, extra)


# -- persistence -------------------------------------------------------------------------------
def save_stats(stats: Mapping[str, ActivationStats], path: str | os.PathLike, extra: dict | None = None) -> None:
    """Write named statistics to one safetensors file, atomically (temp file + rename)."""
    from qera.util.atomic import write_file
    from qera.io.checkpoint.files import write_safetensors

    tensors: dict[str, torch.Tensor] = {}
    meta = {}
    for key, st in stats.items():
        st.finish()
        meta[key] = {"dim": st.dim, "kinds": sorted(st.kinds), "count": st.count}
        for kind, value in st.sums.items():
            tensors[f"{key}::{kind}"] = value.detach().to("cpu").contiguous()
    header = {"qera_stats": json.dumps({"layers": meta, "extra": extra or {}})}
    write_file(path, lambda tmp: write_safetensors(tensors, tmp, metadata=header))


def _read_header(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise QeraError(f"statistics file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {})["qera_stats"])
    except (KeyError, TypeError, json.JSONDecodeError, OSError, SafetensorError) as exc:  # not our file
        raise QeraError(f"{path} is not a qera statistics file ({type(exc).__name__}: {exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get("layers"), dict):
        raise QeraError(f"{path} is not a qera statistics file (no 'layers' table in its header)")
    return header


def load_stats(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, ActivationStats]:
    """Read statistics written by :func:`save_stats`; every tensor is checked (shape, NaN/Inf)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    header = _read_header(path)
    out = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            keys = set(f.keys())
            for key, m in header["layers"].items():
                try:
                    st = ActivationStats(int(m["dim"]), frozenset(m["kinds"]), key, int(m["count"]))
                except (KeyError, TypeError, ValueError) as exc:
                    raise QeraError(f"{path}: bad header entry for {key} ({type(exc).__name__}: {exc})") from None
                for kind in st.kinds:
                    name = f"{key}::{kind}"
                    if name not in keys:
                        if st.count == 0:
                            continue  # an accumulator that never saw a row has no sums
                        raise QeraError(f"{path}: tensor {name} is missing")
                    st.sums[kind] = f.get_tensor(name)
                out[key] = st.validate(str(path))
    except (OSError, SafetensorError) as exc:
        raise QeraError(f"{path} is not a readable statistics file ({type(exc).__name__}: {exc})") from None
    return out


def stats_bytes_of(metas: Iterable[Mapping]) -> int:
    """float64 bytes of statistics described by header entries (``dim``, ``kinds``)."""
    total = 0
    for m in metas:
        d, kinds = int(m["dim"]), set(m["kinds"])
        total += 8 * (d * d if "xtx" in kinds else 0) + 8 * d * len(kinds & {"abs", "sq"})
    return total


def lazy_stats(path: str | os.PathLike, device: str | torch.device = "cpu") -> LazyStats:
    """A :class:`LazyStats` over ``path``: the header and every tensor's shape are checked now, data later."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    header = _read_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (OSError, SafetensorError) as exc:
        raise QeraError(f"{path} is not a readable statistics file ({type(exc).__name__}: {exc})") from None
    for key, m in header["layers"].items():
        try:
            d, kinds, count = int(m["dim"]), list(m["kinds"]), int(m["count"])
        except (KeyError, TypeError, ValueError) as exc:
            raise QeraError(f"{path}: bad header entry for {key} ({type(exc).__name__}: {exc})") from None
        check_kinds(kinds)
        for kind in kinds:
            name = f"{key}::{kind}"
            want = (d, d) if kind == "xtx" else (d,)
            if name not in shapes:
                if count == 0:
                    continue
                raise QeraError(f"{path}: tensor {name} is missing")
            if shapes[name] != want:
                raise QeraError(f"{path}: statistic {kind!r} has shape {shapes[name]}, expected {want} (layer {key})")
    return LazyStats(path, header["layers"], device)


def load_stats_extra(path: str | os.PathLike) -> dict:
    """The ``extra`` dictionary stored with :func:`save_stats` (model name, calibration settings)."""
    extra = _read_header(Path(path)).get("extra", {})
    return extra if isinstance(extra, dict) else {}
