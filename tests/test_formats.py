import math

import pytest
import torch

from qera import FORMATS, QeraError, parse_format, quantize_weight
from qera.core.formats import pack_bits, unpack_bits
from qera.core.formats.mxint import EXP_BIAS
from qera.core.formats.normalfloat import nf_levels

SPECS = [
    "mxint2", "mxint3", "mxint4", "mxint8", "mxint3:block=16",
    "int2", "int3", "int4", "int8", "int4:group=32", "int4:group=32:asym", "int2:group=16:asym",
    "nf2", "nf3", "nf4", "nf4:block=32",
]


def weights(shape=(24, 96), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.03
    w.view(-1)[:: 37] *= 8  # some outliers
    return w.to(dtype)


@pytest.mark.parametrize("spec", SPECS)
def test_spec_round_trip(spec):
    fmt = parse_format(spec)
    assert parse_format(str(fmt)) == fmt
    assert str(parse_format(str(fmt))) == str(fmt)


@pytest.mark.parametrize("spec", SPECS)
def test_idempotent_and_exact_on_grid(spec):
    """q(dq(q(w))) == dq(q(w)): dequantized values are on the grid and re-quantize exactly."""
    w = weights()
    once = quantize_weight(w, spec).dequantize()
    twice = quantize_weight(once, spec).dequantize()
    assert torch.equal(once, twice)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", [(7,), (5, 33), (2, 3, 50)])
def test_any_shape_and_state_dict_round_trip(spec, shape):
    w = weights(shape)
    q = quantize_weight(w, spec)
    d = q.dequantize()
    assert d.shape == w.shape and d.dtype == w.dtype
    rebuilt = type(q).from_state_dict(q.state_dict(), q.metadata())
    assert torch.equal(rebuilt.dequantize(), d)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("spec", ["mxint4", "int4:group=32:asym", "nf4"])
def test_dtypes(spec, dtype):
    w = weights(dtype=dtype)
    d = quantize_weight(w, spec).dequantize()
    assert d.dtype == dtype
    err = (d.float() - w.float()).abs().max()
    assert err < w.float().abs().max() * 0.3


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("block", [16, 32])
def test_mxint_grid_and_error_bound(bits, block):
    w = weights((16, 128))
    q = quantize_weight(w, f"mxint{bits}:block={block}")
    d = q.dequantize()
    exps = q.tensors["exponents"].to(torch.int64) - EXP_BIAS  # (rows, blocks)
    scale = torch.pow(2.0, (exps - (bits - 2)).double()).repeat_interleave(block, dim=1)
    k = d.double() / scale
    assert torch.equal(k, k.round())  # on the grid
    assert k.abs().max() <= 2 ** (bits - 1) - 1
    err = (d.double() - w.double()).abs()
    assert (err <= scale + 1e-12).all()  # clamped top values: < one step
    inside = k.abs() < 2 ** (bits - 1) - 1
    assert (err[inside] <= scale[inside] / 2 + 1e-12).all()  # otherwise round to nearest


def test_mxint_matches_definition_on_hand_values():
    """One block, computed element by element from the definition in the issue."""
    vals = [0.3, -1.7, 0.05, 1.2, -0.61, 0.0, 0.9, -0.25]
    w = torch.tensor([vals])
    got = quantize_weight(w, "mxint4:block=8").dequantize()[0].tolist()
    E = math.floor(math.log2(max(abs(v) for v in vals)))
    step = 2.0 ** (E - 2)
    want = [math.copysign(min(round(abs(v) / step), 7) * step, v) for v in vals]
    assert got == pytest.approx(want, abs=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_grid(bits):
    w = weights((8, 64))
    q = quantize_weight(w, f"int{bits}:group=32")
    s = q.tensors["scales"].float().double().repeat_interleave(32, dim=1)
    k = q.dequantize().double() / s
    assert torch.allclose(k, k.round(), atol=1e-9)
    assert k.abs().max() <= 2 ** (bits - 1) - 1
    qmax = 2 ** (bits - 1) - 1
    assert ((q.dequantize() - w).abs().double() <= s * (0.5 + qmax * 2**-10) + 1e-9).all()


def test_int_asym_grid():
    w = weights((8, 64))
    q = quantize_weight(w, "int3:group=16:asym")
    s = q.tensors["scales"].float().double().repeat_interleave(16, dim=1)
    m = q.tensors["mins"].float().double().repeat_interleave(16, dim=1)
    k = (q.dequantize().double() - m) / s
    assert torch.allclose(k, k.round(), atol=1e-6)
    assert k.min() >= -1e-6 and k.max() <= 7 + 1e-6


def test_asym_is_lossless_on_its_own_grid():
    """Weights built as m + s*q with fp16 m, s (the GGML Q4_1 layout) quantize with zero error."""
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (6, 64), generator=g).float()
    q[:, ::32] = 0
    q[:, 1::32] = 15  # every group spans the full range
    s = (torch.rand(6, 2, generator=g) * 0.01 + 1e-3).half().float().repeat_interleave(32, 1)
    m = (-torch.rand(6, 2, generator=g) * 0.05).half().float().repeat_interleave(32, 1)
    w = m + s * q
    assert torch.equal(quantize_weight(w, "int4:group=32:asym").dequantize(), w)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_levels_and_grid(bits):
    lv = nf_levels(bits)
    assert lv.numel() == 2**bits and lv[0] == -1 and lv[-1] == 1 and (lv == 0).any()
    assert (lv[1:] > lv[:-1]).all()
    w = weights((4, 128))
    q = quantize_weight(w, f"nf{bits}")
    a = q.tensors["absmax"].float().repeat_interleave(64, dim=1)
    ratio = q.dequantize() / a
    assert torch.isin(ratio, lv).all() or torch.allclose(
        ratio, lv[(ratio.unsqueeze(-1) - lv).abs().argmin(-1)], atol=1e-6
    )
    half_gap = float((lv[1:] - lv[:-1]).max()) / 2
    assert ((q.dequantize() - w).abs() <= a * half_gap + 1e-6).all()


def test_nf4_matches_qlora_table():
    # Published NF4 levels (QLoRA, Dettmers et al. 2023), a fact used for comparison.
    published = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
                 0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]
    assert nf_levels(4).tolist() == pytest.approx(published, abs=2e-4)


@pytest.mark.parametrize("spec,bpw", [("mxint4", 4.25), ("mxint3", 3.25), ("mxint2:block=16", 2.5),
                                      ("int4", 4.125), ("int4:group=32:asym", 5.0), ("nf4", 4.25)])
def test_bits_per_weight_exact(spec, bpw):
    w = weights((16, 256))
    q = quantize_weight(w, spec)
    assert q.bits_per_weight == bpw
    assert q.storage_bytes * 8 / w.numel() == pytest.approx(bpw, abs=0)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 1001])
def test_packing_lossless_and_dense(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (n,), generator=g)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 8) * bits
    assert torch.equal(unpack_bits(packed, bits, n).long(), codes)


def test_unknown_family_lists_known_names():
    with pytest.raises(ValueError, match="mxint") as e:
        parse_format("fp4")
    assert "nf" in str(e.value) and "int" in str(e.value)


@pytest.mark.parametrize("spec", ["mxint1", "mxint9", "int1", "nf9", "mxint4:block=0", "int4:grp=3", "mxint4:block=x", "4bit", ""])
def test_bad_specs(spec):
    with pytest.raises(QeraError):
        parse_format(spec)


def test_nonfinite_weight_named():
    w = weights()
    w[3, 5] = float("nan")
    with pytest.raises(QeraError, match="layer model.layers.0.q_proj"):
        quantize_weight(w, "mxint4", name="model.layers.0.q_proj")


def test_registry_contract():
    for family in FORMATS:
        fmt = parse_format(f"{family}4")
        w = weights()
        q = fmt.quantize(w)
        assert q.dequantize().shape == w.shape
        assert fmt.bits_per_weight > 4
