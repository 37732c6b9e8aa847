"""Linear algebra for the reconstruction: weighted low-rank approximation without matrix roots.

Problem: given the error ``D = W - W̃`` (out × in) and a PSD input metric ``R`` (in × in), find
rank-k ``B A`` minimizing ``‖(D - B A) L‖_F² = trace((D - BA) R (D - BA)ᵀ)`` for any ``L Lᵀ = R``.

Closed form: with ``U_k`` the top-k left singular vectors of ``D L`` (equivalently the top-k
eigenvectors of ``G = D R Dᵀ``, out × out), the optimum is ``B A = U_k U_kᵀ D``; the objective
is the sum of the ``m - k`` smallest eigenvalues of ``G``. Proof sketch: the column space of
``(BA) L`` has dimension ≤ k, so by Eckart–Young the best is the projection of ``D L`` onto its
top-k left singular space, ``U_k U_kᵀ D L``, which ``B A = U_k U_kᵀ D`` attains for every ``L``.

So no square root, inverse or Cholesky factor of ``R`` is ever formed: ``G`` is applied through
thin products ``D (R (Dᵀ Y))``, and a singular ``R`` (dead channels, few tokens) needs no
flooring to stay finite. Diagonal metrics (LQER, QERA-approx) use ``R = diag(s²)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from qera.util.errors import QeraError, where

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SolverOptions:
    """Knobs of the top-k solver.

    exact: ``True`` → dense float64 eigendecomposition of ``G``; ``False`` → randomized block
        Krylov; ``None`` → exact when the Krylov basis would span half the problem or more.
    n_iter: Krylov depth (applications of ``G`` after the first sketch).
    oversample: sketch columns beyond ``rank`` (``None`` → ``max(rank, 8)``, i.e. ``p = 2k``).
    seed: seed of the random sketch (the result is deterministic for a given seed).
    compute_dtype: dtype of the big products on the randomized path (float32 by default;
        the Rayleigh–Ritz step is always float64).
    """

    exact: bool | None = None
    n_iter: int = 6
    oversample: int | None = None
    seed: int = 0
    compute_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if not isinstance(self.n_iter, int) or self.n_iter < 0:
            raise ValueError(f"n_iter must be an integer >= 0, got {self.n_iter!r}")
        if self.oversample is not None and (not isinstance(self.oversample, int) or self.oversample < 0):
            raise ValueError(f"oversample must be an integer >= 0, got {self.oversample!r}")

    def sketch_width(self, rank: int) -> int:
        return rank + (max(rank, 8) if self.oversample is None else self.oversample)

    def use_exact(self, rank: int, m: int, n: int) -> bool:
        if self.exact is not None:
            return self.exact
        return self.sketch_width(rank) * (self.n_iter + 1) * 2 >= min(m, n)


def _metric_operator(D: torch.Tensor, scale: torch.Tensor | None, autocorr: torch.Tensor | None, dtype: torch.dtype):
    """Return ``apply(Y) = G Y`` with ``G = D R Dᵀ`` for the given metric, in ``dtype``."""
    Dc = D.to(dtype)
    if autocorr is not None:
        Rc = autocorr.to(device=D.device, dtype=dtype)
        return lambda Y: Dc @ (Rc @ (Dc.T @ Y))
    if scale is not None:
        Mc = Dc * scale.to(device=D.device, dtype=dtype)
    else:
        Mc = Dc
    return lambda Y: Mc @ (Mc.T @ Y)


def gram_matrix(D: torch.Tensor, scale: torch.Tensor | None = None, autocorr: torch.Tensor | None = None) -> torch.Tensor:
    """``G = D R Dᵀ`` in float64 (out × out); ``R = diag(scale²)`` or ``autocorr`` or ``I``."""
    D64 = D.to(torch.float64)
    if autocorr is not None:
        G = D64 @ autocorr.to(device=D.device, dtype=torch.float64) @ D64.T
    else:
        M = D64 * scale.to(device=D.device, dtype=torch.float64) if scale is not None else D64
        G = M @ M.T
    return (G + G.T) / 2


def top_eigvecs_exact(G: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k eigenvectors (columns, largest first) of the symmetric ``G`` via float64 ``eigh``."""
    _, vecs = torch.linalg.eigh(G.to(torch.float64))
    return vecs[:, -k:].flip(-1)


def top_eigvecs_randomized(apply_G, m: int, k: int, opts: SolverOptions, device: torch.device) -> torch.Tensor:
    """Top-k eigenvectors of a PSD ``G`` (m × m) given only ``Y ↦ G Y``.

    Randomized block Krylov (Musco & Musco, 2015): blocks ``Q_0 = orth(G Ω)``,
    ``Q_i = orth(G Q_{i-1})`` with ``p`` columns each, one float64 QR of the whole basis, then
    Rayleigh–Ritz in float64. Krylov bases converge far faster than plain subspace iteration on
    the flat spectra of quantization errors. Returns float64 ``(m, k)`` orthonormal columns.
    """
    p = min(m, opts.sketch_width(k))
    gen = torch.Generator(device="cpu").manual_seed(opts.seed)
    omega = torch.randn(m, p, generator=gen, dtype=opts.compute_dtype)
    if torch.device(device).type == "cuda":  # pageable host→device copies wait for the whole stream
        omega = omega.pin_memory().to(device, non_blocking=True)
    else:
        omega = omega.to(device)
    Q, _ = torch.linalg.qr(apply_G(omega))
    blocks = [Q]
    for _ in range(opts.n_iter):
        Q, _ = torch.linalg.qr(apply_G(Q))
        blocks.append(Q)
    K, _ = torch.linalg.qr(torch.cat(blocks, dim=1).to(torch.float64))
    K = K[:, : min(K.shape[1], m)]
    T = K.T @ apply_G(K.to(opts.compute_dtype)).to(torch.float64)
    _, vecs = torch.linalg.eigh((T + T.T) / 2)
    U, _ = torch.linalg.qr(K @ vecs[:, -k:].flip(-1))
    return U


def weighted_lowrank(
    D: torch.Tensor,
    rank: int,
    scale: torch.Tensor | None = None,
    autocorr: torch.Tensor | None = None,
    opts: SolverOptions = SolverOptions(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` ``(A, B)`` minimizing ``trace((D - BA) R (D - BA)ᵀ)``.

    Args:
        D: error ``W - W̃``, shape ``(out, in)``.
        rank: k, ``1 <= k <= min(out, in)``.
        scale: per-input-channel scale ``s`` (shape ``(in,)``), meaning ``R = diag(s²)``.
        autocorr: ``R`` itself (shape ``(in, in)``, PSD); takes precedence over ``scale``.
    Returns:
        ``A`` of shape ``(k, in)`` and ``B`` of shape ``(out, k)``, float32, with
        ``B A = U_k U_kᵀ D``; the rank-one terms are balanced (``‖B[:, i]‖ = ‖A[i]‖``).
    """
    m, n = D.shape
    k = rank
    exact = opts.use_exact(k, m, n)
    if exact:
        if m > n:
            # Tall D = Q T (thin QR): G = Q (T R Tᵀ) Qᵀ, so eigenvectors come from an n × n problem.
            Q, T = torch.linalg.qr(D.to(torch.float64))
            U = Q @ top_eigvecs_exact(gram_matrix(T, scale, autocorr), k)
        else:
            U = top_eigvecs_exact(gram_matrix(D, scale, autocorr), k)
    else:
        apply_G = _metric_operator(D, scale, autocorr, opts.compute_dtype)
        U = top_eigvecs_randomized(apply_G, m, k, opts, D.device)
    # (k, n); the randomized path multiplies in compute_dtype (no float64 copy of a large D)
    A = U.T @ D.to(torch.float64) if exact else (U.T.to(opts.compute_dtype) @ D.to(opts.compute_dtype)).double()
    norms = A.norm(dim=1).sqrt()
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    return (A / norms[:, None]).to(torch.float32), (U * norms[None, :]).to(torch.float32)


def lowrank_objective(
    D: torch.Tensor, A: torch.Tensor, B: torch.Tensor, autocorr: torch.Tensor | None = None
) -> float:
    """``trace(E R Eᵀ)`` with ``E = D - B A`` (``R = I`` when ``autocorr`` is None), in float64."""
    E = D.to(torch.float64) - B.to(torch.float64) @ A.to(torch.float64)
    if autocorr is None:
        return float((E * E).sum())
    return float(((E @ autocorr.to(device=E.device, dtype=torch.float64)) * E).sum())


def small_gram(D: torch.Tensor, scale: torch.Tensor | None = None, autocorr: torch.Tensor | None = None) -> torch.Tensor:
    """A float64 matrix with the nonzero spectrum of ``G = D R Dᵀ``, of side ``min(out, in)``.

    Wide ``D``: ``G`` itself. Tall ``D = Q T`` (thin QR): ``T R Tᵀ``, since ``G = Q (T R Tᵀ) Qᵀ``.
    """
    if D.shape[0] > D.shape[1]:
        _, D = torch.linalg.qr(D.to(torch.float64))
    return gram_matrix(D, scale, autocorr)


def optimal_objective(D: torch.Tensor, rank: int, autocorr: torch.Tensor | None = None) -> float:
    """The minimum of :func:`lowrank_objective` over rank-``rank`` ``BA``: the tail of ``eig(D R Dᵀ)``."""
    G = small_gram(D, autocorr=autocorr)
    vals = torch.linalg.eigvalsh(G)
    # trace minus the top-k is robust; summing the tail would add rounding noise of ~0 eigenvalues
    return float(torch.trace(G) - vals[vals.numel() - min(rank, vals.numel()):].sum())


def error_spectrum(D: torch.Tensor, scale: torch.Tensor | None = None, autocorr: torch.Tensor | None = None) -> torch.Tensor:
    """Eigenvalues of ``G = D R Dᵀ``, largest first, clamped at 0: shape ``(min(out, in),)``, float64.

    The rank-k optimum of ``trace((D − BA) R (D − BA)ᵀ)`` removes exactly the first k of them, so
    entry ``k`` is what the (k+1)-th rank unit gains. A tall ``D = Q T`` uses ``T R Tᵀ`` (same nonzero
    spectrum, ``in × in``); a wide one ``D R Dᵀ`` (``out × out``); see :func:`small_gram`.
    """
    return torch.linalg.eigvalsh(small_gram(D, scale, autocorr)).flip(0).clamp_min(0.0)


def metric_energy(W: torch.Tensor, scale: torch.Tensor | None = None, autocorr: torch.Tensor | None = None) -> float:
    """``trace(W R Wᵀ)`` in float64 sums: the layer's output energy in the metric ``R`` (see :func:`gram_matrix`)."""
    if autocorr is not None:
        empty = W.new_zeros(0, W.shape[1])
        return weighted_error(W, empty, W.new_zeros(W.shape[0], 0), autocorr.to(W.device))
    M = W.to(torch.float64)
    if scale is not None:
        M = M * scale.to(device=W.device, dtype=torch.float64)
    return float((M * M).sum())


def psd_factor(R: torch.Tensor, floor: float = 1e-10, name: str | None = None) -> torch.Tensor:
    """A factor ``L`` with ``L Lᵀ ≈ R`` in float64, never complex or NaN (for analysis and reference).

    Cholesky first; if it fails, ``eigh`` with eigenvalues floored at ``floor · mean(diag R)``
    and a warning naming the layer.
    """
    R64 = R.to(torch.float64)
    R64 = (R64 + R64.T) / 2
    L, info = torch.linalg.cholesky_ex(R64)
    if int(info) == 0 and torch.isfinite(L).all():
        return L
    vals, vecs = torch.linalg.eigh(R64)
    level = floor * float(torch.diagonal(R64).mean().clamp_min(torch.finfo(torch.float64).tiny))
    n_floored = int((vals < level).sum())
    log.warning(
        "autocorrelation%s is not positive definite: floored %d of %d eigenvalues at %.3g",
        f" of {name}" if name else "", n_floored, vals.numel(), level,
    )
    return vecs * vals.clamp_min(level).sqrt()[None, :]


def weighted_error(D: torch.Tensor, A: torch.Tensor, B: torch.Tensor, R: torch.Tensor, rows: int = 1024,
                   out_metric: torch.Tensor | None = None) -> float:
    """``trace(F E R Eᵀ)`` with ``E = D − B A`` (float64 sums). ``F`` is ``out_metric``: output-channel
    weights (out,) (``diag(w)``), a PSD matrix (out, out), or None (``I``); rows go a block at a time
    unless ``F`` is a full matrix."""
    dtype = R.dtype
    Ac, Bc = A.to(D.device, dtype), B.to(D.device, dtype)
    if out_metric is not None and out_metric.dim() == 2:
        E = D.to(dtype) - Bc @ Ac if A.numel() else D.to(dtype)
        return float(((out_metric.to(D.device, dtype) @ E) * (E @ R)).sum(dtype=torch.float64))
    w = out_metric.to(D.device, torch.float64) if out_metric is not None else None
    total = 0.0
    for r in range(0, D.shape[0], rows):
        E = D[r:r + rows].to(dtype)
        if A.numel():
            E = E - Bc[r:r + rows] @ Ac
        per_row = ((E @ R) * E).sum(dim=1, dtype=torch.float64)
        total += float(per_row @ w[r:r + rows] if w is not None else per_row.sum())
    return total


def output_sqrt(out_metric: torch.Tensor, floor: float = 1e-6,
                name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, S⁻¹)`` float32 with ``SᵀS = F`` for an output metric ``F``: channel weights ``w ≥ 0``
    (out,) give ``S = √w`` (out,); a PSD matrix (out, out) gives its symmetric square root. Weights
    or eigenvalues are floored at ``floor`` × their mean (a warning names the layer) so ``S`` inverts.

    Minimizing ``trace(F E R Eᵀ)`` is the plain problem on ``S D``: solve for ``(A, B')`` there and
    take ``B = S⁻¹ B'`` (see :func:`left_apply`).
    """
    F = out_metric.detach().to(torch.float64)
    if F.dim() not in (1, 2) or (F.dim() == 2 and F.shape[0] != F.shape[1]) or not torch.isfinite(F).all():
        raise QeraError(f"an output metric must be a finite vector (out,) or square matrix (out, out), "
                        f"got shape {tuple(F.shape)}{where(name)}")
    if F.dim() == 1:
        if bool((F < 0).any()):
            raise QeraError(f"output weights must be non-negative{where(name)}")
        vals, vecs = F, None
    else:
        vals, vecs = torch.linalg.eigh((F + F.T) / 2)
    mean = float(vals.mean())
    if mean <= 0:
        log.warning("output metric of %s is zero (the loss never felt this layer): unweighted solve", name or "layer")
        eye = torch.ones(F.shape[0]) if vecs is None else torch.eye(F.shape[0])
        return eye, eye.clone()
    level = floor * mean
    low = int((vals < level).sum())
    if low:
        log.warning("output metric of %s: %d of %d %s floored at %.3g (%.0e of the mean)", name or "layer", low,
                    vals.numel(), "channels" if vecs is None else "eigenvalues", level, floor)
    root = vals.clamp_min(level).sqrt()
    if vecs is None:
        return root.to(torch.float32), (1 / root).to(torch.float32)
    return ((vecs * root) @ vecs.T).to(torch.float32), ((vecs / root) @ vecs.T).to(torch.float32)


def left_apply(S: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``S X`` for ``S`` a diagonal given as (out,) or a matrix (out, out); ``X`` (out, n)."""
    S = S.to(X.device, X.dtype)
    return S[:, None] * X if S.dim() == 1 else S @ X
