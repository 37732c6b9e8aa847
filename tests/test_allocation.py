"""Rank allocation under a parameter budget: the greedy is optimal, the spectra predict the solves,
and the pipelines, checkpoints and CLI carry per-layer ranks."""

import itertools
import json

import pytest
import torch

from qera import QeraError, QuantConfig, collect_statistics, load_quantized, quantize_model, save_quantized
from qera.core.allocation import ErrorCurve, allocate_ranks, budget_params
from qera.core.linalg import (
    error_spectrum,
    metric_energy,
    optimal_objective,
    weighted_error,
    weighted_lowrank,
)
from qera.core.methods import get_method
from tiny import direct_output_gradients, tiny_llama

ALL = ("abs", "sq", "xtx")


@pytest.fixture(scope="module")
def stats(batches):
    return collect_statistics(tiny_llama(), batches, kinds=ALL, progress=False)


def _curve(name, gains, cost, energy=1.0, fixed=None):
    return ErrorCurve(name, torch.tensor(gains, dtype=torch.float64), cost, energy, fixed)


def _total_error(curves, ranks, normalize="output"):
    from qera.core.allocation import NORMALIZERS

    return sum(c.error_at(ranks[c.name]) / NORMALIZERS.get(normalize)(c) for c in curves)


def test_hand_checked_allocation():
    """Costs 10 and 20; gains per parameter a: 1.0, 0.5, 0.1; b: 0.6, 0.55, 0.05."""
    a = _curve("a", [10.0, 5.0, 1.0], 10)
    b = _curve("b", [12.0, 11.0, 1.0], 20)
    # order: a1 (1.0), b1 (0.6), b2 (0.55) take 50; a2 (0.5) would need 60 > 55, so it is skipped
    assert allocate_ranks([a, b], 55, normalize="none") == {"a": 1, "b": 2}
    assert allocate_ranks([a, b], 60, normalize="none") == {"a": 2, "b": 2}
    # then a3 (0.1) before b3 (0.05)
    assert allocate_ranks([a, b], 79, normalize="none") == {"a": 3, "b": 2}
    # normalizing by output energy: b's error is tiny relative to its energy, so a gets the rank
    b_big = _curve("b", [12.0, 11.0, 1.0], 20, energy=1e4)
    assert allocate_ranks([a, b_big], 30, normalize="output") == {"a": 3, "b": 0}


@pytest.mark.parametrize("seed", range(5))
def test_greedy_equals_exhaustive_optimum_with_equal_costs(seed):
    """Equal costs and non-increasing gains: the greedy is the exact optimum (checked by brute force)."""
    g = torch.Generator().manual_seed(seed)
    curves = []
    for j in range(4):
        gains = torch.rand(5, generator=g, dtype=torch.float64).sort(descending=True).values * (j + 1)
        curves.append(ErrorCurve(f"l{j}", gains, 7, float(torch.rand(1, generator=g)) + 0.5))
    budget = 7 * 9
    ranks = allocate_ranks(curves, budget)
    assert sum(ranks.values()) * 7 <= budget
    best = min(_total_error(curves, dict(zip([c.name for c in curves], rs)))
               for rs in itertools.product(range(6), repeat=4) if sum(rs) * 7 <= budget)
    assert _total_error(curves, ranks) == pytest.approx(best, rel=1e-12)


def test_unequal_costs_within_budget_and_never_worse_than_uniform():
    g = torch.Generator().manual_seed(3)
    curves = [ErrorCurve(f"l{j}", torch.rand(16, generator=g, dtype=torch.float64).sort(descending=True).values ** (j + 1),
                         c, 1.0) for j, c in enumerate((96, 160, 160, 128, 224))]
    shapes = {c.name: (c.cost // 2, c.cost - c.cost // 2) for c in curves}
    budget = budget_params(shapes, rank_budget=4)
    ranks = allocate_ranks(curves, budget)
    assert sum(ranks[c.name] * c.cost for c in curves) <= budget
    assert _total_error(curves, ranks) <= _total_error(curves, {c.name: 4 for c in curves})
    # fixed ranks are kept and paid for
    curves[0].fixed = 9
    ranks = allocate_ranks(curves, budget)
    assert ranks["l0"] == 9 and sum(ranks[c.name] * c.cost for c in curves) <= budget


@pytest.mark.parametrize("seed", range(3))
def test_floor_keeps_every_layer_and_is_the_optimum_above_it(seed):
    """With a floor, every free layer keeps at least that rank (fixed ranks stay as set), the budget
    holds, and above the floor the greedy is still the exact optimum (brute force, equal costs)."""
    from qera.core.allocation import floor_rank

    g = torch.Generator().manual_seed(seed)
    # one layer's gains dwarf the others': without a floor it takes nearly the whole budget
    curves = [ErrorCurve(f"l{j}", torch.rand(12, generator=g, dtype=torch.float64).sort(descending=True).values
                         * (1000.0 if j == 0 else 1.0), 7, 1.0) for j in range(4)]
    budget = 7 * 12
    assert min(allocate_ranks(curves, budget, "none").values()) == 0
    assert floor_rank(curves, budget, 0.25) == 0 and floor_rank(curves, budget, 0.5) == 1
    ranks = allocate_ranks(curves, budget, "none", floor=2)
    assert min(ranks.values()) >= 2 and sum(ranks.values()) * 7 <= budget
    best = min(_total_error(curves, dict(zip([c.name for c in curves], rs)), "none")
               for rs in itertools.product(range(2, 13), repeat=4) if sum(rs) * 7 <= budget)
    assert _total_error(curves, ranks, "none") == pytest.approx(best, rel=1e-12)
    curves[1].fixed = 1  # a user's rank is kept below the floor too, and paid
    ranks = allocate_ranks(curves, budget, "none", floor=2)
    assert ranks["l1"] == 1 and all(ranks[c.name] >= 2 for c in curves if c.fixed is None)
    assert floor_rank(curves, budget, 0.5) == int(0.5 * (budget - 7) / 21)
    with pytest.raises(ValueError, match="floor of rank 5"):
        allocate_ranks(curves, budget, "none", floor=5)
    with pytest.raises(ValueError, match="share"):
        floor_rank(curves, budget, 1.5)


def test_budget_params_two_ways():
    shapes = {"a": (64, 32), "b": (96, 32)}
    assert budget_params(shapes, rank_budget=8) == 8 * (96 + 128)
    # extra_bits = params · 16 / Σ out·in
    assert budget_params(shapes, extra_bits=0.5, lowrank_bits=16) == int(0.5 * (64 * 32 + 96 * 32) / 16)
    with pytest.raises(ValueError):
        budget_params(shapes)


@pytest.mark.parametrize("shape", [(48, 64), (64, 40)])
def test_spectrum_predicts_the_qera_exact_objective_at_every_rank(problem, shape):
    """error_at(k) = optimal objective = the objective of the rank-k solve (tall and wide D)."""
    W, x = problem
    g = torch.Generator().manual_seed(0)
    out_f, in_f = shape
    x = x[:, :in_f]
    D = torch.randn(out_f, in_f, generator=g, dtype=torch.float64) * 0.01
    R = (x.double().T @ x.double()) / x.shape[0]
    curve = ErrorCurve("l", error_spectrum(D, autocorr=R), out_f + in_f, metric_energy(D, autocorr=R))
    assert curve.error_at(0) == pytest.approx(weighted_error(D, D[:0], D[:, :0], R), rel=1e-10)
    assert curve.energy == pytest.approx(curve.error_at(0), rel=1e-10)
    for k in (1, 5, 17):
        A, B = weighted_lowrank(D, k, autocorr=R)
        assert curve.error_at(k) == pytest.approx(optimal_objective(D, k, R), rel=1e-9, abs=1e-14)
        assert curve.error_at(k) == pytest.approx(weighted_error(D, A.double(), B.double(), R), rel=1e-5)


def test_allocated_model_beats_uniform_at_the_same_budget(stats):
    """One-shot qera-exact: the allocated ranks spend ≤ the uniform rank-4 parameters, vary across
    layers, give the output errors the spectra predict, and a lower total normalized error."""
    runs = {}
    for name, extra in (("uniform", {}), ("allocated", {"rank_budget": 4, "rank_normalize": "output"})):
        model = tiny_llama()
        cfg = QuantConfig(format="mxint3", method="qera-exact", rank=4, method_options={"exact": True}, **extra)
        rep = quantize_model(model, cfg, stats=stats, report_output_error=True, progress=False)
        runs[name] = (model, rep)
    uni, alloc = runs["uniform"][1], runs["allocated"][1]
    params = {k: sum(l.rank * sum(l.shape) for l in r.layers) for k, r in (("u", uni), ("a", alloc))}
    assert params["a"] <= params["u"]
    ranks = [l.rank for l in alloc.layers]
    assert len(set(ranks)) > 2 and any("ranks allocated" in n for n in alloc.notes)
    model = tiny_llama()
    energy = {}
    for l in alloc.layers:
        mod = model.get_submodule(l.name)
        R = stats[l.name].autocorrelation()
        energy[l.name] = metric_energy(mod.weight.detach(), autocorr=R)
    rel = {k: sum(l.output_error_after / energy[l.name] for l in r.layers) for k, r in (("u", uni), ("a", alloc))}
    assert rel["a"] < rel["u"]
    # the same rounding and the exact solver: the report's errors are the spectra's predictions
    q = get_method("qera-exact", exact=True)
    fmt_layer = next(l for l in alloc.layers if l.rank > 0)
    W = model.get_submodule(fmt_layer.name).weight.detach()
    from qera.core.formats import parse_format

    D = W - parse_format("mxint3").quantize(W).dequantize(torch.float32)
    _, R = q.metric(stats[fmt_layer.name])
    assert error_spectrum(D, autocorr=R)[fmt_layer.rank:].sum() == pytest.approx(fmt_layer.output_error_after, rel=1e-6)


def test_sequential_allocates_per_block_and_checkpoint_round_trip(tmp_path, tok, batches):
    """Sequential: each block spends at most its share; layers with rank 0 save and load; logits equal."""
    model = tiny_llama()
    cfg = QuantConfig(format="mxint3", method="qera-approx", rank=4, pipeline="sequential", extra_bits=0.5,
                      rank_normalize="error")
    rep = quantize_model(model, cfg, calibration=batches, progress=False)
    by_block: dict[int, int] = {}
    for l in rep.layers:
        by_block[l.block] = by_block.get(l.block, 0) + l.rank * sum(l.shape)
    for b, used in by_block.items():
        share = int(0.5 * sum(l.shape[0] * l.shape[1] for l in rep.layers if l.block == b) / 16)
        assert used <= share
    assert sum(1 for n in rep.notes if "ranks allocated" in n) == len(by_block)
    save_quantized(model, tok, tmp_path / "ck", report=rep)
    back, _ = load_quantized(tmp_path / "ck")
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


def test_config_validation():
    with pytest.raises(QeraError, match="not both"):
        QuantConfig(rank_budget=8, extra_bits=0.4)
    with pytest.raises(QeraError, match="no low-rank term"):
        QuantConfig(method="w-only", rank=0, rank_budget=8)
    with pytest.raises(QeraError, match="positive number"):
        QuantConfig(rank_budget=-1)
    with pytest.raises(QeraError, match="rank_normalize"):
        QuantConfig(rank_budget=4, rank_normalize="energy")
    cfg = QuantConfig(rank_budget=8)
    assert QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_cli_rank_budget_and_info(tmp_path, capsys, model_dir, text_file):
    from qera.cli import main

    code = main(["quantize", str(model_dir), "--format", "mxint3", "--rank-budget", "4", "--calib-text", str(text_file),
                 "--calib-samples", "8", "--calib-seq-len", "32", "--out", str(tmp_path / "q"), "--no-progress",
                 "--report", str(tmp_path / "r.md")])
    assert code == 0
    md = (tmp_path / "r.md").read_text()
    assert "ranks allocated within the parameters of rank 4" in md and (tmp_path / "r_files" / "ranks.png").is_file()
    capsys.readouterr()
    assert main(["info", str(tmp_path / "q"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rank_budget"] == 4.0 and len(info["layer_ranks"]) == 14
    assert len(set(info["layer_ranks"].values())) > 1
    assert main(["info", str(tmp_path / "q")]) == 0
    assert "allocated ranks (block x layer)" in capsys.readouterr().out


def test_output_sensitivity_equals_direct_autograd(batches):
    """E‖∂L/∂y‖²/out per layer, against torch.autograd.grad on the captured outputs, unweighted and
    with each token weighted by its input energy; no weight gradients are made, requires_grad flags
    and hooks are put back."""
    from qera import find_targets
    from qera.calibrate.sensitivity import output_sensitivity

    model = tiny_llama()
    targets = find_targets(model)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # a mixed state must come back as it was
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    got = {tw: output_sensitivity(model, batches, targets, token_weight=tw) for tw in ("none", "input")}
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    want = {tw: dict.fromkeys(targets, 0.0) for tw in ("none", "input")}
    norm = {"none": 0.0, "input": dict.fromkeys(targets, 0.0)}
    for b in batches:  # the summed token losses of each window (a window's loss does not depend on the others)
        ins = _inputs(model, b, targets)
        for n, g in direct_output_gradients(model, b, targets).items():
            g2 = (g.double() ** 2).sum(-1) / g.shape[-1]  # (batch, seq)
            xw = ins[n].double().pow(2).sum(-1)
            want["none"][n] += float(g2.sum())
            want["input"][n] += float((g2 * xw).sum())
            norm["input"][n] += float(xw.sum())
        norm["none"] += int(b["attention_mask"].sum())
    for n in targets:
        assert got["none"][n] == pytest.approx(want["none"][n] / norm["none"], rel=1e-5)
        assert got["input"][n] == pytest.approx(want["input"][n] / norm["input"][n], rel=1e-5)
    assert len({round(v, 12) for v in got["input"].values()}) > 3  # layers really differ


def _inputs(model, batch, targets) -> dict:
    """``{layer: x}``: each target's input on ``batch`` (forward hooks, no gradients)."""
    ins = {}
    hs = [m.register_forward_hook(lambda mod, a, o, n=n: ins.__setitem__(n, a[0].detach())) for n, m in targets.items()]
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    finally:
        for h in hs:
            h.remove()
    return ins


class _PostNormLM(torch.nn.Module):
    """embedding (token rows of norms over two decades) → linear → RMSNorm → head: behind the norm
    ``‖∂L/∂y_t‖ ∝ 1/rms(y_t)``, so the loss gradients are largest on the tokens whose inputs (and
    errors) are smallest — Gemma-3's post-attention and post-feedforward norms in miniature."""

    def __init__(self, vocab: int = 64, dim: int = 32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, dim)
        self.lin = torch.nn.Linear(dim, dim, bias=False)
        self.norm = torch.nn.RMSNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(vocab, dim, generator=g) * torch.logspace(-1, 1, vocab)[:, None])
            self.lin.weight.copy_(torch.randn(dim, dim, generator=g) / dim ** 0.5)
            self.head.weight.copy_(torch.randn(vocab, dim, generator=g))

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed

    def forward(self, input_ids, attention_mask=None, labels=None, use_cache=False):
        from types import SimpleNamespace

        logits = self.head(self.norm(self.lin(self.embed(input_ids))))
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return SimpleNamespace(loss=loss, logits=logits)


def test_token_weighted_sensitivity_is_the_token_by_token_cost_behind_a_post_norm():
    """Issue 28's cause in miniature. For an error whose size follows its input's energy
    (``DᵀD = α² I``), the loss's token-by-token cost ``Σ_t ‖g_t‖² ‖D x_t‖² / out`` is exactly the
    input-weighted sensitivity times ``trace(D R Dᵀ)``; averaging gradients and errors separately
    (``token_weight="none"``) overstates it many times over behind a normalization."""
    from qera.calibrate.sensitivity import output_sensitivity

    model = _PostNormLM().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (4, 40), generator=g)
    batches = [{"input_ids": ids[:2], "attention_mask": torch.ones_like(ids[:2])},
               {"input_ids": ids[2:], "attention_mask": torch.ones_like(ids[2:])}]
    targets = {"lin": model.lin}
    alpha = 0.01
    cost, energy, tokens = 0.0, 0.0, 0
    for b in batches:
        x = model.embed(b["input_ids"]).detach()
        y = model.lin(x).detach().requires_grad_()
        logits = model.head(model.norm(y))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), b["input_ids"][:, 1:].flatten(),
                                                 reduction="sum")
        (gy,) = torch.autograd.grad(loss, y)
        xn = x.double().pow(2).sum(-1)
        cost += float((gy.double().pow(2).sum(-1) * alpha ** 2 * xn).sum()) / 32  # ‖D x_t‖² = α²‖x_t‖²
        energy += float(alpha ** 2 * xn.sum())  # trace(D R Dᵀ) · tokens
        tokens += xn.numel()
    est = {tw: output_sensitivity(model, batches, targets, token_weight=tw)["lin"] * energy
           for tw in ("input", "none")}
    assert est["input"] == pytest.approx(cost, rel=1e-5)
    assert est["none"] > 10 * cost


def test_fisher_normalization_in_the_pipeline(stats, batches):
    model = tiny_llama()
    cfg = QuantConfig(format="mxint3", method="qera-exact", rank=4, rank_budget=4, rank_normalize="fisher")
    rep = quantize_model(model, cfg, calibration=batches, stats=stats, progress=False)
    ranks = {l.name: l.rank for l in rep.layers}
    assert sum(ranks[l.name] * sum(l.shape) for l in rep.layers) <= 4 * sum(sum(l.shape) for l in rep.layers)
    assert "sensitivity" in rep.timings and len(set(ranks.values())) > 1
    # auto = fisher when the one-shot pipeline has batches, else error; the note says which
    auto = QuantConfig(format="mxint3", method="qera-exact", rank=4, rank_budget=4)
    rep_auto = quantize_model(tiny_llama(), auto, calibration=batches, stats=stats, progress=False)
    assert {l.name: l.rank for l in rep_auto.layers} == ranks and "(fisher normalization)" in " ".join(rep_auto.notes)
    rep_err = quantize_model(tiny_llama(), auto, stats=stats, progress=False)
    assert "(error normalization)" in " ".join(rep_err.notes)
    with pytest.raises(QeraError, match="loss gradients"):
        quantize_model(tiny_llama(), cfg, stats=stats, progress=False)
    with pytest.raises(QeraError, match="pipeline='oneshot'"):
        QuantConfig(format="mxint3", method="qera-exact", rank=4, rank_budget=4, rank_normalize="fisher",
                    pipeline="sequential")
    auto_seq = QuantConfig(format="mxint3", method="qera-exact", rank=4, rank_budget=4, rank_normalize="fisher",
                           pipeline="auto")  # auto may still choose sequential (memory): the driver refuses then
    with pytest.raises(QeraError, match="loss gradients"):  # a 1-byte budget makes auto choose sequential
        quantize_model(tiny_llama(), auto_seq, calibration=batches, progress=False, max_memory=1)
