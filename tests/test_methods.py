import logging

import pytest
import torch

from qera import (
    METHODS,
    ActivationStats,
    QeraError,
    SolverOptions,
    get_method,
    layer_output_error,
    quantize_and_reconstruct,
    quantize_weight,
    reconstruct,
    weight_error,
    weighted_lowrank,
)
from qera.core.linalg import lowrank_objective, optimal_objective, psd_factor

from conftest import correlated_inputs

ALL = {"abs", "sq", "xtx"}
ONE_SHOT = ["zeroquant-v2", "lqer", "qera-approx", "qera-exact"]


def stats_of(x):
    s = ActivationStats(x.shape[-1], ALL)
    s.update(x)
    return s


def independent_optimum(W, W_q, R, k):
    """Closed form via an eigh square root of R and an SVD (not the code under test):
    min over rank-k BA of trace((D-BA) R (D-BA)^T) = sum of squared tail singular values of D R^{1/2},
    attained by BA = U_k S_k V_k^T R^{-1/2} (QERA, Theorem 1) when R is invertible."""
    D = (W - W_q).double()
    vals, vecs = torch.linalg.eigh(R.double())
    root = vecs @ torch.diag(vals.sqrt()) @ vecs.T
    inv_root = vecs @ torch.diag(vals.rsqrt()) @ vecs.T
    U, S, Vh = torch.linalg.svd(D @ root, full_matrices=False)
    BA = U[:, :k] @ torch.diag(S[:k]) @ Vh[:k] @ inv_root
    return float((S[k:] ** 2).sum()), BA


@pytest.mark.parametrize("fmt", ["mxint3", "int4:group=32", "nf3"])
@pytest.mark.parametrize("rank", [1, 4, 16])
def test_qera_exact_reaches_closed_form_optimum(problem, fmt, rank):
    W, x = problem
    st = stats_of(x)
    qw = quantize_weight(W, fmt)
    A, B = reconstruct(W, qw, "qera-exact", rank, st)
    got = layer_output_error(W, qw, A, B, st)
    opt, BA = independent_optimum(W, qw.dequantize(), st.autocorrelation(), rank)
    assert got == pytest.approx(opt, rel=1e-6)
    assert layer_output_error(W, qw, BA[:rank].new_ones(0), None, st) > got  # sanity: w-only is worse
    torch.testing.assert_close((B @ A).double(), BA, rtol=1e-4, atol=1e-6)
    # No random perturbation of (A, B) does better.
    g = torch.Generator().manual_seed(rank)
    for eps in (1e-4, 1e-3, 1e-2):
        for _ in range(10):
            dA = torch.randn(A.shape, generator=g) * eps * A.abs().mean()
            dB = torch.randn(B.shape, generator=g) * eps * B.abs().mean()
            assert layer_output_error(W, qw, A + dA, B + dB, st) >= got * (1 - 1e-9)


@pytest.mark.parametrize("fmt,rank", [("mxint3", 8), ("mxint4", 4), ("nf2", 16)])
def test_method_orderings(problem, fmt, rank):
    W, x = problem
    st = stats_of(x)
    qw = quantize_weight(W, fmt)
    out, werr = {}, {}
    for m in ["w-only"] + ONE_SHOT:
        A, B = reconstruct(W, qw, m, 0 if m == "w-only" else rank, st)
        out[m] = layer_output_error(W, qw, A, B, st)
        werr[m] = weight_error(W, qw, A, B)
    assert out["qera-exact"] <= out["qera-approx"]
    assert out["qera-exact"] <= out["lqer"]
    assert out["qera-exact"] <= out["zeroquant-v2"] <= out["w-only"]
    assert werr["zeroquant-v2"] == min(werr[m] for m in ONE_SHOT)
    # the correlated, heavy-tailed inputs make the activation-aware methods clearly better
    assert out["qera-exact"] < 0.9 * out["zeroquant-v2"]


@pytest.mark.parametrize("lam", [0.25, 0.5, 0.9])
def test_shrunk_exact_is_optimal_for_the_shrunk_metric(problem, lam):
    """shrink=λ solves for R_λ = (1−λ)R + λ diag(R): optimal there, between exact and approx's ends."""
    W, x = problem
    st = stats_of(x)
    qw = quantize_weight(W, "mxint3")
    R = st.autocorrelation()
    R_lam = (1 - lam) * R + lam * torch.diag(torch.diagonal(R))
    D = (W - qw.dequantize()).double()
    shrunk = reconstruct(W, qw, "qera-exact", 8, st, shrink=lam)
    exact = reconstruct(W, qw, "qera-exact", 8, st)
    approx = reconstruct(W, qw, "qera-approx", 8, st)
    obj = {k: lowrank_objective(D, A.double(), B.double(), R_lam) for k, (A, B) in
           {"shrunk": shrunk, "exact": exact, "approx": approx}.items()}
    assert obj["shrunk"] == pytest.approx(optimal_objective(D, 8, R_lam), rel=1e-6)
    assert obj["shrunk"] <= min(obj["exact"], obj["approx"]) * (1 + 1e-9)


def test_shrink_ends_are_exact_and_approx(problem):
    W, x = problem
    st = stats_of(x)
    qw = quantize_weight(W, "mxint3")
    for lam, other in ((0.0, "qera-exact"), (1.0, "qera-approx")):
        A, B = reconstruct(W, qw, "qera-exact", 8, st, shrink=lam)
        A2, B2 = reconstruct(W, qw, other, 8, st)
        torch.testing.assert_close(B @ A, B2 @ A2, rtol=1e-4, atol=1e-5)
    with pytest.raises(QeraError, match="shrink must be in"):
        get_method("qera-exact", shrink=1.5)


def test_approx_equals_exact_for_uncorrelated_inputs():
    """With x = H diag(s) (H a ±1 Hadamard matrix), E[xᵀx] = diag(s²) exactly."""
    n = 64
    H = torch.ones(1, 1)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    g = torch.Generator().manual_seed(0)
    s = torch.rand(n, generator=g) * 3 + 0.1
    x = H * s
    st = stats_of(x)
    R = st.autocorrelation()
    assert torch.allclose(R, torch.diag(torch.diagonal(R)), atol=1e-6)  # fp32 products
    W = torch.randn(40, n, generator=g) * 0.1
    qw = quantize_weight(W, "mxint3")
    Ae, Be = reconstruct(W, qw, "qera-exact", 8, st)
    Aa, Ba = reconstruct(W, qw, "qera-approx", 8, st)
    assert layer_output_error(W, qw, Ae, Be, st) == pytest.approx(layer_output_error(W, qw, Aa, Ba, st), rel=1e-6)
    torch.testing.assert_close(Be @ Ae, Ba @ Aa, rtol=1e-4, atol=1e-5)


def test_exact_error_decreases_with_rank(problem):
    W, x = problem
    st = stats_of(x)
    qw = quantize_weight(W, "mxint3")
    errs = [layer_output_error(W, qw, *reconstruct(W, qw, "qera-exact", r, st), st) for r in range(1, 49, 3)]
    assert all(b < a for a, b in zip(errs, errs[1:]))


@pytest.mark.parametrize("case", ["well", "few_tokens", "dead_channels", "ill_conditioned"])
def test_randomized_path_matches_exact(case, caplog):
    n, m, k = 512, 384, 16
    x = correlated_inputs(4 * n, n, seed=7)
    if case == "few_tokens":
        x = x[: n // 4]  # rank(R) = 128 < 512
    elif case == "dead_channels":
        x[:, 100:140] = 0
    elif case == "ill_conditioned":
        x = x * torch.logspace(0, -6, n)
    st = stats_of(x)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(m, n, generator=g) * 0.05
    qw = quantize_weight(W, "mxint3")
    D = W - qw.dequantize()
    R = st.autocorrelation()
    opt = optimal_objective(D, k, R)
    with caplog.at_level(logging.INFO):  # per-layer detail: INFO (-v); a run sums them up in one warning
        A, B = reconstruct(W, qw, "qera-exact", k, st, name="blk.mlp", exact=False)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    gap = (lowrank_objective(D, A, B, R) - opt) / opt
    assert -1e-9 <= gap < 1e-4
    Ax, Bx = reconstruct(W, qw, "qera-exact", k, st, exact=True)
    assert abs(lowrank_objective(D, Ax, Bx, R) - opt) / opt < 1e-9
    if case in ("few_tokens", "dead_channels"):
        assert "blk.mlp" in caplog.text and "singular" in caplog.text


def test_solver_is_deterministic():
    g = torch.Generator().manual_seed(0)
    D = torch.randn(300, 400, generator=g)
    opts = SolverOptions(exact=False, seed=3)
    a1, b1 = weighted_lowrank(D, 8, opts=opts)
    a2, b2 = weighted_lowrank(D, 8, opts=opts)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)


def test_loftq(problem):
    W, _ = problem
    rec1 = quantize_and_reconstruct(W, "mxint3", "loftq", 8, iters=1)
    qw = quantize_weight(W, "mxint3")
    A, B = reconstruct(W, qw, "zeroquant-v2", 8)
    torch.testing.assert_close(rec1.B @ rec1.A, B @ A)
    rec5 = quantize_and_reconstruct(W, "mxint3", "loftq", 8, iters=5)
    assert rec5.qweight is not None
    assert not torch.equal(rec5.w_q, qw.dequantize())  # the quantized weight changed
    assert torch.equal(rec5.qweight.dequantize(), rec5.w_q)
    assert weight_error(W, rec5.w_q, rec5.A, rec5.B) < weight_error(W, qw)


def test_loftq_path_yields_every_iteration(problem):
    W, _ = problem
    method = get_method("loftq", iters=4)
    path = list(method.solve_path(W, quantize_weight(W, "mxint3"), 8))
    assert len(path) == 4
    for t, rec in enumerate(path, start=1):
        ref = quantize_and_reconstruct(W, "mxint3", "loftq", 8, iters=t)
        torch.testing.assert_close(rec.B @ rec.A, ref.B @ ref.A)
        assert torch.equal(rec.w_q, ref.w_q)


def test_psd_factor_floors_singular_matrix(caplog):
    x = correlated_inputs(10, 32)
    R = x.double().T @ x.double() / 10
    with caplog.at_level(logging.WARNING):
        L = psd_factor(R, name="layer7")
    assert torch.isfinite(L).all() and not L.is_complex()
    assert torch.allclose(L @ L.T, R, atol=1e-6 * float(R.diagonal().mean()))


@pytest.mark.parametrize("method", sorted(METHODS.names()))
def test_registry_contract(problem, method):
    W, x = problem
    st = stats_of(x)
    rank = 0 if method == "w-only" else 6
    rec = quantize_and_reconstruct(W, "mxint4", method, rank, st)
    assert rec.A.shape == (rank, 64) and rec.B.shape == (48, rank)
    assert rec.A.dtype == rec.B.dtype == torch.float32
    assert torch.isfinite(rec.A).all() and torch.isfinite(rec.B).all()
    if rank:
        # balanced factors: each rank-one term has equal norms on both sides
        torch.testing.assert_close(rec.A.norm(dim=1), rec.B.norm(dim=0), rtol=1e-4, atol=1e-7)


def test_bad_inputs(problem):
    W, x = problem
    st = stats_of(x)
    qw = quantize_weight(W, "mxint4")
    with pytest.raises(ValueError, match="qera-exact"):
        reconstruct(W, qw, "qera", 4, st)
    for bad in (0, -1, 49, 2.5):
        with pytest.raises(QeraError, match="rank must be an integer in 1..48.*q_proj"):
            reconstruct(W, qw, "qera-exact", bad, st, name="q_proj")
    with pytest.raises(QeraError, match="rank must be 0"):
        reconstruct(W, qw, "w-only", 4)
    with pytest.raises(QeraError, match="shape"):
        reconstruct(W, qw.dequantize()[:, :10], "zeroquant-v2", 4)
    with pytest.raises(QeraError, match="needs calibration statistics"):
        reconstruct(W, qw, "lqer", 4)
    with pytest.raises(QeraError, match="width"):
        reconstruct(W, qw, "qera-exact", 4, stats_of(x[:, :32]))
    with pytest.raises(QeraError, match="unknown option"):
        reconstruct(W, qw, "qera-exact", 4, st, iters=3)
    Wn = W.clone()
    Wn[0, 0] = float("inf")
    with pytest.raises(QeraError, match="k_proj.*NaN/Inf"):
        quantize_and_reconstruct(Wn, "mxint4", "qera-exact", 4, st, name="k_proj")
    with pytest.raises(QeraError, match="loftq re-quantizes"):
        reconstruct(W, qw.dequantize(), "loftq", 4)
