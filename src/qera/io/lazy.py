"""Models larger than memory: built on the meta device, weights read from safetensors shards on demand.

:func:`load_model_lazy` instantiates the architecture without allocating any parameter
(accelerate's ``init_empty_weights``: buffers such as rotary frequencies stay real), then reads
only the weights outside the decoder blocks (embeddings, final norm). A block's weights are read
when the block is processed (:class:`StreamingPlacer`) and dropped back to the meta device after,
so peak memory holds one block, never the whole model.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from qera.util.errors import QeraError

log = logging.getLogger(__name__)

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"

# Checkpoints written before transformers 5 fused the experts name some tensors differently; these
# are the layouts transformers itself converts on load (facts from its conversion table).
KEY_ALIASES = ((".mlp.", ".block_sparse_moe."),)  # (model name fragment, checkpoint fragment): Mixtral
LEGACY_EXPERTS = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))  # per-expert (gate, up, down)


class WeightSource:
    """Read-only access to the tensors of a local safetensors checkpoint (single file or index)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        from safetensors import SafetensorError, safe_open

        self.directory = Path(directory)
        index = self.directory / SAFE_INDEX
        self._files: dict[str, Path] = {}
        try:
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                self._files = {k: self.directory / v for k, v in weight_map.items()}
            elif (self.directory / SAFE_SINGLE).is_file():
                with safe_open(str(self.directory / SAFE_SINGLE), framework="pt") as f:
                    self._files = {k: self.directory / SAFE_SINGLE for k in f.keys()}
            else:
                raise QeraError(f"{self.directory} holds no {SAFE_SINGLE} or {SAFE_INDEX}")
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise QeraError(f"{index} is not a safetensors index ({type(exc).__name__}: {exc})") from None
        except (OSError, SafetensorError) as exc:
            raise QeraError(f"cannot read the weights in {self.directory}: {exc}") from None
        missing = sorted({str(p) for p in self._files.values() if not p.is_file()})
        if missing:
            raise QeraError(f"{self.directory}: shard(s) named in the index are missing: {missing[:3]}")
        self._handles: dict[Path, object] = {}

    def keys(self) -> set[str]:
        return set(self._files)

    def __contains__(self, key: str) -> bool:
        return self.resolve(key) is not None

    def resolve(self, key: str) -> str | None:
        """The checkpoint name of model tensor ``key`` (itself, or an older alias), or None."""
        if key in self._files:
            return key
        for new, old in KEY_ALIASES:
            if new in key and key.replace(new, old) in self._files:
                return key.replace(new, old)
        return None

    def legacy_expert(self, prefix: str, index: int, part: str, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """Expert ``index``'s ``gate_up_proj`` (gate and up concatenated) or ``down_proj`` from a per-expert layout."""
        for gate, up, down in LEGACY_EXPERTS:
            names = [f"{prefix}{index}.{n}.weight" for n in ((gate, up) if part == "gate_up_proj" else (down,))]
            found = [self.resolve(n) for n in names]
            if all(found):
                ts = [self.get(n, device) for n in names]
                return torch.cat(ts, dim=0) if len(ts) > 1 else ts[0]
        return None

    def has_fused_experts(self, key: str) -> bool:
        """Whether a fused ``…experts.gate_up_proj``/``down_proj`` can be assembled from per-expert tensors."""
        head, _, part = key.rpartition(".")
        if part not in ("gate_up_proj", "down_proj"):
            return False
        for gate, up, down in LEGACY_EXPERTS:
            names = [f"{head}.0.{n}.weight" for n in ((gate, up) if part == "gate_up_proj" else (down,))]
            if all(self.resolve(n) for n in names):
                return True
        return False

    def _handle(self, path: Path):
        from safetensors import safe_open

        h = self._handles.get(path)
        if h is None:
            h = safe_open(str(path), framework="pt")
            self._handles[path] = h
        return h

    def get(self, key: str, device: torch.device | str = "cpu") -> torch.Tensor:
        from safetensors import SafetensorError

        name = self.resolve(key)
        if name is None:
            raise QeraError(f"tensor {key} is not in the checkpoint {self.directory}")
        try:
            t = self._handle(self._files[name]).get_tensor(name)
        except (OSError, SafetensorError) as exc:
            raise QeraError(f"cannot read {name} from {self._files[name]}: {exc}") from None
        return t.to(device) if str(device) != "cpu" else t

    def close(self) -> None:
        self._handles.clear()


def assign_tensor(module: nn.Module, local: str, value: torch.Tensor) -> torch.Tensor:
    """Put ``value`` at ``local`` (a parameter or buffer name); returns the object stored."""
    owner_name, _, attr = local.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        old = owner._parameters[attr]
        if not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=bool(old is not None and old.requires_grad))
        owner._parameters[attr] = value
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        raise QeraError(f"{local} is neither a parameter nor a buffer of {type(owner).__name__}")
    return value


def materialize(module: nn.Module, prefix: str, source: WeightSource, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None, skip: str | None = None) -> int:
    """Read every meta parameter/persistent buffer of ``module`` (named ``prefix + local``) from ``source``.

    Names starting with ``skip`` are left alone. Tied parameters (one Parameter under two names)
    are read once and stay one object. Returns the bytes read.
    """
    from qera.nn.moe import UnfusedExperts

    total = 0
    special = []
    for n, m in module.named_modules():
        if isinstance(m, UnfusedExperts) and not (skip and n.startswith(skip)):
            total += m.materialize_from(source, f"{prefix}{n}." if n else prefix, device, dtype)
            special.append(f"{n}." if n else "")
    persistent = {f"{n}.{b}" if n else b for n, m in module.named_modules()
                  for b in m._buffers if b not in m._non_persistent_buffers_set}
    named = list(module.named_parameters(remove_duplicate=False))
    named += [(n, b) for n, b in module.named_buffers(remove_duplicate=False) if n in persistent]
    done: dict[int, torch.Tensor] = {}
    for local, t in named:
        if t is None or t.device.type != "meta" or (skip and local.startswith(skip)):
            continue
        if any(local.startswith(sp) for sp in special):
            continue
        if id(t) in done:
            assign_tensor(module, local, done[id(t)])
            continue
        key = prefix + local
        value = source.get(key, device)
        if tuple(value.shape) != tuple(t.shape):
            raise QeraError(f"{key} has shape {tuple(value.shape)} in the checkpoint, the model expects {tuple(t.shape)}")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        total += value.numel() * value.element_size()
        done[id(t)] = assign_tensor(module, local, value)
    # non-persistent buffers (rotary frequencies ...) are not in the shards: built with the model, they
    # follow the block to the device
    target = torch.device(device)
    for n, m in module.named_modules():
        for b in m._non_persistent_buffers_set:
            t = m._buffers.get(b)
            if skip and (f"{n}.{b}" if n else b).startswith(skip):
                continue
            if t is not None and t.device.type != "meta" and t.device != target:
                m._buffers[b] = t.to(target)
    return total


def release(module: nn.Module) -> None:
    """Move every parameter and persistent buffer of ``module`` to the meta device (frees their memory;
    non-persistent buffers, which the shards lack, go to the host), and drop dense caches and
    fused-kernel copies of quantized weights."""
    for m in module.modules():
        for k, p in list(m._parameters.items()):
            if p is not None and p.device.type != "meta":
                m._parameters[k] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for k, b in list(m._buffers.items()):
            if b is None or b.device.type == "meta":
                continue
            # a non-persistent buffer cannot be read again from the shards: it goes back to the host
            m._buffers[k] = b.to("cpu") if k in m._non_persistent_buffers_set else torch.empty_like(b, device="meta")
        if hasattr(m, "_w_cache"):
            m._w_cache = None
        if getattr(m, "_kernel", None) is not None:
            m._kernel.release()


def is_lazy_source(path: str | os.PathLike) -> bool:
    """A local directory with a ``config.json`` and safetensors weights."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and ((p / SAFE_INDEX).is_file() or (p / SAFE_SINGLE).is_file())


def model_class(config):
    """The architecture named in the HF config (e.g. ``BertForSequenceClassification``), else a causal LM."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def empty_model(config, dtype: torch.dtype | None = None) -> nn.Module:
    """The architecture of ``config`` with every parameter on the meta device (buffers real)."""
    from accelerate import init_empty_weights

    cls = model_class(config)
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with init_empty_weights():
        if hasattr(cls, "from_config"):
            model = cls.from_config(config, dtype=dtype)
        else:
            model = cls._from_config(config, dtype=dtype)
    return model.eval()


def _tied_names(model: nn.Module) -> set[str]:
    """Parameter names that are aliases of an earlier parameter (tied weights)."""
    seen: dict[int, str] = {}
    out = set()
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            out.add(n)
        else:
            seen[id(p)] = n
    return out


def load_model_lazy(path: str | os.PathLike, blocks_name: str | None = None, dtype: torch.dtype | None = None):
    """``(model, tokenizer, source)``: everything outside the decoder blocks is read now, the blocks stay on meta.

    ``blocks_name`` is the ``ModuleList`` of blocks (found from the default targets when None).
    """
    from transformers import AutoConfig, AutoTokenizer

    from qera.nn.targets import find_blocks, find_targets

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    model = empty_model(config, dtype)
    source = WeightSource(path)
    if blocks_name is None:
        blocks_name, _ = find_blocks(model, list(find_targets(model)))
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    want = {n for n, _ in model.named_parameters()}
    missing = sorted(n for n in want - _tied_names(model) if n not in source and not source.has_fused_experts(n))
    if missing:
        raise QeraError(
            f"{path}: the checkpoint lacks {len(missing)} weight(s) of the model, e.g. {missing[:3]}; "
            "its names must match the model's state dict"
        )
    prefix = f"{blocks_name}."
    materialize(model, "", source, "cpu", dtype, skip=prefix)
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    tok = None
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(path)
    log.info("lazy model from %s: blocks under %s stay on meta until processed", path, prefix[:-1])
    return model, tok, source


def canonical_device(device: torch.device | str) -> torch.device:
    """``cuda`` → ``cuda:N`` (the current device), so devices compare equal to tensors' ``.device``."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d
