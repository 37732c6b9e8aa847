import pytest
import torch

from qera import ActivationStats, QeraError, load_stats, save_stats
from qera.statistics import load_stats_extra

from conftest import correlated_inputs

ALL = {"abs", "sq", "xtx"}


def test_streaming_equals_one_shot():
    x = correlated_inputs(3000, 32, seed=5)
    one = ActivationStats(32, ALL)
    one.update(x)
    stream = ActivationStats(32, ALL)
    for part in x.split(257):
        stream.update(part.view(-1, 1, 32))
    assert stream.count == one.count == 3000
    for k in ("abs", "sq"):  # float32 chunk sums, float64 accumulation
        assert torch.allclose(stream.sums[k], one.sums[k], rtol=1e-5, atol=0)
    scale = one.sums["xtx"].diagonal().max()  # xtx: fp32 products per chunk
    assert torch.allclose(stream.sums["xtx"], one.sums["xtx"], rtol=0, atol=1e-6 * float(scale))
    x64 = x.double()
    ref = x64.T @ x64 / 3000
    assert torch.allclose(one.autocorrelation(), ref, rtol=1e-6, atol=1e-6 * float(ref.diagonal().max()))
    assert torch.allclose(one.mean_abs(), x64.abs().mean(0), rtol=1e-5)
    assert torch.allclose(one.mean_sq(), (x64**2).mean(0), rtol=1e-5)
    assert one.sums["xtx"].dtype == torch.float64


def test_masked_rows_excluded():
    x = correlated_inputs(40, 16, seed=1).view(4, 10, 16)
    mask = torch.ones(4, 10, dtype=torch.bool)
    mask[1, 6:] = False
    mask[3, :2] = False
    x_poisoned = x.clone()
    x_poisoned[~mask] = 1e6  # must not leak in
    a = ActivationStats(16, ALL)
    a.update(x_poisoned, mask)
    b = ActivationStats(16, ALL)
    b.update(x[mask])
    assert a.count == b.count == int(mask.sum())
    for k in ALL:
        assert torch.allclose(a.sums[k], b.sums[k])


def test_merge_and_save_load(tmp_path):
    x = correlated_inputs(500, 8, seed=3)
    a, b, ab = ActivationStats(8, ALL, "l0"), ActivationStats(8, ALL, "l0"), ActivationStats(8, ALL, "l0")
    a.update(x[:200]); b.update(x[200:]); ab.update(x)
    a.merge(b)
    for k in ALL:
        assert torch.allclose(a.sums[k], ab.sums[k])
    path = tmp_path / "s" / "stats.safetensors"
    save_stats({"l0": ab, "l1": ActivationStats(8, {"sq"})}, path, extra={"model": "tiny"})
    back = load_stats(path)
    assert set(back) == {"l0", "l1"}
    assert back["l0"].count == 500 and back["l0"].kinds == ALL
    for k in ALL:
        assert torch.equal(back["l0"].sums[k], ab.sums[k])
    assert load_stats_extra(path) == {"model": "tiny"}
    assert [p.name for p in path.parent.iterdir()] == ["stats.safetensors"]  # no temp files left


def test_only_requested_statistics_are_kept():
    s = ActivationStats(64, {"sq"})
    s.update(torch.randn(10, 64))
    assert set(s.sums) == {"sq"}
    with pytest.raises(QeraError, match="xtx"):
        s.autocorrelation()


def test_bad_inputs_named():
    s = ActivationStats(8, {"abs"}, name="model.layers.3.mlp.down_proj")
    with pytest.raises(QeraError, match="down_proj"):
        s.update(torch.randn(4, 9))
    x = torch.randn(4, 8)
    x[2, 1] = float("inf")
    with pytest.raises(QeraError, match="NaN/Inf.*down_proj"):
        s.update(x)
    with pytest.raises(QeraError, match="unknown statistic"):
        ActivationStats(8, {"max"})
    with pytest.raises(QeraError, match="not a qera statistics file|not found"):
        load_stats("/nonexistent/stats.safetensors")
