"""The sequential driver: equal to one-shot, streamed from shards, resumable after a kill."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qera import (
    CalibrationStats,
    QERALinear,
    QeraError,
    QuantConfig,
    load_quantized,
    quantize_and_save,
    quantize_model,
    save_quantized,
)
from qera.io.checkpoint import read_qera_config
from qera.core.metrics import layer_output_error
from tiny import TEXT, byte_tokenizer, right_padded, tiny_llama

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("method", ["qera-exact", "lqer", "loftq", "w-only"])
def test_sequential_fp_equals_oneshot_bit_for_bit(batches, method):
    rank = 0 if method == "w-only" else 8
    opts = {"iters": 2} if method == "loftq" else {}
    a, b = tiny_llama(layers=3), tiny_llama(layers=3)
    ra = quantize_model(a, QuantConfig(format="mxint3", method=method, rank=rank, method_options=opts),
                        calibration=batches, report_output_error=True, progress=False)
    rb = quantize_model(b, QuantConfig(format="mxint3", method=method, rank=rank, method_options=opts,
                                       pipeline="sequential"),
                        calibration=batches, report_output_error=True, progress=False)
    assert rb.pipeline == "sequential" and [l.name for l in ra.layers] == [l.name for l in rb.layers]
    for la, lb in zip(ra.layers, rb.layers):
        assert la.output_error_after == lb.output_error_after and la.tokens == lb.tokens == 576
    ids = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_sequential_uses_given_statistics_of_the_fp_model(batches, tmp_path):
    """Given (one-shot) statistics drive the sequential pipeline with propagate="fp": nothing is
    recorded, no batch is needed, and the result equals the one-shot driver's on the same statistics
    bit for bit; propagate="quantized" refuses them with one line."""
    from qera import collect_statistics, find_targets

    cfg = QuantConfig(format="mxint3", method="qera-exact", rank=8, rounding="gptq")
    src = tiny_llama(layers=3)
    stats = collect_statistics(src, batches, list(find_targets(src)), ("xtx",), progress=False)
    stats.save(tmp_path / "stats.safetensors")
    a, b = tiny_llama(layers=3), tiny_llama(layers=3)
    ra = quantize_model(a, cfg, stats=stats, progress=False)
    given = CalibrationStats.load(tmp_path / "stats.safetensors", lazy=True)
    rb = quantize_model(b, dataclasses.replace(cfg, pipeline="sequential"), stats=given, progress=False)
    assert rb.pipeline == "sequential" and rb.calibration_tokens == stats.tokens == 576
    assert [l.output_error_after for l in ra.layers] == [l.output_error_after for l in rb.layers]
    ids = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    with pytest.raises(QeraError, match="propagate='quantized'"):
        quantize_model(tiny_llama(layers=3), dataclasses.replace(cfg, pipeline="sequential", propagate="quantized"),
                       calibration=batches, stats=given, progress=False)


def test_padding_is_excluded_in_sequential_too(tok):
    a, b = tiny_llama(), tiny_llama()
    pb = [right_padded(tok)[1]]
    ra = quantize_model(a, QuantConfig(format="mxint3", rank=4), calibration=pb, progress=False)
    rb = quantize_model(b, QuantConfig(format="mxint3", rank=4, pipeline="sequential"), calibration=pb, progress=False)
    n = int(pb[0]["attention_mask"].sum())
    assert all(l.tokens == n for l in ra.layers + rb.layers)
    assert [l.output_error_after for l in ra.layers] == [l.output_error_after for l in rb.layers]


def test_quantized_propagation_calibrates_on_quantized_inputs(batches):
    """Block 1's statistics are those of the inputs the quantized block 0 produces (checked by hand)."""
    cfg = QuantConfig(format="mxint3", method="qera-exact", rank=4, pipeline="sequential", propagate="quantized")
    model = tiny_llama()
    report = quantize_model(model, cfg, calibration=batches, report_output_error=True, progress=False)
    ids = torch.cat([b["input_ids"] for b in batches])
    ref = tiny_llama()
    with torch.no_grad():  # hidden state after the (already quantized) block 0 of `model`, by hand
        h = model.model.embed_tokens(ids)
        pos = torch.arange(ids.shape[1])[None]
        pe = model.model.rotary_emb(h, pos)
        h = model.model.layers[0](h, position_embeddings=pe, position_ids=pos)
        x = model.model.layers[1].input_layernorm(h).reshape(-1, 64).double()
    R = x.T @ x / x.shape[0]
    W = ref.model.layers[1].self_attn.q_proj.weight
    q = model.model.layers[1].self_attn.q_proj
    got = next(l for l in report.layers if l.name == "model.layers.1.self_attn.q_proj")
    want = layer_output_error(W, q.dequantized_weight(torch.float32), q.A.float(), q.B.float(), R)
    assert got.output_error_after == pytest.approx(want, rel=1e-4)
    fp = quantize_model(tiny_llama(), QuantConfig(format="mxint3", method="qera-exact", rank=4, pipeline="sequential"),
                        calibration=batches, report_output_error=True, progress=False)
    fp1 = next(l for l in fp.layers if l.name == "model.layers.1.self_attn.q_proj")
    assert fp1.output_error_after != pytest.approx(got.output_error_after, rel=1e-3)


def save_source(path, layers=4, dtype=torch.bfloat16, shard="60KB"):
    m = tiny_llama(layers=layers).to(dtype)
    m.save_pretrained(path, max_shard_size=shard)
    byte_tokenizer().save_pretrained(path)
    return path


def test_streamed_from_shards_equals_in_memory(tmp_path, batches):
    """A model in bf16 safetensors shards, quantized block by block from disk, gives the same files."""
    from transformers import AutoModelForCausalLM

    src = save_source(tmp_path / "src")
    assert (src / "model.safetensors.index.json").is_file()
    cfg = QuantConfig(format="int4:group=32", method="qera-exact", rank=4, pipeline="sequential")
    seen = []
    from qera.quantize import placer as streaming

    orig = streaming.StreamingPlacer.onload

    def onload(self, index, block, prefix):  # the previous block is gone; the next is prefetched after this
        orig(self, index, block, prefix)
        blocks = block_list
        live = [i for i, b in enumerate(blocks) if any(p.device.type != "meta" for p in b.parameters())]
        seen.append(live)

    from qera.io.lazy import load_model_lazy

    lazy, _, _ = load_model_lazy(src)
    block_list = lazy.model.layers
    assert all(p.device.type == "meta" for p in lazy.model.layers.parameters())
    streaming.StreamingPlacer.onload = onload
    try:
        import qera.io.lazy as st

        real = st.load_model_lazy
        st.load_model_lazy = lambda p: (lazy, *real(p)[1:])
        rep = quantize_and_save(src, cfg, tmp_path / "stream", calibration=batches, progress=False)
    finally:
        streaming.StreamingPlacer.onload = orig
        st.load_model_lazy = real
    assert seen == [[0], [1], [2], [3]]
    assert rep.pipeline == "sequential" and len(rep.layers) == 28
    mem = AutoModelForCausalLM.from_pretrained(src)
    r2 = quantize_model(mem, QuantConfig(format="int4:group=32", method="qera-exact", rank=4), calibration=batches,
                        progress=False)
    save_quantized(mem, byte_tokenizer(), tmp_path / "mem", report=r2)
    a, b = load_file(str(tmp_path / "stream" / "model.safetensors")), load_file(str(tmp_path / "mem" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    back, _ = load_quantized(tmp_path / "stream")
    assert back.model.norm.weight.dtype == torch.bfloat16  # stored dtypes come back
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, mem(ids).logits)


def test_prefetch_failure_surfaces_in_the_caller(tmp_path, batches, monkeypatch):
    """A shard read that fails in the prefetch thread raises in the run itself; no thread or output is left."""
    import threading

    from qera.io import lazy as streaming

    src = save_source(tmp_path / "src")
    real = streaming.WeightSource.get

    def get(self, key, device="cpu"):
        if ".layers.2." in key:
            raise QeraError(f"cannot read {key}: simulated I/O error")
        return real(self, key, device)

    monkeypatch.setattr(streaming.WeightSource, "get", get)
    cfg = QuantConfig(format="int4:group=32", method="qera-exact", rank=4, pipeline="sequential")
    with pytest.raises(QeraError, match="layers.2.*simulated I/O error"):
        quantize_and_save(src, cfg, tmp_path / "q", calibration=batches, progress=False)
    assert not any(t.name.startswith("qera-prefetch") and t.is_alive() for t in threading.enumerate())
    assert not (tmp_path / "q").exists()


KILL = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from qera.io import checkpoint as ck
    where, at = sys.argv[1], int(sys.argv[2])
    if where == "between":
        orig = ck.CheckpointWriter.add_block
        def add_block(self, i, *a, **k):
            if i == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return orig(self, i, *a, **k)
        ck.CheckpointWriter.add_block = add_block
    else:
        from qera.io.checkpoint import writer as ckw
        orig = ckw._save_safetensors
        def save(tensors, path):
            if path.name == f"block-{{at:05d}}.safetensors":
                from safetensors.torch import save_file
                save_file(dict(tensors), str(path.with_name("." + path.name + ".tmp")))
                os.kill(os.getpid(), signal.SIGKILL)
            return orig(tensors, path)
        ckw._save_safetensors = save
    from qera.cli import main
    sys.exit(main(sys.argv[3:]))
""")


@pytest.mark.parametrize("where,at", [("between", 2), ("mid-write", 1)])
def test_killed_run_resumes_bit_for_bit(tmp_path, where, at):
    src = save_source(tmp_path / "src")
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    args = ["quantize", str(src), "--format", "mxint3", "--method", "qera-exact", "--rank", "4", "--pipeline",
            "sequential", "--propagate", "quantized", "--calib-text", str(text), "--calib-samples", "6",
            "--calib-seq-len", "32", "--calib-batch-size", "2", "--no-progress"]
    script = tmp_path / "kill.py"
    script.write_text(KILL.format(tests=str(HERE)))
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    proc = subprocess.run([sys.executable, str(script), where, str(at), *args, "--out", str(tmp_path / "q")], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (tmp_path / "q").exists()
    state = json.loads((tmp_path / ".q.partial" / "state.json").read_text())
    assert sorted(state["blocks"], key=int) == [str(i) for i in range(at)]
    from qera.cli import main

    assert main([*args, "--out", str(tmp_path / "q")]) == 2  # refuses to clobber the partial run silently
    assert main([*args, "--out", str(tmp_path / "q"), "--resume"]) == 0
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    assert not (tmp_path / ".q.partial").exists()
    a, b = (tmp_path / "q" / "model.safetensors").read_bytes(), (tmp_path / "ref" / "model.safetensors").read_bytes()
    assert a == b
    assert (tmp_path / "q" / "qera_config.json").read_text() == (tmp_path / "ref" / "qera_config.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_resume_refuses_another_configuration(tmp_path, batches):
    src = save_source(tmp_path / "src", layers=2)
    cfg = QuantConfig(format="mxint3", method="qera-exact", rank=4, pipeline="sequential")
    from qera.io import checkpoint as ck

    orig = ck.CheckpointWriter.add_block

    def boom(self, i, *a, **k):
        if i == 1:
            raise KeyboardInterrupt
        return orig(self, i, *a, **k)

    ck.CheckpointWriter.add_block = boom
    try:
        with pytest.raises(KeyboardInterrupt):
            quantize_and_save(src, cfg, tmp_path / "q", calibration=batches, progress=False)
    finally:
        ck.CheckpointWriter.add_block = orig
    other = QuantConfig(format="mxint4", method="qera-exact", rank=4, pipeline="sequential")
    with pytest.raises(QeraError, match="another model, configuration"):
        quantize_and_save(src, other, tmp_path / "q", calibration=batches, resume=True, progress=False)
    quantize_and_save(src, cfg, tmp_path / "q", calibration=batches, resume=True, progress=False)
    assert read_qera_config(tmp_path / "q")["quant_config"]["format"] == "mxint3"


def test_auto_chooses_sequential_over_budget_and_offloads_activations(tmp_path, batches, caplog):
    a, b = tiny_llama(), tiny_llama()
    quantize_model(a, QuantConfig(format="mxint3", rank=4), calibration=batches, progress=False)
    with caplog.at_level("INFO", logger="qera.plan"):
        rb = quantize_model(b, QuantConfig(format="mxint3", rank=4, pipeline="auto"), calibration=batches,
                            progress=False, max_memory=1000, offload_dir=tmp_path / "off")
    assert rb.pipeline == "sequential" and "over the memory budget" in caplog.text
    assert any("kept on disk" in n for n in rb.notes)
    assert list((tmp_path / "off").iterdir()) == []  # the cached activations are removed
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    rc = quantize_model(tiny_llama(), QuantConfig(format="mxint3", rank=4, pipeline="auto"), calibration=batches,
                        progress=False, max_memory="1GiB")
    assert rc.pipeline == "oneshot"


@pytest.mark.parametrize("pipeline", ["oneshot", "sequential"])
def test_failed_run_leaves_the_model_unquantized(batches, pipeline):
    """Block 0 is replaced before block 1 fails: every replaced layer is put back."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(QeraError, match=r"layer model\.layers\.1\.mlp\.(up|down)_proj"):
        quantize_model(model, QuantConfig(format="mxint3", method="zeroquant-v2", rank=4, pipeline=pipeline),
                       calibration=batches, progress=False)
    assert not any(isinstance(m, QERALinear) for m in model.modules())
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[n], p) or (torch.isnan(before[n]).any() and torch.equal(before[n].isnan(), p.isnan()))
               for n, p in after.items())


def test_cli_sequential_streams_and_says_its_plan(tmp_path, capsys):
    from qera.cli import main

    src = save_source(tmp_path / "src", layers=2)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    code = main(["quantize", str(src), "--format", "mxint3", "--rank", "4", "--pipeline", "auto", "--calib-text", str(text),
                 "--calib-samples", "4", "--calib-seq-len", "32", "--out", str(tmp_path / "q"), "--no-progress", "--json",
                 "--report", str(tmp_path / "report.json")])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "pipeline sequential" in out.err and "block inputs: 1 batches, 128 tokens" in out.err
    assert json.loads(out.out)["pipeline"] == "sequential"
    report = json.loads((tmp_path / "report.json").read_text())
    assert {l["block"] for l in report["layers"]} == {0, 1} and all(l["tokens"] == 128 for l in report["layers"])
    assert main(["info", str(tmp_path / "q"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["pipeline"] == "sequential" and info["ranks"] == [4]


def test_cli_sequential_uses_a_statistics_file(tmp_path, capsys):
    """``qera quantize --pipeline sequential --stats S`` on a model streamed from its shards solves from
    S (no calibration text is read) and writes what the one-shot pipeline writes from S; with
    ``--propagate quantized`` S is refused in one line."""
    from qera.cli import main

    src = save_source(tmp_path / "src", layers=2)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    stats = tmp_path / "s.safetensors"
    assert main(["calibrate", str(src), "--calib-text", str(text), "--calib-samples", "4", "--calib-seq-len", "32",
                 "--kinds", "xtx", "--out", str(stats), "--no-progress"]) == 0
    common = ["--format", "mxint3", "--rank", "4", "--stats", str(stats), "--no-progress",
              "--calib-text", str(tmp_path / "missing.txt")]  # read it and the run would fail
    assert main(["quantize", str(src), *common, "--pipeline", "sequential", "--out", str(tmp_path / "seq")]) == 0
    assert main(["quantize", str(src), *common, "--pipeline", "oneshot", "--out", str(tmp_path / "one")]) == 0
    a = load_file(str(tmp_path / "seq" / "model.safetensors"))
    b = load_file(str(tmp_path / "one" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main(["quantize", str(src), *common, "--pipeline", "sequential", "--propagate", "quantized",
                 "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "propagate='quantized'" in err[0] and not (tmp_path / "q").exists()


def test_load_with_a_device_map(tmp_path):
    model = tiny_llama()
    quantize_model(model, QuantConfig(format="mxint4", method="zeroquant-v2", rank=2), progress=False)
    save_quantized(model, byte_tokenizer(), tmp_path / "q")
    back, _ = load_quantized(tmp_path / "q", device_map={"model.layers": "cpu", "": "cpu"})
    assert all(p.device.type == "cpu" for p in back.parameters())
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    with pytest.raises(QeraError, match="places no entry"):
        load_quantized(tmp_path / "q", device_map={"model.layers": "cpu"})


def test_block_calls_move_to_the_compute_device():
    """Every tensor a block is called with (rotary cos/sin, positions, masks) follows the block to the
    compute device: checked with the meta device, which needs no GPU."""
    from qera.calibrate.forward import runner_for
    from qera.calibrate.capture import capture_calls, to_device
    from qera.nn.targets import find_blocks, find_targets

    model = tiny_llama()
    targets = dict(find_targets(model))
    _, blocks = find_blocks(model, list(targets))
    batch = {"input_ids": torch.randint(0, 256, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    _, calls = capture_calls(runner_for(model, targets), blocks, batch, torch.device("cpu"))
    moved = to_device(calls, "meta")
    tensors = []

    def collect(o):
        if torch.is_tensor(o):
            tensors.append(o)
        elif isinstance(o, (tuple, list)):
            for v in o:
                collect(v)
        elif isinstance(o, dict):
            for v in o.values():
                collect(v)

    for c in moved:
        collect(c.args)
        collect(c.kwargs)
    assert tensors and all(t.device.type == "meta" for t in tensors)


def test_sequential_writer_stores_the_requested_dtype(tmp_path, batches):
    """Block-by-block writing casts the non-quantized weights as save_quantized does: the same files."""
    m1 = tiny_llama()
    quantize_and_save(m1, QuantConfig(format="mxint4", method="qera-exact", rank=4, pipeline="sequential"),
                      tmp_path / "seq", calibration=batches, progress=False, dtype="float16")
    m2 = tiny_llama()
    rep = quantize_model(m2, QuantConfig(format="mxint4", method="qera-exact", rank=4), calibration=batches,
                         progress=False)
    save_quantized(m2, None, tmp_path / "one", report=rep, dtype=torch.float16)
    a, b = load_file(str(tmp_path / "seq" / "model.safetensors")), load_file(str(tmp_path / "one" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert a["model.norm.weight"].dtype == a["model.embed_tokens.weight"].dtype == torch.float16


def _as_if_on_gpu(monkeypatch):
    """Run the sequential driver's GPU code paths on the CPU: reports settled once per block,
    statistics checks deferred to the end of each block's recording."""
    import qera.quantize.walk as seq
    import qera.core.statistics as S

    monkeypatch.setattr(seq, "_on_gpu", lambda module: True)
    monkeypatch.setattr(S, "_device_path", lambda rows, precision: (True, False))
    settled = []
    real = seq.settle_reports
    monkeypatch.setattr(seq, "settle_reports", lambda pending: (settled.append(len(pending)), real(pending)))
    return settled


def test_reports_settled_once_per_block_equal_per_layer(batches, monkeypatch):
    a, b = tiny_llama(layers=3), tiny_llama(layers=3)
    cfg = QuantConfig(format="mxint3", method="qera-exact", rank=8, pipeline="sequential", report_spectrum=4)
    ra = quantize_model(a, cfg, calibration=batches, report_output_error=True, progress=False)
    settled = _as_if_on_gpu(monkeypatch)
    rb = quantize_model(b, cfg, calibration=batches, report_output_error=True, progress=False)
    assert settled == [7, 7, 7]  # one settlement per block, of its 7 layers
    for la, lb in zip(ra.layers, rb.layers, strict=True):
        for key in ("weight_error_before", "weight_error_after", "output_error_before", "output_error_after",
                    "dead_channels", "spectrum", "tokens"):
            assert getattr(la, key) == getattr(lb, key), key
        assert isinstance(lb.output_error_after, float) and isinstance(lb.dead_channels, int)
        assert 0 < lb.seconds < 60
    ids = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_a_nan_solve_found_at_settlement_leaves_the_model_unquantized(batches, monkeypatch):
    from qera.core.methods.basic import ZeroQuantV2

    real = ZeroQuantV2.solve_error

    def poisoned(self, D, rank, stats, name):
        A, B = real(self, D, rank, stats, name)
        if name == "model.layers.1.mlp.up_proj":
            A = A.clone()
            A[0, 0] = float("nan")
        return A, B

    monkeypatch.setattr(ZeroQuantV2, "solve_error", poisoned)
    _as_if_on_gpu(monkeypatch)
    model = tiny_llama()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(QeraError, match=r"zeroquant-v2 solve produced NaN/Inf.*layers\.1\.mlp\.up_proj"):
        quantize_model(model, QuantConfig(format="mxint3", method="zeroquant-v2", rank=4, pipeline="sequential"),
                       calibration=batches, progress=False)
    assert not any(isinstance(m, QERALinear) for m in model.modules())
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_non_persistent_buffers_survive_a_streamed_block():
    """A buffer the shards lack (a per-block rotary table, say) follows the block to its device and
    goes back to the host on release: read again, the block computes as before."""
    from torch import nn

    from qera.io.lazy import materialize, release

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4, bias=False)
            self.register_buffer("freq", torch.arange(4.0), persistent=False)

        def forward(self, x):
            return self.proj(x) * self.freq

    real = Block()
    weights = {"blk.proj.weight": real.proj.weight.detach().clone()}

    class Source:
        def get(self, key, device):
            return weights[key].to(device)

    with torch.device("meta"):
        block = Block()
    block.freq = torch.arange(4.0)  # what init_empty_weights leaves: parameters on meta, buffers real
    x = torch.randn(2, 4)
    for _ in range(2):  # stream in, use, release, stream in again
        materialize(block, "blk.", Source(), "cpu")
        torch.testing.assert_close(block(x), real(x))
        release(block)
        assert block.proj.weight.device.type == "meta" and block.freq.device.type == "cpu"
