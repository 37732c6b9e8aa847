"""Quantized checkpoints: a streaming, sharded, atomic writer and a validating meta-device loader.

Layout (Hugging Face conventions)::

    model.safetensors                      (or model-0000k-of-0000N.safetensors + model.safetensors.index.json)
    qera_config.json   format version, QuantConfig, per-layer format/shape/rank/dtypes, tied names, bits
    config.json, generation_config.json, tokenizer files

Writing: :class:`CheckpointWriter` adds one decoder block at a time to a work folder
``.<name>.partial`` beside the output (each block's file flushed to disk, then recorded in
``state.json``), so an interrupted run resumes after its last finished block. ``finalize`` writes
the rest, assembles the shards in a temporary folder and publishes it atomically
(:mod:`qera.atomic`). Loading: the configuration is validated against the tensors' headers
(names, shapes, dtypes, format, rank) before anything is built; the model is built on the meta
device and filled from the files, each tensor in its stored dtype. Pickle files are never loaded.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ._version import __version__
from .atomic import atomic_directory, cleanup_stale, recover_directory, refuse_existing, write_json
from .errors import QeraError
from .formats import parse_format
from .modules import QPREFIX, QERALinear
from .moe import unfuse_experts, unfused_names

log = logging.getLogger(__name__)

QERA_CONFIG = "qera_config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
FORMAT_VERSION = 2
DEFAULT_MAX_SHARD = 5 * 10**9
PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "model.pt", "model.pth", "pytorch_model.bin.index.json")
LAYER_KEYS = ("format", "in_features", "out_features", "rank", "bias", "weight_dtype", "lowrank_dtype")


# -- names and metadata ---------------------------------------------------------------------------
def plain_key(key: str) -> str | None:
    """Name of a parameter in the plain (un-adapted) model, or None for PEFT adapter tensors.

    PEFT wraps a target as ``<name>.base_layer`` beside ``<name>.lora_A.<adapter>`` and a saved
    head as ``<name>.original_module`` beside ``<name>.modules_to_save.<adapter>``; the base
    checkpoint keeps only the former of each.
    """
    if ".lora_" in key or ".modules_to_save." in key:
        return None
    return key.replace(".base_layer.", ".").replace(".original_module.", ".")


def quantized_layers(model: nn.Module) -> dict[str, QERALinear]:
    """``QERALinear`` modules by their plain-model name (PEFT's ``.base_layer`` suffix removed)."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, QERALinear):
            out[n[: -len(".base_layer")] if n.endswith(".base_layer") else n] = m
    return out


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def layer_meta(m: QERALinear) -> dict[str, Any]:
    return {"format": str(m.fmt), "in_features": m.in_features, "out_features": m.out_features, "rank": m.rank,
            "bias": m.bias is not None, "weight_dtype": _dtype_name(m.weight_dtype),
            "lowrank_dtype": _dtype_name(m.A.dtype)}


def expected_layer_tensors(meta: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Local tensor name → (shape, dtype) that a layer with this JSON entry stores."""
    fmt = parse_format(meta["format"])
    out_f, in_f, r = int(meta["out_features"]), int(meta["in_features"]), int(meta["rank"])
    low = getattr(torch, str(meta["lowrank_dtype"]))
    want = {QPREFIX + k: v for k, v in fmt.stored_shapes((out_f, in_f)).items()}
    want["A"] = ((r, in_f), low)
    want["B"] = ((out_f, r), low)
    return want


def bits_summary(layers: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Parameters and bits per weight (with and without ``A``, ``B``) from the layers' JSON entries."""
    n = wbits = lbits = 0
    for meta in layers.values():
        out_f, in_f = int(meta["out_features"]), int(meta["in_features"])
        n += out_f * in_f
        for key, (shape, dt) in expected_layer_tensors(meta).items():
            bits = 8 * torch.empty(0, dtype=dt).element_size() * int(torch.Size(shape).numel())
            if key in ("A", "B"):
                lbits += bits
            else:
                wbits += bits
    n = n or 1
    return {"params": n, "bits_weight": wbits / n, "bits_total": (wbits + lbits) / n}


def _validate_layer_meta(name: str, meta: Any, where: str) -> None:
    if not isinstance(meta, dict):
        raise QeraError(f"{where}: entry of layer {name} is not an object")
    missing = [k for k in LAYER_KEYS if k not in meta]
    if missing:
        raise QeraError(f"{where}: layer {name} lacks {missing}")
    for k in ("in_features", "out_features", "rank"):
        if not isinstance(meta[k], int) or isinstance(meta[k], bool) or meta[k] < (0 if k == "rank" else 1):
            raise QeraError(f"{where}: layer {name} has {k} = {meta[k]!r}; expected a {'non-negative' if k == 'rank' else 'positive'} integer")
    if meta["rank"] > min(meta["in_features"], meta["out_features"]):
        raise QeraError(f"{where}: layer {name} has rank {meta['rank']} > min(in, out) = {min(meta['in_features'], meta['out_features'])}")
    for k in ("weight_dtype", "lowrank_dtype"):
        if not isinstance(getattr(torch, str(meta[k]), None), torch.dtype):
            raise QeraError(f"{where}: layer {name} has an unknown {k} {meta[k]!r}")
    try:
        parse_format(meta["format"])
    except (QeraError, ValueError) as exc:
        raise QeraError(f"{where}: layer {name}: {exc}") from None


def read_qera_config(path: str | os.PathLike) -> dict:
    """The parsed and checked ``qera_config.json`` of a checkpoint directory."""
    path = Path(path)
    recover_directory(path)
    if not path.exists():
        raise QeraError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise QeraError(f"{path} is a file; a qera checkpoint is a directory")
    p = path / QERA_CONFIG
    if not p.is_file():
        pickles = [n for n in PICKLE_NAMES if (path / n).exists()]
        hint = (f"; it holds {pickles[0]}, a pickle file, which qera never loads (it could run code)"
                if pickles else "")
        raise QeraError(f"{path} is not a qera checkpoint (no {QERA_CONFIG}){hint}")
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QeraError(f"{p} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("layers"), dict):
        raise QeraError(f"{p} has no 'layers' table; not a qera checkpoint config")
    for name, m in meta["layers"].items():
        _validate_layer_meta(name, m, str(p))
    if not isinstance(meta.get("tied", {}), dict):
        raise QeraError(f"{p}: 'tied' must be an object")
    if meta.get("quant_config") is not None:
        from .config import QuantConfig

        try:
            QuantConfig.from_dict(meta["quant_config"])
        except (QeraError, ValueError) as exc:
            raise QeraError(f"{p}: bad quant_config: {exc}") from None
    meta.setdefault("tied", {})
    meta.setdefault("bits", bits_summary(meta["layers"]))
    return meta


# -- the weight files -----------------------------------------------------------------------------
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


# -- writing --------------------------------------------------------------------------------------
def _block_state(block: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in block.state_dict().items():
        name = plain_key(prefix + k)
        if name is not None:
            if v.device.type == "meta":
                raise QeraError(f"cannot save {name}: its weights were never loaded (meta device)")
            out[name] = v.detach().to("cpu").contiguous()
    return out


def _save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """One safetensors file, written atomically (flushed before it appears under its name)."""
    from safetensors.torch import save_file

    from .atomic import write_file

    # one metadata key only: safetensors writes its metadata map in no fixed order
    write_file(path, lambda tmp: save_file(dict(tensors), str(tmp), metadata={"format": "pt"}))


def _read_st_header(path: Path) -> tuple[int, dict]:
    """``(data start, header)`` of a safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n, json.loads(f.read(n))


def merge_safetensors(parts: list[Path], out: Path, chunk: int = 64 * 2**20) -> None:
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
    table: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, _, _, info in entries:
        size = info["data_offsets"][1] - info["data_offsets"][0]
        table[name] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(table, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    tmp = out.with_name(f".{out.name}.tmp")
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
        w.flush()
        os.fsync(w.fileno())
    os.replace(tmp, out)


def fingerprint_of(*parts: Any) -> str:
    """A short stable hash of JSON-able parts and tensors (what identifies a resumable run)."""
    h = hashlib.sha256()
    for p in parts:
        if torch.is_tensor(p):
            h.update(str((tuple(p.shape), str(p.dtype))).encode())
            h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


class CheckpointWriter:
    """Writes a quantized checkpoint block by block; see the module docstring.

    Args:
        path: final checkpoint directory.
        overwrite: replace an existing checkpoint (atomically) and discard an interrupted run.
        resume: continue the interrupted run whose work folder is beside ``path``.
        fingerprint: identifies the run (config, model, calibration); a resume must match it.
        keep_on_error: keep the work folder when the run fails (resumable runs).
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False, resume: bool = False,
                 fingerprint: str = "", keep_on_error: bool = True, max_shard_bytes: int = DEFAULT_MAX_SHARD) -> None:
        self.path = refuse_existing(path, overwrite)
        self.overwrite, self.fingerprint, self.keep_on_error = overwrite, fingerprint, keep_on_error
        self.max_shard_bytes = max_shard_bytes
        self.work = self.path.parent / f".{self.path.name}.partial"
        cleanup_stale(self.path)
        existed = self.work.exists()
        try:
            self.work.mkdir(exist_ok=True)
            self._lock = open(self.work / "lock", "a")
        except OSError as exc:
            raise QeraError(f"cannot write beside {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise QeraError(f"another qera run is writing {self.path} (its work folder {self.work} is locked)") from None
        self.state: dict[str, Any] = {"version": 1, "fingerprint": fingerprint, "blocks": {}}
        state_file = self.work / "state.json"
        if existed and state_file.is_file():
            try:
                old = json.loads(state_file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                old = None
            if resume and old and old.get("fingerprint") == fingerprint:
                self.state = old
                log.info("resuming %s after block %d", self.path, self.done_blocks - 1)
            elif resume and old:
                self._unlock()
                raise QeraError(
                    f"cannot resume {self.path}: the interrupted run in {self.work} used another model, "
                    "configuration or calibration; pass --overwrite to start over"
                )
            elif not overwrite:
                self._unlock()
                raise QeraError(
                    f"an interrupted run left {self.work}; pass --resume to continue it or --overwrite to start over"
                )
            else:
                self._clear()
        elif existed:
            self._clear()
        elif resume:
            log.info("nothing to resume for %s: starting from the first block", self.path)
        self._save_state()

    # -- state ----------------------------------------------------------------------------------
    def _clear(self) -> None:
        for entry in self.work.iterdir():
            if entry.name != "lock":
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    def _save_state(self) -> None:
        write_json(self.work / "state.json", self.state)

    def _unlock(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
            self._lock.close()

    @property
    def done_blocks(self) -> int:
        """Number of leading blocks already written (0 for a fresh run)."""
        n = 0
        while str(n) in self.state["blocks"]:
            n += 1
        return n

    # -- blocks ---------------------------------------------------------------------------------
    def add_block(self, index: int, prefix: str, block: nn.Module, reports: Iterable = ()) -> None:
        """Write block ``index`` (all its tensors, quantized or not) and record it as finished."""
        import dataclasses

        tensors = _block_state(block, prefix)
        name = f"block-{index:05d}.safetensors"
        _save_safetensors(tensors, self.work / name)
        layers = {prefix + n: layer_meta(m) for n, m in quantized_layers(block).items()}
        self.state["blocks"][str(index)] = {
            "file": name, "layers": layers, "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            "reports": [dataclasses.asdict(r) for r in reports],
        }
        self._save_state()

    def stored_layers(self, index: int) -> dict[str, QERALinear]:
        """The quantized layers of a finished block, rebuilt from its file (for a resumed run)."""
        from safetensors.torch import load_file

        entry = self.state["blocks"][str(index)]
        tensors = load_file(str(self.work / entry["file"]))
        out = {}
        for name, meta in entry["layers"].items():
            local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            out[name] = QERALinear.from_stored(meta, local)
        return out

    def stored_reports(self, index: int) -> list:
        from .report import LayerReport

        return [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in self.state["blocks"][str(index)]["reports"]]

    # -- the end --------------------------------------------------------------------------------
    def finalize(self, rest: Mapping[str, torch.Tensor], *, tied: Mapping[str, str] | None = None,
                 quant_config=None, quality: Mapping[str, Any] | None = None, hf_config=None,
                 generation_config=None, tokenizer=None, unfused: Iterable[str] = (),
                 buffer_dtypes: Mapping[str, str] | None = None) -> Path:
        """Write the tensors outside the blocks and the JSON files, then publish the checkpoint."""
        rest_name = "rest.safetensors"
        _save_safetensors(rest, self.work / rest_name)
        blocks = [self.state["blocks"][k] for k in sorted(self.state["blocks"], key=int)]
        layers: dict[str, Any] = {}
        for b in blocks:
            layers.update(b["layers"])
        parts = [self.work / b["file"] for b in blocks] + [self.work / rest_name]
        total = sum(p.stat().st_size for p in parts)
        meta = {
            "format_version": FORMAT_VERSION, "qera_version": __version__,
            "quant_config": quant_config.to_dict() if quant_config is not None else None,
            "layers": layers, "tied": dict(tied or {}), "bits": bits_summary(layers),
            "unfused_experts": sorted(unfused),
            "buffer_dtypes": dict(sorted((buffer_dtypes or {}).items())),
        }
        if quality:
            meta["quality"] = dict(quality)
        with atomic_directory(self.path, self.overwrite) as tmp:
            if total <= self.max_shard_bytes or len(parts) == 1:
                merge_safetensors(parts, tmp / WEIGHTS)
            else:
                weight_map: dict[str, str] = {}
                n = len(parts)
                for k, p in enumerate(parts, start=1):
                    name = f"model-{k:05d}-of-{n:05d}.safetensors"
                    weight_map.update({key: name for key in _read_st_header(p)[1] if key != "__metadata__"})
                    os.replace(p, tmp / name)
                (tmp / WEIGHTS_INDEX).write_text(json.dumps(
                    {"metadata": {"total_size": total, "qera_version": __version__}, "weight_map": weight_map}, indent=1))
            (tmp / QERA_CONFIG).write_text(json.dumps(meta, indent=1))
            if hf_config is not None:
                hf_config = _without_quantization_config(hf_config)
                hf_config.save_pretrained(tmp)
            if generation_config is not None:
                try:
                    generation_config.save_pretrained(tmp)
                except Exception as exc:  # invalid generation configs should not block the save
                    log.warning("generation config not saved: %s", exc)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        self.close(success=True)
        return self.path

    def close(self, success: bool = False) -> None:
        """Release the lock; remove the work folder unless a failed run is to be resumed."""
        self._unlock()
        if success or not self.keep_on_error:
            shutil.rmtree(self.work, ignore_errors=True)


def _without_quantization_config(hf_config):
    import copy

    cfg = copy.deepcopy(hf_config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    return cfg


def rest_tensors(model: nn.Module, skip_prefix: str | None, source=None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Plain-model tensors outside ``skip_prefix`` with tied tensors stored once: ``(tensors, {alias: stored})``.

    Tensors still on the meta device (a lazily loaded model) are read from ``source``.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[Any, str] = {}
    for raw, t in model.state_dict(keep_vars=True).items():
        name = plain_key(raw)
        if name is None or (skip_prefix and name.startswith(skip_prefix)):
            continue
        key = id(t) if t.device.type == "meta" else ((t.data_ptr(), t.dtype, tuple(t.shape), t.device) if t.numel() else None)
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        if t.device.type == "meta":
            if source is None:
                raise QeraError(f"cannot save {name}: its weights were never loaded (meta device)")
            tensors[name] = source.get(name)
        else:
            tensors[name] = t.detach().to("cpu").contiguous()
    return tensors, aliases


def buffer_dtypes(model: nn.Module) -> dict[str, str]:
    """dtypes of the floating non-persistent buffers (rotary tables ...), which are rebuilt, not saved."""
    out = {}
    for mod_name, mod in model.named_modules():
        for b in getattr(mod, "_non_persistent_buffers_set", ()):
            t = mod._buffers.get(b)
            if t is not None and t.is_floating_point():
                out[f"{mod_name}.{b}" if mod_name else b] = _dtype_name(t.dtype)
    return out


def save_quantized(model: nn.Module, tokenizer, path: str | os.PathLike, overwrite: bool = False, report=None,
                   config=None, max_shard_bytes: int = DEFAULT_MAX_SHARD) -> Path:
    """Write a quantized model (and tokenizer, if given) to ``path`` atomically; returns the path.

    ``config`` (a :class:`~qera.config.QuantConfig`) or ``report`` (whose config is used) is stored
    as the checkpoint's ``quant_config``. Refuses an existing ``path`` unless ``overwrite``.
    """
    from .targets import find_blocks

    layers = quantized_layers(model)
    if not layers:
        raise QeraError("the model has no quantized layers; run quantize_model first")
    if config is None and report is not None:
        config = report.config
    writer = CheckpointWriter(path, overwrite=overwrite, keep_on_error=False, max_shard_bytes=max_shard_bytes)
    try:
        try:
            blocks_name, blocks = find_blocks(model, list(layers))
        except QeraError:
            blocks_name, blocks = None, []
        skip = None
        if blocks_name is not None:
            skip = f"{blocks_name}."
            for i, block in enumerate(blocks):
                writer.add_block(i, f"{blocks_name}.{i}.", block)
        rest, tied = rest_tensors(model, skip)
        return writer.finalize(
            rest, tied=tied, quant_config=config, quality=report.quality() if report is not None else None,
            hf_config=getattr(model, "config", None), generation_config=getattr(model, "generation_config", None),
            tokenizer=tokenizer, unfused=unfused_names(model), buffer_dtypes=buffer_dtypes(model),
        )
    except BaseException:
        writer.close(success=False)
        raise


# -- loading --------------------------------------------------------------------------------------
def validate_checkpoint(path: str | os.PathLike, model: nn.Module | None = None) -> tuple[dict, TensorFiles]:
    """Check a checkpoint before anything is built: JSON, files, and every tensor's name/shape/dtype.

    With ``model`` (built on the meta device from the checkpoint's ``config.json``), the
    non-quantized tensors are checked against the model's parameters too.
    """
    path = Path(path)
    meta = read_qera_config(path)
    files = TensorFiles(path)
    have = files.header
    for name, lm in meta["layers"].items():
        want = expected_layer_tensors(lm)
        if lm["bias"]:
            want["bias"] = ((int(lm["out_features"]),), None)  # type: ignore[assignment]
        for local, (shape, dt) in want.items():
            key = f"{name}.{local}"
            if key not in have:
                raise QeraError(f"{path}: tensor {key} of layer {name} is missing")
            _, got_shape, got_dt = have[key]
            if got_shape != tuple(shape) or (dt is not None and got_dt != dt):
                raise QeraError(
                    f"{path}: {key} is {got_shape} {got_dt}, but {QERA_CONFIG} ({lm['format']}, "
                    f"{lm['out_features']}x{lm['in_features']}, rank {lm['rank']}) needs {tuple(shape)} {dt or ''}".rstrip()
                )
    for alias, stored in meta["tied"].items():
        if stored not in have:
            raise QeraError(f"{path}: tied tensor {alias} points to {stored}, which is not in the checkpoint")
    if model is not None:
        layer_keys = {f"{n}." for n in meta["layers"]}
        state = {k: v for k, v in model.state_dict(keep_vars=True).items()}
        for key, t in state.items():
            if any(key.startswith(p) for p in layer_keys):
                continue
            src = meta["tied"].get(key, key)
            if src not in have:
                if key in meta["tied"] or _is_nonpersistent(model, key):
                    continue
                raise QeraError(f"{path}: the checkpoint lacks {key}, which the model in its config.json has")
            if have[src][1] != tuple(t.shape):
                raise QeraError(
                    f"{path}: {src} has shape {have[src][1]}, but the model in config.json expects {tuple(t.shape)} "
                    "(config.json and the weights disagree)"
                )
        for name in meta["layers"]:
            try:
                mod = model.get_submodule(name)
            except AttributeError:
                raise QeraError(f"{path}: quantized layer {name} is not a module of the model in config.json") from None
            from .targets import is_linear, linear_shape

            if is_linear(mod):
                out_f, in_f = linear_shape(mod)
                lm = meta["layers"][name]
                if (out_f, in_f) != (lm["out_features"], lm["in_features"]):
                    raise QeraError(
                        f"{path}: layer {name} is {lm['out_features']}x{lm['in_features']} in {QERA_CONFIG} "
                        f"but {out_f}x{in_f} in config.json"
                    )
        extra = sorted(k for k in have if not any(k.startswith(p) for p in layer_keys) and k not in state)
        if extra:
            raise QeraError(f"{path}: {len(extra)} tensor(s) are not part of the model, e.g. {extra[:3]}")
    return meta, files


def _is_nonpersistent(model: nn.Module, key: str) -> bool:
    owner, _, attr = key.rpartition(".")
    try:
        mod = model.get_submodule(owner) if owner else model
    except AttributeError:
        return False
    return attr in getattr(mod, "_non_persistent_buffers_set", set())


def _place(device_map: str | torch.device | Mapping[str, str | torch.device] | None, name: str) -> torch.device:
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, (str, torch.device)):
        return torch.device(device_map)
    best = max((p for p in device_map if p == "" or name == p or name.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise QeraError(f"device_map places no entry for {name}")
    return torch.device(device_map[best])


def load_quantized(path: str | os.PathLike, device: str | torch.device | None = None, cache_weight: bool = True,
                   device_map: str | Mapping[str, str | torch.device] | None = None):
    """Rebuild ``(model, tokenizer)`` from a qera checkpoint (tokenizer may be None).

    The model is built on the meta device and filled from the files (no random init, no fp32
    copy); each tensor keeps its stored dtype. ``device`` or ``device_map`` (one device, or
    ``{module prefix: device}`` as in Hugging Face) says where each tensor goes.
    ``cache_weight=False`` keeps only the packed weights in memory (dequantized per forward).
    """
    from transformers import AutoConfig, AutoTokenizer

    from .streaming import empty_model
    from .targets import replace_module

    path = Path(path)
    read_qera_config(path)  # clear errors for the JSON before transformers reads anything
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise QeraError(f"{path}/config.json cannot be read: {str(exc).splitlines()[0]}") from None
    model = empty_model(config)
    meta0 = read_qera_config(path)
    if meta0.get("unfused_experts"):
        unfused = set(unfuse_experts(model))
        missing = sorted(set(meta0["unfused_experts"]) - unfused)
        if missing:
            raise QeraError(f"{path}: {QERA_CONFIG} names expert modules the model does not have: {missing[:3]}")
    meta, files = validate_checkpoint(path, model)
    dmap = device_map if device_map is not None else device
    for name, lm in meta["layers"].items():
        dev = _place(dmap, name)
        local = {k[len(name) + 1:]: files.get(k, dev) for k in files.header if k.startswith(name + ".")
                 and "." not in k[len(name) + 1:]}
        replace_module(model, name, QERALinear.from_stored(lm, local, cache_weight))
    from .streaming import _assign

    stored_objs: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if t.device.type != "meta" or key in meta["tied"]:
            continue
        if key not in files.header:
            continue  # non-persistent buffers are real already (built by the model)
        stored_objs[key] = _assign(model, key, files.get(key, _place(dmap, key)))
    for alias, src in meta["tied"].items():
        if src in stored_objs:
            _assign(model, alias, stored_objs[src])
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    for name, dt in (meta.get("buffer_dtypes") or {}).items():  # e.g. rotary tables of a model cast to bf16
        owner, _, attr = name.rpartition(".")
        try:
            mod = model.get_submodule(owner) if owner else model
        except AttributeError:
            continue
        buf = mod._buffers.get(attr)
        want = getattr(torch, str(dt), None)
        if buf is not None and isinstance(want, torch.dtype) and buf.dtype != want:
            mod._buffers[attr] = buf.to(want)
    left = [k for k, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
    if left:
        raise QeraError(f"{path}: {len(left)} tensor(s) of the model were not in the checkpoint, e.g. {left[:3]}")
    if isinstance(device_map, Mapping) and len({str(v) for v in device_map.values()}) > 1:
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map=dict(device_map))
    tok = None
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(path)
    return model.eval(), tok
