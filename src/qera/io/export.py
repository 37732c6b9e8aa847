"""Export a qera checkpoint to formats that other tools load without qera.

``export(src, out, to="compressed-tensors")`` writes, from a checkpoint directory or a model::

    OUT/model.safetensors   non-quantized tensors as stored; each quantized layer <name> as
                            <name>.weight_packed  int32 (out, ceil(in * bits / 32)),
                            <name>.weight_scale   (out, in / group),
                            <name>.weight_shape   int64 [out, in]  (+ <name>.bias as stored)
    OUT/config.json         the model's config + ``quantization_config`` (compressed-tensors, pack-quantized)
    OUT/adapter/            PEFT LoRA adapter: lora_A = A (r, in), lora_B = B (out, r), lora_alpha = r
    OUT/tokenizer files and generation_config.json, when the source has them

so ``AutoModelForCausalLM.from_pretrained(OUT)`` + ``PeftModel.from_pretrained(model, OUT/"adapter")``
compute ``x W̃ᵀ + (x Aᵀ) Bᵀ``. Only formats whose grid is an integer grid with one scale per
group convert without changing any weight:

- ``int{b}:group=G`` (symmetric): value = code - (2**(b-1) - 1), scale as stored (fp16 values);
  written as float32 by default, because compressed-tensors' load-time dequantization multiplies
  in the scale's dtype, and an fp16 product rounds (int4:group=128: 4.25 bits per weight).
- ``mxint{b}`` (block K): value = ±k, scale = 2**(E - (b - 2)), written as bfloat16 (exact for any
  power of two): mxint4 costs 4 + 16/32 = **4.5** bits per weight instead of 4.25, mxint3 **3.5**
  instead of 3.25, because the 8-bit shared exponent becomes a 16-bit float scale.

compressed-tensors' group strategy needs ``in_features`` divisible by the group; a layer whose
width is not a multiple of G (SmolLM2: 576 with G = 128) is written with group ``gcd(G, in)``
and each scale repeated, still exactly the same weights. Asymmetric int, nf and layers with
activation quantization have no lossless target and are refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from qera.util.registry import Registry
from qera.util.errors import QeraError
from qera.core.formats import QuantizedWeight, WeightFormat
from qera.core.formats.base import _row_chunks
from qera.core.formats.packing import pack_bits, packed_nbytes, unpack_bits

log = logging.getLogger(__name__)

EXPORTERS: Registry[Callable[..., Path]] = Registry("export target")
INTEGER_VALUES: Registry[Callable[..., tuple[torch.Tensor, torch.Tensor]]] = Registry("exportable format family")

# transformers 5.23 + compressed-tensors 0.20 load every width 2..8 exactly (checked in tests/test_export.py)
EXPORTABLE = "symmetric int{2..8}:group=G and mxint{2..8} (any block)"
DEFAULT_SCALE_DTYPES = {"int": torch.float32, "mxint": torch.bfloat16}
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
ADAPTER_DIR = "adapter"


# -- pure conversions -------------------------------------------------------------------------------
def stored_codes(qw: QuantizedWeight, rows: slice | None = None) -> torch.Tensor:
    """qera's unsigned codes of ``qw`` ``(out, in)`` (``rows`` of them), int32, block padding dropped."""
    out_f, in_f = qw.shape
    fmt = qw.fmt
    width = -(-in_f // fmt.group_width) * fmt.group_width  # codes per row, padded to whole groups
    r0, r1, _ = (rows or slice(0, out_f)).indices(out_f)
    if (r0 * width * fmt.bits) % 8:
        raise ValueError(f"row {r0} does not start on a byte of the packed codes")
    start = r0 * width * fmt.bits // 8
    n = (r1 - r0) * width
    packed = qw.tensors["codes"][start:start + packed_nbytes(n, fmt.bits)]
    return unpack_bits(packed, fmt.bits, n).view(r1 - r0, width)[:, :in_f].to(torch.int32)


@INTEGER_VALUES.register("int")
def int_values(fmt: WeightFormat, codes: torch.Tensor, params: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric ``int{b}``: ``(values (rows, in) int8 in [-(2**(b-1)-1), 2**(b-1)-1], scales (rows, groups) float32)``."""
    return (codes - ((1 << (fmt.bits - 1)) - 1)).to(torch.int8), params["scales"].float()


@INTEGER_VALUES.register("mxint")
def mxint_values(fmt: WeightFormat, codes: torch.Tensor, params: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``mxint{b}`` (sign-magnitude codes, shared exponents): ``(±k (rows, in) int8, 2**(E-(b-2)) (rows, blocks) float32)``."""
    sign = codes >> (fmt.bits - 1)
    k = codes & ((1 << (fmt.bits - 1)) - 1)
    exps = params["exponents"].to(torch.int32) - 127 - (fmt.bits - 2)
    return (k * (1 - 2 * sign)).to(torch.int8), torch.ldexp(torch.ones(exps.shape), exps)


def export_group(groups: Iterable[int], widths: Iterable[int]) -> int:
    """One group for every layer: the largest that splits each qera group and each width evenly (their gcd)."""
    return math.gcd(*groups, *widths)


def regroup_scales(scales: torch.Tensor, group: int, in_features: int, target: int) -> torch.Tensor:
    """Scales ``(rows, ceil(in / group))`` as ``(rows, in / target)``, each repeated ``group / target`` times."""
    if group % target or in_features % target:
        raise ValueError(f"group {target} does not split groups of {group} and a width of {in_features} evenly")
    return scales.repeat_interleave(group // target, dim=1)[:, : in_features // target]


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' dense int32 packing of signed ``values`` ``(rows, cols)``.

    Each value is offset by ``2**(bits-1)`` to an unsigned code; code ``j`` of a row occupies bits
    ``j*bits .. j*bits+bits-1`` of the row's little-endian bit stream of 32-bit words. Returns int32
    ``(rows, ceil(cols * bits / 32))``.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if values.numel() and (int(values.min()) < lo or int(values.max()) > hi):
        raise ValueError(f"values must lie in [{lo}, {hi}] to pack into {bits} bits")
    rows, cols = values.shape
    codes = values.to(torch.int64) + (1 << (bits - 1))
    codes = nn.functional.pad(codes, (0, (-cols) % 32))  # a row is then a whole number of words
    stream = pack_bits(codes, bits).view(rows, -1, 4).to(torch.int64)
    words = stream[..., 0] | (stream[..., 1] << 8) | (stream[..., 2] << 16) | (stream[..., 3] << 24)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return words[:, : -(-cols * bits // 32)].contiguous()


@dataclass(frozen=True)
class PackedLayer:
    """One layer in compressed-tensors' pack-quantized layout (``W̃[i, j] = value[i, j] * scale[i, j // group]``)."""

    bits: int
    group: int
    packed: torch.Tensor  # int32 (out, ceil(in * bits / 32))
    scale: torch.Tensor  # (out, in // group)
    shape: tuple[int, int]

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{name}.weight_packed": self.packed, f"{name}.weight_scale": self.scale,
                f"{name}.weight_shape": torch.tensor(self.shape, dtype=torch.int64)}


def check_exportable(name: str, fmt: WeightFormat, act_format: WeightFormat | None = None) -> None:
    """Raise a :class:`QeraError` naming the layer unless it converts losslessly to pack-quantized."""
    why = None
    if fmt.family not in INTEGER_VALUES:
        why = "its levels are not an evenly spaced integer grid"
    elif getattr(fmt, "asym", False):
        why = "its fp16 minimum is no integer multiple of the scale, and compressed-tensors' zero point is an integer"
    elif act_format is not None:
        why = f"it also quantizes its input ({act_format}), which neither transformers nor PEFT reproduces"
    if why:
        raise QeraError(f"layer {name} has format {fmt} and cannot be exported to compressed-tensors: {why}. "
                        f"Exportable formats: {EXPORTABLE}")


def to_pack_quantized(qw: QuantizedWeight, group: int | None = None, scale_dtype: torch.dtype | None = None,
                      name: str = "", chunk_elems: int = 1 << 22) -> PackedLayer:
    """Convert a qera weight ``(out, in)`` to :class:`PackedLayer` without changing any value.

    ``group`` (default ``gcd(G, in)``) must split the format's groups and ``in`` evenly.
    ``scale_dtype`` defaults per family (:data:`DEFAULT_SCALE_DTYPES`); a dtype that cannot hold
    every scale exactly is refused. Rows are converted ``chunk_elems`` weights at a time.
    """
    fmt = qw.fmt
    check_exportable(name or "?", fmt)
    if len(qw.shape) != 2:
        raise QeraError(f"layer {name}: weight of shape {qw.shape} is not a matrix")
    out_f, in_f = qw.shape
    group = group or export_group([fmt.group_width], [in_f])
    rule = INTEGER_VALUES.get(fmt.family)
    params = {k: v for k, v in qw.tensors.items() if k != "codes"}
    _, _, step = _row_chunks((out_f, in_f), chunk_elems)
    packed, scales = [], []
    for r in range(0, out_f, step):
        rows = slice(r, min(r + step, out_f))
        values, scale = rule(fmt, stored_codes(qw, rows), {k: v[rows] for k, v in params.items()})
        packed.append(pack_int32(values, fmt.bits))
        scales.append(regroup_scales(scale, fmt.group_width, in_f, group))
    scale = torch.cat(scales)
    dtype = scale_dtype or DEFAULT_SCALE_DTYPES[fmt.family]
    stored = scale.to(dtype)
    if not torch.equal(stored.float(), scale):
        raise QeraError(f"layer {name}: {dtype} cannot hold the scales of {fmt} exactly; use float32")
    return PackedLayer(fmt.bits, group, torch.cat(packed), stored, (out_f, in_f))


def quantization_config(bits: int, group: int, ignore: list[str]) -> dict[str, Any]:
    """``quantization_config`` of config.json: one pack-quantized scheme for every ``Linear`` not in ``ignore``.

    One scheme only: transformers' load-time dequantization applies the first scheme to every
    dense layer, so per-layer schemes would be decoded with the wrong group.
    """
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": group,
               "dynamic": False, "actorder": None}
    scheme = {"targets": ["Linear"], "weights": weights, "input_activations": None, "output_activations": None,
              "format": "pack-quantized"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": scheme}, "ignore": sorted(ignore), "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}}


def lora_adapter(lowrank: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT LoRA ``(adapter_config, tensors)`` for ``{layer: (A (r, in), B (out, r))}`` with scaling 1.

    ``r`` is the most common rank; other ranks go to ``rank_pattern`` and ``alpha_pattern``
    (keys are escaped full names, which PEFT matches as regexes).
    """
    ranks = {name: int(A.shape[0]) for name, (A, _) in lowrank.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    other = {re.escape(n): k for n, k in sorted(ranks.items()) if k != r}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "inference_mode": True,
              "r": r, "lora_alpha": r, "rank_pattern": other, "alpha_pattern": dict(other), "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "modules_to_save": None, "target_modules": sorted(lowrank)}
    tensors = {}
    for name, (A, B) in lowrank.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.detach().to("cpu").contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.detach().to("cpu").contiguous()
    return config, tensors


# -- reading the model ------------------------------------------------------------------------------
def _check_model(model: nn.Module, layers: Mapping[str, nn.Module]) -> list[str]:
    """Refuse what the export cannot represent; return the plain ``nn.Linear`` layers left unquantized."""
    from qera.nn.moe import unfused_names
    from qera.io.lazy import empty_model

    if hasattr(model, "peft_config"):
        raise QeraError("this is a PEFT model; export a qera checkpoint (qera.save_quantized), not a QPEFT model")
    if not layers:
        raise QeraError("the model has no quantized layers; nothing to export")
    if unfused_names(model):
        raise QeraError("models with unfused MoE experts cannot be exported to compressed-tensors yet")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise QeraError("export needs a transformers model (with a .config)")
    for name, m in layers.items():
        check_exportable(name, m.fmt, m.act_format)
    plain = empty_model(config)
    for name in layers:
        try:
            original = plain.get_submodule(name)
        except AttributeError:
            raise QeraError(f"quantized layer {name} is not a module of the model its config describes") from None
        if not isinstance(original, nn.Linear):
            raise QeraError(f"layer {name} is a {type(original).__name__} in the original model; compressed-tensors "
                            "packs nn.Linear layers only")
    return sorted(n for n, m in plain.named_modules() if isinstance(m, nn.Linear) and n not in layers)


def _plain_tensors(model: nn.Module, layers: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Tensors outside the quantized layers, as stored; tied aliases dropped when the config ties them."""
    tie = bool(getattr(model.config, "tie_word_embeddings", False))
    prefixes = tuple(f"{n}." for n in layers)
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in model.state_dict(keep_vars=True).items():
        if key.startswith(prefixes):
            continue
        if t.device.type == "meta":
            raise QeraError(f"cannot export {key}: its weights were never loaded (meta device)")
        if tie and id(t) in seen:
            continue
        seen.add(id(t))
        out[key] = t.detach().to("cpu").contiguous()
    return out


def _one_scheme(layers: Mapping[str, nn.Module]) -> tuple[int, int]:
    """``(bits, group)`` shared by all layers: group = gcd of the formats' groups and the layer widths."""
    bits = sorted({m.fmt.bits for m in layers.values()})
    if len(bits) > 1:
        raise QeraError(f"the layers use {len(bits)} bit widths ({', '.join(map(str, bits))}); transformers decodes "
                        "every layer of a compressed-tensors model with one scheme, so export one bit width per model")
    groups = [m.fmt.group_width for m in layers.values()]
    return bits[0], export_group(groups, [m.in_features for m in layers.values()])


# -- writing -----------------------------------------------------------------------------------------
def _write_json(path: Path, obj: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _copy_side_files(source_dir: Path | None, tmp: Path, tokenizer, model: nn.Module) -> None:
    """Tokenizer and generation config: copied from the source directory, else saved from objects."""
    if source_dir is not None:
        for name in TOKENIZER_FILES:
            if (source_dir / name).is_file():
                shutil.copyfile(source_dir / name, tmp / name)
        return
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(tmp)
        except Exception as exc:  # an invalid generation config should not block the export
            log.warning("generation config not exported: %s", exc)


def _hf_config(model: nn.Module, quant: Mapping[str, Any], tmp: Path) -> None:
    import copy

    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.save_pretrained(tmp)
    data = json.loads((tmp / "config.json").read_text())
    data["quantization_config"] = dict(quant)
    _write_json(tmp / "config.json", data)


@EXPORTERS.register("compressed-tensors")
def export_compressed_tensors(model: nn.Module, out_dir: str | os.PathLike, *, source_dir: str | os.PathLike | None = None,
                              tokenizer=None, overwrite: bool = False,
                              scale_dtype: torch.dtype | str | None = None) -> Path:
    """Write ``model``'s quantized layers as compressed-tensors pack-quantized + a PEFT LoRA adapter.

    See the module docstring for the layout. Written atomically: ``out_dir`` appears whole or not at all.
    """
    from qera.util.atomic import atomic_directory
    from qera.io.checkpoint.files import write_safetensors
    from qera.io.checkpoint.layout import quantized_layers

    if isinstance(scale_dtype, str):
        if scale_dtype not in SCALE_DTYPES:
            raise QeraError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {scale_dtype!r}")
        scale_dtype = SCALE_DTYPES[scale_dtype]
    layers = quantized_layers(model)
    ignore = _check_model(model, layers)
    bits, group = _one_scheme(layers)
    tensors = _plain_tensors(model, layers)
    lowrank = {}
    for name, m in layers.items():
        tensors.update(to_pack_quantized(m.packed_weight, group, scale_dtype, name).tensors(name))
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach().to("cpu").contiguous()
        if m.rank:
            lowrank[name] = (m.A, m.B)
    quant = quantization_config(bits, group, ignore)
    with atomic_directory(out_dir, overwrite) as tmp:
        write_safetensors(tensors, tmp / "model.safetensors")
        _hf_config(model, quant, tmp)
        _copy_side_files(Path(source_dir) if source_dir is not None else None, tmp, tokenizer, model)
        if lowrank:
            config, lora = lora_adapter(lowrank)
            (tmp / ADAPTER_DIR).mkdir()
            _write_json(tmp / ADAPTER_DIR / "adapter_config.json", config)
            write_safetensors(lora, tmp / ADAPTER_DIR / "adapter_model.safetensors")
        else:
            log.warning("no layer has a low-rank term (rank 0): no adapter written")
    n = sum(math.prod(m.packed_weight.shape) for m in layers.values())
    q_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items()
                  if k.endswith((".weight_packed", ".weight_scale")))
    log.info("exported %d layers to %s as int%d, group %d: %.3f bits per quantized weight", len(layers), out_dir,
             bits, group, 8 * q_bytes / n)
    return Path(out_dir)


@EXPORTERS.register("gguf")
def export_gguf(model: nn.Module, out_dir: str | os.PathLike, **options: Any) -> Path:
    """llama.cpp: ``OUT/model.gguf`` + ``OUT/adapter.gguf`` (see :mod:`qera.io.gguf_export`)."""
    from qera.io.gguf_export import export_gguf as write

    return write(model, out_dir, **options)


def export(src: str | os.PathLike | nn.Module, out_dir: str | os.PathLike, to: str = "compressed-tensors", *,
           overwrite: bool = False, tokenizer=None, **options: Any) -> Path:
    """Export a qera checkpoint directory (or a model with ``QERALinear`` layers) to ``to``; returns ``out_dir``.

    Targets: :data:`EXPORTERS` (``compressed-tensors``, ``gguf``). ``options`` go to the target
    (``scale_dtype`` for compressed-tensors; ``gguf_source``, ``base_type`` for gguf). A directory is loaded with packed weights only.
    """
    from qera.util.atomic import refuse_existing
    from qera.io.checkpoint import load_quantized

    try:
        target = EXPORTERS.get(to)
    except ValueError as exc:
        raise QeraError(str(exc)) from None
    refuse_existing(out_dir, overwrite)  # before any slow loading
    source_dir = None
    if isinstance(src, nn.Module):
        model = src
    else:
        source_dir = Path(src)
        model, _ = load_quantized(source_dir, cache_weight=False)
    return target(model, out_dir, source_dir=source_dir, tokenizer=tokenizer, overwrite=overwrite, **options)


__all__ = ["EXPORTERS", "EXPORTABLE", "PackedLayer", "check_exportable", "export", "export_compressed_tensors",
           "export_group", "int_values", "lora_adapter", "mxint_values", "pack_int32", "quantization_config",
           "regroup_scales", "stored_codes", "to_pack_quantized"]
