"""The fused int4 kernel of packed inference: the same weights as qera's own decoding, run on the CPU."""

import pytest
import torch

from qera import QERALinear, QeraError, prepare_inference, quantize_model, QuantConfig, quantize_weight
from qera.nn.kernels import int4_operands, unsupported
from qera.core.methods import Reconstruction

FORMATS = ["int4:group=32", "int4", "int4:group=64:asym", "mxint4", "int4:group=256"]


def _weight(out_f=48, in_f=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * 0.05
    W[:, 3] *= 20  # an outlier column: large scales next to small ones
    return W


@pytest.mark.parametrize("fmt", FORMATS)
def test_operands_are_the_formats_own_values(fmt):
    qw = quantize_weight(_weight(), fmt)
    ops = int4_operands(qw)
    assert ops.q.dtype == torch.uint8 and int(ops.q.max()) < 16
    exact = "asym" not in fmt  # int4 symmetric and mxint4 map exactly; asym rounds min + 8·s once
    torch.testing.assert_close(ops.dense(), qw.dequantize(torch.float32), rtol=0 if exact else 1e-6,
                               atol=0 if exact else 1e-7)


def _layer(fmt, rank=4, bias=True, seed=0):
    W = _weight(seed=seed)
    qw = quantize_weight(W, fmt)
    g = torch.Generator().manual_seed(seed + 1)
    A, B = torch.randn(rank, W.shape[1], generator=g) * 0.1, torch.randn(W.shape[0], rank, generator=g) * 0.1
    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=bias)
    rec = Reconstruction(A, B, qw.dequantize(torch.float32), qw)
    return QERALinear.from_linear(lin, rec, torch.float32, cache_weight=False)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_layer_equals_dequantizing_layer(fmt):
    layer = _layer(fmt)
    x = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(2))
    ref = layer(x)
    bits_before = layer.storage_bits()["weight"]
    assert "bfloat16" in layer.use_kernel(torch.float32)  # exact on the CPU but slow: refused by default
    assert layer.use_kernel(torch.float32, slow_ok=True) is None
    assert not any(k.startswith("qweight_") for k, _ in layer.named_buffers())  # the kernel holds the codes
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    assert layer.storage_bits()["weight"] <= 1.5 * bits_before  # the codes once, not twice
    xb = x.to(torch.bfloat16)
    dense_b = _layer(fmt).to(torch.bfloat16)(xb).float()  # the bf16 model without the kernel
    layer_b = _layer(fmt)
    layer_b.use_kernel(torch.bfloat16)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(layer_b._kernel(xb).float(), layer._kernel(x)) < 1e-2  # the kernel alone: bf16 rounding
    assert rel(layer_b(xb).float(), ref) < 1.25 * rel(dense_b, ref)  # as accurate as bf16 dequantizing


def test_unsupported_formats_and_shapes_say_why():
    assert "no fused kernel" in unsupported(quantize_weight(_weight(), "mxint3"), torch.device("cpu"), torch.float32)
    assert "group" in unsupported(quantize_weight(_weight(), "int4:group=16"), torch.device("cpu"), torch.float32)
    assert "% 16" in unsupported(quantize_weight(_weight(out_f=40), "mxint4"), torch.device("cpu"), torch.bfloat16)
    with pytest.raises(QeraError, match="no fused kernel"):
        int4_operands(quantize_weight(_weight(), "nf4"))
    layer = _layer("mxint3")
    assert "no fused kernel" in layer.use_kernel(torch.float32, slow_ok=True)
    assert layer._kernel is None and layer.storage_bits()["weight"] > 0  # left as it was


def test_prepared_layer_is_inference_only():
    layer = _layer("mxint4")
    layer.use_kernel(torch.float32, slow_ok=True)
    with pytest.raises(QeraError, match="save it"):
        layer.state_dict()
    with pytest.raises(QeraError, match="move it to meta"):
        layer.to("meta")
    layer.float()  # same device: allowed
    with pytest.raises(QeraError, match="prepared for torch.float32"):
        layer(torch.randn(2, 256, dtype=torch.bfloat16))


def test_prepare_inference_on_a_model():
    from tiny import tiny_llama

    model = tiny_llama(hidden=64, inter=96)
    quantize_model(model, QuantConfig(format="mxint4", method="zeroquant-v2", rank=4), progress=False)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    used = prepare_inference(model, slow_ok=True)
    assert set(used.values()) == {"int4 kernel"} and len(used) == 14
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_prepared_layer_reads_as_having_no_dense_weight():
    layer = _layer("mxint4")
    layer.use_kernel(torch.bfloat16)
    assert getattr(layer, "weight", None) is None  # PEFT and HF utilities probe .weight this way
    with pytest.raises(QeraError, match="load the checkpoint again"):
        layer.use_kernel(torch.float32, slow_ok=True)
    assert layer.use_kernel(torch.bfloat16) is None  # already prepared for it


def test_releasing_a_prepared_layer_frees_its_kernel_copy():
    from qera.io.lazy import release

    layer = _layer("mxint4")
    layer.use_kernel(torch.bfloat16)
    assert layer._kernel is not None and layer._kernel.nbytes() > 0
    release(layer)
    assert all(t.device.type == "meta" for t in [*layer.parameters(), *layer.buffers()])
    assert layer._kernel.tiles.device.type == layer._kernel.scales_zeros.device.type == "meta"
    with pytest.raises(QeraError, match="save it"):  # still a prepared layer: its codes are gone
        layer.state_dict()
