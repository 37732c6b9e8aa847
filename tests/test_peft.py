import copy

import pytest
import torch

pytest.importorskip("peft")

from qera import QERALinear, QeraError, QuantConfig, quantize_model  # noqa: E402
from qera.io.data import calibration_batches  # noqa: E402
from qera.finetune.qpeft import QPEFTConfig, load_qpeft, prepare_qpeft_model, read_qpeft_config, save_qpeft  # noqa: E402
from tiny import TEXT, byte_tokenizer, tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def batches(tok):
    return calibration_batches(tok, TEXT, n_samples=8, seq_len=48, seed=0, batch_size=4)


@pytest.mark.parametrize("init", ["qlora", "loftq", "qera-approx", "qera-exact", "qera-iter"])
def test_step0_equals_quantized_model_with_reconstruction(batches, init):
    """alpha/r = 12/5 is not a power of two: the B / scaling bookkeeping must be right (qera-iter and
    LoftQ also replace W̃: the packed base is the iterate's)."""
    base = tiny_llama()
    cfg = QPEFTConfig(format="mxint3", init=init, rank=5, alpha=12.0,
                      init_options={"iters": 2} if init in ("loftq", "qera-iter") else {})
    pm, _ = prepare_qpeft_model(copy.deepcopy(base), cfg, calibration=batches, progress=False)
    ref = copy.deepcopy(base)
    method = "w-only" if init == "qlora" else init
    quantize_model(ref, QuantConfig(format="mxint3", method=method, rank=0 if method == "w-only" else 5,
                                    method_options=cfg.init_options, lowrank_dtype="float32"),
                   calibration=batches, progress=False)
    ids = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_refined_init_is_the_refined_ptq_model(tok):
    """``refine_steps``: the adapters start from the refined reconstruction (rounding offsets moved
    W̃ too), so step 0 computes what the refined PTQ model computes, which is closer to the fp
    model than the closed-form init on text the calibration never saw."""
    cal = calibration_batches(tok, TEXT, n_samples=16, seq_len=48, seed=0, batch_size=2)
    base = tiny_llama(layers=3)
    cfg = QPEFTConfig(format="int3:group=32", init="qera-exact", rank=4, alpha=12.0, refine_steps=30,
                      refine_lr=3e-3, refine_train="lowrank,rounding")
    pm, report = prepare_qpeft_model(copy.deepcopy(base), cfg, calibration=cal, progress=False)
    assert len(report.refinement) == 3 and all(r["kept"] for r in report.refinement)
    ref = copy.deepcopy(base)
    quantize_model(ref, cfg.quant_config(), calibration=cal, progress=False)
    closed, _ = prepare_qpeft_model(copy.deepcopy(base), QPEFTConfig(format="int3:group=32", init="qera-exact", rank=4,
                                                                     alpha=12.0), calibration=cal, progress=False)
    ids = torch.tensor([tok("".join(reversed(TEXT))[i * 64:(i + 1) * 64])["input_ids"][:40] for i in range(4)])
    with torch.no_grad():
        got, want, fp, cf = pm(ids).logits, ref(ids).logits, base(ids).logits, closed(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert float((got - fp).pow(2).mean()) < float((cf - fp).pow(2).mean())
    layers = [m for m in pm.get_base_model().modules() if isinstance(m, QERALinear)]
    assert len(layers) == 21 and all(m.A.numel() == 0 for m in layers)  # the base holds W̃ alone
    with pytest.raises(QeraError, match="calibration batches"):
        prepare_qpeft_model(copy.deepcopy(base), cfg, progress=False)


def test_init_reduces_output_error_vs_qlora(batches):
    base = tiny_llama()
    ids = torch.cat([b["input_ids"] for b in batches])
    with torch.no_grad():
        want = base(ids).logits
    err = {}
    for init in ("qlora", "qera-approx", "qera-exact", "qera-iter"):
        pm, _ = prepare_qpeft_model(copy.deepcopy(base), QPEFTConfig(format="mxint3", init=init, rank=8), calibration=batches, progress=False)
        with torch.no_grad():
            err[init] = float(((pm(ids).logits - want) ** 2).mean())
    assert err["qera-exact"] < err["qlora"] and err["qera-approx"] < err["qlora"] and err["qera-iter"] < err["qlora"]


def test_only_adapters_train_and_base_stays_packed(batches):
    pm, _ = prepare_qpeft_model(tiny_llama(), QPEFTConfig(init="qera-approx", rank=4), calibration=batches, progress=False)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    bases = [m for m in pm.modules() if isinstance(m, QERALinear)]
    assert len(bases) == 14
    for m in bases:
        assert m.rank == 0 and not m.cache_weight
        assert all(getattr(m, "qweight_" + k).dtype in (torch.uint8, torch.float16) for k in m._qkeys)
    ids = torch.randint(0, 256, (2, 16))
    pm(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in pm.named_parameters() if p.requires_grad)
    assert all(m._w_cache is None for m in bases)  # nothing dense kept between forwards


def test_save_load_round_trip(tmp_path, tok, batches):
    cfg = QPEFTConfig(init="qera-exact", rank=4, alpha=7.0)
    pm, _ = prepare_qpeft_model(tiny_llama(), cfg, calibration=batches, progress=False)
    with torch.no_grad():  # pretend some training happened
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    save_qpeft(pm, tok, tmp_path / "q", config=cfg)
    assert read_qpeft_config(tmp_path / "q") == cfg and not hasattr(pm, "qpeft_config")
    back, tok2 = load_qpeft(tmp_path / "q", is_trainable=True)
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, back(ids).logits, rtol=0, atol=0)
    assert any(p.requires_grad for p in back.parameters())
    with pytest.raises(QeraError, match="already exists"):
        save_qpeft(pm, tok, tmp_path / "q")


def test_tiny_training_run_decreases_loss(batches):
    pm, _ = prepare_qpeft_model(tiny_llama(), QPEFTConfig(format="mxint3", init="qera-approx", rank=4), calibration=batches, progress=False)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ids = batches[0]["input_ids"]
    losses = []
    for _ in range(15):
        loss = pm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0]


def test_bad_input(batches):
    with pytest.raises(QeraError, match="unknown init"):
        QPEFTConfig(init="pissa")
    with pytest.raises(QeraError, match=r"rank must be an integer in 1\.\.64 .*got 100"):
        prepare_qpeft_model(tiny_llama(), QPEFTConfig(init="qera-approx", rank=100), calibration=batches, progress=False)
    with pytest.raises(QeraError, match="needs calibration"):
        prepare_qpeft_model(tiny_llama(), QPEFTConfig(init="qera-exact", rank=4), progress=False)
    with pytest.raises(QeraError):
        QPEFTConfig(rank=0)
