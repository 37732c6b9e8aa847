"""Every decoder family on tiny random configs: one-shot == sequential, save → load identical logits."""

import copy

import pytest
import torch

from qera import (
    QERALinear,
    QuantConfig,
    find_targets,
    load_quantized,
    quantize_and_save,
    quantize_model,
    save_quantized,
)

T = pytest.importorskip("transformers")

COMMON = dict(vocab_size=259, max_position_embeddings=128)


def build(family: str):
    torch.manual_seed(0)
    if family == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, **COMMON))
    if family == "gemma3":  # sliding-window and full-attention layers: per-layer masks and rotary tables
        return T.Gemma3ForCausalLM(T.Gemma3TextConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            **COMMON))
    if family == "qwen2":  # q/k/v biases
        return T.Qwen2ForCausalLM(T.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, **COMMON))
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        return T.Phi3ForCausalLM(T.Phi3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=4, pad_token_id=0, **COMMON))
    if family == "gpt2":  # Conv1D layers with transposed weights, positional block arguments
        return T.GPT2LMHeadModel(T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=259, n_positions=128))
    if family == "opt":  # flattens the hidden state before fc1/fc2
        return T.OPTForCausalLM(T.OPTConfig(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                                            word_embed_proj_dim=64, **COMMON))
    if family == "mixtral":  # fused 3-D experts
        return T.MixtralForCausalLM(T.MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                                    num_experts_per_tok=2, **COMMON))
    if family == "qwen2_moe":  # fused experts + a shared expert and its gate
        return T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(
            hidden_size=64, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
            **COMMON))
    raise KeyError(family)


FAMILIES = ["llama", "gemma3", "qwen2", "phi3", "gpt2", "opt", "mixtral", "qwen2_moe"]


def batches():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (6, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 15:] = 0  # right padding: excluded from the statistics
    return [{"input_ids": ids[:3], "attention_mask": mask[:3]}, {"input_ids": ids[3:], "attention_mask": mask[3:]}]


@pytest.mark.parametrize("family", FAMILIES)
def test_oneshot_equals_sequential_and_round_trips(tmp_path, family):
    model = build(family).eval()
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    cfg = QuantConfig(format="mxint3", method="qera-exact", rank=4)
    ra = quantize_model(a, cfg, calibration=batches(), progress=False)
    rb = quantize_model(b, QuantConfig(format="mxint3", method="qera-exact", rank=4, pipeline="sequential"),
                        calibration=batches(), progress=False)
    assert [l.name for l in ra.layers] == [l.name for l in rb.layers]
    n_tokens = 6 * 24 - 9
    dense = [l for l in ra.layers if ".experts." not in l.name]
    assert all(l.tokens == n_tokens for l in dense)
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
        assert torch.equal(la, lb)
        assert not torch.equal(la, model(ids).logits)
    save_quantized(a, None, tmp_path / "q", report=ra)
    back, _ = load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(back(ids).logits, la)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_experts_report_their_tokens(family):
    model = build(family).eval()
    report = quantize_model(model, QuantConfig(format="mxint3", method="qera-exact", rank=4),
                            calibration=batches(), progress=False)
    experts = [l for l in report.layers if ".experts." in l.name and l.name.endswith("gate_up_proj")]
    assert len(experts) == 2 * 4
    top_k = 2
    for blk in range(2):  # every routed (non-padding) token is counted once per chosen expert
        assert sum(l.tokens for l in experts if f"layers.{blk}." in l.name) == top_k * (6 * 24 - 9)
    assert all(isinstance(m, QERALinear) for n, m in model.named_modules() if n.endswith(("gate_up_proj", "down_proj"))
               and ".experts." in n)


def test_expert_without_tokens_stays_finite():
    """An expert no token is routed to: the solve falls back to the weight error, and says so."""
    model = build("mixtral").eval()

    def never_three(router):
        def forward(h):  # the standard top-k router, with expert 3 masked out
            h = h.reshape(-1, router.hidden_dim)
            logits = torch.nn.functional.linear(h, router.weight)
            logits[:, 3] = float("-inf")
            probs = torch.softmax(logits.float(), dim=-1)
            top, idx = torch.topk(probs, router.top_k, dim=-1)
            return logits, top / top.sum(dim=-1, keepdim=True), idx
        return forward

    for layer in model.model.layers:
        layer.mlp.gate.forward = never_three(layer.mlp.gate)
    report = quantize_model(model, QuantConfig(format="mxint3", method="qera-exact", rank=4),
                            calibration=batches(), progress=False)
    starved = [l for l in report.layers if ".experts.3." in l.name]
    assert len(starved) == 4 and all(l.tokens == 0 and "weight error" in (l.note or "") for l in starved)
    assert all(torch.isfinite(m.A).all() and torch.isfinite(m.B).all()
               for m in model.modules() if isinstance(m, QERALinear))
    fed = [l for l in report.layers if ".experts.0." in l.name]
    assert all(l.tokens > 0 and l.note is None for l in fed)


def test_moe_streamed_from_fused_shards(tmp_path):
    model = build("mixtral").eval()
    model.save_pretrained(tmp_path / "src")
    cfg = QuantConfig(format="mxint3", method="qera-exact", rank=4, pipeline="sequential")
    quantize_and_save(tmp_path / "src", cfg, tmp_path / "q", calibration=batches(), progress=False)
    ref = copy.deepcopy(model)
    quantize_model(ref, QuantConfig(format="mxint3", method="qera-exact", rank=4), calibration=batches(), progress=False)
    back, _ = load_quantized(tmp_path / "q")
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref(ids).logits)


def test_gpt2_conv1d_is_targeted_with_its_transposed_weight():
    model = build("gpt2").eval()
    names = find_targets(model)
    assert "transformer.h.0.attn.c_attn" in names and "lm_head" not in names
    c_attn = model.transformer.h[0].attn.c_attn
    x = torch.randn(3, 64)
    ref = c_attn(x)
    quantize_model(model, QuantConfig(format="int8:group=64", method="w-only", rank=0), progress=False)
    q = model.transformer.h[0].attn.c_attn
    assert isinstance(q, QERALinear) and (q.out_features, q.in_features) == (192, 64)
    torch.testing.assert_close(q(x), ref, rtol=0.05, atol=0.05)
