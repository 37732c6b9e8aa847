"""The CUDA path: the same numbers on the GPU as on the CPU. Skipped when no GPU is present."""

import pytest
import torch

from qera import ActivationStats, QuantConfig, SolverOptions, quantize_model, quantize_weight, weighted_lowrank
from qera.linalg import lowrank_objective, optimal_objective

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
