"""The recipe guard: the baseline it compares against has the same bits or fewer, the model it leaves
is the run with the lower held-out loss (whichever that is), and it refuses what it cannot do."""

import math

import pytest
import torch

from qera import QeraError, QuantConfig, load_quantized
from qera.core.allocation import budget_params
from qera.io.data import calibration_batches
from qera.nn.targets import find_targets, linear_shape
from qera.quantize.guard import baseline_config, heldout_loss, quantize_guarded, quantize_guarded_and_save
from qera.quantize.refine import split_batches
from tiny import TEXT, byte_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def cal():
    """16 windows of 48 tokens in batches of 2: 7 calibrate, 1 is held out."""
    return calibration_batches(byte_tokenizer(), TEXT, n_samples=16, seq_len=48, seed=0, batch_size=2)


def _shapes(model, cfg):
    return {n: linear_shape(m) for n, m in find_targets(model, cfg.include, cfg.exclude).items()}


def test_baseline_is_plain_qera_exact_within_the_same_parameters():
    model = tiny_llama(seed=0)
    cfg = QuantConfig(format="int3:group=32", rank=4, rank_budget=5.5, rounding="gptq", output_weight="fisher",
                      method="qera-iter")
    shapes = _shapes(model, cfg)
    base = baseline_config(cfg, shapes)
    assert (base.method, base.rounding, base.output_weight, base.rank_budget) == ("qera-exact", "rtn", "none", None)
    assert base.rank == 5  # ⌊5.5⌋: A/B parameters within the budget, the largest such uniform rank
    assert base.rank * sum(o + i for o, i in shapes.values()) <= budget_params(shapes, rank_budget=5.5)
    bits = QuantConfig(format="int3:group=32", rank=4, extra_bits=0.5)  # 0.5 bit/weight of fp16 A, B
    r = baseline_config(bits, shapes).rank
    assert r * sum(o + i for o, i in shapes.values()) <= budget_params(shapes, extra_bits=0.5) \
        < (r + 1) * sum(o + i for o, i in shapes.values())
    assert baseline_config(QuantConfig(format="int3:group=32", rank=4), shapes) is None  # already plain
    assert baseline_config(QuantConfig(format="int3:group=32", method="w-only"), shapes) is None  # no low-rank term
    refined = QuantConfig(format="int3:group=32", rank=4, pipeline="sequential", propagate="quantized", refine_steps=3)
    assert baseline_config(refined, shapes).refine_steps == 0


@pytest.mark.parametrize("method", ["zeroquant-v2", "qera-iter"])
def test_guard_keeps_the_run_with_the_lower_heldout_loss(cal, method, tmp_path):
    model = tiny_llama(seed=0)
    cfg = QuantConfig(format="int2:group=32", method=method, rank=4)
    rep = quantize_guarded(model, cfg, cal, progress=False)
    g = rep.guard
    _, held_i = split_batches(len(cal))
    held = [cal[i] for i in held_i]
    kept = min(g["recipe_loss"], g["baseline_loss"])
    assert g["kept"] == ("recipe" if g["recipe_loss"] <= g["baseline_loss"] else "baseline")
    assert heldout_loss(model, held) == pytest.approx(kept, rel=1e-6)  # the model in memory is the kept run
    assert rep.config.method == (method if g["kept"] == "recipe" else "qera-exact")
    assert (g["heldout_batches"], g["train_batches"]) == (1, len(cal) - 1)


def test_a_worse_recipe_leaves_the_baseline_in_the_model(cal, monkeypatch):
    """The recipe's held-out score is made worse by 1 nat; what stays in the model is the baseline run."""
    import qera.quantize.guard as guard

    real, calls = guard.heldout_loss, []

    def penalized(model, batches):
        calls.append(1)
        return real(model, batches) + (1.0 if len(calls) == 1 else 0.0)

    monkeypatch.setattr(guard, "heldout_loss", penalized)
    model = tiny_llama(seed=0)
    rep = quantize_guarded(model, QuantConfig(format="int2:group=32", method="zeroquant-v2", rank=4), cal,
                           progress=False)
    assert rep.guard["kept"] == "baseline" and rep.config.method == "qera-exact"
    _, held_i = split_batches(len(cal))
    assert real(model, [cal[i] for i in held_i]) == pytest.approx(rep.guard["baseline_loss"], rel=1e-6)


def test_guarded_checkpoint_is_the_kept_run(cal, tmp_path):
    model = tiny_llama(seed=0)
    cfg = QuantConfig(format="int2:group=32", method="zeroquant-v2", rank=4)
    rep = quantize_guarded_and_save(model, cfg, tmp_path / "q", calibration=cal, progress=False)
    _, held_i = split_batches(len(cal))
    loaded, _ = load_quantized(tmp_path / "q")
    got = heldout_loss(loaded, [cal[i] for i in held_i])
    assert got == pytest.approx(min(rep.guard["recipe_loss"], rep.guard["baseline_loss"]), rel=1e-5)
    assert math.isfinite(got)
    with pytest.raises(QeraError, match="already exists"):  # refused before any work
        quantize_guarded_and_save(tiny_llama(seed=0), cfg, tmp_path / "q", calibration=cal, progress=False)


def test_guard_refusals(cal, tmp_path):
    cfg = QuantConfig(format="int2:group=32", method="zeroquant-v2", rank=4)
    with pytest.raises(QeraError, match="at least 4 batches"):
        quantize_guarded(tiny_llama(seed=0), cfg, cal[:3], progress=False)
    with pytest.raises(QeraError, match="resume"):
        quantize_guarded_and_save(tiny_llama(seed=0), cfg, tmp_path / "r", calibration=cal, resume=True)
    model = tiny_llama(seed=0)
    before = {n: m for n, m in model.named_modules()}
    plain = quantize_guarded(model, QuantConfig(format="int2:group=32", rank=4), cal, progress=False)
    assert plain.guard is None  # nothing to compare: an ordinary run on every batch
    assert set(dict(model.named_modules())) >= {n for n in before if n.endswith("proj")}
    assert torch.isfinite(torch.tensor(heldout_loss(model, cal[:1])))


def test_cli_guard_writes_the_kept_run_and_says_which(tmp_path, capsys, model_dir, text_file):
    import json

    from qera.cli import main

    code = main([str(a) for a in ("quantize", model_dir, "--format", "int2:group=32", "--method", "zeroquant-v2",
                                  "--rank", 4, "--guard", "--calib-text", text_file, "--calib-samples", 8,
                                  "--calib-seq-len", 32, "--calib-batch-size", 2, "--out", tmp_path / "q", "--json",
                                  "--no-progress", "--report", tmp_path / "r.json")])
    out = capsys.readouterr()
    assert code == 0, out.err
    g = json.loads(out.out)["guard"]
    assert g["kept"] in ("recipe", "baseline") and g["heldout_batches"] == 1 and g["train_batches"] == 3
    report = json.loads((tmp_path / "r.json").read_text())
    assert any(n.startswith("guard: kept the") for n in report["notes"])
    assert report["config"]["method"] == ("zeroquant-v2" if g["kept"] == "recipe" else "qera-exact")
    code = main([str(a) for a in ("quantize", model_dir, "--rank", 4, "--guard", "--stats", text_file,
                                  "--out", tmp_path / "s", "--no-progress")])
    assert code != 0 and "drop --stats" in capsys.readouterr().err


def test_guard_on_fused_experts_compares_whole_models(cal, monkeypatch):
    """On a fused-expert MoE the guard's targets include the unfused experts: the baseline run
    quantizes them afresh from the fp weights (not on top of the recipe's), and it is what stays."""
    from test_architectures import build

    import qera.quantize.guard as guard

    real, calls = guard.heldout_loss, []

    def penalized(model, batches):  # the recipe scores 1 nat worse: the baseline is kept
        calls.append(1)
        return real(model, batches) + (1.0 if len(calls) == 1 else 0.0)

    monkeypatch.setattr(guard, "heldout_loss", penalized)
    model = build("mixtral").eval()
    rep = quantize_guarded(model, QuantConfig(format="int2:group=32", method="zeroquant-v2", rank=4), cal,
                           progress=False)
    assert rep.guard["kept"] == "baseline"
    experts = [l.name for l in rep.layers if ".experts." in l.name]
    assert len(experts) == 2 * 4 * 2  # 2 blocks x 4 experts x (gate_up, down), all solved by the baseline run
    _, held_i = split_batches(len(cal))
    assert real(model, [cal[i] for i in held_i]) == pytest.approx(rep.guard["baseline_loss"], rel=1e-6)
