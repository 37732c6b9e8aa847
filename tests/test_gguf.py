"""GGUF block formats (bit-exact with gguf-py's reference dequantization) and the llama.cpp export."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, GGUFReader  # noqa: E402
from gguf.quants import dequantize, quant_shape_from_byte_shape, quantize  # noqa: E402

from qera import QeraError, QuantConfig, load_quantized, parse_format, quantize_model, quantize_weight, round_gptq, save_quantized  # noqa: E402
from qera import export  # noqa: E402
from qera.core.formats.base import as_rows  # noqa: E402
from qera.core.rounding import round_nearest  # noqa: E402
from conftest import correlated_inputs, output_error  # noqa: E402
from tiny import byte_tokenizer, tiny_llama  # noqa: E402

TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
LEGACY = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]  # gguf-py quantizes these too


def _weights(kind: str, shape=(16, 512), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(shape, generator=g) * 0.02
    if kind == "heavy":  # Student-t(2) entries plus a few large outliers and an all-zero block
        torch.manual_seed(seed)
        w = torch.distributions.StudentT(2.0).sample(shape) * 0.01
        w.view(-1)[::97] *= 20
        w.view(-1, shape[-1])[0, :256] = 0
        return w
    raise ValueError(kind)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(np.ascontiguousarray(a, np.float32).view(np.uint32),
                                                 np.ascontiguousarray(b, np.float32).view(np.uint32))


# -- formats ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["normal", "heavy"])
@pytest.mark.parametrize("spec", TYPES)
def test_decode_is_gguf_py_dequantize_bit_for_bit(spec, kind):
    fmt = parse_format(spec)
    w = _weights(kind)
    q = quantize_weight(w, fmt)
    raw = fmt.to_gguf_bytes(q.tensors, q.shape)
    gtype = GGMLQuantizationType[fmt.ggml_type]
    assert raw.dtype == np.uint8 and quant_shape_from_byte_shape(raw.shape, gtype) == tuple(w.shape)
    assert _same_bits(q.dequantize(torch.float32).numpy(), dequantize(raw, gtype))
    back = fmt.from_gguf_bytes(raw, q.shape)
    assert back.keys() == q.tensors.keys() and all(torch.equal(back[k], q.tensors[k]) for k in back)
    err = float((q.dequantize(torch.float32) - w).norm() / w.norm())
    assert err < {2: 0.35, 3: 0.2, 4: 0.15, 5: 0.09, 6: 0.045, 8: 0.015}[fmt.bits]


@pytest.mark.parametrize("spec", ["q3_k", "q4_0"])
def test_any_leading_shape(spec):
    fmt = parse_format(spec)
    w = _weights("normal", shape=(2, 3, 256))
    q = quantize_weight(w, fmt)
    raw = fmt.to_gguf_bytes(q.tensors, q.shape)
    assert _same_bits(q.dequantize(torch.float32).numpy(), dequantize(raw, GGMLQuantizationType[fmt.ggml_type]))


@pytest.mark.parametrize("spec", LEGACY)
def test_reads_blocks_that_gguf_py_wrote(spec):
    fmt = parse_format(spec)
    gtype = GGMLQuantizationType[fmt.ggml_type]
    w = _weights("heavy", seed=3)
    raw = quantize(w.numpy(), gtype)
    tensors = fmt.from_gguf_bytes(raw, (16, 512))
    fmt.check_stored(tensors, (16, 512))
    dq = fmt.decode(tensors, torch.Size((16, 512)))
    assert _same_bits(dq.numpy(), dequantize(raw, gtype))
    assert np.array_equal(fmt.to_gguf_bytes(tensors, (16, 512)), raw)
    ours = quantize_weight(w, fmt).dequantize(torch.float32)  # qera's scale search: never worse than the reference's
    assert (ours - w).norm() <= (dq - w).norm()


def test_specs_and_bits_per_weight():
    bpw = {"q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0, "q8_0": 8.5, "q2_k": 2.625, "q3_k": 3.4375,
           "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625}
    for spec, bits in bpw.items():
        fmt = parse_format(spec)
        assert str(fmt) == spec and parse_format(str(fmt)) == fmt and fmt.bits_per_weight == bits
        assert fmt.group_width == (256 if spec.endswith("_k") else 32)
    assert str(parse_format("q4")) == "q4_0" and str(parse_format("Q3_K")) == "q3_k"
    assert str(QuantConfig(format="q4_k", method="w-only").format) == "q4_k"
    for bad, needle in [("q7_k", "known: q4_0"), ("q4_2", "known"), ("int4_0", "no _0 suffix"),
                        ("q4_k:block=8", "unknown option"), ("4bit", "such as 'q4_k'.*known families: .*q")]:
        with pytest.raises(QeraError, match=needle):
            parse_format(bad)
    with pytest.raises(ValueError, match="known: int, mxint, nf, q"):
        parse_format("fp4")


def test_widths_that_are_not_whole_blocks_are_refused_naming_the_layer():
    W = torch.randn(8, 576) * 0.02
    name = "model.layers.0.mlp.up_proj"
    for spec in ("q4_k", "q3_k"):
        with pytest.raises(QeraError, match=rf"width is 576 \(layer {name}\)"):
            quantize_weight(W, spec, name=name)
        with pytest.raises(QeraError, match=rf"width is 576 \(layer {name}\)"):
            round_gptq(W, parse_format(spec), torch.eye(576, dtype=torch.float64), name=name)
    with pytest.raises(QeraError, match="blocks of 32"):
        quantize_weight(torch.randn(8, 48), "q4_0", name=name)
    assert quantize_weight(W, "q4_0").dequantize().shape == W.shape  # 576 = 18 blocks of 32


@pytest.fixture(scope="module")
def layer_problem():
    x = correlated_inputs(4000, 512, seed=1)
    R = x.double().T @ x.double() / x.shape[0]
    W = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * 0.05
    return W, R


@pytest.mark.parametrize("spec", ["q3_k", "q4_k", "q2_k", "q4_0"])
def test_gptq_beats_round_to_nearest_and_stays_exact(layer_problem, spec):
    W, R = layer_problem
    fmt = parse_format(spec)
    g, r = round_gptq(W, fmt, R), round_nearest(W, fmt)
    Q = g.dequantize(torch.float32)
    assert output_error(W, Q, R) < 0.6 * output_error(W, r.dequantize(torch.float32), R)
    fmt.check_stored(g.tensors, tuple(W.shape))
    blocks, _ = as_rows(Q, fmt.group_width)
    params = {k: v for k, v in g.tensors.items() if k != "codes"}
    assert torch.equal(fmt.round_to_grid(blocks, params), blocks)  # on the grid of its own parameters
    raw = fmt.to_gguf_bytes(g.tensors, g.shape)
    assert _same_bits(Q.numpy(), dequantize(raw, GGMLQuantizationType[fmt.ggml_type]))


def test_qera_exact_on_q3_k_lowers_theoutput_error(layer_problem):
    from qera import ActivationStats, get_method
    from qera.core.linalg import lowrank_objective

    W, _ = layer_problem
    st = ActivationStats(512, {"xtx"})
    st.update(correlated_inputs(4000, 512, seed=1))
    R = st.autocorrelation(torch.float64)
    fmt = parse_format("q3_k")
    objs = {}
    for rounding, q in (("rtn", round_nearest(W, fmt)), ("gptq", round_gptq(W, fmt, R))):
        D = W - q.dequantize(torch.float32)
        rec = get_method("qera-exact", exact=True).solve(W, q, 8, st, fmt)
        objs[rounding] = (output_error(W, q.dequantize(torch.float32), R), lowrank_objective(D, rec.A, rec.B, R))
    for before, after in objs.values():
        assert after < 0.8 * before
    assert objs["gptq"][1] < objs["rtn"][1]
    it = get_method("qera-iter", exact=True, iters=3, rounding="gptq").solve(W, round_nearest(W, fmt), 8, st, fmt)
    assert lowrank_objective(W - it.w_q, it.A, it.B, R) <= objs["rtn"][1] * (1 + 1e-9)


# -- export -------------------------------------------------------------------------------------------
def _permute_rows(a: np.ndarray, n_head: int) -> np.ndarray:
    """GGML's rotary row order of a llama q/k weight (what llama.cpp's converter does), written here
    independently of qera's exporter; transformers' GGUF loader undoes it (checked below)."""
    return a.reshape(n_head, 2, a.shape[0] // n_head // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def _rows_of(name: str, cfg) -> int | None:
    if ".attn_q." in name:
        return cfg.num_attention_heads
    if ".attn_k." in name:
        return cfg.num_key_value_heads
    return None


def write_source_gguf(model, tok, path: Path) -> None:
    """A GGUF of ``model`` in F32 with llama metadata and the byte tokenizer, as llama.cpp's converter lays it out."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(0)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if len(t) > 1 else 1 for t, _ in vocab])
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    w.add_pad_token_id(258)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":  # tied to the embedding
            continue
        g = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        a = t.detach().float().numpy()
        heads = _rows_of(g, cfg)
        w.add_tensor(g, np.ascontiguousarray(_permute_rows(a, heads) if heads else a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def _tiny(seed=0):
    return tiny_llama(seed=seed, hidden=256, inter=512)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The tiny Llama (widths 256 and 512: whole k-quant blocks) as a GGUF file; transformers reads it back exactly."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("src") / "tiny.gguf"
    model = _tiny()
    write_source_gguf(model, byte_tokenizer(), path)
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, model(IDS).logits)
    return path


def _checkpoint(path: Path, fmt: str, rank: int = 4, **kw) -> Path:
    model = _tiny()
    quantize_model(model, QuantConfig(format=fmt, method="zeroquant-v2", rank=rank, **kw), progress=False)
    save_quantized(model, byte_tokenizer(), path)
    return path


@pytest.mark.parametrize("fmt", ["q3_k", "q4_0"])  # q4_k: test_export_base_type_q8_0_and_uniform_alpha
def test_export_round_trips_through_gguf_py_and_transformers(tmp_path, source, fmt):
    from transformers import AutoModelForCausalLM

    ck = _checkpoint(tmp_path / "ck", fmt, rank_overrides={"k_proj": 2})
    out = export(ck, tmp_path / "out", to="gguf", gguf_source=str(source))
    model, _ = load_quantized(ck)
    cfg = model.config
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "packed_weight")}
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    by_gguf = {tmap.get_name(f"{n}.weight", try_suffixes=(".weight",)): m for n, m in layers.items()}

    src, base = GGUFReader(str(source)), GGUFReader(str(out / "model.gguf"))
    assert [t.name for t in base.tensors] == [t.name for t in src.tensors]
    assert base.fields["tokenizer.ggml.tokens"].contents() == src.fields["tokenizer.ggml.tokens"].contents()
    assert base.fields["general.architecture"].contents() == "llama"
    want_type = parse_format(fmt).ggml_type
    state = model.state_dict()
    for t in base.tensors:
        values = dequantize(t.data, t.tensor_type)
        if t.name in by_gguf:
            m = by_gguf[t.name]
            assert t.tensor_type.name == want_type
            wq = m.packed_weight.dequantize(torch.float32).numpy()
            heads = _rows_of(t.name, cfg)
            assert _same_bits(values, _permute_rows(wq, heads) if heads else wq), t.name
        else:
            hf = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}.get(t.name)
            hf = hf or next(k for k in state if tmap.get_name(k, try_suffixes=(".weight",)) == t.name)
            assert t.tensor_type.name == "F32" and np.array_equal(values, state[hf].float().numpy()), t.name

    adapter = GGUFReader(str(out / "adapter.gguf"))
    meta = {k: f.contents() for k, f in adapter.fields.items() if not k.startswith("GGUF.")}
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == "llama" and meta["adapter.lora.alpha"] == 0.0  # ranks 4 and 2
    ab = {t.name: t for t in adapter.tensors}
    assert len(ab) == 2 * len(layers)
    for g, m in by_gguf.items():
        a, b = ab[g + ".lora_a"], ab[g + ".lora_b"]
        assert a.tensor_type.name == "F16" and list(a.shape) == [m.in_features, m.rank]  # GGML ne: (in, r), (r, out)
        assert list(b.shape) == [m.rank, m.out_features]
        heads = _rows_of(g, cfg)
        B = m.B.detach().numpy()
        assert np.array_equal(np.asarray(a.data), m.A.detach().numpy())
        assert np.array_equal(np.asarray(b.data), _permute_rows(B, heads) if heads else B)

    # transformers reads the base GGUF back into the model qera evaluates with its low-rank term off
    hf_model = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
    for m in layers.values():
        m.A.data.zero_()
        m.B.data.zero_()
    with torch.no_grad():
        assert torch.equal(hf_model(IDS).logits, model(IDS).logits)


def test_export_base_type_q8_0_and_uniform_alpha(tmp_path, source):
    ck = _checkpoint(tmp_path / "ck", "q4_k")
    out = export(ck, tmp_path / "out", to="gguf", gguf_source=str(source), base_type="q8_0")
    base = {t.name: t for t in GGUFReader(str(out / "model.gguf")).tensors}
    assert base["token_embd.weight"].tensor_type.name == "Q8_0"
    assert base["output_norm.weight"].tensor_type.name == "F32"
    model, _ = load_quantized(ck)
    down = base["blk.1.ffn_down.weight"]
    assert down.tensor_type.name == "Q4_K"
    wq = model.model.layers[1].mlp.down_proj.packed_weight.dequantize(torch.float32).numpy()
    assert _same_bits(dequantize(down.data, down.tensor_type), wq)
    assert GGUFReader(str(out / "adapter.gguf")).fields["adapter.lora.alpha"].contents() == 4.0


def test_export_refusals(tmp_path, source):
    mx = _checkpoint(tmp_path / "mx", "mxint4")
    with pytest.raises(QeraError, match="format mxint4, which GGUF cannot store"):
        export(mx, tmp_path / "o1", to="gguf", gguf_source=str(source))
    ck = _checkpoint(tmp_path / "ck", "q4_0")
    with pytest.raises(QeraError, match="--gguf-source"):
        export(ck, tmp_path / "o2", to="gguf")
    with pytest.raises(QeraError, match="base type"):
        export(ck, tmp_path / "o3", to="gguf", gguf_source=str(source), base_type="mxint8")
    other = tmp_path / "other.gguf"
    write_source_gguf(_tiny(seed=5), byte_tokenizer(), other)
    with pytest.raises(QeraError, match="away .* from the source GGUF"):
        export(ck, tmp_path / "o4", to="gguf", gguf_source=str(other))
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_cli_export_to_gguf(tmp_path, capsys, source):
    from qera.cli import main

    ck = _checkpoint(tmp_path / "ck", "q3_k")
    code = main(["export", str(ck), "--to", "gguf", "--gguf-source", str(source), "--out", str(tmp_path / "out")])
    assert code == 0 and (tmp_path / "out" / "model.gguf").is_file() and (tmp_path / "out" / "adapter.gguf").is_file()
    assert "adapter.gguf" in capsys.readouterr().out
    code = main(["export", str(ck), "--to", "gguf", "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--gguf-source" in err and "\n" not in err



def test_format_fallback_for_widths_the_k_quants_cannot_store(tmp_path, batches):
    """SmolLM2's and Gemma's widths are no multiples of 256 everywhere: without a fallback the run
    stops before any calibration, naming the layer, its width and the option; with
    ``format_fallback="auto"`` those layers take llama.cpp's own fallback (q3_k → q4_0) and the
    rest stay q3_k, through GPTQ, the report, a save/load round trip and the GGUF export."""
    model = tiny_llama(hidden=256, inter=288)  # down_proj's input width 288 = 9 blocks of 32, not of 256
    with pytest.raises(QeraError, match=r"width is 288 \(layer model\.layers\.0\.mlp\.down_proj\).*--format-fallback auto \(q4_0\)"):
        quantize_model(model, QuantConfig(format="q3_k", rank=4), calibration=batches, progress=False)
    assert not any(hasattr(m, "packed_weight") for m in model.modules())
    with pytest.raises(QeraError, match="mxint4 stores every shape"):
        QuantConfig(format="mxint4", format_fallback="auto")
    with pytest.raises(QeraError, match="^format_fallback: "):
        QuantConfig(format="q3_k", format_fallback="q9_z")
    with pytest.raises(QeraError, match=r"q4_k stores whole GGUF blocks of 256 .* width is 288 \(layer model\.layers\.0\.mlp\.down_proj\)"):
        quantize_model(model, QuantConfig(format="q3_k", format_fallback="q4_k", rank=4), calibration=batches,
                       progress=False)

    cfg = QuantConfig(format="q3_k", format_fallback="auto", rank=4, rounding="gptq")
    assert cfg.format_fallback == "q4_0"
    report = quantize_model(model, cfg, calibration=batches, progress=False)
    formats = {lr.name: lr.format for lr in report.layers}
    assert {n for n, f in formats.items() if f == "q4_0"} == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    assert {f for n, f in formats.items() if "down_proj" not in n} == {"q3_k"}
    assert any("2 of 14 layers in the fallback format q4_0" in n for n in report.notes)
    down = next(lr for lr in report.layers if lr.name.endswith("0.mlp.down_proj"))
    assert down.bits_weight == parse_format("q4_0").bits_per_weight and "format_fallback" in down.note
    assert down.output_error_after < down.output_error_before  # the reconstruction works on the fallback grid

    save_quantized(model, byte_tokenizer(), tmp_path / "ck")
    back, _ = load_quantized(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, model(IDS).logits)
    src = tmp_path / "src.gguf"
    write_source_gguf(tiny_llama(hidden=256, inter=288), byte_tokenizer(), src)
    out = export(tmp_path / "ck", tmp_path / "out", to="gguf", gguf_source=str(src))
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(out / "model.gguf")).tensors}
    assert types["blk.0.ffn_down.weight"] == "Q4_0" and types["blk.0.ffn_up.weight"] == "Q3_K"
    t = next(t for t in GGUFReader(str(out / "model.gguf")).tensors if t.name == "blk.1.ffn_down.weight")
    wq = back.model.layers[1].mlp.down_proj.packed_weight.dequantize(torch.float32).numpy()
    assert _same_bits(dequantize(t.data, t.tensor_type), wq)


# -- llama.cpp itself (skipped unless QERA_LLAMA_CPP names a folder with its tools) -----------------------
LLAMA_CPP = os.environ.get("QERA_LLAMA_CPP")


@pytest.mark.skipif(not LLAMA_CPP or shutil.which("llama-perplexity", path=LLAMA_CPP) is None,
                    reason="set QERA_LLAMA_CPP to a folder holding llama.cpp's llama-perplexity")
def test_llama_cpp_runs_the_export_with_and_without_the_adapter(tmp_path, source):
    ck = _checkpoint(tmp_path / "ck", "q4_k", rank=8)
    out = export(ck, tmp_path / "out", to="gguf", gguf_source=str(source))
    text = tmp_path / "text.txt"
    text.write_text(" the quick brown fox jumps over the lazy dog" * 200)
    tool = shutil.which("llama-perplexity", path=LLAMA_CPP)
    ppl = {}
    for extra in ([], ["--lora", str(out / "adapter.gguf")]):
        # one chunk per pass (-b = -c), one chunk more than read: llama.cpp's log thread may drop the last
        # lines at exit, so the running perplexity after chunk 4 is read, not the final estimate
        res = subprocess.run([tool, "-m", str(out / "model.gguf"), "-f", str(text), "-c", "128", "-b", "128",
                              "--chunks", "5", "-t", "2", *extra], capture_output=True, text=True, timeout=600, check=False)
        assert res.returncode == 0, res.stderr[-2000:]
        running = dict(re.findall(r"\[(\d+)\]([0-9.]+)", res.stdout))
        assert "4" in running, res.stdout[-2000:]
        ppl[bool(extra)] = float(running["4"])
    assert all(np.isfinite(v) and v > 1 for v in ppl.values()) and ppl[True] != ppl[False]
    # llama.cpp's logits of the export with its adapter against qera's model of the same checkpoint
    from qera import load_quantized
    from qera.evaluate.llama_cpp import agreement, gguf_window_bos, read_logits_file

    logits = tmp_path / "logits.bin"
    res = subprocess.run([tool, "-m", str(out / "model.gguf"), "--lora", str(out / "adapter.gguf"), "-f", str(text),
                          "-c", "128", "-b", "128", "--chunks", "4", "-t", "2", "--kl-divergence-base", str(logits)],
                         capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    model, _ = load_quantized(ck)
    agree = agreement(model.float(), read_logits_file(logits), gguf_window_bos(out / "model.gguf"), progress=False)
    assert agree["windows"] == 4 and agree["top1_agreement"] > 0.95
    assert abs(agree["ppl_rel_diff"]) < 0.01
