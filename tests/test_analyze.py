"""``qera analyze``: prefix statistics, truncated solves, autocorrelation measures, CLI outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qera.analyze import (
    normalized_autocorrelation,
    offdiag_share,
    prefix_statistics,
    spearman,
    split_windows,
    truncate_result,
    truncated_output_errors,
)
from qera.analyze.autocorr import approx_exact_gap, downsample, offdiag_rms
from qera.analyze.calib_size import crossing
from qera.analyze.common import bits_per_weight, parse_int_list, type_group
from qera.cli import main
from qera.util.errors import QeraError
from qera.core.linalg import SolverOptions, optimal_objective, weighted_error, weighted_lowrank

# -- pure functions ------------------------------------------------------------------------------


def test_offdiag_share_diagonal_handmade_and_dead_channels():
    assert offdiag_share(torch.diag(torch.tensor([4.0, 1.0, 9.0]))) == 0.0
    # R' = [[1, 1], [1, 1]]: half of ‖R'‖² is off the diagonal
    assert offdiag_share(torch.tensor([[4.0, 2.0], [2.0, 1.0]])) == pytest.approx(0.5, abs=1e-15)
    # R' = [[1, .5], [.5, 1]]: 0.5 / 2.5
    assert offdiag_share(torch.tensor([[2.0, 1.0], [1.0, 2.0]])) == pytest.approx(0.2, abs=1e-15)
    # a dead channel (zero row/column) adds nothing and makes no NaN
    R = torch.tensor([[1.0, 0.3, 0.0], [0.3, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    Rn, live = normalized_autocorrelation(R)
    assert torch.isfinite(Rn).all() and live.tolist() == [True, True, False]
    assert offdiag_share(R) == pytest.approx(0.18 / 2.18, abs=1e-15)
    assert offdiag_share(torch.zeros(3, 3)) == 0.0
    assert offdiag_rms(R) == pytest.approx(0.3, abs=1e-15)
    assert offdiag_rms(torch.tensor([[2.0, 1.0], [1.0, 2.0]])) == pytest.approx(0.5, abs=1e-15)
    assert offdiag_rms(torch.diag(torch.tensor([4.0, 1.0]))) == 0.0


def test_spearman_and_helpers():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [5, 5, 5]) is None and spearman([1, 2], [1, 2]) is None
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486832980505138)  # ties: average ranks
    assert downsample(torch.ones(10, 10), 4).shape == (4, 4)
    assert torch.allclose(downsample(torch.ones(10, 10), 4), torch.ones(4, 4))
    assert [type_group(k) for k in ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")] == \
        ["q/k/v", "q/k/v", "o", "gate/up", "down"]
    assert bits_per_weight({"a": (4, 8), "b": (8, 8)}, 3.0, 2) == pytest.approx(3.0 + 16 * 2 * (12 + 16) / 96)
    assert parse_int_list("0,4,8", "--ranks") == [0, 4, 8]
    for bad in ("4,0", "-1,4", "4,4", "a", ""):
        with pytest.raises(QeraError):
            parse_int_list(bad, "--ranks")
    rows = [{"method": m, "samples": s, "perplexity": p} for m, s, p in
            [("a", 8, 10), ("b", 8, 11), ("a", 16, 10), ("b", 16, 9), ("a", 32, 10), ("b", 32, 9.5)]]
    assert crossing(rows, "b", "a") == 16 and crossing(rows, "a", "b") is None


def _psd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3 * d, d, generator=g, dtype=torch.float64) @ (torch.eye(d, dtype=torch.float64)
                                                                  + 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64))
    return X.T @ X / X.shape[0]


@pytest.mark.parametrize("metric", ["none", "scale", "autocorr"])
def test_truncated_solve_equals_direct_rank_k(metric):
    g = torch.Generator().manual_seed(0)
    D = torch.randn(40, 24, generator=g)
    R = _psd(24, 1)
    kw = {"none": {}, "scale": {"scale": torch.diagonal(R).sqrt()}, "autocorr": {"autocorr": R}}[metric]
    opts = SolverOptions(exact=True)
    A, B = weighted_lowrank(D, 12, opts=opts, **kw)
    for k in (1, 3, 7, 12):
        Ak, Bk = weighted_lowrank(D, k, opts=opts, **kw)
        assert torch.allclose(B[:, :k] @ A[:k], Bk @ Ak, atol=2e-5, rtol=1e-4)
        # rows of A and columns of B stay individually balanced after slicing
        assert torch.allclose(A[:k].norm(dim=1), B[:, :k].norm(dim=0), rtol=1e-5)
    if metric == "autocorr":  # and the truncation reaches the rank-k optimum
        errs = truncated_output_errors(D, A, B, R, [0, 1, 3, 12])
        assert errs[0] == pytest.approx(weighted_error(D, A[:0], B[:, :0], R), rel=1e-10)
        for k, e in zip((1, 3, 12), errs[1:]):
            assert e == pytest.approx(optimal_objective(D, k, R), rel=1e-5)
            assert e == pytest.approx(weighted_error(D, A[:k], B[:, :k], R), rel=1e-8)


def test_truncated_layer_solve_equals_direct(model_dir):
    """Through the per-layer step (methods, RTN W̃): a rank-8 solve sliced to 2 and 4 equals solving at 2 and 4."""
    from qera import QuantConfig, collect_statistics, find_targets, load_model
    from qera.analyze import solve_layers
    from qera.io.data import calibration_batches
    from tiny import TEXT

    model, tok = load_model(str(model_dir))
    targets = find_targets(model)
    one = {n: targets[n] for n in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj")}
    stats = collect_statistics(model, calibration_batches(tok, TEXT, 6, 48, 0, 3), list(targets),
                               ("abs", "sq", "xtx"), progress=False)
    for method in ("lqer", "qera-approx", "qera-exact", "zeroquant-v2"):
        def cfg(r):
            return QuantConfig(format="mxint3", method=method, rank=r, method_options={"exact": True})
        big = solve_layers(one, stats, cfg(8), progress=False)
        for k in (2, 4):
            small = solve_layers(one, stats, cfg(k), progress=False)
            for n in one:
                t = truncate_result(big[n], k)
                assert torch.equal(t.qweight.dequantize(torch.float32), small[n].qweight.dequantize(torch.float32))
                assert torch.allclose(t.B @ t.A, small[n].B @ small[n].A, atol=1e-5, rtol=1e-4), (method, n, k)


def test_gap_is_nonnegative_and_zero_for_diagonal_R():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(16, 12, generator=g)
    w_q = W + 0.1 * torch.randn(16, 12, generator=g)
    r = approx_exact_gap(W, w_q, _psd(12, 4), 3)
    assert r["err_exact"] <= r["err_approx"] * (1 + 1e-9) and r["err_approx"] < r["err_before"]
    d = approx_exact_gap(W, w_q, torch.diag(torch.rand(12, generator=g, dtype=torch.float64) + 0.5), 3)
    assert d["err_approx"] == pytest.approx(d["err_exact"], rel=1e-9)


# -- prefix statistics ---------------------------------------------------------------------------


def test_prefix_statistics_equal_separately_collected(model_dir):
    from qera import collect_statistics, find_targets, load_model
    from qera.io.data import calibration_batches
    from tiny import TEXT

    model, tok = load_model(str(model_dir))
    targets = find_targets(model)
    batches = calibration_batches(tok, TEXT, n_samples=11, seq_len=40, seed=0, batch_size=4)
    sizes = [3, 7, 11]  # not multiples of the batch size: segments are re-batched
    segments = split_windows(batches, sizes, 4)
    assert [sum(b["input_ids"].shape[0] for b in s) for s in segments] == [3, 4, 4]
    kinds = frozenset({"abs", "sq", "xtx"})
    seen = []
    for n, stats in prefix_statistics(model, segments, targets, kinds, precision="float64", progress=False):
        seen.append(n)
        ids = torch.cat([b["input_ids"] for b in batches])[:n]
        ref = collect_statistics(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], list(targets),
                                 kinds, progress=False, precision="float64")
        assert stats.groups == ref.groups and set(stats.stats) == set(ref.stats)
        for key, st in ref.stats.items():
            mine = stats.stats[key]
            assert mine.count == st.count == n * 40
            for kind in kinds:
                assert torch.allclose(mine.sums[kind], st.sums[kind], rtol=1e-12, atol=1e-12 * float(st.sums[kind].abs().max()))
        # quantizing and evaluating in between does not touch the accumulators (hooks are off)
        before = {k: v.sums["xtx"].clone() for k, v in stats.stats.items()}
        with torch.no_grad():
            model(input_ids=ids[:2])
        assert all(torch.equal(before[k], v.sums["xtx"]) for k, v in stats.stats.items())
    assert seen == sizes
    with pytest.raises(QeraError, match="only 11 are available"):
        split_windows(batches, [4, 12], 4)


# -- the commands --------------------------------------------------------------------------------


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("analyze")


def test_cli_analyses(workdir, capsys, model_dir, text_file):
    w = workdir
    common = ["--calib-text", text_file, "--calib-seq-len", 32, "--no-progress", "--fig-dir", w, "--fig-prefix", "t_"]
    code, out, err = run(capsys, "analyze", "calib-size", model_dir, *common, "--eval-text", text_file, "--seq-len", 32,
                         "--max-windows", 3, "--sizes", "2,5", "--calib-batch-size", 3, "--rank", 4,
                         "--save-stats", w / "stats.safetensors", "--out-json", w / "cs.json", "--json")
    assert code == 0, err
    cs = json.loads((w / "cs.json").read_text())
    assert json.loads(out)["complete"] and cs["complete"] and cs["sizes"] == [2, 5]
    assert [(r["method"], r["samples"], r["tokens"]) for r in cs["rows"]] == [
        ("qera-approx", 2, 64), ("qera-exact", 2, 64), ("qera-approx", 5, 160), ("qera-exact", 5, 160)]
    assert all(math.isfinite(r["perplexity"]) and 0 < r["mean_output_error_ratio"] < 1 for r in cs["rows"])
    assert set(cs["crossing"]) == {"challenger", "baseline", "perplexity", "mean_output_error_ratio"}
    assert cs["windows"] == 3 and cs["seq_len"] == 32 and (w / "t_calib_size.png").stat().st_size > 0

    code, out, err = run(capsys, "analyze", "autocorrelation", model_dir, *common, "--stats", w / "stats.safetensors",
                         "--rank", 4, "--out-json", w / "ac.json")
    assert code == 0, err
    ac = json.loads((w / "ac.json").read_text())
    assert len(ac["layers"]) == 14 and {g["group"] for g in ac["groups"]} == {"q/k/v", "o", "gate/up", "down"}
    assert all(0 <= r["offdiag_share"] < 1 and r["gap_relative"] >= -1e-9 for r in ac["layers"])
    assert -1 <= ac["spearman_offdiag_vs_gap_relative"] <= 1 and "Spearman" in out
    assert len(ac["heatmap_layers"]) == 8  # 2 blocks x 4 distinct inputs
    assert (w / "t_autocorr_heatmaps.png").stat().st_size > 0 and (w / "t_autocorr_summary.png").stat().st_size > 0

    code, out, err = run(capsys, "analyze", "rank", model_dir, *common, "--stats", w / "stats.safetensors",
                         "--eval-text", text_file, "--seq-len", 32, "--max-windows", 3, "--ranks", "0,2,4",
                         "--methods", "qera-approx,qera-exact", "--formats", "mxint3", "--out-json", w / "rk.json")
    assert code == 0, err
    rk = json.loads((w / "rk.json").read_text())
    assert [(r["method"], r["rank"]) for r in rk["rows"]] == [
        ("w-only", 0), ("qera-approx", 2), ("qera-approx", 4), ("qera-exact", 2), ("qera-exact", 4)]
    bits = {r["rank"]: r["bits_total"] for r in rk["rows"]}
    assert bits[0] == pytest.approx(3.25) and bits[0] < bits[2] < bits[4]
    # the rank sweep's rank-4 row equals calib-size's (same statistics, same solution)
    same = [r for r in rk["rows"] if r["method"] == "qera-exact" and r["rank"] == 4][0]
    ref = [r for r in cs["rows"] if r["method"] == "qera-exact" and r["samples"] == 5][0]
    assert same["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-4)
    assert same["mean_output_error_ratio"] == pytest.approx(ref["mean_output_error_ratio"], rel=1e-4)
    assert (w / "t_rank_sweep.png").stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["rank", "--ranks", "8,4"], "strictly increasing"),
    (["rank", "--ranks=-4,4"], ">= 0"),
    (["rank", "--ranks", "0,4", "--methods", "w-only"], "adds no low-rank term"),
    (["calib-size", "--sizes", "0,4"], ">= 1"),
    (["calib-size", "--methods", "nope"], "nope"),
])
def test_cli_bad_input(capsys, model_dir, argv, message):
    code, _, err = run(capsys, "analyze", argv[0], model_dir, *argv[1:], "--no-progress")
    assert code == 2 and message in err


def test_eval_prefix_keeps_the_evaluated_tokens(tok):
    from qera.cli.analyze import eval_prefix
    from qera.io.data import tokenize
    from tiny import TEXT

    p = eval_prefix(tok, TEXT, 32, 3)
    assert len(p) < len(TEXT)
    assert torch.equal(tokenize(tok, p)[:97], tokenize(tok, TEXT)[:97])
    assert eval_prefix(tok, TEXT, 32, None) is TEXT and eval_prefix(tok, TEXT, 32, 10**6) is TEXT
