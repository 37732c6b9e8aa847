"""W4A8: the quantized GEMM's input is fake-quantized per block; the low-rank branch is not."""

import torch

from qera import QERALinear, QuantConfig, load_quantized, parse_format, quantize_model, save_quantized
from qera.nn.activations import fake_quantize_activations


def test_fake_quantization_is_the_formats_rounding_per_row():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 70, generator=g)
    x[0, 0, 3] = 40.0  # an outlier sets its own block's scale only
    f = parse_format("mxint8")
    xq = fake_quantize_activations(x, f)
    assert xq.shape == x.shape and xq.dtype == x.dtype
    assert torch.equal(xq, f.fake_quantize(x.reshape(-1, 70)).reshape(x.shape))
    assert torch.equal(fake_quantize_activations(xq, f), xq)  # values on the grid stay
    rel = (xq - x).norm() / x.norm()
    assert 0 < rel < 5e-2
    y = x.clone().requires_grad_()
    fake_quantize_activations(y, f).sum().backward()
    assert torch.equal(y.grad, torch.ones_like(x))  # straight through


def test_w4a8_layer_forward_and_checkpoint(tmp_path):
    """y = q_a(x) W̃ᵀ + (x Aᵀ) Bᵀ + b, and the act format survives save/load."""
    from tiny import byte_tokenizer, tiny_llama

    model = tiny_llama()
    batches = [{"input_ids": torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))}]
    rep = quantize_model(model, QuantConfig(format="mxint4", method="qera-exact", rank=4, act_format="mxint8"),
                         calibration=batches, progress=False)
    assert rep.config.act_format == "mxint8"
    layers = [m for m in model.modules() if isinstance(m, QERALinear)]
    assert layers and all(str(m.act_format) == "mxint8" for m in layers)
    m = layers[0]
    x = torch.randn(4, m.in_features, generator=torch.Generator().manual_seed(2))
    W = m.dequantized_weight(torch.float32)
    want = fake_quantize_activations(x, parse_format("mxint8")) @ W.T + (x @ m.A.float().T) @ m.B.float().T
    if m.bias is not None:
        want = want + m.bias
    with torch.no_grad():
        torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)
    ids = torch.randint(0, 256, (1, 24))
    with torch.no_grad():
        ref = model(ids).logits
    save_quantized(model, byte_tokenizer(), tmp_path / "q", report=rep)
    back, _ = load_quantized(tmp_path / "q")
    assert all(str(m.act_format) == "mxint8" for m in back.modules() if isinstance(m, QERALinear))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref)
