"""Save and load quantized models: safetensors + JSON, written atomically.

Layout of a checkpoint directory::

    model.safetensors     packed codes, scales, A, B of every QERALinear + all other weights
    qera_config.json      QuantConfig, per-layer format/shape/rank, bits, qera version
    config.json, tokenizer files, generation_config.json   (Hugging Face)

The directory is first written under a temporary name beside the target and renamed into
place, so an interrupted save never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .errors import QeraError
from .modules import QERALinear

log = logging.getLogger(__name__)

QERA_CONFIG = "qera_config.json"
WEIGHTS = "model.safetensors"


def plain_key(key: str) -> str | None:
    """Name of a parameter in the plain (un-adapted) model, or None for PEFT adapter tensors.

    PEFT wraps a target as ``<name>.base_layer`` beside ``<name>.lora_A.<adapter>`` and a saved
    head as ``<name>.original_module`` beside ``<name>.modules_to_save.<adapter>``; the base
    checkpoint keeps only the former of each.
    """
    if ".lora_" in key or ".modules_to_save." in key:
        return None
    return key.replace(".base_layer.", ".").replace(".original_module.", ".")


def _dedup_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Plain-model state dict with tied tensors stored once; returns ``(tensors, {alias: stored_name})``."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for raw, t in model.state_dict().items():
        name = plain_key(raw)
        if name is None:
            continue
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.device) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    return tensors, aliases


def quantized_layers(model: nn.Module) -> dict[str, QERALinear]:
    """``QERALinear`` modules by their plain-model name (PEFT's ``.base_layer`` suffix removed)."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, QERALinear):
            out[n[: -len(".base_layer")] if n.endswith(".base_layer") else n] = m
    return out


def save_quantized(model: nn.Module, tokenizer, path: str | os.PathLike, overwrite: bool = False, report=None) -> Path:
    """Write a quantized model (and tokenizer, if given) to ``path`` atomically.

    Refuses an existing ``path`` unless ``overwrite``. Returns the path.
    """
    from safetensors.torch import save_file

    path = Path(path)
    layers = quantized_layers(model)
    if not layers:
        raise QeraError("the model has no quantized layers; run quantize_model first")
    if path.exists() and not overwrite:
        raise QeraError(f"output {path} already exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        tensors, aliases = _dedup_state_dict(model)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "qera_version": __version__})
        config = getattr(model, "qera_config", None)
        meta = {
            "qera_version": __version__,
            "quant_config": config.to_dict() if config is not None else None,
            "layers": {
                n: {"format": str(m.fmt), "in_features": m.in_features, "out_features": m.out_features,
                    "rank": m.rank, "bias": m.bias is not None,
                    "weight_dtype": str(m.weight_dtype).replace("torch.", ""),
                    "lowrank_dtype": str(m.A.dtype).replace("torch.", "")}
                for n, m in layers.items()
            },
            "tied": aliases,
            "bits": _bits_summary(layers),
        }
        if report is not None:
            meta["report_summary"] = report.summary()
        (tmp / QERA_CONFIG).write_text(json.dumps(meta, indent=1))
        hf_config = getattr(model, "config", None)
        if hf_config is not None:
            if hasattr(hf_config, "quantization_config"):
                del hf_config.quantization_config
            hf_config.save_pretrained(tmp)
            gen = getattr(model, "generation_config", None)
            if gen is not None:
                try:
                    gen.save_pretrained(tmp)
                except Exception as exc:  # invalid generation configs should not block the save
                    log.warning("generation config not saved: %s", exc)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if path.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, backup / "old")
            os.replace(tmp, path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _bits_summary(layers: dict[str, QERALinear]) -> dict[str, float]:
    n = sum(m.in_features * m.out_features for m in layers.values())
    wbits = sum(m.storage_bits()["weight"] for m in layers.values())
    lbits = sum(m.storage_bits()["lowrank"] for m in layers.values())
    return {"params": n, "bits_weight": wbits / n, "bits_total": (wbits + lbits) / n}


def read_qera_config(path: str | os.PathLike) -> dict:
    p = Path(path) / QERA_CONFIG
    if not p.is_file():
        raise QeraError(f"{path} is not a qera checkpoint (no {QERA_CONFIG})")
    return json.loads(p.read_text())


def _model_class(config):
    """The architecture named in the HF config (e.g. ``BertForSequenceClassification``), else a causal LM."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu", cache_weight: bool = True):
    """Rebuild ``(model, tokenizer)`` from :func:`save_quantized` output (tokenizer may be None).

    ``cache_weight=False`` keeps only the packed weights in memory (dequantized per forward).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    from .pipeline import QuantConfig, replace_module

    path = Path(path)
    meta = read_qera_config(path)
    config = AutoConfig.from_pretrained(path)
    cls = _model_class(config)
    dtype = getattr(config, "dtype", None) or torch.float32
    model = cls.from_config(config, dtype=dtype) if hasattr(cls, "from_config") else cls._from_config(config, dtype=dtype)
    for name, m in meta["layers"].items():
        replace_module(model, name, QERALinear.empty(
            m["in_features"], m["out_features"], m["format"], m["rank"], m["bias"],
            getattr(torch, m["weight_dtype"]), getattr(torch, m["lowrank_dtype"]),
        ))
        model.get_submodule(name).cache_weight = cache_weight
    state = load_file(str(path / WEIGHTS))
    for alias, stored in meta.get("tied", {}).items():
        state[alias] = state[stored]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in meta.get("tied", {})]
    if missing or unexpected:
        raise QeraError(f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    if meta.get("quant_config"):
        model.qera_config = QuantConfig.from_dict(meta["quant_config"])
    tok = None
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), tok
