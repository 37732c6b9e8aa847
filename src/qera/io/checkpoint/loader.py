"""Loading: validate a checkpoint against its tensors, then build the model on the meta device and fill it."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from qera.util.errors import QeraError
from qera.nn.moe import unfuse_experts
from qera.nn.modules import QERALinear
from qera.io.checkpoint.files import TensorFiles
from qera.io.checkpoint.layout import QERA_CONFIG, expected_layer_tensors, read_qera_config

log = logging.getLogger(__name__)


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
            from qera.nn.targets import is_linear, linear_shape

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

    from qera.io.lazy import empty_model
    from qera.nn.targets import replace_module

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
    from qera.io.lazy import assign_tensor

    stored_objs: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if t.device.type != "meta" or key in meta["tied"]:
            continue
        if key not in files.header:
            continue  # non-persistent buffers are real already (built by the model)
        stored_objs[key] = assign_tensor(model, key, files.get(key, _place(dmap, key)))
    for alias, src in meta["tied"].items():
        if src in stored_objs:
            assign_tensor(model, alias, stored_objs[src])
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
