import copy
import json
import os

import pytest
import torch
from safetensors import safe_open

from qera import (
    QERALinear,
    QeraError,
    QuantConfig,
    collect_statistics,
    find_targets,
    load_quantized,
    perplexity,
    quantize_model,
    save_quantized,
)
from tiny import TEXT, right_padded, tiny_llama

ALL = ("abs", "sq", "xtx")


@pytest.fixture(scope="module")
def stats(batches):
    return collect_statistics(tiny_llama(), batches, kinds=ALL, progress=False)


def test_default_targets_are_decoder_linears_only():
    names = set(find_targets(tiny_llama()))
    assert len(names) == 14
    assert all(".layers." in n for n in names)
    assert not any("lm_head" in n or "embed" in n for n in names)


def test_shared_inputs_computed_once(stats):
    assert len(stats.stats) == 4 * 2  # attn-in, o_proj-in, mlp-in, down_proj-in per block
    for blk in range(2):
        p = f"model.layers.{blk}."
        assert stats[p + "self_attn.k_proj"] is stats[p + "self_attn.q_proj"] is stats[p + "self_attn.v_proj"]
        assert stats[p + "mlp.up_proj"] is stats[p + "mlp.gate_proj"]
        assert stats[p + "mlp.down_proj"] is not stats[p + "mlp.gate_proj"]


def test_hook_statistics_equal_hand_computed(stats, batches):
    model = tiny_llama()
    ids = torch.cat([b["input_ids"] for b in batches])
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids)).reshape(-1, 64).double()
    st = stats["model.layers.0.self_attn.q_proj"]
    assert st.count == ids.numel()
    torch.testing.assert_close(st.autocorrelation(), x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.mean_abs(), x.abs().mean(0), rtol=1e-5, atol=0)
    torch.testing.assert_close(st.mean_sq(), (x**2).mean(0), rtol=1e-5, atol=0)


def test_padding_is_excluded(tok):
    """Right-padded batch with a mask == the sequences run one by one (causal model)."""
    model = tiny_llama()
    seqs, batch = right_padded(tok)
    padded = collect_statistics(model, [batch], kinds=ALL, progress=False)
    single = collect_statistics(
        model, [{"input_ids": torch.tensor([s]), "attention_mask": torch.ones(1, len(s), dtype=torch.long)} for s in seqs],
        kinds=ALL, progress=False,
    )
    assert padded.tokens == single.tokens == sum(map(len, seqs))
    for key in padded.stats:
        for kind in ALL:
            torch.testing.assert_close(padded.stats[key].sums[kind], single.stats[key].sums[kind], rtol=1e-4, atol=1e-4)


def test_hooks_removed_even_on_error():
    model = tiny_llama()
    bad = [{"input_ids": torch.randint(0, 256, (2, 8)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}]
    bad[0]["attention_mask"][0, -1] = 0
    with pytest.raises(Exception):
        collect_statistics(model, bad, kinds=("sq",), progress=False)
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("method", ["w-only", "zeroquant-v2", "loftq", "lqer", "qera-approx", "qera-exact"])
def test_quantize_save_load_identical_logits(tmp_path, tok, stats, method):
    model = tiny_llama()
    cfg = QuantConfig(format="mxint3", method=method, rank=0 if method == "w-only" else 8,
                      method_options={"iters": 2} if method == "loftq" else {})
    report = quantize_model(model, cfg, stats=stats, report_output_error=True, progress=False)
    assert len(report.layers) == 14
    assert all(isinstance(m, QERALinear) for n, m in model.named_modules() if n in {l.name for l in report.layers})
    save_quantized(model, tok, tmp_path / "ck", report=report)
    back, tok2 = load_quantized(tmp_path / "ck")
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)
    assert tok2(TEXT[:50])["input_ids"] == tok(TEXT[:50])["input_ids"]
    from qera.io.checkpoint import read_qera_config

    assert QuantConfig.from_dict(read_qera_config(tmp_path / "ck")["quant_config"]) == cfg
    for l in report.layers:
        assert l.output_error_after <= l.output_error_before * (1 + 1e-9) or method in ("w-only", "loftq")


def test_report_orderings(stats):
    errs = {}
    for method in ["w-only", "zeroquant-v2", "qera-approx", "qera-exact"]:
        model = tiny_llama()
        rep = quantize_model(model, QuantConfig(format="mxint3", method=method, rank=0 if method == "w-only" else 8),
                             stats=stats, report_output_error=True, progress=False)
        errs[method] = sum(l.output_error_after for l in rep.layers)
    assert errs["qera-exact"] < errs["qera-approx"] < errs["w-only"]
    assert errs["qera-exact"] < errs["zeroquant-v2"] < errs["w-only"]


def test_on_disk_size_matches_bits(tmp_path, tok):
    model = tiny_llama()
    quantize_model(model, QuantConfig(format="mxint4", method="zeroquant-v2", rank=4), progress=False)
    save_quantized(model, tok, tmp_path / "ck")
    qbytes, numel = 0, 0
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        for k in f.keys():
            if ".qweight_" in k:
                qbytes += f.get_tensor(k).numel() * f.get_tensor(k).element_size()
    for m in model.modules():
        if isinstance(m, QERALinear):
            numel += m.in_features * m.out_features
    bf16_bytes = 2 * numel
    assert qbytes / bf16_bytes == pytest.approx(4.25 / 16, rel=1e-12)
    meta = json.loads((tmp_path / "ck" / "qera_config.json").read_text())
    assert meta["bits"]["bits_weight"] == pytest.approx(4.25)


def test_rank_overrides_and_lowrank_dtype(stats):
    model = tiny_llama()
    cfg = QuantConfig(format="mxint4", method="qera-exact", rank=8, rank_overrides={r"mlp\.down_proj": 2, r"k_proj": 0},
                      lowrank_dtype="bfloat16")
    rep = quantize_model(model, cfg, stats=stats, progress=False)
    ranks = {l.name.split(".", 3)[-1]: l.rank for l in rep.layers}
    assert ranks["mlp.down_proj"] == 2 and ranks["self_attn.k_proj"] == 0 and ranks["self_attn.q_proj"] == 8
    assert model.model.layers[0].self_attn.q_proj.A.dtype == torch.bfloat16


def test_config_json_round_trip_and_validation():
    cfg = QuantConfig(format="int4:group=32:asym", method="loftq", rank=4, method_options={"iters": 3})
    assert QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="known"):
        QuantConfig(method="gptq")
    with pytest.raises(QeraError):
        QuantConfig(method="qera-exact", rank=0)
    with pytest.raises(QeraError, match="unknown option"):
        QuantConfig(method="lqer", method_options={"iters": 3})
    with pytest.raises(QeraError, match="regex"):
        QuantConfig(include=["("])


def test_missing_calibration_and_rank_too_large(stats):
    with pytest.raises(QeraError, match="needs calibration"):
        quantize_model(tiny_llama(), QuantConfig(method="qera-exact"), progress=False)
    with pytest.raises(QeraError, match=r"rank must be an integer in 0\.\.64.*layer model\.layers\.0"):
        quantize_model(tiny_llama(), QuantConfig(method="zeroquant-v2", rank=65), progress=False)
    lacking = copy.copy(stats)
    lacking.stats = {k: v for k, v in stats.stats.items()}
    with pytest.raises(QeraError, match="lack"):
        from qera.calibrate.forward import CalibrationStats
        from qera.core.statistics import ActivationStats

        only_sq = CalibrationStats({k: ActivationStats(v.dim, {"sq"}, k) for k, v in stats.stats.items()}, stats.groups)
        quantize_model(tiny_llama(), QuantConfig(method="qera-exact"), stats=only_sq, progress=False)


def test_unquantized_weights_stored_in_bf16(tmp_path, tok):
    """dtype=bfloat16 halves the embeddings/norms/head on disk, keeps the quantized layers' tensors, and the
    loaded model equals the in-memory one with those weights cast to bf16."""
    import copy

    from safetensors import safe_open

    from qera.io.checkpoint import read_qera_config

    model = tiny_llama()
    quantize_model(model, QuantConfig(format="mxint4", method="zeroquant-v2", rank=4), progress=False)
    save_quantized(model, tok, tmp_path / "fp32")
    save_quantized(model, tok, tmp_path / "bf16", dtype="bfloat16")
    layers = read_qera_config(tmp_path / "bf16")["layers"]
    with safe_open(str(tmp_path / "fp32" / "model.safetensors"), "pt") as f32, \
            safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f16:
        assert set(f32.keys()) == set(f16.keys())
        for k in f32.keys():
            a, b = f32.get_tensor(k), f16.get_tensor(k)
            if any(k.startswith(n + ".") for n in layers):
                assert b.dtype == a.dtype and torch.equal(a, b), k  # quantized layers untouched
            else:
                assert a.dtype == torch.float32 and b.dtype == torch.bfloat16, k
                assert torch.equal(a.to(torch.bfloat16), b), k
    size = {d: (tmp_path / d / "model.safetensors").stat().st_size for d in ("fp32", "bf16")}
    assert size["bf16"] < size["fp32"]
    assert read_qera_config(tmp_path / "bf16")["unquantized_dtype"] == "bfloat16"
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    ref = copy.deepcopy(model)
    for mod in ref.modules():
        if not isinstance(mod, QERALinear):
            for p in mod.parameters(recurse=False):
                p.data = p.data.to(torch.bfloat16)
    back, _ = load_quantized(tmp_path / "bf16")
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, back(ids).logits)
    with pytest.raises(QeraError, match="storage dtype must be one of"):
        save_quantized(model, tok, tmp_path / "bad", dtype="int8")


def test_save_is_atomic_and_refuses_existing(tmp_path, tok, monkeypatch):
    model = tiny_llama()
    quantize_model(model, QuantConfig(format="mxint4", method="zeroquant-v2", rank=2), progress=False)
    save_quantized(model, tok, tmp_path / "ck")
    with pytest.raises(QeraError, match="already exists"):
        save_quantized(model, tok, tmp_path / "ck")
    from qera.io.checkpoint import files

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(files, "write_safetensors", boom)
    with pytest.raises(OSError):
        save_quantized(model, tok, tmp_path / "ck2")
    with pytest.raises(OSError):
        save_quantized(model, tok, tmp_path / "ck", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # nothing half-written, old checkpoint intact
    load_quantized(tmp_path / "ck")


def test_stats_save_load_reuse(tmp_path, stats):
    from qera.calibrate.forward import CalibrationStats

    stats.save(tmp_path / "s.safetensors")
    back = CalibrationStats.load(tmp_path / "s.safetensors")
    assert back.groups == stats.groups
    m1, m2 = tiny_llama(), tiny_llama()
    cfg = QuantConfig(format="mxint3", method="qera-exact", rank=4)
    quantize_model(m1, cfg, stats=stats, progress=False)
    quantize_model(m2, cfg, stats=back, progress=False)
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert torch.equal(m1(ids).logits, m2(ids).logits)


def test_perplexity_protocol(tok):
    model = tiny_llama()
    r = perplexity(model, tok, TEXT, seq_len=64, max_windows=3, progress=False)
    assert r.windows == 3 and r.tokens == 3 * 63
    # by hand: same windows, mean NLL
    ids = torch.tensor(tok(TEXT, add_special_tokens=False)["input_ids"][: 3 * 64]).view(3, 64)
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert r.nll == pytest.approx(float(nll), rel=1e-5)
    with pytest.raises(QeraError, match="tokens"):
        perplexity(model, tok, "tiny", seq_len=64, progress=False)


def test_qera_linear_moves_without_touching_packed_dtypes():
    model = tiny_llama()
    quantize_model(model, QuantConfig(format="int4:group=32", method="zeroquant-v2", rank=2), progress=False)
    lin = model.model.layers[0].self_attn.q_proj
    before = lin.dequantized_weight(torch.float32).clone()
    model.to(torch.bfloat16)
    assert lin.qweight_scales.dtype == torch.float16
    assert torch.equal(lin.dequantized_weight(torch.float32), before)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    assert lin(x).dtype == torch.bfloat16


def test_merged_and_separate_lowrank_forward_agree(stats):
    model = tiny_llama()
    quantize_model(model, QuantConfig(format="mxint3", method="qera-exact", rank=8), stats=stats, progress=False)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        merged = model(ids).logits
        for m in model.modules():
            if isinstance(m, QERALinear):
                m.merge_lowrank, m._w_cache = False, None
        separate = model(ids).logits
        for m in model.modules():
            if isinstance(m, QERALinear):
                m.cache_weight, m._w_cache = False, None
        uncached = model(ids).logits
    torch.testing.assert_close(merged, separate, rtol=1e-4, atol=1e-4)
    assert torch.equal(separate, uncached)
    assert all(m._w_cache is None for m in model.modules() if isinstance(m, QERALinear))


def test_report_counts_dead_channels_and_keeps_the_spectrum(batches):
    """A zero RMSNorm weight kills one input channel of q/k/v in block 0: the report says so, and
    the spectrum (off by default) is kept when asked."""
    from qera.evaluate.render import coverage_lines

    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] = 0.0
    rep = quantize_model(model, QuantConfig(format="mxint3", method="qera-approx", rank=4, report_spectrum=8),
                         calibration=batches, report_output_error=True, progress=False)
    dead = {l.name: l.dead_channels for l in rep.layers}
    hit = {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"}
    assert {n for n, d in dead.items() if d} == hit and all(dead[n] == 1 for n in hit)
    assert all(len(l.spectrum) == 8 and 0 <= sum(l.spectrum) <= 1 + 1e-9 for l in rep.layers)
    assert any("1 / 64" in line for line in coverage_lines(rep.layers))
    off = quantize_model(tiny_llama(), QuantConfig(format="mxint3", method="qera-approx", rank=4),
                         calibration=batches, report_output_error=True, progress=False)
    assert all(l.spectrum is None and l.dead_channels == 0 for l in off.layers)


def test_singular_autocorrelations_are_summed_up_in_one_warning(batches, caplog):
    """A dead input channel makes R singular on q/k/v of block 0: the run logs one WARNING line for
    all of them (how many layers, which kinds, why) and names each layer only at INFO (-v)."""
    import logging

    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] = 0.0
    with caplog.at_level(logging.INFO, logger="qera"):
        rep = quantize_model(model, QuantConfig(format="mxint3", method="qera-exact", rank=4),
                             calibration=batches, progress=False)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "singular" in r.getMessage()]
    assert len(warnings) == 1
    assert "singular on 3 of 14 layers (q_proj, k_proj, v_proj): 0 with fewer calibration tokens than input channels, 3 with input channels no token reached" in warnings[0].getMessage()
    details = [r for r in caplog.records if r.levelno == logging.INFO and "singular" in r.getMessage()]
    assert {r.getMessage().split()[2] for r in details} == {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"}
    assert [l.name for l in rep.singular_layers()] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qera"):  # lqer never reads R: nothing to say
        quantize_model(tiny_llama(), QuantConfig(format="mxint3", method="lqer", rank=4), calibration=batches,
                       progress=False)
    assert not [r for r in caplog.records if "singular" in r.getMessage()]
