"""Export a qera checkpoint to llama.cpp: a base GGUF and the low-rank term as a GGUF LoRA adapter.

``export_gguf(model, OUT, gguf_source=...)`` (``qera export CKPT --to gguf --gguf-source SRC --out OUT``)
writes::

    OUT/model.gguf    the source GGUF's metadata (architecture, hyper-parameters, tokenizer, chat
                      template) and tensor list; each quantized layer in its GGUF type, its block
                      bytes converted from the stored codes (no re-rounding: llama.cpp's reference
                      dequantization gives qera's W̃ bit for bit); the other tensors from the
                      checkpoint: 1-D ones (norms) as F32, 2-D ones (embeddings, head) at ``base_type``
    OUT/adapter.gguf  llama.cpp's LoRA adapter: general.type = adapter, adapter.type = lora,
                      adapter.lora.alpha; per layer <tensor>.lora_a = A (r, in) and <tensor>.lora_b = B
                      (out, r) as stored; llama.cpp adds (alpha / r)·B (A x) (alpha = r: exactly B A x)

The source GGUF is the file the checkpoint was quantized from (qera converts GGUF models to
safetensors before quantizing; the checkpoint does not remember the file): its metadata and
tokenizer are copied, and every tensor of the checkpoint is checked against it (names, shapes and
values within quantization error), so a wrong source is refused rather than silently exported.
Layouts llama.cpp stores differently from transformers are undone: llama's q/k rows are permuted
to GGML's rotary order (rows of quantized blocks, of ``B`` and of plain weights alike) and
gemma3's norms get their ``+ 1``. Other architectures are refused.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from qera.util.errors import QeraError
from qera.core.formats import parse_format

log = logging.getLogger(__name__)

MODEL_FILE = "model.gguf"
ADAPTER_FILE = "adapter.gguf"
BASE_TYPES = ("auto", "f32", "f16", "bf16")  # or any GGUF format spec (q8_0, q6_k ...) for 2-D tensors
# HF model_type → GGUF architecture, for the architectures whose tensor conventions are handled here
ARCHITECTURES = {"llama": "llama", "gemma3_text": "gemma3", "gemma3": "gemma3"}
QUANTIZED_TOLERANCE = 0.75  # relative Frobenius distance of W̃ to the source tensor (a wrong tensor: ≈ 1.4)
PLAIN_TOLERANCE = 0.05  # the same for tensors kept in float (the checkpoint holds the source's values)
FILE_TYPES = {"Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1",
              "Q8_0": "MOSTLY_Q8_0", "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_S", "Q4_K": "MOSTLY_Q4_K_S",
              "Q5_K": "MOSTLY_Q5_K_S", "Q6_K": "MOSTLY_Q6_K"}


# -- pure conversions -------------------------------------------------------------------------------
def rope_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order of a llama q/k projection in GGUF: ``gguf[i] = hf[perm[i]]``, shape ``(rows,)``.

    transformers rotates the two halves of each head (``rotate_half``); GGML rotates adjacent
    pairs, so the converter interleaves each head's halves."""
    if rows % (2 * n_head):
        raise QeraError(f"{rows} rows do not split into {n_head} heads of even size")
    return torch.arange(rows).view(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


def gguf_name_map(arch: str, n_blocks: int) -> Callable[[str], str | None]:
    """``hf tensor name -> GGUF tensor name`` (None when the name has no GGUF counterpart)."""
    import gguf

    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise QeraError(f"gguf-py does not know the architecture {arch!r}")
    tmap = gguf.get_tensor_name_map(by_name[arch], n_blocks)
    return lambda name: tmap.get_name(name, try_suffixes=(".weight", ".bias"))


def _float_array(t: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """``(array, raw GGML type or None)`` of a float tensor written as ``dtype`` (f32, f16, bf16)."""
    from gguf import GGMLQuantizationType

    t = t.detach().cpu()
    if dtype == "f32":
        return t.to(torch.float32).numpy(), None
    if dtype == "f16":
        h = t.to(torch.float16)
        if not torch.isfinite(h).all() and torch.isfinite(t).all():
            raise QeraError("a tensor overflows f16; use --base-type f32 or bf16")
        return h.numpy(), None
    if dtype == "bf16":
        b = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
        return b.reshape(*t.shape[:-1], 2 * t.shape[-1]), GGMLQuantizationType.BF16
    raise QeraError(f"unknown float type {dtype!r}")


def _raw_float(dtype: str) -> Any:
    """The raw GGML type the writer needs for ``dtype`` (bf16 goes as bytes; f32/f16 arrays carry theirs)."""
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType.BF16 if dtype == "bf16" else None


def _auto_dtype(t: torch.Tensor) -> str:
    """The lossless GGUF float type of ``t``'s dtype."""
    return {torch.float16: "f16", torch.bfloat16: "bf16"}.get(t.dtype, "f32")


def _relative_distance(ours: np.ndarray, ref: np.ndarray) -> float:
    ref64 = ref.astype(np.float64)
    return float(np.linalg.norm(ours.astype(np.float64) - ref64) / max(np.linalg.norm(ref64), 1e-30))


# -- planning ----------------------------------------------------------------------------------------
@dataclass
class PlannedTensor:
    """One tensor of an output file: name, writer shape and dtype, byte count and how to make its data."""

    name: str
    shape: tuple[int, ...]  # numpy shape of the array handed to the writer (bytes for block types)
    dtype: np.dtype
    nbytes: int
    raw_dtype: Any  # gguf.GGMLQuantizationType or None (f32/f16 arrays)
    make: Callable[[], np.ndarray]


def _source_reader(source: str | os.PathLike):
    """``(path, GGUFReader)`` of a ``.gguf`` file or a model alias that resolves to one."""
    from gguf import GGUFReader

    from qera.io.models import resolve_source

    where = resolve_source(str(source))
    if not isinstance(where, Path) or not where.is_file() or where.suffix != ".gguf":
        raise QeraError(f"--gguf-source must be a .gguf file or an alias of a GGUF model, got {source!r}")
    return where, GGUFReader(str(where))


def _field(reader, key: str) -> Any:
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _architecture(model: nn.Module, reader) -> str:
    arch = _field(reader, "general.architecture")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise QeraError(f"GGUF export handles the tensor conventions of {', '.join(sorted(set(ARCHITECTURES.values())))}; "
                        f"this checkpoint is a {model_type!r} model")
    if ARCHITECTURES[model_type] != arch:
        raise QeraError(f"the checkpoint is a {model_type!r} model but the source GGUF's architecture is {arch!r}")
    blocks = _field(reader, f"{arch}.block_count")
    if blocks is not None and int(blocks) != int(model.config.num_hidden_layers):
        raise QeraError(f"the source GGUF has {blocks} blocks, the checkpoint {model.config.num_hidden_layers}")
    return arch


def _check_layers(layers: Mapping[str, nn.Module]) -> None:
    """Refuse, in one line, a layer GGUF cannot store."""
    from qera.core.formats.gguf import GGUFFormat, KNOWN

    if not layers:
        raise QeraError("the model has no quantized layers; nothing to export")
    for name, m in layers.items():
        if not isinstance(m.fmt, GGUFFormat):
            raise QeraError(f"layer {name} has format {m.fmt}, which GGUF cannot store; quantize with a GGUF type "
                            f"({KNOWN})")
        if m.act_format is not None:
            raise QeraError(f"layer {name} also quantizes its input ({m.act_format}), which llama.cpp does not reproduce")
        if len(m.packed_weight.shape) != 2:
            raise QeraError(f"layer {name}: weight of shape {m.packed_weight.shape} is not a matrix")


def _plain_state(model: nn.Module, layers: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Tensors outside the quantized layers' packed buffers (their biases included), by HF name."""
    prefixes = tuple(f"{n}." for n in layers)
    out = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    for name, m in layers.items():
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias
    for key, t in out.items():
        if t.device.type == "meta":
            raise QeraError(f"cannot export {key}: its weights were never loaded (meta device)")
    return out


class _Plan:
    """Everything both files need: the name map, the per-tensor transforms and the source tensors."""

    def __init__(self, model: nn.Module, reader, arch: str, layers: Mapping[str, nn.Module], base_type: str,
                 check_source: bool) -> None:
        self.model, self.reader, self.arch, self.layers = model, reader, arch, layers
        self.base_type, self.check_source = base_type, check_source
        cfg = model.config
        self.to_gguf = gguf_name_map(arch, int(cfg.num_hidden_layers))
        self.n_head = int(getattr(cfg, "num_attention_heads", 0) or 0)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", 0) or self.n_head)
        self.plain = _plain_state(model, layers)
        self.source = {t.name: t for t in reader.tensors}

    # -- per-tensor rules ------------------------------------------------------------------------
    def row_order(self, gguf_name: str, rows: int) -> torch.Tensor | None:
        """The GGUF row order of a llama q/k weight (or bias); None where rows keep their order."""
        if self.arch != "llama":
            return None
        if ".attn_q." in gguf_name:
            return rope_permutation(rows, self.n_head)
        if ".attn_k." in gguf_name:
            return rope_permutation(rows, self.n_kv)
        return None

    def shift(self, gguf_name: str) -> float:
        """gemma3 stores its RMSNorm weights as ``1 + w``."""
        return 1.0 if self.arch == "gemma3" and gguf_name.endswith("norm.weight") else 0.0

    def source_shape(self, gguf_name: str) -> tuple[int, ...]:
        t = self.source[gguf_name]
        return tuple(int(n) for n in reversed(t.shape.tolist()))

    def check_values(self, gguf_name: str, ours: np.ndarray, tolerance: float) -> None:
        if not self.check_source:
            return
        from gguf.quants import dequantize

        t = self.source[gguf_name]
        ref = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(ours.shape)
        dist = _relative_distance(ours, ref)
        if not dist <= tolerance:
            raise QeraError(f"tensor {gguf_name} of the checkpoint is {dist:.2f} away (relative) from the source GGUF's: "
                            f"is --gguf-source the model this checkpoint was quantized from?")

    def hf_names(self) -> dict[str, str]:
        """``gguf name -> hf name`` for every tensor of the checkpoint that has a GGUF name."""
        out: dict[str, str] = {}
        for hf in [f"{n}.weight" for n in self.layers] + list(self.plain):
            g = self.to_gguf(hf)
            if g is None:
                if hf[: -len(".weight")] in self.layers:
                    raise QeraError(f"quantized layer {hf} has no GGUF tensor name in architecture {self.arch}")
                continue
            out.setdefault(g, hf)  # a tied head maps to token_embd too: the embedding comes first
        return out

    # -- tensors ----------------------------------------------------------------------------------
    def quantized(self, gguf_name: str, layer: str) -> PlannedTensor:
        from gguf import GGMLQuantizationType

        m = self.layers[layer]
        qw = m.packed_weight
        fmt = qw.fmt
        out_f, in_f = qw.shape
        if self.source_shape(gguf_name) != (out_f, in_f):
            raise QeraError(f"layer {layer} is {out_f}x{in_f}, the source GGUF's {gguf_name} is "
                            f"{'x'.join(map(str, self.source_shape(gguf_name)))}")
        fmt.check_shape(tuple(qw.shape), layer)
        raw_type = GGMLQuantizationType[fmt.ggml_type]
        row_bytes = in_f // fmt.block_type.block * fmt.block_type.type_size
        order = self.row_order(gguf_name, out_f)

        def make() -> np.ndarray:
            data = fmt.to_gguf_bytes(qw.tensors, qw.shape, layer)
            w = qw.dequantize(torch.float32)
            if order is not None:
                data, w = data[order.numpy()], w[order]
            self.check_values(gguf_name, w.numpy(), QUANTIZED_TOLERANCE)
            return np.ascontiguousarray(data)

        return PlannedTensor(gguf_name, (out_f, row_bytes), np.dtype(np.uint8), out_f * row_bytes, raw_type, make)

    def plain_tensor(self, gguf_name: str, hf: str) -> PlannedTensor:
        t = self.plain[hf]
        shape = tuple(t.shape)
        if self.source_shape(gguf_name) != shape:
            raise QeraError(f"tensor {hf} is {shape}, the source GGUF's {gguf_name} is {self.source_shape(gguf_name)}")
        kind = "f32" if t.dim() < 2 else self.base_type
        if kind == "auto":
            kind = _auto_dtype(t)
        order = self.row_order(gguf_name, shape[0])
        shift = self.shift(gguf_name)

        def value() -> torch.Tensor:
            v = t.detach().cpu()
            if order is not None:
                v = v[order]
            if shift:
                v = v.to(torch.float32) + shift
            return v

        if kind in ("f32", "f16", "bf16"):
            size = {"f32": 4, "f16": 2, "bf16": 2}[kind]
            arr_shape = shape if kind != "bf16" else (*shape[:-1], 2 * shape[-1])
            dt = {"f32": np.float32, "f16": np.float16, "bf16": np.uint8}[kind]

            def make() -> np.ndarray:
                v = value()
                self.check_values(gguf_name, v.to(torch.float32).numpy(), PLAIN_TOLERANCE)
                return np.ascontiguousarray(_float_array(v, kind)[0])

            return PlannedTensor(gguf_name, arr_shape, np.dtype(dt), math.prod(shape) * size, _raw_float(kind), make)
        from gguf import GGMLQuantizationType

        fmt = parse_format(kind)
        fmt.check_shape(shape, hf)
        bt = fmt.block_type
        row_bytes = shape[-1] // bt.block * bt.type_size
        rows = math.prod(shape[:-1])

        def make_q() -> np.ndarray:
            v = value().to(torch.float32)
            qw = fmt.quantize(v, hf)
            self.check_values(gguf_name, qw.dequantize(torch.float32).numpy(), QUANTIZED_TOLERANCE)
            return np.ascontiguousarray(fmt.to_gguf_bytes(qw.tensors, qw.shape, hf))

        return PlannedTensor(gguf_name, (*shape[:-1], row_bytes), np.dtype(np.uint8), rows * row_bytes,
                             GGMLQuantizationType[fmt.ggml_type], make_q)

    def verbatim(self, gguf_name: str) -> PlannedTensor:
        """A source tensor the checkpoint does not hold (e.g. precomputed rope factors), copied as is."""
        t = self.source[gguf_name]
        data = np.asarray(t.data)
        raw = None if t.tensor_type.name in ("F32", "F16") else t.tensor_type
        return PlannedTensor(gguf_name, tuple(data.shape), data.dtype, int(data.nbytes), raw, lambda: np.asarray(t.data))

    def base_tensors(self) -> list[PlannedTensor]:
        """The base file's tensors, in the source GGUF's order."""
        names = self.hf_names()
        missing = sorted(f"{n}.weight" for n in self.layers if self.to_gguf(f"{n}.weight") not in self.source)
        if missing:
            raise QeraError(f"the source GGUF has no tensor for the quantized layer(s) {', '.join(missing[:3])}"
                            f"{' ...' if len(missing) > 3 else ''}")
        planned = []
        for t in self.reader.tensors:
            hf = names.get(t.name)
            if hf is None:
                log.info("%s: not in the checkpoint, copied from the source GGUF", t.name)
                planned.append(self.verbatim(t.name))
            elif hf.endswith(".weight") and hf[: -len(".weight")] in self.layers:
                planned.append(self.quantized(t.name, hf[: -len(".weight")]))
            else:
                planned.append(self.plain_tensor(t.name, hf))
        return planned

    def adapter_tensors(self) -> list[PlannedTensor]:
        """``<tensor>.lora_a`` = A (r, in) and ``<tensor>.lora_b`` = B (out, r) of each layer with a rank."""
        out = []
        for layer, m in self.layers.items():
            if not m.rank:
                continue
            g = self.to_gguf(f"{layer}.weight")
            order = self.row_order(g, m.out_features)
            for suffix, t, rows_first in ((".lora_a", m.A, False), (".lora_b", m.B, True)):
                kind = _auto_dtype(t)

                def make(t=t, kind=kind, order=order if rows_first else None) -> np.ndarray:
                    v = t.detach().cpu()
                    if order is not None:
                        v = v[order]
                    return np.ascontiguousarray(_float_array(v, kind)[0])

                shape = tuple(t.shape) if kind != "bf16" else (t.shape[0], 2 * t.shape[1])
                dt = np.dtype({"f32": np.float32, "f16": np.float16, "bf16": np.uint8}[kind])
                out.append(PlannedTensor(g + suffix, shape, dt, t.numel() * t.element_size(), _raw_float(kind), make))
        return out


# -- writing -----------------------------------------------------------------------------------------
def _copy_metadata(writer, reader, skip: set[str]) -> None:
    """Every key/value of ``reader`` except the header's own fields and ``skip``."""
    from gguf import GGUFValueType

    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        vtype = f.types[0]
        sub = None
        if vtype == GGUFValueType.ARRAY:
            if len(f.types) > 2:
                log.warning("metadata %s is a nested array: not copied", key)
                continue
            sub = f.types[1] if len(f.types) > 1 else GGUFValueType.INT32
        writer.add_key_value(key, f.contents(), vtype, sub_type=sub)


def _write(path: Path, arch: str, tensors: list[PlannedTensor], metadata: Callable[[Any], None]) -> None:
    """Write a GGUF file: metadata, tensor infos, then each tensor's data as it is made (one at a time)."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    metadata(writer)
    for p in tensors:
        writer.add_tensor_info(p.name, p.shape, p.dtype, p.nbytes, raw_dtype=p.raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        for p in tensors:
            data = p.make()
            if data.nbytes != p.nbytes or data.dtype != p.dtype:
                raise RuntimeError(f"{p.name}: made {data.nbytes} bytes of {data.dtype}, planned {p.nbytes} of {p.dtype}")
            writer.write_tensor_data(data)
    finally:
        writer.close()


def export_gguf(model: nn.Module, out_dir: str | os.PathLike, *, gguf_source: str | os.PathLike | None = None,
                base_type: str = "auto", check_source: bool = True, overwrite: bool = False,
                source_dir: str | os.PathLike | None = None, tokenizer=None) -> Path:
    """Write ``OUT/model.gguf`` and (when a layer has a rank) ``OUT/adapter.gguf``; see the module docstring.

    ``gguf_source``: the GGUF file (or model alias) the checkpoint was quantized from. ``base_type``:
    2-D tensors outside the quantized layers as ``auto`` (their own float dtype, lossless), ``f32``,
    ``f16``, ``bf16`` or a GGUF format spec (``q8_0``). ``check_source``: compare every tensor with
    the source's. Written atomically: ``out_dir`` appears whole or not at all.
    """
    from gguf import LlamaFileType

    from qera.io.checkpoint.layout import quantized_layers
    from qera.util.atomic import atomic_directory

    if gguf_source is None:
        raise QeraError("GGUF export copies the architecture metadata and tokenizer of the GGUF the checkpoint was "
                        "quantized from: pass --gguf-source FILE.gguf (or a model alias such as smollm2-135m)")
    if base_type not in BASE_TYPES:
        try:
            fmt = parse_format(base_type)
        except QeraError as exc:
            raise QeraError(f"base type must be one of {', '.join(BASE_TYPES)} or a GGUF type such as q8_0: {exc}") from None
        if getattr(fmt, "family", "") != "q":
            raise QeraError(f"base type {base_type!r} is no GGUF type; use {', '.join(BASE_TYPES)} or e.g. q8_0")
    if hasattr(model, "peft_config"):
        raise QeraError("this is a PEFT model; export a qera checkpoint (qera.save_quantized), not a QPEFT model")
    if getattr(model, "config", None) is None:
        raise QeraError("GGUF export needs a transformers model (with a .config)")
    layers = quantized_layers(model)
    _check_layers(layers)
    src_path, reader = _source_reader(gguf_source)
    arch = _architecture(model, reader)
    plan = _Plan(model, reader, arch, layers, base_type, check_source)
    base = plan.base_tensors()
    adapter = plan.adapter_tensors()
    types = Counter(m.fmt.ggml_type for m in layers.values())
    main_type = types.most_common(1)[0][0]
    formats = sorted({str(m.fmt) for m in layers.values()})

    def base_meta(writer) -> None:
        _copy_metadata(writer, reader, {"general.architecture", "general.file_type", "general.quantization_version"})
        writer.add_file_type(int(LlamaFileType[FILE_TYPES[main_type]]))
        writer.add_quantization_version(2)
        writer.add_string("qera.format", ",".join(formats))
        writer.add_string("qera.source", src_path.name)

    ranks = sorted({int(m.rank) for m in layers.values() if m.rank})

    def adapter_meta(writer) -> None:
        writer.add_string("general.type", "adapter")
        writer.add_string("adapter.type", "lora")
        # llama.cpp scales B A x by alpha / rank, or by 1 when alpha is 0 (mixed ranks)
        writer.add_float32("adapter.lora.alpha", float(ranks[0]) if len(ranks) == 1 else 0.0)
        for key in ("general.name", "general.basename", "general.size_label"):
            if key in reader.fields:
                writer.add_string(key, str(_field(reader, key)))

    with atomic_directory(out_dir, overwrite) as tmp:
        _write(tmp / MODEL_FILE, arch, base, base_meta)
        if adapter:
            _write(tmp / ADAPTER_FILE, arch, adapter, adapter_meta)
        else:
            log.warning("no layer has a low-rank term (rank 0): no adapter written")
    n = sum(m.in_features * m.out_features for m in layers.values())
    q_bytes = sum(p.nbytes for p in base if p.raw_dtype is not None and p.name in
                  {plan.to_gguf(f"{k}.weight") for k in layers})
    ab_bytes = sum(p.nbytes for p in adapter)
    log.info("exported %d layers (%s) to %s: %.4f bits per quantized weight, %.4f with the adapter", len(layers),
             ", ".join(f"{k} x{v}" for k, v in types.items()), out_dir, 8 * q_bytes / n, 8 * (q_bytes + ab_bytes) / n)
    return Path(out_dir)


__all__ = ["ADAPTER_FILE", "BASE_TYPES", "MODEL_FILE", "export_gguf", "gguf_name_map", "rope_permutation"]
