"""The streaming checkpoint writer (block by block, resumable) and ``save_quantized``."""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from qera._version import __version__
from qera.util.errors import QeraError
from qera.util.atomic import atomic_directory, cleanup_stale, refuse_existing, write_json
from qera.nn.modules import QERALinear
from qera.nn.moe import unfused_names
from qera.io.checkpoint.files import DEFAULT_MAX_SHARD, _read_st_header, _save_safetensors, merge_safetensors
from qera.io.checkpoint.layout import (
    FORMAT_VERSION,
    QERA_CONFIG,
    WEIGHTS,
    WEIGHTS_INDEX,
    _dtype_name,
    bits_summary,
    layer_meta,
    plain_key,
    quantized_layers,
)

log = logging.getLogger(__name__)


def _block_state(block: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in block.state_dict().items():
        name = plain_key(prefix + k)
        if name is not None:
            if v.device.type == "meta":
                raise QeraError(f"cannot save {name}: its weights were never loaded (meta device)")
            out[name] = v.detach().to("cpu").contiguous()
    return out


def cast_unquantized(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None,
                     quantized: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """``tensors`` with every floating tensor outside the ``quantized`` layers cast to ``dtype``.

    The quantized layers' own tensors (packed codes, scales, ``A``, ``B``, bias) keep their dtypes:
    those are fixed by the weight format and ``lowrank_dtype``. ``dtype=None`` changes nothing.
    """
    if dtype is None:
        return dict(tensors)
    prefixes = tuple(f"{n}." for n in quantized)
    return {k: v.to(dtype) if v.is_floating_point() and not k.startswith(prefixes) else v
            for k, v in tensors.items()}


def fingerprint_of(*parts: Any) -> str:
    """A short stable hash of JSON-able parts and tensors (what identifies a resumable run)."""
    h = hashlib.sha256()
    for p in parts:
        if torch.is_tensor(p):
            h.update(str((tuple(p.shape), str(p.dtype))).encode())
            h.update(p.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
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
        dtype: store the non-quantized floating tensors (embeddings, norms, LM head) in this dtype
            (None: as they are in the model).
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False, resume: bool = False,
                 fingerprint: str = "", keep_on_error: bool = True, max_shard_bytes: int = DEFAULT_MAX_SHARD,
                 dtype: torch.dtype | None = None) -> None:
        self.path = refuse_existing(path, overwrite)
        self.dtype = dtype
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
    def add_block(self, index: int, prefix: str, block: nn.Module, reports: Iterable = (),
                  refinement: Mapping[str, Any] | None = None) -> None:
        """Write block ``index`` (all its tensors, quantized or not) and record it as finished
        (with its layers' reports and its refinement's record, for a resumed run's report)."""
        import dataclasses

        layers = {prefix + n: layer_meta(m) for n, m in quantized_layers(block).items()}
        tensors = cast_unquantized(_block_state(block, prefix), self.dtype, layers)
        name = f"block-{index:05d}.safetensors"
        _save_safetensors(tensors, self.work / name)
        self.state["blocks"][str(index)] = {
            "file": name, "layers": layers, "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            "reports": [dataclasses.asdict(r) for r in reports],
        }
        if refinement is not None:
            self.state["blocks"][str(index)]["refinement"] = dict(refinement)
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
        from qera.core.report import LayerReport

        return [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in self.state["blocks"][str(index)]["reports"]]

    def stored_refinement(self, index: int) -> dict[str, Any] | None:
        """The refinement record of a finished block (None when it was not refined)."""
        return self.state["blocks"][str(index)].get("refinement")

    # -- the end --------------------------------------------------------------------------------
    def finalize(self, rest: Mapping[str, torch.Tensor], *, tied: Mapping[str, str] | None = None,
                 quant_config=None, quality: Mapping[str, Any] | None = None, hf_config=None,
                 generation_config=None, tokenizer=None, unfused: Iterable[str] = (),
                 buffer_dtypes: Mapping[str, str] | None = None,
                 extra_layers: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
        """Write the tensors outside the blocks and the JSON files, then publish the checkpoint.

        ``extra_layers``: JSON entries of quantized layers stored in ``rest`` (models without blocks).
        """
        rest_name = "rest.safetensors"
        blocks = [self.state["blocks"][k] for k in sorted(self.state["blocks"], key=int)]
        layers: dict[str, Any] = {}
        for b in blocks:
            layers.update(b["layers"])
        layers.update(extra_layers or {})
        _save_safetensors(cast_unquantized(rest, self.dtype, layers), self.work / rest_name)
        parts = [self.work / b["file"] for b in blocks] + [self.work / rest_name]
        total = sum(p.stat().st_size for p in parts)
        meta = {
            "format_version": FORMAT_VERSION, "qera_version": __version__,
            "quant_config": quant_config.to_dict() if quant_config is not None else None,
            "layers": layers, "tied": dict(tied or {}), "bits": bits_summary(layers),
            "unfused_experts": sorted(unfused),
            "buffer_dtypes": dict(sorted((buffer_dtypes or {}).items())),
        }
        if self.dtype is not None:
            meta["unquantized_dtype"] = _dtype_name(self.dtype)
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
                hf_config = _without_quantization_config(hf_config, self.dtype)
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


def _without_quantization_config(hf_config, dtype: torch.dtype | None = None):
    import copy

    cfg = copy.deepcopy(hf_config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    if dtype is not None:
        cfg.dtype = dtype  # config.json's "dtype": the dtype the stored non-quantized weights have
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
                   config=None, max_shard_bytes: int = DEFAULT_MAX_SHARD, dtype: torch.dtype | str | None = None) -> Path:
    """Write a quantized model (and tokenizer, if given) to ``path`` atomically; returns the path.

    ``config`` (a :class:`~qera.core.config.QuantConfig`) or ``report`` (whose config is used) is stored
    as the checkpoint's ``quant_config``. Refuses an existing ``path`` unless ``overwrite``.
    ``dtype`` (e.g. ``torch.bfloat16``): store the non-quantized weights (embeddings, norms, LM head)
    in it; None keeps the model's dtypes. The quantized layers are stored as they are either way.
    """
    dtype = parse_dtype(dtype)
    from qera.nn.targets import find_blocks

    layers = quantized_layers(model)
    if not layers:
        raise QeraError("the model has no quantized layers; run quantize_model first")
    if config is None and report is not None:
        config = report.config
    writer = CheckpointWriter(path, overwrite=overwrite, keep_on_error=False, max_shard_bytes=max_shard_bytes,
                              dtype=dtype)
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
            extra_layers=None if skip else {n: layer_meta(m) for n, m in layers.items()},
        )
    except BaseException:
        writer.close(success=False)
        raise


STORAGE_DTYPES = ("bfloat16", "float16", "float32")


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``torch.bfloat16`` / None → a storage dtype for the non-quantized weights."""
    if dtype is None:
        return None
    name = str(dtype).replace("torch.", "")  # str(torch.bfloat16) == "torch.bfloat16"
    if name not in STORAGE_DTYPES:
        raise QeraError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    return getattr(torch, name)


