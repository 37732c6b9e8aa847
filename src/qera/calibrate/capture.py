"""Inputs of the decoder blocks, captured without re-implementing any model's forward.

The model is run from ``input_ids`` with every block replaced by a stub that records how it is
called (hidden state, positional arguments and keywords: attention mask, position ids, rotary
embeddings, Gemma-3's per-layer sliding-window masks ...) and passes the hidden state on; the
last stub stops the forward. So everything before the blocks (embeddings, mask and rotary
computation) runs as the model wrote it, and no block's weights are needed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from qera.calibrate.forward import run_model, row_mask
from qera.util.atomic import Scratch, scratch_dir, write_file
from qera.util.errors import QeraError
from qera.util.memory import format_size
from qera.io.lazy import canonical_device

log = logging.getLogger(__name__)
plan_log = logging.getLogger("qera.plan")


class _StopForward(Exception):
    """Raised by the last stub: nothing after the blocks needs to run."""


@dataclass
class BlockCall:
    """How a block is called, less its hidden-state input."""

    args: tuple
    kwargs: dict
    hidden_key: str | None = None  # keyword of the hidden state when it is not passed positionally

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_key is None:
            out = block(hidden, *self.args, **self.kwargs)
        else:
            out = block(*self.args, **{self.hidden_key: hidden, **self.kwargs})
        return out[0] if isinstance(out, (tuple, list)) else out


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, BlockCall]:
    if args and torch.is_tensor(args[0]):
        return args[0], BlockCall(tuple(args[1:]), dict(kwargs))
    if "hidden_states" in kwargs:
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return kwargs["hidden_states"], BlockCall(tuple(args), rest, "hidden_states")
    raise QeraError("cannot find the hidden-state input of a decoder block (no tensor argument)")


class _BlockStub(nn.Module):
    """Stands in for block ``index`` during capture; attribute reads fall through to the real block."""

    def __init__(self, block: nn.Module, index: int, record, stop: bool, tuple_out: bool) -> None:
        super().__init__()
        object.__setattr__(self, "_real", block)
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_record", record)
        object.__setattr__(self, "_stop", stop)
        object.__setattr__(self, "_tuple_out", tuple_out)

    def forward(self, *args, **kwargs):
        hidden, call = _split_hidden(args, kwargs)
        self._record(self._index, hidden, call)
        if self._stop:
            raise _StopForward
        return (hidden,) if self._tuple_out else hidden

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_real"), name)


@contextlib.contextmanager
def _stubbed(blocks: nn.ModuleList, record, upto: int, tuple_out: bool) -> Iterator[None]:
    real = list(blocks)
    try:
        for i in range(upto + 1):
            blocks[i] = _BlockStub(real[i], i, record, stop=(i == upto), tuple_out=tuple_out)
        yield
    finally:
        for i in range(upto + 1):
            blocks[i] = real[i]


def to_device(obj: Any, device: torch.device | str, memo: dict[int, Any] | None = None) -> Any:
    """Move every tensor inside tuples/lists/dicts to ``device``, each object once (shared stays shared)."""
    memo = {} if memo is None else memo
    if torch.is_tensor(obj):
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, BlockCall):
        return BlockCall(to_device(obj.args, device, memo), to_device(obj.kwargs, device, memo), obj.hidden_key)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # named tuple
        return type(obj)(*(to_device(v, device, memo) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device, memo) for v in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device, memo) for k, v in obj.items()}
    return obj


def capture_calls(
    runner: nn.Module, blocks: nn.ModuleList, batch: Mapping[str, torch.Tensor], input_device: torch.device,
    upto: int | None = None, tuple_out: bool = False,
) -> tuple[torch.Tensor, list[BlockCall]]:
    """Run ``runner`` on ``batch`` with blocks ``0..upto`` stubbed: block 0's hidden input and each block's call."""
    upto = len(blocks) - 1 if upto is None else upto
    calls: list[BlockCall | None] = [None] * (upto + 1)
    first: list[torch.Tensor] = []

    def record(i: int, hidden: torch.Tensor, call: BlockCall) -> None:
        if i == 0:
            first.append(hidden)
        calls[i] = call

    with _stubbed(blocks, record, upto, tuple_out), torch.no_grad():
        try:
            run_model(runner, batch, input_device)
        except _StopForward:
            pass
    if not first or any(c is None for c in calls):
        missing = [i for i, c in enumerate(calls) if c is None]
        raise QeraError(f"the model's forward did not call decoder block(s) {missing[:5]} in order")
    return first[0], calls  # type: ignore[return-value]


class ActivationCache:
    """The hidden states entering the current block, one tensor per calibration batch.

    ``location``: ``"device"`` (kept on the compute device), ``"cpu"`` (host memory, pinned when
    the compute device is a GPU) or ``"disk"`` (one safetensors file per batch under a temporary
    folder of ``offload_dir``, removed on :meth:`close`). Entries are replaced in place as each
    block's outputs become the next block's inputs, so one copy of the activations is held.
    """

    def __init__(self, n: int, location: str, device: torch.device, offload_dir: str | os.PathLike | None = None) -> None:
        if location not in ("device", "cpu", "disk"):
            raise QeraError(f"activation cache location must be device, cpu or disk, got {location!r}")
        self.location, self.device = location, canonical_device(device)
        self._items: list[torch.Tensor | None] = [None] * n
        self._dir: Path | None = None
        self._scratch: Scratch | None = None
        if location == "disk":
            self._scratch = scratch_dir(Path(offload_dir) if offload_dir else Path(tempfile.gettempdir()),
                                        "qera-activations-")
            self._dir = self._scratch.path

    def __len__(self) -> int:
        return len(self._items)

    def put(self, i: int, t: torch.Tensor) -> None:
        t = t.detach()
        if self.location == "device":
            self._items[i] = t.to(self.device)
        elif self.location == "cpu":
            if t.is_cuda and t.device == self.device:  # straight into pinned memory, in stream order: no
                # host sync per batch. Safe because the only reader, get(), copies it back to this same
                # device on the same stream, and the pinned allocator keeps a buffer until the copies
                # queued on it are done. From another device (or for a CPU reader) the copy blocks.
                cpu = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                cpu.copy_(t, non_blocking=True)
            else:
                cpu = t.to("cpu")
                if self.device.type == "cuda":
                    cpu = cpu.pin_memory()
            self._items[i] = cpu
        else:
            from safetensors.torch import save_file

            assert self._dir is not None
            x = t.to("cpu").contiguous()
            write_file(self._dir / f"{i}.safetensors", lambda tmp: save_file({"x": x}, str(tmp)), durable=False)

    def get(self, i: int) -> torch.Tensor:
        if self.location == "disk":
            from safetensors.torch import load_file

            assert self._dir is not None
            return load_file(str(self._dir / f"{i}.safetensors"))["x"].to(self.device)
        t = self._items[i]
        if t is None:
            raise QeraError(f"no cached activation for calibration batch {i}")
        return t.to(self.device, non_blocking=True)

    def close(self) -> None:
        self._items = [None] * len(self._items)
        if self._scratch is not None:
            self._scratch.remove()
            self._scratch = self._dir = None


@dataclass
class CapturedInputs:
    """Block 0's inputs and every block's call for each calibration batch (and a one-row probe)."""

    cache: ActivationCache
    calls: list[list[BlockCall]]  # [batch][block]
    masks: list[torch.Tensor | None]  # rows kept in the statistics, per batch
    probe_hidden: torch.Tensor
    probe_calls: list[BlockCall]
    nbytes: int = 0
    tokens: int = 0
    notes: list[str] = field(default_factory=list)


def tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes the distinct tensors inside tuples/lists/dicts/:class:`BlockCall` take once copied to a
    device the way :func:`to_device` copies them: each tensor object once, densely."""
    seen = set() if seen is None else seen
    if torch.is_tensor(obj):
        if id(obj) in seen or obj.device.type == "meta":
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, BlockCall):
        return tensor_bytes(obj.args, seen) + tensor_bytes(obj.kwargs, seen)
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    return 0


def call_bytes(runner: nn.Module, blocks: nn.ModuleList, batches: Sequence[Mapping[str, torch.Tensor]],
               input_device: torch.device, tuple_out: bool) -> int:
    """Device bytes the captured block calls of all ``batches`` will hold, bounded from above.

    The calls of the batch with the most tokens (rotary tables grow with B·T) and of the one with the
    largest B·T² (masks) are measured; the larger, times the number of batches.
    """
    most_tokens = max(batches, key=lambda b: b["input_ids"].numel())
    largest_mask = max(batches, key=lambda b: b["input_ids"].numel() * b["input_ids"].shape[-1])
    per_batch = max(tensor_bytes(capture_calls(runner, blocks, b, input_device, tuple_out=tuple_out)[1])
                    for b in {id(b): b for b in (most_tokens, largest_mask)}.values())
    return per_batch * len(batches)


def activation_bytes(batches: Sequence[Mapping[str, torch.Tensor]], width: int, dtype: torch.dtype) -> int:
    """Bytes of the block inputs of every batch (one hidden state per token)."""
    per = torch.empty(0, dtype=dtype).element_size()
    return sum(int(b["input_ids"].numel()) for b in batches) * width * per


def capture_block_inputs(
    runner: nn.Module,
    blocks: nn.ModuleList,
    batches: Sequence[Mapping[str, torch.Tensor]],
    input_device: torch.device,
    compute_device: torch.device,
    tuple_out: bool,
    location: str,
    probe: tuple[torch.Tensor, list[BlockCall]],
    offload_dir: str | os.PathLike | None = None,
) -> CapturedInputs:
    """Capture every block's call for every batch; block 0's inputs go to an :class:`ActivationCache` at ``location``."""
    probe_hidden, probe_calls = probe
    cache = ActivationCache(len(batches), location, compute_device, offload_dir)
    calls: list[list[BlockCall]] = []
    masks: list[torch.Tensor | None] = []
    tokens = nbytes = 0
    try:
        for i, batch in enumerate(batches):
            hidden, batch_calls = capture_calls(runner, blocks, batch, input_device, tuple_out=tuple_out)
            nbytes += hidden.numel() * hidden.element_size()
            cache.put(i, hidden)
            calls.append(to_device(batch_calls, compute_device))
            m = row_mask(batch, compute_device)
            masks.append(m)
            tokens += int(m.sum()) if m is not None else hidden.shape[0] * hidden.shape[1]
    except BaseException:
        cache.close()
        raise
    note = (f"block inputs: {len(batches)} batches, {tokens} tokens, {format_size(nbytes)} ({probe_hidden.dtype}), "
            f"kept on {location if location != 'device' else str(compute_device)}")
    plan_log.info("%s", note)
    return CapturedInputs(cache, calls, masks, probe_hidden.to(compute_device), probe_calls, nbytes, tokens, [note])


def capture_probe(runner: nn.Module, blocks: nn.ModuleList, batch: Mapping[str, torch.Tensor],
                  input_device: torch.device, compute_device: torch.device,
                  tuple_out: bool) -> tuple[torch.Tensor, list[BlockCall]]:
    """Every block's call for a one-row, few-token probe (to group shared inputs and size the plan)."""
    from qera.calibrate.forward import probe_batch

    hidden, calls = capture_calls(runner, blocks, probe_batch(batch), input_device, tuple_out=tuple_out)
    return hidden.to(compute_device), to_device(calls, compute_device)


def block_output_is_tuple(runner: nn.Module, blocks: nn.ModuleList, batch: Mapping[str, torch.Tensor],
                          input_device: torch.device, compute_device: torch.device) -> bool:
    """Whether block 0 returns a tuple (transformers 4.x) or the hidden state itself (5.x)."""
    from qera.calibrate.forward import probe_batch

    hidden, calls = capture_calls(runner, blocks, probe_batch(batch), input_device, upto=0)
    call = to_device(calls[0], compute_device)
    with torch.no_grad():
        if call.hidden_key is None:
            out = blocks[0](hidden.to(compute_device), *call.args, **call.kwargs)
        else:
            out = blocks[0](*call.args, **{call.hidden_key: hidden.to(compute_device), **call.kwargs})
    return isinstance(out, (tuple, list))
