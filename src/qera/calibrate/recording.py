"""Recording input statistics of a set of modules, independent of how the model is run.

:func:`record_statistics` attaches forward pre-hooks to the modules (one per distinct input),
yields a :class:`StatisticsRecorder` whose ``mask`` the caller sets before each forward (padding
rows are excluded), and always removes the hooks. Whoever runs the model — the whole model over
calibration batches (one-shot) or one decoder block over cached inputs (sequential) — is the
caller's business.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from qera.util.errors import QeraError
from qera.core.statistics import ActivationStats
from qera.calibrate.store import CalibrationStats
from qera.nn.targets import linear_shape

log = logging.getLogger(__name__)


def module_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The input tensor of a linear-like module's forward call."""
    if args:
        return args[0]
    for v in kwargs.values():
        if torch.is_tensor(v):
            return v
    raise QeraError("a hooked layer was called without an input tensor")


class StatisticsRecorder:
    """Live hooks of one :func:`record_statistics` block; set ``mask`` before each forward.

    ``mask``: ``(batch, seq)`` bool tensor of the rows to keep, or None to keep every row.
    """

    def __init__(self, stats: CalibrationStats) -> None:
        self.stats = stats
        self.mask: torch.Tensor | None = None

    def _hook(self, st: ActivationStats):
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            x = module_input(args, kwargs).detach()
            mask = self.mask
            rows = getattr(mod, "qera_rows", None)  # routed token indices (mixture-of-experts layers)
            if mask is not None and rows is not None:
                mask = mask.reshape(-1)[rows]
            if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
                if mask.numel() != x[..., 0].numel():  # (batch·seq, d) inputs (OPT, MoE) keep row order
                    raise QeraError(
                        f"attention_mask shape {tuple(mask.shape)} does not match the input of {st.name} "
                        f"{tuple(x.shape[:-1])}"
                    )
                mask = mask.reshape(x.shape[:-1])
            st.update(x, mask)

        return hook


@contextlib.contextmanager
def record_statistics(
    modules: Mapping[str, nn.Module],
    kinds: Iterable[str],
    groups: Mapping[str, str] | None = None,
    stats: CalibrationStats | None = None,
    precision: str = "mixed",
    pending: bool = False,
) -> Iterator[StatisticsRecorder]:
    """Accumulate ``kinds`` of the inputs of ``modules`` while the block runs; hooks off in ``finally``.

    Args:
        modules: name → linear-like module.
        groups: name → representative name (layers sharing an input; default: none shared).
        stats: accumulators to add into (default: new, zeroed ones).
        precision: ``mixed`` or ``float64`` chunk sums (see :data:`qera.core.statistics.STATS_PRECISIONS`).
        pending: new accumulators keep a float32 pending ``Σxᵀx`` on the tensor-core path
            (:attr:`qera.core.statistics.ActivationStats.pending`; fewer float64 passes, 4·d² bytes more each).
    """
    groups = dict(groups) if groups is not None else {n: n for n in modules}
    if stats is None:
        kinds = frozenset(kinds)
        stats = CalibrationStats(
            {rep: ActivationStats(linear_shape(modules[rep])[1], kinds, name=rep, precision=precision, pending=pending)
             for rep in dict.fromkeys(groups.values())},
            groups,
        )
    recorder = StatisticsRecorder(stats)
    handles = []
    try:
        for rep, st in stats.stats.items():
            if rep not in modules:
                raise QeraError(f"statistics key {rep} is not among the recorded modules")
            handles.append(modules[rep].register_forward_pre_hook(recorder._hook(st), with_kwargs=True))
        yield recorder
        for st in stats.stats.values():  # deferred GPU work and checks: one host synchronization per input
            st.finish()
    finally:
        for h in handles:
            h.remove()
        recorder.mask = None


Run = tuple["torch.Tensor | None", Callable[[], Any]]  # (rows kept in the statistics, a forward to call)


def record_runs(
    modules: Mapping[str, nn.Module],
    kinds: Iterable[str],
    groups: Mapping[str, str] | None,
    runs: Iterable[Run],
    stats: CalibrationStats | None = None,
    precision: str = "mixed",
    pending: bool = False,
) -> CalibrationStats:
    """The calibration loop: with the inputs of ``modules`` recorded, call each run's forward under
    ``torch.no_grad()``, keeping the rows its mask marks (None: all rows). Returns the statistics.

    Every calibration goes through here: the whole model over batches (:func:`qera.calibrate.forward.collect_statistics`),
    growing prefixes of the calibration set (``stats`` carried over), one decoder block over its cached inputs.
    ``stats``, ``precision``, ``pending``: as :func:`record_statistics` takes them.
    """
    with record_statistics(modules, kinds, groups, stats=stats, precision=precision, pending=pending) as rec, \
            torch.no_grad():
        for mask, run in runs:
            rec.mask = mask
            run()
        return rec.stats


def probe_shared_inputs(modules: Mapping[str, nn.Module], run: Callable[[], Any]) -> dict[str, str]:
    """Map each module to the first module (in the given order) that receives the identical input tensor.

    ``run`` performs one small forward pass that reaches every module.
    """
    seen: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name, mod in modules.items():
            def hook(m, args, kwargs, name=name):
                seen.setdefault(name, module_input(args, kwargs))
            handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    groups: dict[str, str] = {}
    reps: list[str] = []
    for name in modules:
        x = seen.get(name)
        rep = next((r for r in reps if x is not None and seen.get(r) is x), None)
        if rep is None:
            reps.append(name)
            rep = name
        groups[name] = rep
    return groups
