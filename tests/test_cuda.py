"""The CUDA path: the same numbers on the GPU as on the CPU. Skipped when no GPU is present."""

import pytest
import torch

from qera import (
    ActivationStats,
    QuantConfig,
    SolverOptions,
    quantize_model,
    quantize_weight,
    weighted_lowrank,
)
from qera.core.linalg import lowrank_objective, optimal_objective

from conftest import correlated_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_statistics_accumulate_on_device():
    x = correlated_inputs(3000, 128, seed=4)
    cpu, gpu = ActivationStats(128, {"abs", "sq", "xtx"}), ActivationStats(128, {"abs", "sq", "xtx"})
    cpu.update(x)
    gpu.update(x.cuda())
    assert all(v.is_cuda and v.dtype == torch.float64 for v in gpu.sums.values())
    for k in cpu.sums:
        torch.testing.assert_close(gpu.sums[k].cpu(), cpu.sums[k], rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_statistics_on_device_equal_dropping_the_rows(dtype, monkeypatch):
    import qera.core.statistics as S

    monkeypatch.setattr(S, "XTX_BLOCK_ELEMS", 256 * 512)  # Σxᵀx formed in two blocks of 256 rows
    x = correlated_inputs(4 * 512, 512, seed=5).view(4, 512, 512).to(dtype)
    mask = torch.rand(4, 512, generator=torch.Generator().manual_seed(1)) > 0.25
    cpu, gpu = ActivationStats(512, {"abs", "sq", "xtx"}), ActivationStats(512, {"abs", "sq", "xtx"}, pending=True)
    cpu.update(x[mask].float())
    gpu.update(x.cuda(), mask.cuda())  # padded rows zeroed on the device, counted at finish()
    assert gpu.finish().count == cpu.count == int(mask.sum())
    for k in cpu.sums:
        torch.testing.assert_close(gpu.sums[k].cpu(), cpu.sums[k], rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("exact", [False, True])
def test_solver_on_gpu_reaches_optimum(exact):
    n = 1024
    x = correlated_inputs(2 * n, n, seed=1)
    R = (x.double().T @ x.double() / x.shape[0]).cuda()
    W = torch.randn(n, n, generator=torch.Generator().manual_seed(0)) * 0.03
    D = (W - quantize_weight(W, "mxint3").dequantize()).cuda()
    A, B = weighted_lowrank(D, 32, autocorr=R, opts=SolverOptions(exact=exact))
    assert A.is_cuda and B.is_cuda
    opt = optimal_objective(D.cpu(), 32, R.cpu())
    gap = (lowrank_objective(D.cpu(), A.cpu(), B.cpu(), R.cpu()) - opt) / opt
    assert -1e-9 <= gap < (1e-9 if exact else 1e-4)


def test_quantized_model_runs_on_gpu():
    from tiny import tiny_llama

    model = tiny_llama().cuda()
    batches = [{"input_ids": torch.randint(0, 256, (2, 32))}]
    quantize_model(model, QuantConfig(format="mxint4", method="qera-exact", rank=4), calibration=batches, progress=False)
    ids = torch.randint(0, 256, (1, 16)).cuda()
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_tensor_core_statistics_lose_nothing():
    """bf16 activations on the GPU take the tensor-core path (float32 accumulation); with 1000x outlier
    and nearly collinear channels the qera-exact objective matches float64 sums to 1e-6 relative."""
    from qera import reconstruct
    from qera.core.linalg import lowrank_objective

    g = torch.Generator().manual_seed(0)
    n, d = 12000, 192
    x = correlated_inputs(n, d, seed=5)
    x[:, :3] *= 1000.0
    x[:, 10:20] = x[:, 20:30] + 1e-3 * torch.randn(n, 10, generator=g)
    xb = x.to(torch.bfloat16).cuda()
    W = torch.randn(96, d, generator=g) * 0.05
    mixed, exact = ActivationStats(d, {"xtx"}, precision="mixed"), ActivationStats(d, {"xtx"}, precision="float64")
    mixed.update(xb)
    exact.update(xb)
    R64 = exact.autocorrelation().cpu()
    qw = quantize_weight(W, "mxint3")
    D = W - qw.dequantize(torch.float32)
    objs = []
    for st in (mixed, exact):
        A, B = reconstruct(W, qw, "qera-exact", rank=8, stats=st, exact=True)
        objs.append(lowrank_objective(D, A.cpu(), B.cpu(), R64))
    assert abs(objs[0] - objs[1]) / objs[1] <= 1e-6


def test_sequential_on_gpu_with_prefetch_equals_cpu():
    """The sequential driver on the GPU (next block prefetched on a side stream, weights home on the
    CPU) gives the CPU run's codes and a low-rank term within float32 rounding."""
    from tiny import tiny_llama

    from qera import QERALinear

    batches = [{"input_ids": torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(i))}
               for i in range(3)]
    cfg = QuantConfig(format="int4:group=32", method="qera-exact", rank=4, pipeline="sequential")
    cpu, gpu = tiny_llama(), tiny_llama()
    gpu.load_state_dict(cpu.state_dict())
    lin_bytes = sum(m.weight.numel() * 4 for n, m in gpu.named_modules() if isinstance(m, torch.nn.Linear))
    rep_c = quantize_model(cpu, cfg, calibration=batches, progress=False)
    before = torch.cuda.memory_allocated()
    rep_g = quantize_model(gpu, cfg, calibration=batches, progress=False, device="cuda")
    import gc

    gc.collect()
    assert torch.cuda.memory_allocated() - before < lin_bytes / 4  # no fp layer was left behind on the GPU
    assert set(rep_g.timings) >= {"capture", "record", "solve", "onload", "offload"}
    qc = {n: m for n, m in cpu.named_modules() if isinstance(m, QERALinear)}
    qg = {n: m for n, m in gpu.named_modules() if isinstance(m, QERALinear)}
    assert len(qc) == len(qg) == len(rep_c.layers) == len(rep_g.layers)
    assert all(next(m.parameters()).device.type == "cpu" for m in qg.values())  # blocks went home
    for a, b in zip(rep_c.layers, rep_g.layers, strict=True):  # reports settled once per block, as floats
        assert isinstance(b.weight_error_after, float) and isinstance(b.seconds, float) and b.seconds > 0
        assert abs(a.weight_error_after - b.weight_error_after) <= 1e-2 * a.weight_error_after
    for name, m in qc.items():
        ratio = (qg[name].B.float() @ qg[name].A.float() - m.B.float() @ m.A.float()).norm() / \
            (m.B.float() @ m.A.float()).norm()
        assert ratio < 1e-2, (name, float(ratio))


def test_failed_gpu_run_puts_the_cpu_layers_back(monkeypatch):
    """A run that fails in block 1 on the GPU leaves the model as it was: fp layers, on the CPU, same values."""
    from tiny import tiny_llama

    from qera.quantize import layer

    model = tiny_llama()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    real = layer.LayerQuantizer.__call__

    def failing(self, name, *a, **k):
        if ".1.mlp" in name:
            raise RuntimeError("simulated failure")
        return real(self, name, *a, **k)

    monkeypatch.setattr(layer.LayerQuantizer, "__call__", failing)
    batches = [{"input_ids": torch.randint(0, 256, (2, 32))}]
    with pytest.raises(RuntimeError, match="simulated"):
        quantize_model(model, QuantConfig(format="mxint4", method="qera-exact", rank=4, pipeline="sequential"),
                       calibration=batches, progress=False, device="cuda")
    state = model.state_dict()
    assert set(state) == set(ref)
    assert all(v.device.type == "cpu" and torch.equal(v, ref[k]) for k, v in state.items())


def test_gpu_statistics_defer_checks_and_fold_pending_sums():
    """On the GPU, bf16 rows go to a float32 pending Σxᵀx folded into float64 by the readers, and the
    NaN/Inf check waits for finish() (no host synchronization per batch)."""
    from qera import QeraError

    x = correlated_inputs(5000, 64, seed=2).to(torch.bfloat16)
    st = ActivationStats(64, {"xtx", "sq"}, name="L", pending=True)
    for part in x.cuda().split(1000):
        st.update(part)
    assert st._pending is not None and st._pending_rows == 5000
    ref = x.double()
    torch.testing.assert_close(st.autocorrelation().cpu(), ref.T @ ref / 5000, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(st.mean_sq().cpu(), (ref * ref).mean(0), rtol=1e-6, atol=1e-6)
    bad = x[:10].cuda().clone()
    bad[3, 7] = float("nan")
    st2 = ActivationStats(64, {"xtx"}, name="L")
    st2.update(bad)
    with pytest.raises(QeraError, match="NaN/Inf.*layer L"):
        st2.finish()


@pytest.mark.parametrize("fmt", ["int4:group=128", "int4:group=64:asym", "mxint4"])
def test_fused_int4_kernel_on_gpu_matches_dequantizing(fmt):
    """PyTorch's CUDA int4 GEMM (tile layout of the GPU, bf16) computes the layer qera decodes."""
    from qera import QERALinear
    from qera.core.methods import Reconstruction

    g = torch.Generator().manual_seed(0)
    W = torch.randn(256, 512, generator=g) * 0.05
    qw = quantize_weight(W, fmt)
    A, B = torch.randn(8, 512, generator=g) * 0.1, torch.randn(256, 8, generator=g) * 0.1
    rec = Reconstruction(A, B, qw.dequantize(torch.float32), qw)
    layer = QERALinear.from_linear(torch.nn.Linear(512, 256).cuda(), rec, torch.bfloat16, cache_weight=False)
    x = torch.randn(2, 7, 512, generator=g).to(torch.bfloat16).cuda()
    ref = (x.double() @ (qw.dequantize(torch.float32).double() + B.double() @ A.double()).cuda().T
           + layer.bias.double())
    dense = layer(x).double()
    assert layer.use_kernel(torch.bfloat16) is None
    fused = layer(x).double()
    rel = lambda a: float((a - ref).norm() / ref.norm())  # noqa: E731
    assert rel(fused) < max(1.25 * rel(dense), 1e-2)


def test_float32_accumulation_inside_the_gemm_adds_in_place_or_declines():
    from qera.core.statistics import _addmm_fp32_

    a = torch.randn(300, 64, generator=torch.Generator().manual_seed(0)).to("cuda", torch.bfloat16)
    acc = torch.randn(64, 64, generator=torch.Generator().manual_seed(1)).cuda()
    before = acc.clone()
    added = _addmm_fp32_(acc, a, a)  # False: this torch wants `self` in bf16 for out_dtype (nothing done)
    expect = before + a.float().T @ a.float() if added else before
    torch.testing.assert_close(acc, expect, rtol=1e-5, atol=1e-4)
    print(f"addmm(out_dtype=float32) into a float32 accumulator: {'used' if added else 'not supported'}")
    # the Gram's blocks are strided views (rows j:j+b, columns j:): only the view changes
    b = torch.randn(300, 192, generator=torch.Generator().manual_seed(2)).to("cuda", torch.bfloat16)
    big = torch.zeros(192, 192, device="cuda")
    view = big[64:128, 64:]
    want = torch.zeros_like(big)
    if _addmm_fp32_(view, b[:, 64:128], b[:, 64:]):
        want[64:128, 64:] = b[:, 64:128].float().T @ b[:, 64:].float()
    torch.testing.assert_close(big, want, rtol=1e-5, atol=1e-4)


def test_activations_in_pinned_host_memory_round_trip():
    """Block inputs kept in host memory go there by non-blocking copies into pinned buffers: read,
    computed on and written back in place over several blocks, they stay exact."""
    from qera.calibrate.capture import ActivationCache

    cache = ActivationCache(3, "cpu", torch.device("cuda"))
    xs = [torch.randn(2, 64, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    for i, x in enumerate(xs):
        cache.put(i, x)
    for _ in range(3):  # the driver's pattern: each block's outputs replace its inputs
        for i in range(3):
            y = cache.get(i) * 2
            cache.put(i, y)
            del y
    for i, x in enumerate(xs):
        assert cache._items[i].is_pinned()
        torch.testing.assert_close(cache.get(i), x * 8, rtol=0, atol=0)
    cache.close()
    # a reader on the CPU (model on the GPU, compute device the CPU): that copy blocks, the values are there
    host = ActivationCache(1, "cpu", torch.device("cpu"))
    y = torch.randn(8, 512, 512, device="cuda")
    host.put(0, y)
    torch.testing.assert_close(host.get(0), y.cpu(), rtol=0, atol=0)


def test_recording_batches_never_synchronizes_the_host():
    """The record loop's promise, checked by CUDA itself: hooked bf16 layers with padded batches, the
    tensor-core pending sums, the deferred checks and counts — no host synchronization until finish()."""
    from torch import nn

    from qera import record_statistics

    torch.manual_seed(0)
    mods = {"a": nn.Linear(256, 64).cuda().to(torch.bfloat16), "b": nn.Linear(256, 32).cuda().to(torch.bfloat16)}
    xs = [torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    masks = [torch.ones(4, 64, dtype=torch.bool, device="cuda") for _ in xs]
    masks[1][2, 40:] = False
    masks[3][:, 50:] = False
    with record_statistics(mods, {"xtx", "abs", "sq"}, precision="mixed", pending=True) as rec, torch.no_grad():
        rec.mask = masks[0]
        for m in mods.values():
            m(xs[0])  # first batch: accumulators allocated, fused-GEMM support found out
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for x, mask in zip(xs[1:], masks[1:]):
                rec.mask = mask
                for m in mods.values():
                    m(x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        stats = rec.stats
    rows = torch.cat([x[m] for x, m in zip(xs, masks)]).double()
    for name in mods:
        st = stats[name]
        assert st.count == rows.shape[0]
        torch.testing.assert_close(st.autocorrelation().cpu(), (rows.T @ rows / rows.shape[0]).cpu(), rtol=1e-6, atol=1e-6)
