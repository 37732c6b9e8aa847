"""Reading and writing safetensors files: headers, a lazy multi-shard reader, atomic writes, a streaming merge."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from qera.util.atomic import write_file
from qera.util.errors import QeraError
from qera.io.checkpoint.layout import WEIGHTS, WEIGHTS_INDEX

DEFAULT_MAX_SHARD = 5 * 10**9  # one model.safetensors up to this size, shards + index beyond

class TensorFiles:
    """The tensors of a checkpoint directory: names → (file, shape, dtype), read lazily."""

    def __init__(self, path: Path) -> None:
        from safetensors import SafetensorError, safe_open

        self.path = path
        index, single = path / WEIGHTS_INDEX, path / WEIGHTS
        files: dict[str, Path] = {}
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
                files = {k: path / v for k, v in wm.items()}
            except (KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise QeraError(f"{index} is not a valid safetensors index ({type(exc).__name__}: {exc})") from None
        elif single.exists():
            files = {}
        else:
            raise QeraError(f"{path} holds neither {WEIGHTS} nor {WEIGHTS_INDEX}")
        shard_list = sorted(set(files.values())) if files else [single]
        self.header: dict[str, tuple[Path, tuple[int, ...], torch.dtype]] = {}
        for shard in shard_list:
            if not shard.is_file():
                raise QeraError(f"{shard} is missing (named in {index.name})")
            if shard.stat().st_size == 0:
                raise QeraError(f"{shard} is empty (0 bytes): the checkpoint is incomplete")
            try:
                with safe_open(str(shard), framework="pt") as f:
                    for k in f.keys():
                        sl = f.get_slice(k)
                        self.header[k] = (shard, tuple(sl.get_shape()), _st_dtype(sl.get_dtype(), shard, k))
            except (OSError, SafetensorError) as exc:
                raise QeraError(f"{shard} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
        if files:
            wrong = sorted(k for k, f in files.items() if k not in self.header or self.header[k][0] != f)
            if wrong:
                raise QeraError(f"{index}: {len(wrong)} tensor(s) are not in the shard the index names, e.g. {wrong[:3]}")
        self._handles: dict[Path, Any] = {}

    def keys(self) -> set[str]:
        return set(self.header)

    def get(self, key: str, device: torch.device | str = "cpu") -> torch.Tensor:
        from safetensors import safe_open

        shard = self.header[key][0]
        h = self._handles.get(shard)
        if h is None:
            h = self._handles[shard] = safe_open(str(shard), framework="pt")
        t = h.get_tensor(key)
        return t if str(device) == "cpu" else t.to(device)


def _st_dtype(name: str, shard: Path, key: str) -> torch.dtype:
    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
    if name not in table:
        raise QeraError(f"{shard}: tensor {key} has dtype {name}, which qera does not read")
    return table[name]


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file tensor by tensor from the tensors' own memory (no serialized copy).

    ``safetensors.torch.save_file`` first turns every tensor into a bytes object, doubling the memory
    of what is saved (4.7 GB of statistics became 9.4 GB); this writer holds nothing extra. Tensors
    are laid out in name order and the header is padded to 8 bytes, so the file is deterministic.
    """
    names = sorted(tensors)
    table: dict[str, Any] = {"__metadata__": dict(metadata) if metadata is not None else {"format": "pt"}}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _ST_DTYPES:
            raise QeraError(f"cannot save {name}: dtype {t.dtype} has no safetensors code")
        n = t.numel() * t.element_size()
        table[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(table, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for name in names:
            t = tensors[name].detach().to("cpu").contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # flat first: a size-1 dim may keep any stride


def _save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """One safetensors file, written atomically (flushed before it appears under its name)."""
    write_file(path, lambda tmp: write_safetensors(tensors, tmp))


def _read_st_header(path: Path) -> tuple[int, dict]:
    """``(data start, header)`` of a safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n, json.loads(f.read(n))


def merge_safetensors(parts: list[Path], out: Path, chunk: int = 64 * 2**20,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Concatenate safetensors files into one, copying raw bytes in chunks (memory: one chunk).

    Tensors are laid out in name order; the header is padded with spaces to a multiple of 8.
    """
    entries = []
    for p in parts:
        start, header = _read_st_header(p)
        for name, info in header.items():
            if name != "__metadata__":
                entries.append((name, p, start, info))
    entries.sort(key=lambda e: e[0])
    if len({e[0] for e in entries}) != len(entries):
        raise QeraError("two parts of the checkpoint hold a tensor of the same name")
    table: dict[str, Any] = {"__metadata__": dict(metadata) if metadata is not None else {"format": "pt"}}
    offset = 0
    for name, _, _, info in entries:
        size = info["data_offsets"][1] - info["data_offsets"][0]
        table[name] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(table, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as w:
            w.write(len(head).to_bytes(8, "little"))
            w.write(head)
            handles: dict[Path, Any] = {}
            try:
                for name, p, start, info in entries:
                    f = handles.get(p) or handles.setdefault(p, open(p, "rb"))
                    b, e = info["data_offsets"]
                    f.seek(start + b)
                    left = e - b
                    while left:
                        buf = f.read(min(chunk, left))
                        if not buf:
                            raise QeraError(f"{p} ended early while merging the checkpoint")
                        w.write(buf)
                        left -= len(buf)
            finally:
                for f in handles.values():
                    f.close()

    write_file(out, write)


