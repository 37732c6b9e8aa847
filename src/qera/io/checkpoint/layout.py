"""Names, per-layer JSON entries and the checked ``qera_config.json`` of a checkpoint."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from qera.util.errors import QeraError
from qera.util.atomic import recover_directory
from qera.core.formats import parse_format
from qera.nn.modules import QPREFIX, QERALinear

QERA_CONFIG = "qera_config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
FORMAT_VERSION = 2
PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "model.pt", "model.pth", "pytorch_model.bin.index.json")
LAYER_KEYS = ("format", "in_features", "out_features", "rank", "bias", "weight_dtype", "lowrank_dtype")
# Top-level keys of qera_config.json that every qera version wrote and readers need (format_version
# came only with version 2; 'tied' defaults to {}, 'quant_config' may be null, the rest is optional).
CONFIG_KEYS = ("layers", "bits")
BITS_KEYS = ("bits_weight", "bits_total")


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
    meta = {"format": str(m.fmt), "in_features": m.in_features, "out_features": m.out_features, "rank": m.rank,
            "bias": m.bias is not None, "weight_dtype": _dtype_name(m.weight_dtype),
            "lowrank_dtype": _dtype_name(m.A.dtype)}
    if m.act_format is not None:  # optional key: checkpoints without activation quantization stay as before
        meta["act_format"] = str(m.act_format)
    return meta


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
        if meta.get("act_format") is not None:
            parse_format(meta["act_format"])
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
    if not isinstance(meta, dict):
        raise QeraError(f"{p} holds a JSON {type(meta).__name__}, not an object; not a qera checkpoint config")
    missing = [k for k in CONFIG_KEYS if k not in meta]
    if missing:
        raise QeraError(f"{p} lacks the required key(s) {missing}; not a complete qera checkpoint config")
    if not isinstance(meta["layers"], dict):
        raise QeraError(f"{p}: 'layers' must be an object (layer name -> entry), got {type(meta['layers']).__name__}")
    for name, m in meta["layers"].items():
        _validate_layer_meta(name, m, str(p))
    bits = meta["bits"]
    if not isinstance(bits, dict) or any(isinstance(bits.get(k), bool) or not isinstance(bits.get(k), (int, float))
                                         or not math.isfinite(bits[k]) or bits[k] < 0 for k in BITS_KEYS):
        raise QeraError(f"{p}: 'bits' must be an object with non-negative numbers {list(BITS_KEYS)}, got {bits!r}")
    if not isinstance(meta.get("tied", {}), dict):
        raise QeraError(f"{p}: 'tied' must be an object")
    if meta.get("quant_config") is not None:
        from qera.core.config import QuantConfig

        try:
            QuantConfig.from_dict(meta["quant_config"])
        except (QeraError, ValueError) as exc:
            raise QeraError(f"{p}: bad quant_config: {exc}") from None
    meta.setdefault("tied", {})
    return meta


