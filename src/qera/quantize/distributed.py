"""The sequential driver over several processes, on torch.distributed (``torchrun``).

Each rank takes every world-th calibration batch, records statistics of its share, and the float64
sums of each block are all-reduced (gloo on CPUs, NCCL on GPUs), so every rank holds the
statistics of all the calibration data. The layers of a block are solved by the ranks in turn
(layer k of the block by rank k mod world) and broadcast, so every rank ends the block with the
same quantized layers (quantized propagation needs them); rank 0 writes the checkpoint. Nothing is
pickled: tensors travel as tensors whose shapes every rank knows, reports and metadata as JSON
bytes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from qera.util.errors import QeraError

log = logging.getLogger(__name__)


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 when not launched by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_from_env() -> bool:
    """Initialize the default process group from torchrun's environment when it is not yet.

    NCCL when CUDA is available (each rank on ``cuda:LOCAL_RANK``), gloo otherwise. Returns whether
    this call created the group (the caller then destroys it).
    """
    import torch.distributed as dist

    if env_world_size() <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def split_rows(batches: Sequence[Mapping[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Every window of ``batches`` as a batch of its own (tensors sliced along their first dimension)."""
    out = []
    for b in batches:
        n = int(b["input_ids"].shape[0])
        out.extend({k: v[i:i + 1] if torch.is_tensor(v) and v.dim() and v.shape[0] == n else v for k, v in b.items()}
                   for i in range(n))
    return out


class Dist:
    """This process's place in the default process group, and the collectives the driver needs."""

    def __init__(self, rank: int, world: int, backend: str) -> None:
        self.rank, self.world, self.backend = rank, world, backend
        self.comm_device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    @staticmethod
    def current() -> "Dist | None":
        """The initialized default group with more than one rank, or None."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return Dist(dist.get_rank(), dist.get_world_size(), dist.get_backend())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device_for_compute(self) -> torch.device:
        return self.comm_device if self.backend == "nccl" else torch.device("cpu")

    # -- data ------------------------------------------------------------------------------------
    def shard(self, batches: Sequence[Mapping[str, torch.Tensor]]) -> list:
        """This rank's batches: every world-th one. Fewer batches than processes are first split
        into single-window batches (the summed statistics do not depend on the batching)."""
        batches = list(batches)
        if len(batches) < self.world:
            rows = split_rows(batches)
            if len(rows) < self.world:
                raise QeraError(f"{len(rows)} calibration windows for {self.world} processes: each needs at least "
                                "one (use more calibration samples or fewer processes)")
            log.info("%d calibration batches for %d processes: split into %d single-window batches",
                     len(batches), self.world, len(rows))
            batches = rows
        return batches[self.rank::self.world]

    # -- collectives -----------------------------------------------------------------------------
    def _reduce_(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        buf = t if t.device == self.comm_device else t.to(self.comm_device)
        dist.all_reduce(buf)
        if buf is not t:
            t.copy_(buf)
        return t

    def sum_int(self, n: int) -> int:
        return int(self._reduce_(torch.tensor([n], dtype=torch.int64, device=self.comm_device)).item())

    def all_reduce_stats(self, stats) -> int:
        """Sum every rank's float64 accumulators and counts in place; returns the bytes each rank sent."""
        sent = 0
        for key in sorted(stats.stats):
            st = stats.stats[key].finish()
            st.count = self.sum_int(st.count)
            for kind in sorted(st.kinds):
                if kind not in st.sums:  # this rank's share never reached the layer (a rarely routed expert)
                    st.sums[kind] = st._zeros(kind, self.comm_device)
                self._reduce_(st.sums[kind])
                sent += st.sums[kind].numel() * 8
        return sent

    def broadcast_tensors(self, tensors: dict[str, torch.Tensor] | None,
                          spec: Mapping[str, tuple[tuple[int, ...], torch.dtype]], src: int,
                          device: torch.device) -> dict[str, torch.Tensor]:
        """``tensors`` of rank ``src`` on every rank; ``spec`` gives every tensor's shape and dtype."""
        import torch.distributed as dist

        out = {}
        for name in sorted(spec):
            shape, dtype = spec[name]
            if self.rank == src:
                assert tensors is not None
                buf = tensors[name].detach().to(self.comm_device, dtype).contiguous()
            else:
                buf = torch.empty(shape, dtype=dtype, device=self.comm_device)
            dist.broadcast(buf, src)
            out[name] = buf.to(device)
        return out

    def broadcast_json(self, obj: Any, src: int) -> Any:
        import torch.distributed as dist

        data = json.dumps(obj, default=float).encode() if self.rank == src else b""
        n = torch.tensor([len(data)], dtype=torch.int64, device=self.comm_device)
        dist.broadcast(n, src)
        buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.comm_device) if self.rank == src
               else torch.empty(int(n.item()), dtype=torch.uint8, device=self.comm_device))
        dist.broadcast(buf, src)
        return json.loads(bytes(buf.cpu().tolist()).decode()) if self.rank != src else obj

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


def broadcast_result(dist_: Dist, result, src: int, name: str, module: nn.Module, quantizer,
                     rank: int | None = None) -> Any:
    """A :class:`~qera.quantize.layer.LayerResult` solved on rank ``src``, rebuilt on every rank
    (``rank``: the layer's allocated rank, when ranks were allocated)."""
    from qera.core.formats import QuantizedWeight
    from qera.quantize.layer import LayerResult
    from qera.core.report import LayerReport
    from qera.nn.targets import linear_shape, linear_weight

    out_f, in_f = linear_shape(module)
    rank = quantizer.rank_for(name) if rank is None else rank
    w = linear_weight(module)
    fmt = quantizer.format_for(name, (out_f, in_f))
    spec = {f"q.{k}": v for k, v in fmt.stored_shapes((out_f, in_f)).items()}
    spec["A"], spec["B"] = ((rank, in_f), torch.float32), ((out_f, rank), torch.float32)
    mine = None
    if dist_.rank == src:
        mine = {f"q.{k}": v for k, v in result.qweight.tensors.items()}
        mine["A"], mine["B"] = result.A, result.B
    got = dist_.broadcast_tensors(mine, spec, src, w.device)
    report = dist_.broadcast_json(dataclasses.asdict(result.report) if dist_.rank == src else None, src)
    if dist_.rank == src:
        return result
    qw = QuantizedWeight(fmt, (out_f, in_f), w.dtype, {k[2:]: v for k, v in got.items() if k.startswith("q.")})
    return LayerResult(name, qw, got["A"], got["B"], LayerReport(**{**report, "shape": tuple(report["shape"])}))


def broadcast_stored_block(dist_: Dist, writer, index: int, device: torch.device):
    """A finished block of an interrupted run (held by rank 0's writer): its layers and reports on every rank."""
    from qera.io.checkpoint.layout import expected_layer_tensors
    from qera.nn.modules import QERALinear
    from qera.core.report import LayerReport

    entry = writer.state["blocks"][str(index)] if dist_.is_main else None
    metas = dist_.broadcast_json(entry["layers"] if dist_.is_main else None, 0)
    reports = dist_.broadcast_json(entry["reports"] if dist_.is_main else None, 0)
    local = writer.stored_layers(index) if dist_.is_main else {}
    layers = {}
    for name in sorted(metas):
        meta = metas[name]
        spec = dict(expected_layer_tensors(meta))
        if meta["bias"]:
            spec["bias"] = ((int(meta["out_features"]),), getattr(torch, meta["weight_dtype"]))
        mine = None
        if dist_.is_main:
            mine = dict(local[name].state_dict())
            if "bias" in spec:
                spec["bias"] = (spec["bias"][0], mine["bias"].dtype)
        spec = dist_.broadcast_json({k: [list(s), str(d).replace("torch.", "")] for k, (s, d) in spec.items()}, 0)
        spec = {k: (tuple(s), getattr(torch, d)) for k, (s, d) in spec.items()}
        tensors = dist_.broadcast_tensors(mine, spec, 0, device)
        layers[name] = local[name] if dist_.is_main else QERALinear.from_stored(meta, tensors)
    return layers, [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in reports]
