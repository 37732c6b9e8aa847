import pytest
import torch

from qera import ActivationStats, QeraError, load_stats, save_stats
from qera.calibrate.store import load_stats_extra

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


def _objective_gap(x_bf16: torch.Tensor, W: torch.Tensor, rank: int = 16, pending: bool = False) -> float:
    """Relative gap in the qera-exact objective (evaluated with the float64 R) between the two precisions."""
    from qera import quantize_weight, reconstruct
    from qera.core.linalg import lowrank_objective

    d = x_bf16.shape[1]
    mixed = ActivationStats(d, {"xtx"}, precision="mixed", pending=pending)
    exact = ActivationStats(d, {"xtx"}, precision="float64")
    mixed.update(x_bf16)
    exact.update(x_bf16)
    R64 = exact.autocorrelation()
    qw = quantize_weight(W, "mxint3")
    D = W - qw.dequantize(torch.float32)
    objs = []
    for st in (mixed, exact):
        A, B = reconstruct(W, qw, "qera-exact", rank=rank, stats=st, exact=True)
        objs.append(lowrank_objective(D, A, B, R64))
    return abs(objs[0] - objs[1]) / objs[1]


def test_mixed_precision_statistics_lose_nothing_on_adversarial_inputs():
    """bf16 inputs with 1000x outlier channels and nearly collinear channels: the float32-chunk sums
    give the same qera-exact objective as float64 sums to 1e-6 (the CUDA tensor-core path computes the
    same exact products with float32 accumulation)."""
    g = torch.Generator().manual_seed(0)
    n, d = 12000, 192
    x = correlated_inputs(n, d, seed=5)
    x[:, :3] *= 1000.0  # outlier channels
    x[:, 10:20] = x[:, 20:30] + 1e-3 * torch.randn(n, 10, generator=g)  # nearly collinear pairs
    W = torch.randn(96, d, generator=g) * 0.05
    assert _objective_gap(x.to(torch.bfloat16), W) <= 1e-6
    with pytest.raises(QeraError, match="precision"):
        ActivationStats(8, {"xtx"}, precision="float16")


# -- the GPU path (deferred checks, float32 pending sums), run on the CPU through its seam -------------
@pytest.fixture
def gpu_path(monkeypatch):
    """Make every batch take the GPU path: checks deferred, bf16/fp16 rows summed in float32 pending."""
    import qera.core.statistics as S

    monkeypatch.setattr(S, "_device_path", lambda rows, precision: (
        True, precision == "mixed" and rows.dtype in (torch.bfloat16, torch.float16)))
    return S


def test_pending_float32_sums_fold_every_flush_rows(gpu_path, monkeypatch):
    monkeypatch.setattr(gpu_path, "FLUSH_ROWS", 1000)
    x = correlated_inputs(5300, 48, seed=3).to(torch.bfloat16)
    st, ref = ActivationStats(48, ALL, pending=True), x.double()
    seen = []
    for part in x.split(700):  # calls that straddle the folds
        st.update(part)
        seen.append(st._pending_rows)
        assert st._pending_rows < 1000  # a float32 run never reaches FLUSH_ROWS rows unfolded
    assert seen[:3] == [700, 400, 100] and st.count == 5300
    assert st._pending is not None  # 300 rows still pending: readers fold them
    torch.testing.assert_close(st.sums["xtx"] + st._pending.double(), ref.T @ ref, rtol=1e-6, atol=1e-3)
    R = st.autocorrelation()
    assert st._pending is None and st._pending_rows == 0
    torch.testing.assert_close(R, ref.T @ ref / 5300, rtol=1e-6, atol=1e-6)
    direct = ActivationStats(48, ALL)  # one-shot recording: no pending buffer, float64 adds per chunk
    for part in x.split(700):
        direct.update(part)
        assert direct._pending is None
    torch.testing.assert_close(direct.autocorrelation(), R, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(st.mean_sq(), (ref * ref).mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(st.mean_abs(), ref.abs().mean(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_rows_on_the_gpu_path_are_zeroed_and_counted_without_a_sync(gpu_path, dtype):
    """On a GPU padded rows are zeroed, not dropped (boolean indexing would sync for its size); the
    kept-row count stays on the device until finish(). The sums equal dropping the rows, and NaN in
    a padded row does not leak in."""
    x = correlated_inputs(3 * 2 * 10, 16, seed=2).view(3, 2, 10, 16).to(dtype)
    masks = torch.rand(3, 2, 10, generator=torch.Generator().manual_seed(0)) > 0.3
    masks[1] = False  # a batch that is all padding
    dropped, zeroed = ActivationStats(16, ALL), ActivationStats(16, ALL, pending=True)
    for xb, mb in zip(x, masks):
        poisoned = xb.clone()
        poisoned[~mb] = float("nan")
        zeroed.update(poisoned, mb)
        dropped.update(xb[mb].float())
    assert zeroed._kept is not None  # not yet counted on the host
    assert zeroed.count == dropped.count == int(masks.sum())  # reading the count settles it
    assert zeroed._kept is None and zeroed._pending is None
    for k in ALL:
        torch.testing.assert_close(zeroed.sums[k], dropped.sums[k], rtol=1e-6, atol=1e-6)
    bad = ActivationStats(16, ALL, name="L")
    poisoned = x[0].clone()
    poisoned[masks[0]] = float("nan")  # NaN in a kept row is still found
    bad.update(poisoned, masks[0])
    with pytest.raises(QeraError, match="NaN/Inf.*layer L"):
        bad.finish()


def test_deferred_checks_fail_the_recording_not_the_batch(gpu_path):
    from tiny import tiny_llama

    from qera import find_targets, record_statistics

    st = ActivationStats(8, ALL, name="model.layers.1.mlp.down_proj")
    st.update(torch.randn(10, 8))
    bad = torch.randn(4, 8)
    bad[1, 3] = float("nan")
    st.update(bad)  # no host synchronization per batch: the check waits for finish()
    with pytest.raises(QeraError, match="NaN/Inf.*down_proj"):
        st.finish()
    for read in (st.finish, st.autocorrelation, st.validate):  # the failure sticks: the sums hold NaN
        with pytest.raises(QeraError, match="NaN/Inf.*down_proj"):
            read()
    huge = ActivationStats(8, {"xtx"}, name="L")
    huge.update(torch.full((4, 8), 1e30))
    with pytest.raises(QeraError, match="overflow.*layer L"):
        huge.autocorrelation()  # every reader settles the deferred check first
    with pytest.raises(QeraError, match="overflow.*layer L"):
        huge.autocorrelation()  # and a second read cannot see the finite but huge sums either
    model = tiny_llama()
    mods = find_targets(model)
    name = next(n for n in mods if n.endswith("layers.0.self_attn.o_proj"))
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[0, 0] = float("inf")
    with pytest.raises(QeraError, match="NaN/Inf.*o_proj"):
        with record_statistics({name: mods[name]}, {"xtx"}), torch.no_grad():
            model(torch.randint(0, 256, (2, 16)))
    assert not mods[name]._forward_pre_hooks  # hooks removed


def test_tensor_core_path_meets_the_objective_bound_over_a_whole_flush(gpu_path):
    """The float32 pending sum over FLUSH_ROWS rows keeps the qera-exact objective within 1e-6 of
    float64 sums on adversarial bf16 inputs (outlier and nearly collinear channels)."""
    g = torch.Generator().manual_seed(0)
    n, d = 2 * gpu_path.FLUSH_ROWS + 5000, 192
    x = correlated_inputs(n, d, seed=5)
    x[:, :3] *= 1000.0
    x[:, 10:20] = x[:, 20:30] + 1e-3 * torch.randn(n, 10, generator=g)
    W = torch.randn(96, d, generator=g) * 0.05
    for pending in (True, False):
        assert _objective_gap(x.to(torch.bfloat16), W, pending=pending) <= 1e-6


@pytest.mark.parametrize("path", ["float64", "mixed", "tensor-cores", "tensor-cores-pending"])
def test_gram_formed_above_the_diagonal_and_mirrored_is_the_full_product(path, monkeypatch):
    """Σxᵀx is formed only on and above its block diagonal (36/64 of the GEMM work at 8 blocks) and
    the rest copied from the mirror image: on every accumulation path, over calls and folds, the sums
    are exactly symmetric and equal the full product."""
    import qera.core.statistics as S

    d = 700  # blocks of 256, 256, 188
    assert S._gram_block(d) == 256 and S._gram_block(11008) == 1408 and S._gram_block(4096) == 512
    if path.startswith("tensor-cores"):
        monkeypatch.setattr(S, "_device_path", lambda rows, precision: (True, True))
        monkeypatch.setattr(S, "FLUSH_ROWS", 900)
    x = correlated_inputs(2100, d, seed=7)
    if path.startswith("tensor-cores"):
        x = x.to(torch.bfloat16)
    elif path == "float64":  # full float64 mantissas: a GEMM's diagonal blocks are not bitwise symmetric
        x = x.double() + 1e-3 * torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    st = ActivationStats(d, {"xtx"}, precision="float64" if path == "float64" else "mixed",
                         pending=path == "tensor-cores-pending")
    for part in x.split(500):  # several calls; the pending path folds mid-call
        st.update(part)
    ref = x.double().T @ x.double()
    got = st.finish().sums["xtx"]
    assert torch.equal(got, got.T)
    torch.testing.assert_close(got, ref, rtol=1e-6 if path != "float64" else 1e-12, atol=1e-6 * float(ref.diagonal().max()))
