"""Streaming float64 accumulators of one layer input's statistics.

For inputs ``x`` of shape ``(..., d)`` (rows masked out by padding excluded) we keep:

- ``count``  N, the number of rows seen
- ``abs``    Σ|x_i|          → mean |x| per channel (LQER)          shape (d,)
- ``sq``     Σx_i²           → E[x_i²] per channel (QERA-approx)     shape (d,)
- ``xtx``    Σxᵀx            → R = E[xᵀx] (QERA-exact)               shape (d, d)

Per chunk of rows the sums are formed in float32 (one fused pass per diagonal statistic, one GEMM for
``Σxᵀx``) and added into float64 accumulators, so streaming equals one-shot
to float32 rounding of one chunk. Accumulators live on the device of the first
batch: no host↔device copy per batch.

On a GPU the recording runs without a host synchronization per batch: the NaN/Inf and overflow
check keeps a running peak ``max |x|`` on the device and is settled by :meth:`ActivationStats.finish`
(called once when :func:`qera.record_statistics` ends), and bf16/fp16 inputs (tensor cores)
add their float32 ``Σxᵀx`` into a float32 pending sum that is folded into the float64 accumulator
every :data:`FLUSH_ROWS` rows (a few float64 passes per block instead of one per chunk).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterable

import torch

from qera.util.errors import QeraError, where

log = logging.getLogger(__name__)

STAT_KINDS = ("abs", "sq", "xtx")
# "mixed": each chunk's Σxᵀx in float32 (from bf16/fp16 inputs on a GPU: one tensor-core GEMM, exact
# products, float32 accumulation), added into float64 between chunks. "float64": the chunk GEMM in
# float64 too (slow on GPUs). tests/test_statistics.py bounds their difference in the qera-exact
# objective by 1e-6 relative, on real and on adversarial activations.
STATS_PRECISIONS = ("mixed", "float64")
CHUNK_ROWS = 4096  # rows per fp32 product before adding into the float64 accumulator
# Tensor-core path: rows summed in float32 (within one GEMM and across calls) before a float64 fold.
# tests/test_statistics.py checks the 1e-6 objective bound at this length too.
FLUSH_ROWS = 65536
XTX_BLOCK_ELEMS = 1 << 24  # entries of Σxᵀx formed per GEMM (64 MB in float32): bounds the temporaries
# Σxᵀx is symmetric: it is formed in row blocks of at most 1/GRAM_SPLIT of its width, each only from
# its diagonal block rightwards; the blocks below the diagonal are copied from their mirror images.
# With 8 blocks that is 36/64 of the GEMM work (GRAM_MIN_BLOCK keeps small widths in few, wide GEMMs).
GRAM_SPLIT = 8
GRAM_MIN_BLOCK = 256
# larger |x| could overflow a float32 sum of x² over the longest run of rows summed in float32
MAX_ABS = float(torch.finfo(torch.float32).max / max(CHUNK_ROWS, FLUSH_ROWS)) ** 0.5


def _device_path(rows: torch.Tensor, precision: str) -> tuple[bool, bool]:
    """``(defer, tensor_cores)`` for a batch: checks are deferred on a GPU (no host sync per batch);
    bf16/fp16 rows on a GPU in ``mixed`` precision take the tensor-core float32 path."""
    defer = rows.is_cuda
    return defer, defer and precision == "mixed" and rows.dtype in (torch.bfloat16, torch.float16)


def _add_product_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += aᵀb``: inside the GEMM (no temporary) when the dtypes agree."""
    if acc.dtype == a.dtype:
        acc.addmm_(a.T, b)
    else:
        acc.add_(a.T @ b)


def _add_product_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += aᵀb`` for bf16/fp16 ``a``, ``b`` (rows, ·) with exact products and float32 accumulation
    (``acc``: float32 or float64): one tensor-core GEMM on CUDA, else float32 copies of
    :data:`CHUNK_ROWS` rows at a time (torch < 2.8 on CUDA, and the CPU tests of this path)."""
    if a.is_cuda:
        try:
            acc.add_(torch.mm(a.T, b, out_dtype=torch.float32))
            return
        except TypeError:  # torch < 2.8 has no out_dtype; the same exact products below (bf16 ⊂ TF32)
            pass
    for a_rows, b_rows in zip(a.split(CHUNK_ROWS), b.split(CHUNK_ROWS)):
        acc.add_(a_rows.to(torch.float32).T @ b_rows.to(torch.float32))


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """``acc += aᵀb`` for bf16/fp16 ``a``, ``b`` on CUDA into float32 ``acc`` inside the GEMM (β = 1: no
    d×d temporary, no separate add pass). Some torch versions want ``self`` in the inputs' dtype for
    ``out_dtype``: then nothing is done (the checks run before any work) and this returns False."""
    try:
        torch.addmm(acc, a.T, b, out_dtype=torch.float32, out=acc)
    except torch.cuda.OutOfMemoryError:  # a real failure, not a refusal
        raise
    except (RuntimeError, TypeError):
        return False
    return True


def _gram_block(d: int) -> int:
    """Rows of a d×d Σxᵀx formed per GEMM (the same partition for adding and mirroring)."""
    split = -(-d // GRAM_SPLIT)
    return max(GRAM_MIN_BLOCK, min(XTX_BLOCK_ELEMS // d, -(-split // 64) * 64))


def _add_gram_(acc: torch.Tensor, c: torch.Tensor, add=_add_product_) -> None:
    """``acc += cᵀc`` on and above the block diagonal only (``c``: (rows, d)); :func:`_mirror_lower_`
    completes it. A block of rows at a time, so the d×d product never exists whole;
    ``add(acc_block, a, b)`` does ``acc_block += aᵀb``."""
    d = c.shape[1]
    cols = _gram_block(d)
    for j in range(0, d, cols):
        add(acc[j:j + cols, j:], c[:, j:j + cols], c[:, j:])


def _mirror_lower_(acc: torch.Tensor) -> None:
    """Fill the blocks below the diagonal of ``acc`` (d × d), and the lower triangles of the diagonal
    blocks, from their mirror images above: ``acc`` is exactly symmetric afterwards."""
    d = acc.shape[0]
    cols = _gram_block(d)
    for j in range(0, d, cols):
        diag = acc[j:j + cols, j:j + cols]  # a GEMM's own diagonal block is not bitwise symmetric
        diag.copy_(torch.triu(diag) + torch.triu(diag, 1).T)
        if j + cols < d:
            acc[j + cols:, j:j + cols].copy_(acc[j:j + cols, j + cols:].T)


def provided(kinds: Iterable[str]) -> frozenset[str]:
    """What statistics of ``kinds`` can serve: ``xtx`` also gives ``sq`` (its diagonal)."""
    kinds = frozenset(kinds)
    return kinds | {"sq"} if "xtx" in kinds else kinds


def check_kinds(kinds: Iterable[str]) -> frozenset[str]:
    kinds = frozenset(kinds)
    bad = kinds - set(STAT_KINDS)
    if bad:
        raise QeraError(f"unknown statistic(s) {sorted(bad)}; known: {', '.join(STAT_KINDS)}")
    return kinds


def symmetrize_(M: torch.Tensor, block: int = 2048) -> torch.Tensor:
    """``M ← (M + Mᵀ) / 2`` in place, one ``block × block`` tile at a time (cache-friendly, little memory)."""
    n = M.shape[0]
    for i in range(0, n, block):
        for j in range(i, n, block):
            upper, lower = M[i:i + block, j:j + block], M[j:j + block, i:i + block]
            avg = (upper + lower.T).mul_(0.5)
            upper.copy_(avg)
            lower.copy_(avg.T)
    return M


@dataclass
class ActivationStats:
    """Statistics of one layer input of width ``dim``; only ``kinds`` are accumulated."""

    dim: int
    kinds: frozenset[str] = frozenset({"abs", "sq"})
    name: str | None = None
    count: int = 0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    precision: str = "mixed"
    # tensor-core path only: keep a float32 pending Σxᵀx (4·dim² bytes more) and fold it into the
    # float64 sums every FLUSH_ROWS rows, instead of once per CHUNK_ROWS chunk (the sequential
    # driver turns it on: one block's inputs at a time; one-shot recording keeps every input's sums)
    pending: bool = False

    def __post_init__(self) -> None:
        self._pending: torch.Tensor | None = None  # float32 Σxᵀx not yet folded into sums["xtx"]
        self._pending_rows = 0
        self._peak: torch.Tensor | None = None  # deferred check: running max |x| on the device
        self._kept: torch.Tensor | None = None  # deferred count of masked batches' kept rows (device)
        self._fused_add: bool | None = None  # CUDA: does addmm accumulate bf16 products into float32 here?
        self._failed: QeraError | None = None  # a failed deferred check, raised again by every reader
        self.kinds = check_kinds(self.kinds)
        if self.precision not in STATS_PRECISIONS:
            raise QeraError(f"statistics precision must be one of {', '.join(STATS_PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.dim, int) or self.dim < 1:
            raise QeraError(f"statistics dimension must be a positive integer, got {self.dim!r}")

    # -- accumulation ---------------------------------------------------------------------------
    def _zeros(self, kind: str, device: torch.device) -> torch.Tensor:
        shape = (self.dim, self.dim) if kind == "xtx" else (self.dim,)
        return torch.zeros(shape, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add rows of ``x`` (shape ``(..., dim)``); ``mask`` (shape ``x.shape[:-1]``) keeps True rows.

        On the CPU all or nothing: the rows are checked (NaN/Inf, magnitudes that would overflow the
        float32 chunk sums) before anything is added, so a rejected call leaves the sums unchanged.
        On a GPU the same check is deferred to :meth:`finish` (a bad batch fails the recording).
        """
        if x.shape[-1] != self.dim:
            raise QeraError(f"activation width {x.shape[-1]} != expected {self.dim}{where(self.name)}")
        rows = x.reshape(-1, self.dim)
        defer, tensor_cores = _device_path(rows, self.precision)
        kept: int | torch.Tensor = rows.shape[0]
        if mask is not None:
            if mask.numel() != rows.shape[0]:
                raise QeraError(
                    f"mask has {mask.numel()} entries but the activation has {rows.shape[0]} rows{where(self.name)}"
                )
            keep = mask.reshape(-1).to(device=rows.device, dtype=torch.bool)
            if defer:  # zero the padded rows (they add nothing; their GEMM work is the price) instead of
                # dropping them, which needs the kept count on the host: no host sync
                rows = torch.where(keep.unsqueeze(1), rows, rows.new_zeros(()))
                kept = keep.sum()  # on the device; finish() adds it to count
            else:
                rows = rows[keep]
                kept = rows.shape[0]
        if rows.shape[0] == 0:
            return
        peak = rows.abs().amax()  # NaN propagates through amax
        if defer:
            self._peak = peak if self._peak is None else torch.maximum(self._peak, peak)
        else:
            self._check_peak(float(peak))
        for kind in self.kinds:
            if kind not in self.sums:
                self.sums[kind] = self._zeros(kind, rows.device)
        if tensor_cores:
            self._update_tensor_cores(rows)
        else:
            self._update_chunks(rows)
        if isinstance(kept, torch.Tensor):
            self._kept = kept if self._kept is None else self._kept + kept
        else:
            self._count += kept  # not through `count`, which would settle (sync) a deferred count

    def _check_peak(self, peak: float) -> None:
        if not math.isfinite(peak):
            raise QeraError(f"activation contains NaN/Inf{where(self.name)}")
        if peak > MAX_ABS:
            raise QeraError(
                f"activation magnitude {peak:.3g} exceeds {MAX_ABS:.3g}, where float32 chunk sums of x² "
                f"overflow{where(self.name)}"
            )

    def _update_chunks(self, rows: torch.Tensor) -> None:
        """Float32 (``mixed``) or float64 sums per chunk of :data:`CHUNK_ROWS` rows, added into float64."""
        exact = self.precision == "float64"
        for chunk in rows.split(CHUNK_ROWS):
            c = chunk.to(torch.float64 if exact else torch.float32)
            if "xtx" in self.kinds:
                _add_gram_(self.sums["xtx"], c)
            self._add_diagonal(c)
        if "xtx" in self.kinds:
            _mirror_lower_(self.sums["xtx"])

    def _update_tensor_cores(self, rows: torch.Tensor) -> None:
        """bf16/fp16 rows: Σxᵀx from the rows themselves (no float32 copy), into the float32 pending
        sum (``pending``) or straight into float64 per chunk of :data:`CHUNK_ROWS` rows."""
        diagonal = bool(self.kinds & {"sq", "abs"})
        run = FLUSH_ROWS if self.pending else CHUNK_ROWS
        start = 0
        while start < rows.shape[0]:  # a float32 run never exceeds FLUSH_ROWS rows (MAX_ABS holds)
            chunk = rows[start:start + run - self._pending_rows]
            start += chunk.shape[0]
            if "xtx" in self.kinds and self.pending:
                if self._pending is None:
                    self._pending = torch.zeros(self.dim, self.dim, dtype=torch.float32, device=rows.device)
                _add_gram_(self._pending, chunk, self._add_pending_)
                self._pending_rows += chunk.shape[0]
                if self._pending_rows >= FLUSH_ROWS:
                    self._flush()
            elif "xtx" in self.kinds:
                _add_gram_(self.sums["xtx"], chunk, _add_product_fp32_)
            if diagonal:
                for part in chunk.split(CHUNK_ROWS):
                    self._add_diagonal(part.to(torch.float32))
        if "xtx" in self.kinds and not self.pending:
            _mirror_lower_(self.sums["xtx"])

    def _add_pending_(self, acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """``acc += aᵀb`` into the float32 pending sum: in the GEMM itself where this torch allows it."""
        if a.is_cuda and self._fused_add is not False:
            self._fused_add = _addmm_fp32_(acc, a, b)
            if self._fused_add:
                return
        _add_product_fp32_(acc, a, b)

    def _add_diagonal(self, c: torch.Tensor) -> None:
        if "sq" in self.kinds:
            self.sums["sq"].add_(torch.linalg.vector_norm(c, 2, dim=0).square())
        if "abs" in self.kinds:
            self.sums["abs"].add_(torch.linalg.vector_norm(c, 1, dim=0))

    def _flush(self) -> None:
        """Fold the float32 pending Σxᵀx into the float64 accumulator."""
        if self._pending is not None and self._pending_rows:
            self.sums["xtx"].add_(self._pending)  # the pending sum holds the upper blocks only
            _mirror_lower_(self.sums["xtx"])
            self._pending.zero_()
        self._pending_rows = 0

    def finish(self) -> "ActivationStats":
        """Settle deferred work: fold pending sums, free their buffer and run the deferred NaN/Inf and
        overflow check and the deferred row count (one host synchronization). Readers call it; it is
        cheap when nothing is pending."""
        if self._failed is not None:  # the sums hold the bad rows: no reader may use them
            raise self._failed
        self._flush()
        self._pending = None
        if self._peak is None and self._kept is None:
            return self
        device = (self._peak if self._peak is not None else self._kept).device
        peak, kept = torch.stack([  # one transfer for both
            t.double() if t is not None else torch.zeros((), dtype=torch.float64, device=device)
            for t in (self._peak, self._kept)
        ]).tolist()
        self._peak = self._kept = None
        self._count += int(kept)
        try:
            self._check_peak(peak)
        except QeraError as exc:
            self._failed = exc
            raise
        return self

    def validate(self, source: str = "") -> "ActivationStats":
        """Check shapes, dtypes and finiteness of the sums (for statistics read from a file)."""
        self.finish()
        what = f"{source}: " if source else ""
        if not isinstance(self.count, int) or self.count < 0:
            raise QeraError(f"{what}token count must be a non-negative integer, got {self.count!r}{where(self.name)}")
        for kind in self.kinds:
            if kind not in self.sums:
                if self.count == 0:
                    continue
                raise QeraError(f"{what}statistic {kind!r} is missing{where(self.name)}")
            t = self.sums[kind]
            want = (self.dim, self.dim) if kind == "xtx" else (self.dim,)
            if tuple(t.shape) != want:
                raise QeraError(
                    f"{what}statistic {kind!r} has shape {tuple(t.shape)}, expected {want}{where(self.name)}"
                )
            if not t.is_floating_point():
                raise QeraError(f"{what}statistic {kind!r} has dtype {t.dtype}, expected float64{where(self.name)}")
        # the value checks of every kind in one host transfer: (non-finite, negative) per kind
        kinds = sorted(k for k in self.kinds if k in self.sums)
        if not kinds:
            return self
        flags = torch.stack([torch.stack([~torch.isfinite(self.sums[k]).all(),
                                          (self.sums[k] < 0).any() if k in ("abs", "sq") else self.sums[k].new_zeros((), dtype=torch.bool)])
                             for k in kinds]).tolist()
        for kind, (nonfinite, negative) in zip(kinds, flags):
            if nonfinite:
                raise QeraError(f"{what}statistic {kind!r} contains NaN/Inf{where(self.name)}")
            if negative:
                raise QeraError(f"{what}statistic {kind!r} has negative entries{where(self.name)}")
        return self

    def merge(self, other: "ActivationStats") -> "ActivationStats":
        """Add another accumulator of the same width and kinds into this one (returns self)."""
        self.finish()
        other.finish()
        if other.dim != self.dim or other.kinds != self.kinds:
            raise QeraError(
                f"cannot merge statistics of width {other.dim} / kinds {sorted(other.kinds)} into "
                f"width {self.dim} / kinds {sorted(self.kinds)}{where(self.name)}"
            )
        for kind, value in other.sums.items():
            if kind in self.sums:
                self.sums[kind].add_(value.to(self.sums[kind].device))
            else:
                self.sums[kind] = value.clone()
        self.count += other.count
        return self

    # -- accessors ------------------------------------------------------------------------------
    def _sum(self, kind: str) -> torch.Tensor:
        self.finish()
        if kind not in self.kinds:
            raise QeraError(
                f"statistic {kind!r} was not collected{where(self.name)} (have: {', '.join(sorted(self.kinds))})"
            )
        if self.count == 0:
            raise QeraError(f"no activation rows were collected{where(self.name)}")
        return self.sums[kind]

    def mean_abs(self) -> torch.Tensor:
        """E|x_i|, float64, shape (dim,)."""
        return self._sum("abs") / self.count

    def mean_sq(self) -> torch.Tensor:
        """E[x_i²], float64, shape (dim,). Taken from the diagonal of Σxᵀx when only that is kept."""
        if "sq" not in self.kinds and "xtx" in self.kinds:
            return torch.diagonal(self._sum("xtx")).clone() / self.count
        return self._sum("sq") / self.count

    def autocorrelation(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """R = E[xᵀx], symmetric, shape (dim, dim), as a new tensor of ``dtype``.

        Formed with one allocation (copy, scale, blocked in-place symmetrization), so a 13824²
        statistic costs one more matrix, not three. Not cached: callers hold it as long as needed.
        """
        R = self._sum("xtx").to(dtype=dtype, copy=True)
        R.div_(self.count)
        return symmetrize_(R)

    def to(self, device: torch.device | str) -> "ActivationStats":
        self.finish()
        return ActivationStats(self.dim, self.kinds, self.name, self.count, {k: v.to(device) for k, v in self.sums.items()},
                               self.precision, self.pending)


def _settled_count(self: ActivationStats) -> int:
    """Rows seen. A masked batch on a GPU counts its kept rows on the device: reading settles that first."""
    if self.__dict__.get("_kept") is not None:
        self.finish()
    return self._count


def _set_count(self: ActivationStats, value: int) -> None:
    self._count = value


# `count` stays a dataclass field (constructor argument, repr, equality), read through a property
ActivationStats.count = property(_settled_count, _set_count)
