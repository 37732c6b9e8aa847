"""Block-wise refinement in the sequential driver: it lowers the block error it trains on and the
model's output error on text it never saw, what it trains stays exactly representable (the saved
checkpoint computes the same logits), and it guards, resumes and refuses as documented."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qera import QeraError, QuantConfig, load_quantized, quantize_and_save, quantize_model
from qera.core.formats import parse_format
from qera.core.formats import trainable
from qera.io.data import calibration_batches
from qera.quantize.refine import split_batches
from tiny import TEXT, byte_tokenizer, tiny_llama

HERE = Path(__file__).resolve().parent
CFG = QuantConfig(format="int3:group=32", method="qera-exact", rank=4, pipeline="sequential",
                  propagate="quantized", refine_steps=40, refine_lr=3e-3, refine_train="lowrank")


@pytest.fixture(scope="module")
def cal():
    """16 windows of 48 tokens in batches of 2: 7 training batches and 1 held out per block."""
    return calibration_batches(byte_tokenizer(), TEXT, n_samples=16, seq_len=48, seed=0, batch_size=2)


def _held_out_ids() -> torch.Tensor:
    tok = byte_tokenizer()
    text = "".join(reversed(TEXT))  # text the calibration never saw
    return torch.tensor([tok(text[i * 64:(i + 1) * 64])["input_ids"][:40] for i in range(4)])


def _logit_error(model, ref_logits: torch.Tensor, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(ids).logits - ref_logits).pow(2).mean())


def _refined_against_closed(cal, cfg: QuantConfig):
    """``(report, closed-form logit error, refined logit error)`` of a 3-block tiny model refined with
    ``cfg``, the errors against the fp model's logits on text the calibration never saw."""
    ids = _held_out_ids()
    fp = tiny_llama(layers=3)
    with torch.no_grad():
        ref = fp(ids).logits
    closed, refined = tiny_llama(layers=3), tiny_llama(layers=3)
    quantize_model(closed, dataclasses.replace(cfg, refine_steps=0), calibration=cal, progress=False)
    rep = quantize_model(refined, cfg, calibration=cal, progress=False)
    return rep, _logit_error(closed, ref, ids), _logit_error(refined, ref, ids)


@pytest.mark.parametrize("train", ["lowrank", "lowrank,scales", "lowrank,rounding"])
def test_refinement_lowers_block_and_model_error(cal, train):
    rep, closed_err, refined_err = _refined_against_closed(cal, dataclasses.replace(CFG, refine_train=train))
    assert [r["block"] for r in rep.refinement] == [0, 1, 2]
    for r in rep.refinement:  # each block's held-out error went down and the refined layers were kept
        assert r["kept"] and r["loss_after"] < r["loss_before"]
        assert r["train_batches"] == 7 and r["heldout_batches"] == 1 and r["steps"] == 40
    s = rep.summary()
    assert s["refined_blocks"] == 3 and s["refine_error_after"] < s["refine_error_before"]
    assert s["refine_seconds"] > 0 and "refine" in s["timings"]
    # the whole model's logits on unseen text are closer to the fp model's than the closed form's
    assert refined_err < 0.8 * closed_err


def test_token_loss_counts_each_tokens_relative_error_alike():
    """A row 100x larger than another (an attention sink) dominates the energy loss, not the token loss."""
    from qera.quantize.refine import _loss_terms

    u = torch.tensor([[0.6, 0.8]])
    target = torch.cat([100 * u, u])  # ‖y‖² = 10^4 and 1
    out = torch.cat([100 * u, 0.5 * u])  # exact on the big row, half off on the small one: ‖e‖² = 0, 0.25
    num, den = _loss_terms(out, target, None, "energy")
    assert float(num / den) == pytest.approx(0.25 / 10001)
    num, den = _loss_terms(out, target, None, "token")
    assert float(num / den) == pytest.approx(0.125)  # (0 + 0.25) / 2
    num, den = _loss_terms(out, target, torch.tensor([0.0, 1.0]), "token")  # masked rows do not count
    assert float(num / den) == pytest.approx(0.25)
    from qera.core.config import REFINE_LOSSES
    from qera.quantize.refine import LOSSES

    assert set(LOSSES) == set(REFINE_LOSSES)  # the config accepts exactly the losses the refinement has


def test_channel_loss_caps_a_massive_channel():
    """A channel 100x larger than the others (a massive activation) owns the energy loss; the channel
    loss weighs it as the median channel, so an error in the small channels shows."""
    from qera.quantize.refine import BlockData, _loss_terms, channel_energy, clipped_channel_weights

    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 16, 8, generator=g)
    target[..., 0] *= 100.0  # channel 0 holds ~99.9% of the energy
    out = target.clone()
    out[..., 1:] *= 0.5  # exact on the massive channel, half off on every other
    energy = channel_energy(BlockData([None], lambda b: None, lambda b: target, [None]), [0])
    assert torch.allclose(energy, target.double().pow(2).sum((0, 1)))
    w = clipped_channel_weights(energy)
    typical = energy.median()
    assert float(w[0]) == pytest.approx(float(typical / energy[0]), rel=1e-6)  # capped to the median channel
    assert torch.equal(w[1:], torch.clamp(typical / energy[1:], max=1).float())  # the others: at most 1
    assert int((w[1:] == 1).sum()) >= 3  # the lower half keeps weight 1
    e_num, e_den = _loss_terms(out, target, None, "energy")
    c_num, c_den = _loss_terms(out, target, None, "channel", w)
    assert float(e_num / e_den) < 0.001  # the massive channel hides the error
    assert float(c_num / c_den) > 0.1  # the capped loss sees it
    # masked rows count neither in the energy nor in the loss
    mask = torch.zeros(2, 16)
    mask[0] = 1
    masked = channel_energy(BlockData([None], lambda b: None, lambda b: target, [mask]), [0])
    assert torch.allclose(masked, target[0].double().pow(2).sum(0))
    assert torch.equal(clipped_channel_weights(torch.zeros(4, dtype=torch.float64)), torch.ones(4))


def test_channel_loss_refinement_lowers_its_heldout_error_and_the_logit_error(cal):
    cfg = dataclasses.replace(CFG, refine_loss="channel", refine_train="lowrank,rounding")
    rep, closed_err, refined_err = _refined_against_closed(cal, cfg)
    assert all(r["kept"] and r["loss_after"] < r["loss_before"] for r in rep.refinement)
    assert refined_err < 0.8 * closed_err


def test_token_loss_refinement_lowers_its_heldout_error_and_the_logit_error(cal):
    cfg = dataclasses.replace(CFG, refine_loss="token", refine_train="lowrank,rounding")
    rep, closed_err, refined_err = _refined_against_closed(cal, cfg)
    assert all(r["kept"] and r["loss_after"] < r["loss_before"] for r in rep.refinement)
    assert refined_err < 0.8 * closed_err


def test_refined_checkpoint_reproduces_the_refined_model(cal, tmp_path):
    """What is trained is stored exactly: reloaded logits equal the in-memory refined model's bit for
    bit; scale training moves only the fp16 scales (codes equal the closed form's), A/B stay fp16."""
    cfg = dataclasses.replace(CFG, refine_train="lowrank,scales")
    src = tiny_llama(layers=3)
    rep = quantize_and_save(src, cfg, tmp_path / "q", tokenizer=byte_tokenizer(), calibration=cal, progress=False)
    quantize_and_save(tiny_llama(layers=3), dataclasses.replace(cfg, refine_steps=0), tmp_path / "c",
                      tokenizer=byte_tokenizer(), calibration=cal, progress=False)
    assert all(r["kept"] for r in rep.refinement)
    mem = tiny_llama(layers=3)
    quantize_model(mem, cfg, calibration=cal, progress=False)
    back, _ = load_quantized(tmp_path / "q")
    ids = _held_out_ids()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, mem(ids).logits)
    q, c = load_file(str(tmp_path / "q" / "model.safetensors")), load_file(str(tmp_path / "c" / "model.safetensors"))
    codes = [k for k in q if k.endswith("qweight_codes")]
    scales = [k for k in q if k.endswith("qweight_scales")]
    assert len(codes) == 21 and all(torch.equal(q[k], c[k]) for k in codes)
    assert all(q[k].dtype == torch.float16 for k in scales)
    assert sum(not torch.equal(q[k], c[k]) for k in scales) == len(scales)
    assert all(q[k].dtype == torch.float16 and not torch.equal(q[k], c[k]) for k in q if k.endswith((".A", ".B")))
    saved = json.loads((tmp_path / "q" / "qera_config.json").read_text())
    assert '"refine_steps": 40' in json.dumps(saved) and '"refine_train": "lowrank,scales"' in json.dumps(saved)


def test_a_refinement_that_does_not_help_is_not_kept(cal):
    """A learning rate that wrecks the block: the held-out check keeps the closed-form layers, so the
    model equals the unrefined one bit for bit."""
    ids = _held_out_ids()
    closed, bad = tiny_llama(layers=3), tiny_llama(layers=3)
    quantize_model(closed, dataclasses.replace(CFG, refine_steps=0), calibration=cal, progress=False)
    rep = quantize_model(bad, dataclasses.replace(CFG, refine_lr=0.9, refine_steps=5), calibration=cal, progress=False)
    assert not any(r["kept"] for r in rep.refinement)
    with torch.no_grad():
        assert torch.equal(closed(ids).logits, bad(ids).logits)


def test_scale_training_keeps_codes_and_roundtrips_the_format():
    fmt = parse_format("int3:group=32:asym")
    w = torch.randn(8, 64)
    qw = fmt.quantize(w)
    codes, params = trainable.split(qw)
    assert trainable.float_params(fmt) == ["mins", "scales"]
    assert torch.equal(trainable.weight_of(fmt, codes, params, qw.shape), qw.dequantize(torch.float32))
    moved = trainable.with_params(qw, {"scales": params["scales"].float() * 1.5})
    assert torch.equal(moved.tensors["codes"], qw.tensors["codes"]) and moved.tensors["scales"].dtype == torch.float16
    assert trainable.float_params(parse_format("mxint3")) == []


@pytest.mark.parametrize("spec", ["mxint3", "q4_0"])
def test_rounding_offsets_move_codes_by_at_most_one_level(cal, tmp_path, spec):
    """mxint3 (no float scales to train) and GGUF q4_0: the rounding offsets move some codes of the
    closed form's W̃, none by more than one level, the group parameters stay, the held-out block
    error drops, and the checkpoint stores the moved codes exactly (reloaded logits equal the refined
    model's bit for bit)."""
    cfg = dataclasses.replace(CFG, format=spec, refine_train="rounding")
    rep = quantize_and_save(tiny_llama(layers=3), cfg, tmp_path / "q", tokenizer=byte_tokenizer(), calibration=cal,
                            progress=False)
    quantize_and_save(tiny_llama(layers=3), dataclasses.replace(cfg, refine_steps=0), tmp_path / "c",
                      tokenizer=byte_tokenizer(), calibration=cal, progress=False)
    assert all(r["kept"] and r["loss_after"] < r["loss_before"] for r in rep.refinement)
    q, _ = load_quantized(tmp_path / "q")
    c, _ = load_quantized(tmp_path / "c")
    moved = total = 0
    fmt = parse_format(spec)
    for (name, mq), (_, mc) in zip(((n, m) for n, m in q.named_modules() if hasattr(m, "packed_weight")),
                                   ((n, m) for n, m in c.named_modules() if hasattr(m, "packed_weight"))):
        wq, wc = mq.packed_weight.dequantize(torch.float32), mc.packed_weight.dequantize(torch.float32)
        _, params = trainable.split(mc.packed_weight)
        assert all(torch.equal(v, mc.packed_weight.tensors[k]) for k, v in mq.packed_weight.tensors.items()
                   if k != "codes")
        step = fmt.grid_step(params).expand(-1, -1, 32).reshape(wc.shape)
        assert bool(((wq - wc).abs() <= step * (1 + 1e-6)).all()), name
        moved += int((wq != wc).sum())
        total += wc.numel()
        if ".layers.0." in name:  # only the rounding was trained (later blocks' inputs moved with block 0)
            assert torch.equal(mq.A, mc.A) and torch.equal(mq.B, mc.B)
    assert 0 < moved < total // 4
    mem = tiny_llama(layers=3)
    quantize_model(mem, cfg, calibration=cal, progress=False)
    ids = _held_out_ids()
    with torch.no_grad():
        assert torch.equal(q(ids).logits, mem(ids).logits)


def test_rounding_anchor_gives_back_the_closed_form():
    """With zero offsets the anchor's codes are the closed form's, for nearest and for GPTQ rounding
    (codes farther than half a level from the weight); offsets of ±½ move a code by at most one level."""
    from qera import round_gptq
    from conftest import correlated_inputs

    w64 = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    x = correlated_inputs(400, 64, seed=0)
    R64 = x.double().T @ x.double() / x.shape[0]
    w256 = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    x256 = correlated_inputs(600, 256, seed=1)
    R256 = x256.double().T @ x256.double() / x256.shape[0]
    for spec in ("int3:group=32", "int2:group=32:asym", "mxint3", "q4_0", "q4_1", "q3_k", "q4_k"):
        fmt = parse_format(spec)
        w, R = (w256, R256) if spec.endswith("_k") else (w64, R64)
        for qw in (fmt.quantize(w), round_gptq(w, fmt, R)):
            codes, params = trainable.split(qw)
            anchor = trainable.rounding_anchor(fmt, codes, params, w)
            assert torch.equal(fmt.codes(anchor, params), codes), spec
            step = fmt.grid_step(params)
            for v in (0.5, -0.5):
                far = fmt.values(fmt.codes(anchor + v * step, params), params)
                assert bool(((far - fmt.values(codes, params)).abs() <= step * (1 + 1e-6)).all()), spec
    assert trainable.can_round(parse_format("mxint3")) and not trainable.can_round(parse_format("nf4"))


def test_split_batches_holds_out_one_in_eight():
    assert split_batches(16) == (list(range(14)), [14, 15])
    assert split_batches(4) == ([0, 1, 2], [3])
    assert split_batches(3) == ([0, 1, 2], [0, 1, 2])


def test_auto_refine_train_follows_the_format():
    def auto(**kw):
        return QuantConfig(**{**dict(pipeline="sequential", refine_steps=5, method="qera-exact", rank=4), **kw}).refine_train

    assert auto(format="mxint3") == auto(format="int2:group=64:asym") == "lowrank,rounding"
    assert auto(format="nf4") == "lowrank"
    assert auto(format="q3_k", format_fallback="q4_0") == auto(format="q4_0") == "lowrank,rounding"
    assert auto(format="q3_k", format_fallback="nf4") == "lowrank"
    assert auto(format="int3:group=32", method="w-only", rank=0) == "rounding"
    assert auto(format="nf4", method="w-only", rank=0) == "scales"
    assert auto(format="mxint3", refine_steps=0) == "lowrank,rounding"  # resolved even when unused: the config is explicit


@pytest.mark.parametrize("kw,match", [
    (dict(pipeline="oneshot", refine_steps=5), "sequential pipeline"),
    (dict(pipeline="sequential", refine_steps=5, format="mxint3", refine_train="scales"), "no float group parameters"),
    (dict(pipeline="sequential", refine_steps=5, method="w-only", rank=0, refine_train="lowrank"), "no low-rank term"),
    (dict(pipeline="sequential", refine_steps=-1), "non-negative"),
    (dict(pipeline="sequential", refine_steps=5, refine_train="codes"), "lowrank, scales"),
    (dict(pipeline="sequential", refine_steps=5, refine_lr=2.0), r"\(0, 1\)"),
    (dict(pipeline="sequential", refine_steps=5, act_format="mxint8"), "act_format"),
    (dict(pipeline="sequential", refine_steps=5, format="nf4", refine_train="rounding"), "evenly spaced levels"),
    (dict(pipeline="sequential", refine_steps=5, refine_loss="mse"), "refine_loss must be one of energy, token"),
])
def test_refine_options_are_checked(kw, match):
    base = dict(format="int4:group=32", method="qera-exact", rank=4)
    with pytest.raises(QeraError, match=match):
        QuantConfig(**{**base, **kw})


def test_auto_pipeline_refines_block_by_block(cal):
    rep = quantize_model(tiny_llama(layers=2), dataclasses.replace(CFG, pipeline="auto", propagate="fp", refine_steps=3),
                         calibration=cal, progress=False)
    assert rep.pipeline == "sequential" and len(rep.refinement) == 2
    w_only = QuantConfig(format="int3:group=32", method="w-only", rank=0, pipeline="sequential", refine_steps=20,
                         refine_train="scales", refine_lr=1e-3)
    rep = quantize_model(tiny_llama(layers=2), w_only, calibration=cal, progress=False)
    assert len(rep.refinement) == 2 and all(r["loss_after"] is not None for r in rep.refinement)


KILL = """
import os, signal, sys
from qera.io import checkpoint as ck
at = int(sys.argv[1])
orig = ck.CheckpointWriter.add_block
def add_block(self, i, *a, **k):
    if i == at:
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(self, i, *a, **k)
ck.CheckpointWriter.add_block = add_block
from qera.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_killed_refined_run_resumes_bit_for_bit(tmp_path):
    """A run killed after block 1 was refined and written resumes after it: the same checkpoint and the
    same refinement record as an uninterrupted run."""
    from test_sequential import save_source

    src = save_source(tmp_path / "src")
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    args = ["quantize", str(src), "--format", "int3:group=32", "--method", "qera-exact", "--rank", "4",
            "--pipeline", "sequential", "--propagate", "quantized", "--refine", "6", "--refine-lr", "3e-3",
            "--refine-train", "lowrank,scales", "--calib-text", str(text), "--calib-samples", "8",
            "--calib-seq-len", "32", "--calib-batch-size", "2", "--no-progress", "--report-spectrum", "0"]
    script = tmp_path / "kill.py"
    script.write_text(KILL)
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    proc = subprocess.run([sys.executable, str(script), "2", *args, "--out", str(tmp_path / "q")], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    state = json.loads((tmp_path / ".q.partial" / "state.json").read_text())
    assert sorted(state["blocks"], key=int) == ["0", "1"] and "refinement" in state["blocks"]["1"]
    from qera.cli import main

    assert main([*args, "--out", str(tmp_path / "q"), "--resume", "--report", str(tmp_path / "q.json")]) == 0
    assert main([*args, "--out", str(tmp_path / "ref"), "--report", str(tmp_path / "ref.json")]) == 0
    a, b = (tmp_path / "q" / "model.safetensors").read_bytes(), (tmp_path / "ref" / "model.safetensors").read_bytes()
    assert a == b
    ra, rb = (json.loads((tmp_path / f"{n}.json").read_text())["refinement"] for n in ("q", "ref"))
    assert ra == rb and len(ra) == 4


def test_heldout_windows_never_touch_calibration_tokens():
    from qera.io.data import heldout_windows, window_starts

    tokens = torch.arange(5000)
    val = heldout_windows(tokens, 6, 64, calib_samples=20, calib_len=128, seed=3)
    seen = {int(t) for s in window_starts(5000, 20, 128, 3) for t in tokens[s:s + 128]}
    assert val.shape == (6, 64) and not seen & set(val.flatten().tolist())
    assert len(set(val.flatten().tolist())) == 6 * 64  # non-overlapping
    with pytest.raises(QeraError, match="outside the calibration windows"):
        heldout_windows(tokens, 500, 64, calib_samples=20, calib_len=128, seed=3)
