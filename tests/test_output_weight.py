"""Output weighting (``output_weight="fisher"`` / ``"kfac"``): the solve minimizes ``trace(F E R Eᵀ)``
exactly for a diagonal or full ``F``, the loss gradients are right, and the pipelines use or refuse it."""

import pytest
import torch

from conftest import correlated_inputs
from qera import QeraError, QuantConfig, collect_statistics, find_targets, quantize_model
from qera.core.formats import parse_format
from qera.core.linalg import output_sqrt, weighted_error
from qera.core.methods import get_method
from qera.core.statistics import ActivationStats
from tiny import direct_output_gradients, tiny_llama


def _layer(seed=0, out_f=40, in_f=48, n=1500):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * 0.05
    x = correlated_inputs(n, in_f, seed=seed + 1)
    stats = ActivationStats(in_f, {"xtx"})
    stats.update(x)
    w = torch.rand(out_f, generator=g, dtype=torch.float64) ** 4 * 10 + 1e-3  # weights over four decades
    return W, stats, w


def _objective(W, rec, R, w=None):
    return weighted_error(W - rec.w_q, rec.A, rec.B, R, out_metric=w)


@pytest.mark.parametrize("seed", range(3))
def test_weighted_qera_exact_is_the_weighted_optimum(seed):
    """``B A`` from the weighted solve equals the closed form ``F^-½ [F^½ D L]_k L⁻¹`` and beats the
    unweighted solve on the weighted objective (and loses to it on the unweighted one)."""
    W, stats, w = _layer(seed)
    fmt = parse_format("mxint3")
    q = fmt.quantize(W)
    R = stats.autocorrelation(torch.float64)
    m = get_method("qera-exact", exact=True)
    rank = 6
    weighted = m.solve(W, q, rank, stats, fmt, out_metric=w)
    plain = m.solve(W, q, rank, stats, fmt)
    # closed form in float64
    D = (W - q.dequantize(torch.float32)).double()
    L = torch.linalg.cholesky(R)
    s = w.sqrt()[:, None]
    U, S, Vh = torch.linalg.svd(s * D @ L, full_matrices=False)
    best = (U[:, :rank] * S[:rank]) @ Vh[:rank] @ torch.linalg.inv(L) / s
    got = (weighted.B @ weighted.A).double()
    assert torch.allclose(got, best, rtol=1e-4, atol=1e-6 * float(best.abs().max()))
    assert _objective(W, weighted, R, w) < _objective(W, plain, R, w) * (1 - 1e-3)
    assert _objective(W, plain, R) < _objective(W, weighted, R)
    # the weighted optimum is (S_k+1..)² of the scaled problem
    assert _objective(W, weighted, R, w) == pytest.approx(float((S[rank:] ** 2).sum()), rel=1e-4)


def test_uniform_weights_change_nothing():
    W, stats, _ = _layer(3)
    fmt = parse_format("mxint3")
    q = fmt.quantize(W)
    m = get_method("qera-exact", exact=True)
    a = m.solve(W, q, 5, stats, fmt)
    b = m.solve(W, q, 5, stats, fmt, out_metric=torch.full((W.shape[0],), 7.0, dtype=torch.float64))
    assert torch.allclose(a.B @ a.A, b.B @ b.A, atol=1e-6)


@pytest.mark.parametrize("rounding", ["rtn", "gptq"])
def test_weighted_qera_iter_never_worse_than_weighted_qera_exact(rounding):
    W, stats, w = _layer(5)
    fmt = parse_format("mxint3")
    R = stats.autocorrelation(torch.float64)
    from qera.core.rounding import ROUNDINGS

    q = ROUNDINGS.get(rounding)(W, fmt, R)
    exact = get_method("qera-exact", exact=True).solve(W, q, 4, stats, fmt, out_metric=w)
    it = get_method("qera-iter", exact=True, iters=4, rounding=rounding)
    path = [obj for _, obj in it.solve_path(W, q, 4, stats, fmt, out_metric=w)]
    assert path[0] == pytest.approx(_objective(W, exact, R, w), rel=1e-6)  # iterate 1 is weighted qera-exact
    best = it.solve(W, q, 4, stats, fmt, out_metric=w)
    assert _objective(W, best, R, w) == pytest.approx(min(path), rel=1e-9)
    assert _objective(W, best, R, w) <= _objective(W, exact, R, w) * (1 + 1e-9)


def test_output_sqrt_floors_and_refuses(caplog):
    w = torch.tensor([4.0, 0.0, 1.0, 3.0], dtype=torch.float64)
    with caplog.at_level("WARNING"):
        s, s_inv = output_sqrt(w, name="blk.0.q")
    assert "1 of 4 channels floored" in caplog.text and "blk.0.q" in caplog.text
    assert s[0] == pytest.approx(2.0) and 0 < float(s[1]) < 1e-2 and s.dtype == torch.float32
    assert torch.allclose(s * s_inv, torch.ones(4))
    # a rank-deficient PSD matrix: floored eigenvalues, S symmetric, SᵀS = F on its range, S S⁻¹ = I
    g = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    F = g.T @ g
    caplog.clear()
    with caplog.at_level("WARNING"):
        S, S_inv = output_sqrt(F, name="blk.1.k")
    assert "2 of 5 eigenvalues floored" in caplog.text
    assert torch.allclose(S, S.T) and torch.allclose(S @ S_inv, torch.eye(5), atol=1e-3)
    assert torch.allclose((S.T @ S).double(), F, atol=1e-5 * float(F.abs().max()))
    with pytest.raises(QeraError, match="finite vector.*blk.0.q"):
        output_sqrt(torch.tensor([1.0, float("nan")]), name="blk.0.q")
    with pytest.raises(QeraError, match="non-negative"):
        output_sqrt(torch.tensor([1.0, -1.0]))
    with pytest.raises(QeraError, match="square matrix"):
        output_sqrt(torch.ones(2, 3))
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert torch.equal(output_sqrt(torch.zeros(3))[0], torch.ones(3))
    assert "is zero" in caplog.text


@pytest.mark.parametrize("seed", range(2))
def test_full_output_metric_is_the_kfac_optimum(seed):
    """With ``F = E[gᵀg]`` full, the solve equals the closed form ``S⁻¹ [S D L]_k L⁻¹`` (``S = F^½``),
    beats the diagonal-F solve on ``trace(F E R Eᵀ)``, and a diagonal matrix equals the vector form."""
    W, stats, w = _layer(seed + 10)
    fmt = parse_format("mxint3")
    q = fmt.quantize(W)
    R = stats.autocorrelation(torch.float64)
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(W.shape[0], W.shape[0], generator=g, dtype=torch.float64)
    F = mix @ torch.diag(w) @ mix.T / W.shape[0]  # correlated output channels
    F += 0.05 * float(torch.diagonal(F).mean()) * torch.eye(W.shape[0], dtype=torch.float64)  # well conditioned
    m = get_method("qera-exact", exact=True)
    rank = 5
    full = m.solve(W, q, rank, stats, fmt, out_metric=F)
    diag = m.solve(W, q, rank, stats, fmt, out_metric=torch.diagonal(F).clone())
    vals, vecs = torch.linalg.eigh(F)
    S = (vecs * vals.sqrt()) @ vecs.T
    L = torch.linalg.cholesky(R)
    D = (W - q.dequantize(torch.float32)).double()
    U, Sig, Vh = torch.linalg.svd(S @ D @ L, full_matrices=False)
    best = torch.linalg.solve(S, (U[:, :rank] * Sig[:rank]) @ Vh[:rank]) @ torch.linalg.inv(L)
    assert torch.allclose((full.B @ full.A).double(), best, rtol=1e-3, atol=1e-5 * float(best.abs().max()))
    assert _objective(W, full, R, F) == pytest.approx(float((Sig[rank:] ** 2).sum()), rel=1e-4)
    assert _objective(W, full, R, F) < _objective(W, diag, R, F)
    as_matrix = m.solve(W, q, rank, stats, fmt, out_metric=torch.diag(w))
    as_vector = m.solve(W, q, rank, stats, fmt, out_metric=w)
    assert torch.allclose(as_matrix.B @ as_matrix.A, as_vector.B @ as_vector.A, atol=1e-5)


def _layer_inputs(model, batch, targets) -> dict:
    """``{layer: x}`` (batch, seq, in): each target's input on ``batch`` (forward hooks, no gradients)."""
    ins = {}
    hs = [m.register_forward_hook(lambda mod, a, o, n=n: ins.__setitem__(n, a[0].detach())) for n, m in targets.items()]
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in hs:
            h.remove()
    return ins


def test_output_fisher_equals_direct_autograd(batches):
    """Per output channel E[(∂L/∂y_j)²] against torch.autograd.grad on the captured outputs: each
    token weighted by its input energy ‖x_t‖² (the default) or not at all (``token_weight="none"``);
    the per-layer sensitivity is its mean; kfac's diagonal is fisher under either weighting."""
    from qera.calibrate.sensitivity import output_fisher, output_sensitivity

    model = tiny_llama()
    targets = find_targets(model)
    got = {tw: output_fisher(model, batches, targets, token_weight=tw) for tw in ("input", "none")}
    want = {tw: {n: torch.zeros(m.weight.shape[0], dtype=torch.float64) for n, m in targets.items()}
            for tw in ("input", "none")}
    norm = {tw: dict.fromkeys(targets, 0.0) for tw in ("input", "none")}
    for b in batches:
        ins = _layer_inputs(model, b, targets)
        mask = b["attention_mask"].double()
        for n, g in direct_output_gradients(model, b, targets).items():
            xw = ins[n].double().pow(2).sum(-1) * mask  # (batch, seq): ‖x_t‖², 0 on padding
            want["none"][n] += (g.double() ** 2 * mask[..., None]).sum((0, 1))
            want["input"][n] += (g.double() ** 2 * xw[..., None]).sum((0, 1))
            norm["none"][n] += float(mask.sum())
            norm["input"][n] += float(xw.sum())
    for tw in ("input", "none"):
        sens = output_sensitivity(model, batches, targets, token_weight=tw)
        full = output_fisher(model, batches, targets, full=True, token_weight=tw)
        for n in targets:
            f = got[tw][n]
            assert f.shape == want[tw][n].shape and f.dtype == torch.float64
            assert torch.allclose(f, want[tw][n] / norm[tw][n], rtol=1e-5, atol=1e-12)
            assert sens[n] == pytest.approx(float(f.mean()), rel=1e-12)
            assert full[n].shape == (f.numel(),) * 2 and torch.allclose(full[n], full[n].T)
            assert torch.allclose(torch.diagonal(full[n]), f, rtol=1e-5, atol=1e-12)  # its diagonal is fisher
    # the default is the input weighting, and it really differs from the plain average
    assert all(torch.equal(output_fisher(model, batches, targets)[n], got["input"][n]) for n in list(targets)[:2])
    assert any(not torch.allclose(got["input"][n], got["none"][n], rtol=1e-3) for n in targets)
    full = output_fisher(model, batches, targets, full=True)
    # the off-diagonal part is really there (gradients of channels correlate)
    k = "model.layers.0.self_attn.q_proj"
    off = full[k] - torch.diag(torch.diagonal(full[k]))
    assert float(off.abs().max()) > 0.05 * float(torch.diagonal(full[k]).max())
    # channels really differ: the weighting is not a per-layer constant
    assert all(float(f.max() / f.mean()) > 1.5 for f in got["input"].values())
    with pytest.raises(QeraError, match="token_weight must be one of input, none"):
        output_fisher(model, batches, targets, token_weight="output")


def test_output_weight_in_the_pipeline(batches):
    stats = collect_statistics(tiny_llama(), batches, kinds=("xtx",), progress=False)
    plain = QuantConfig(format="mxint3", method="qera-exact", rank=4, rank_budget=4)
    cfg = QuantConfig(format="mxint3", method="qera-exact", rank=4, rank_budget=4, output_weight="fisher")
    rep = quantize_model(tiny_llama(), cfg, calibration=batches, stats=stats, progress=False)
    ranks = {l.name: l.rank for l in rep.layers}
    assert "sensitivity" in rep.timings and len(set(ranks.values())) > 1
    assert "(none normalization)" in " ".join(rep.notes)  # the gains are in the loss's units already
    assert sum(ranks[l.name] * sum(l.shape) for l in rep.layers) <= 4 * sum(sum(l.shape) for l in rep.layers)
    rep_plain = quantize_model(tiny_llama(), plain, calibration=batches, stats=stats, progress=False)
    assert ranks != {l.name: l.rank for l in rep_plain.layers}
    # fixed ranks: the weighted solve trades plain output error for loss-weighted error
    fixed = QuantConfig(format="mxint3", method="qera-exact", rank=4, output_weight="fisher")
    rep_w = quantize_model(tiny_llama(), fixed, calibration=batches, stats=stats, progress=False)
    rep_u = quantize_model(tiny_llama(), QuantConfig(format="mxint3", method="qera-exact", rank=4),
                           stats=stats, progress=False)
    after = lambda r: sum(l.output_error_after for l in r.layers)  # noqa: E731
    assert after(rep_w) > after(rep_u)  # unweighted is the plain output-error optimum
    with pytest.raises(QeraError, match="calibration batches"):
        quantize_model(tiny_llama(), fixed, stats=stats, progress=False)
    # kfac: the layers' K-FAC objective trace(G E R Eᵀ) is what the full solve lowers
    kfac = QuantConfig(format="mxint3", method="qera-exact", rank=4, rank_budget=4, output_weight="kfac")
    rep_k = quantize_model(tiny_llama(), kfac, calibration=batches, stats=stats, progress=False)
    assert "(none normalization)" in " ".join(rep_k.notes) and "kfac" in rep_k.config.output_weight


def test_output_weight_config_errors(batches):
    with pytest.raises(QeraError, match="output_weight must be one of none, fisher, kfac"):
        QuantConfig(output_weight="hessian")
    with pytest.raises(QeraError, match="count the loss gradients twice"):
        QuantConfig(output_weight="fisher", rank_budget=4, rank_normalize="fisher")
    with pytest.raises(QeraError, match="no low-rank term"):
        QuantConfig(method="w-only", output_weight="fisher")
    seq = QuantConfig(format="mxint3", rank=4, output_weight="fisher", pipeline="sequential")
    with pytest.raises(QeraError, match="needs calibration"):
        quantize_model(tiny_llama(), seq, progress=False)


def test_output_weight_in_the_sequential_pipeline(batches):
    """The loss gradients of the full-precision model, taken before the first block: with fp
    propagation the sequential pipeline gives the one-shot result, layer for layer."""
    one = QuantConfig(format="mxint3", method="qera-exact", rank=4, output_weight="fisher")
    seq = QuantConfig(format="mxint3", method="qera-exact", rank=4, output_weight="fisher", pipeline="sequential")
    a = quantize_model(tiny_llama(), one, calibration=batches, progress=False)
    b = quantize_model(tiny_llama(), seq, calibration=batches, progress=False)
    assert b.pipeline == "sequential" and "sensitivity" in b.timings
    plain = quantize_model(tiny_llama(), QuantConfig(format="mxint3", method="qera-exact", rank=4),
                           calibration=batches, progress=False)
    for la, lb, lp in zip(a.layers, b.layers, plain.layers):
        assert la.name == lb.name
        assert lb.output_error_after == pytest.approx(la.output_error_after, rel=1e-4)
    assert sum(l.output_error_after for l in b.layers) > sum(l.output_error_after for l in plain.layers)
    # quantized propagation with a per-block budget runs too
    seqq = QuantConfig(format="mxint3", method="qera-iter", rank=4, rank_budget=4, output_weight="fisher",
                       pipeline="sequential", propagate="quantized")
    rep = quantize_model(tiny_llama(), seqq, calibration=batches, progress=False)
    assert any("(none normalization)" in n for n in rep.notes)


def test_kfac_refuses_matrices_over_the_memory_budget(batches, monkeypatch):
    from qera.calibrate.sensitivity import output_fisher

    model = tiny_llama()
    monkeypatch.setenv("QERA_MAX_MEMORY", "64KiB")  # the tiny model's q/k/v/o/gate/up/down need ~0.5 MiB
    with pytest.raises(QeraError, match=r"kfac.*over the memory budget of 64.0 KiB.*output_weight='fisher'"):
        output_fisher(model, batches, find_targets(model), full=True)
    assert output_fisher(model, batches, find_targets(model))  # the diagonal needs no such room


def test_output_weight_refuses_a_streamed_model(tmp_path, batches):
    """A model streamed from its shards is never whole in memory: a clear error, and no output."""
    from test_sequential import save_source

    from qera import quantize_and_save

    src = save_source(tmp_path / "src")
    cfg = QuantConfig(format="mxint3", rank=4, output_weight="fisher", pipeline="sequential")
    with pytest.raises(QeraError, match="cannot be streamed"):
        quantize_and_save(src, cfg, tmp_path / "out", calibration=batches, progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_output_weight(tmp_path, capsys, model_dir, text_file):
    import json

    from qera.cli import main

    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), "--out", str(out), "--format", "mxint3", "--rank", "4",
                 "--rank-budget", "4", "--output-weight", "fisher", "--calib-text", str(text_file),
                 "--calib-samples", "8", "--calib-seq-len", "32", "--no-progress",
                 "--report", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["config"]["output_weight"] == "fisher"
    assert len({l["rank"] for l in report["layers"]}) > 1
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["output_weight"] == "fisher" and info["rank_budget"] == 4.0 and info["rank"] is None


def _block_calls(batches):
    """Block 0 of a tiny Llama with its cached inputs, masks and per-batch calls."""
    model = tiny_llama()
    block = model.model.layers[0]
    mods = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    xs, masks, calls = [], [], []
    hook = block.register_forward_pre_hook(lambda m, a, kw: xs.append((a[0] if a else kw["hidden_states"]).detach()),
                                           with_kwargs=True)
    kwargs = []
    hook2 = block.register_forward_pre_hook(lambda m, a, kw: kwargs.append(dict(kw)), with_kwargs=True)
    try:
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
                masks.append(b["attention_mask"])
    finally:
        hook.remove()
        hook2.remove()

    def call_with(kw):
        def call(blk, x):
            out = blk(x, **kw)
            return out[0] if isinstance(out, tuple) else out
        return call

    for kw in kwargs:
        for k in ("hidden_states", "past_key_values", "use_cache"):
            kw.pop(k, None)
        calls.append(call_with(kw))
    return model, block, mods, xs, masks, calls


def test_block_output_fisher_is_the_block_gauss_newton_diagonal(batches):
    """``output_weight="block"``'s metric: per layer, the token-weighted mean of ``(Jᵀv)_j²`` with one
    standard-normal probe ``v`` per batch on the block's output, against torch.autograd.grad; where
    the layer's output is the block's last addition to the residual stream (down_proj: ``J = I``) it
    is 1 up to the probe's noise; where attention or the MLP lie between (q_proj, o_proj) it is not flat."""
    from qera.calibrate.sensitivity import block_output_fisher

    model, block, mods, xs, masks, calls = _block_calls(batches)
    flags = {p: p.requires_grad for p in block.parameters()}
    got = block_output_fisher(block, calls, xs.__getitem__, mods, masks, seed=3)
    assert {p: p.requires_grad for p in block.parameters()} == flags and all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in block.modules())

    gen = torch.Generator().manual_seed(3)
    want = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in mods.items()}
    norm = dict.fromkeys(mods, 0.0)
    for b, call in enumerate(calls):
        outs, ins = {}, {}

        def keep(n):
            def hook(mod, a, o):
                outs[n], ins[n] = o, a[0]
            return hook

        hs = [m.register_forward_hook(keep(n)) for n, m in mods.items()]
        try:
            with torch.enable_grad():
                for p in block.parameters():
                    p.requires_grad_(False)
                z = call(block, xs[b].clone().requires_grad_())
                v = torch.randn(z.shape, generator=gen) * masks[b][..., None]
                g = torch.autograd.grad((z * v).sum(), [outs[n] for n in mods])
        finally:
            for h in hs:
                h.remove()
            for p, f in flags.items():
                p.requires_grad_(f)
        for (n, gn) in zip(mods, g):
            w = ins[n].detach().double().pow(2).sum(-1) * masks[b].double()  # ‖x_t‖², 0 on padding
            want[n] += (gn.double() ** 2 * w[..., None]).sum((0, 1))
            norm[n] += float(w.sum())
    for n in mods:
        assert torch.allclose(got[n], want[n] / norm[n], rtol=1e-4, atol=1e-10), n
    assert float((got["mlp.down_proj"] - 1).abs().max()) < 0.35  # J = I: E[v_j²] = 1
    for n in ("self_attn.q_proj", "self_attn.o_proj"):  # the MLP (and attention) lie between: not flat
        assert float(got[n].std() / got[n].mean()) > 1.5 * float(got["mlp.down_proj"].std()), n


def test_block_output_fisher_with_channel_weights(batches):
    """With channel weights ``w`` (the refinement's ``channel`` loss), the probe is ``√w ⊙ v``: the
    weights are computed from the block outputs' per-channel energy, and at down_proj (``J = I``)
    the metric is ``w`` up to the probe's noise."""
    from qera.calibrate.sensitivity import block_output_fisher
    from qera.quantize.refine import clipped_channel_weights

    model, block, mods, xs, masks, calls = _block_calls(batches)
    seen = []
    w = torch.linspace(0.05, 1.0, block.mlp.down_proj.out_features)

    def weights(energy):
        seen.append(energy)
        return w

    got = block_output_fisher(block, calls, xs.__getitem__, mods, masks, seed=3, channel_weights=weights)
    with torch.no_grad():
        want = sum((call(block, xs[b]).double().pow(2) * masks[b].double()[..., None]).sum((0, 1))
                   for b, call in enumerate(calls))
    assert len(seen) == 1 and seen[0].dtype == torch.float64 and torch.allclose(seen[0], want)
    assert float((got["mlp.down_proj"] / w.double() - 1).abs().max()) < 0.35
    plain = block_output_fisher(block, calls, xs.__getitem__, mods, masks, seed=3)
    ones = block_output_fisher(block, calls, xs.__getitem__, mods, masks, seed=3,
                               channel_weights=lambda e: torch.ones_like(e, dtype=torch.float32))
    assert all(torch.allclose(ones[n], plain[n], rtol=1e-6) for n in mods)  # weights of 1: the plain metric
    capped = block_output_fisher(block, calls, xs.__getitem__, mods, masks, seed=3,
                                 channel_weights=clipped_channel_weights)
    assert all(torch.isfinite(capped[n]).all() and (capped[n] > 0).any() for n in mods)


def test_block_output_weight_in_the_sequential_pipeline(batches):
    """``output_weight="block"`` runs in the sequential pipeline (auto picks it), with ranks allocated
    per block; it is refused in the one-shot pipeline and with given statistics."""
    cfg = QuantConfig(format="mxint3", method="qera-exact", rank=4, rank_budget=4, output_weight="block",
                      pipeline="auto")
    model = tiny_llama()
    rep = quantize_model(model, cfg, calibration=batches, progress=False)
    assert rep.pipeline == "sequential" and "sensitivity" in rep.timings
    assert sum(lr.rank * sum(lr.shape) for lr in rep.layers) <= 4 * sum(sum(lr.shape) for lr in rep.layers)
    assert len({lr.rank for lr in rep.layers}) > 1  # allocated
    plain = tiny_llama()
    quantize_model(plain, QuantConfig(format="mxint3", method="qera-exact", rank=4, rank_budget=4,
                                      pipeline="sequential"), calibration=batches, progress=False)
    ids = torch.cat([b["input_ids"] for b in batches])
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, plain(ids).logits)  # the metric changed the solve
    with pytest.raises(QeraError, match="output_weight='block'.*sequential"):
        QuantConfig(format="mxint3", rank=4, output_weight="block", pipeline="oneshot")
    stats = collect_statistics(tiny_llama(), batches, kinds=("xtx",), progress=False)
    with pytest.raises(QeraError, match="not given statistics"):
        quantize_model(tiny_llama(), QuantConfig(format="mxint3", rank=4, output_weight="block", pipeline="sequential"),
                       calibration=batches, stats=stats, progress=False)
