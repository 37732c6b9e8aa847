"""Where the sequential driver puts things, planned from sizes and budgets before any slow work.

A pure function of sizes (bytes) and budgets: testable with simulated budgets, no device needed.
"""

from __future__ import annotations

from dataclasses import dataclass

from qera.util.errors import QeraError
from qera.util.memory import format_size


@dataclass(frozen=True)
class BlockNeeds:
    """What processing one block needs at its peak, in bytes.

    weights: one block's parameters in the compute dtype; statistics: float64 accumulators of its
    distinct inputs (plus the float32 pending Σxᵀx of bf16/fp16 inputs on a GPU); solve: R in
    float32 plus ~7 float32 copies of its largest layer (measured, bench/README.md); activations:
    the cached block inputs of every calibration batch; prefetch: blocks resident beside this one
    (the next, brought in while this one computes, and on a GPU the previous, on its way home;
    0 without prefetching); calls: the tensors every batch's block call takes besides the hidden
    state (rotary tables, attention masks of padded batches), kept on the compute device;
    refine: the block refinement's working set beside the solved block (float32 ``W̃`` of each
    layer, ``A``/``B`` with gradients and Adam's two moments, the autograd activations of one batch;
    0 without refinement), which replaces the solve's at its peak. With refinement, ``activations``
    counts both streams (the run's and the full-precision targets).
    """

    weights: int
    statistics: int
    solve: int
    activations: int
    prefetch: int = 0
    calls: int = 0
    refine: int = 0

    @property
    def per_block(self) -> int:
        """What must be on the compute device whatever the activations' place."""
        return self.weights + self.prefetch + self.statistics + max(self.solve, self.refine) + self.calls


@dataclass(frozen=True)
class Plan:
    device: str
    activations: str  # "device", "cpu" or "disk"
    needs: BlockNeeds
    gpu_budget: int | None
    host_budget: int | None

    def describe(self) -> str:
        n = self.needs
        where = {"device": f"on {self.device}", "cpu": "in host memory" + (" (pinned)" if self.device != "cpu" else ""),
                 "disk": "on disk (--offload-dir)"}[self.activations]
        budget = (f"; GPU budget {format_size(self.gpu_budget)}" if self.gpu_budget is not None else "") + \
                 (f"; host budget {format_size(self.host_budget)}" if self.host_budget is not None else "")
        ahead = f" + blocks in flight {format_size(n.prefetch)}" if n.prefetch else ""
        calls = f" + block call tensors {format_size(n.calls)}" if n.calls else ""
        refine = f" (refinement ≤ {format_size(n.refine)})" if n.refine else ""
        return (f"plan: one block at a time on {self.device} (weights {format_size(n.weights)}{ahead} + statistics "
                f"{format_size(n.statistics)} + solve ≤ {format_size(n.solve)}{refine}{calls}); activations "
                f"{format_size(n.activations)} {where}{budget}")


def plan_placement(device: str, needs: BlockNeeds, gpu_budget: int | None = None,
                   host_budget: int | None = None) -> Plan:
    """Activations go to the GPU when they fit beside one block's work, else host memory, else disk.

    Raises a :class:`QeraError` before any slow work when one block's work alone exceeds the GPU
    budget (a CPU run is never refused here: the host budget only moves activations to disk).
    """
    on_gpu = device != "cpu"
    if on_gpu and gpu_budget is not None and needs.per_block > gpu_budget:
        raise QeraError(
            f"one block needs about {format_size(needs.per_block)} on {device} (weights "
            f"{format_size(needs.weights)}, statistics {format_size(needs.statistics)}, solve "
            f"{format_size(needs.solve)}" + (f", block call tensors {format_size(needs.calls)}" if needs.calls else "")
            + f"), over the GPU budget of {format_size(gpu_budget)}"
        )
    if on_gpu and (gpu_budget is None or needs.per_block + needs.activations <= gpu_budget):
        where = "device" if gpu_budget is not None else "cpu"
    elif host_budget is None or needs.activations <= host_budget:
        where = "cpu"
    else:
        where = "disk"
    return Plan(device, where, needs, gpu_budget, host_budget)
