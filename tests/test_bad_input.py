"""Bad input and faults: every case gets one clear line (CLI exit 2) or a QeraError, and loses nothing.

This module grows with each feature: add the bad inputs a new option can receive here.
"""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from qera import (
    ActivationStats,
    QERALinear,
    QeraError,
    QuantConfig,
    load_quantized,
    quantize_model,
    save_quantized,
)
from qera.io.checkpoint import read_qera_config
from qera.cli import main
from qera.io.data import calibration_batches
from tiny import TEXT, byte_tokenizer, tiny_llama


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(capsys, argv, needle):
    code, out, err = run(capsys, *argv, "--no-progress")
    lines = [l for l in err.strip().splitlines() if l.startswith("qera")]
    assert code == 2, (out, err)
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A good checkpoint; tests copy it before breaking it."""
    d = tmp_path_factory.mktemp("ck") / "q"
    model = tiny_llama()
    quantize_model(model, QuantConfig(format="mxint3", method="zeroquant-v2", rank=4), progress=False)
    save_quantized(model, byte_tokenizer(), d)
    return d


def broken(checkpoint, tmp_path, edit):
    d = tmp_path / "broken"
    shutil.copytree(checkpoint, d)
    edit(d)
    return d


# -- command-line arguments ---------------------------------------------------------------------
@pytest.mark.parametrize("argv,needle", [
    (["calibrate", "{model}", "--calib-batch-size", "0", "--calib-text", "{text}", "--out", "{tmp}/s"], "--calib-batch-size"),
    (["quantize", "{model}", "--calib-batch-size", "0", "--calib-text", "{text}", "--out", "{tmp}/q"], "--calib-batch-size"),
    (["calibrate", "{model}", "--include", "(", "--out", "{tmp}/s"], "invalid --include regex"),
    (["quantize", "{model}", "--exclude", "[", "--out", "{tmp}/q"], "invalid --exclude regex"),
    (["compare", "{model}", "--settings", "mxint4"], "FORMAT@RANK"),
    (["compare", "{model}", "--settings", "mxint4@x"], "FORMAT@RANK"),
    (["compare", "{model}", "--methods", ","], "--methods is empty"),
    (["compare", "{model}", "--settings", "mxint99@4"], "--settings: mxint: bits must be an integer in 2..8, got 99"),
    (["eval", "{model}", "--max-windows", "-1"], "--max-windows"),
    (["eval", "{model}", "--seq-len", "1"], "--seq-len"),
    (["quantize", "{model}", "--calib-samples", "0", "--out", "{tmp}/q"], "--calib-samples"),
    (["quantize", "{model}", "--max-memory", "lots", "--out", "{tmp}/q"], "is not a size"),
    (["quantize", "{model}", "--format", "int4:group=32:asym=maybe", "--out", "{tmp}/q"], "asym"),
    (["quantize", "{model}", "--format", "int4:group", "--out", "{tmp}/q"], "needs a value"),
    (["quantize", "{model}", "--propagate", "quantized", "--out", "{tmp}/q"], "sequential"),
    (["quantize", "{model}", "--out", "{file}/q"], "is a file"),
    (["calibrate", "{model}", "--out", "{file}/s.safetensors"], "is a file"),
    (["quantize", "{model}", "--out", "/proc/qera-test/q"], "cannot"),
    (["quantize", "{model}", "--device", "cuda", "--pipeline", "sequential", "--out", "{tmp}/q"], "cuda"),
    (["eval", "{model}", "--max-memory", "1MB"], "over the memory budget of 976.6 KiB"),
    (["compare", "{model}", "--max-memory", "1MB"], "model weights"),
])
def test_arguments(tmp_path, capsys, model_dir, text_file, argv, needle):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    f = tmp_path / "a_file"
    f.write_text("x")
    argv = [a.format(model=model_dir, tmp=tmp_path, text=text_file, file=f) for a in argv]
    one_line_error(capsys, argv, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing half-written


@pytest.mark.parametrize("command", ["quantize", "calibrate"])
@pytest.mark.parametrize("below", [False, True])
def test_offload_dir_that_is_a_file(tmp_path, capsys, monkeypatch, model_dir, text_file, command, below):
    """Refused up front, even when nothing would be offloaded (a tiny model never spills to disk)."""
    f = tmp_path / "a_file"
    f.write_text("x")
    monkeypatch.setattr("qera.io.models.load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    argv = [command, model_dir, "--offload-dir", f / "sub" if below else f, "--calib-text", text_file,
            "--calib-samples", "2", "--calib-seq-len", "16", "--out", tmp_path / "o"]
    one_line_error(capsys, argv, f"--offload-dir: {f} is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"] and f.read_text() == "x"


@pytest.mark.parametrize("field,flag", [("act_format", "--act-format"), ("format", "--format")])
@pytest.mark.parametrize("spec,needle", [("mxint99", "mxint: bits must be an integer in 2..8, got 99"),
                                         ("bogus", "cannot parse format 'bogus'")])
def test_bad_format_names_its_field(tmp_path, capsys, model_dir, field, flag, spec, needle):
    """The format's own message names only its family; the config field (the CLI: the option) comes first."""
    with pytest.raises(QeraError) as exc:
        QuantConfig(**{field: spec})
    assert str(exc.value).startswith(f"{field}: {needle}")
    line = one_line_error(capsys, ["quantize", model_dir, flag, spec, "--out", tmp_path / "q"], f"{flag}: {needle}")
    assert line.startswith(f"qera quantize: error: {flag}: ")
    assert not (tmp_path / "q").exists()


# -- broken or foreign checkpoints ----------------------------------------------------------------
def _truncate(d):
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _edit_meta(fn):
    def edit(d):
        meta = json.loads((d / "qera_config.json").read_text())
        fn(meta)
        (d / "qera_config.json").write_text(json.dumps(meta))
    return edit


def _first(meta):
    return meta["layers"][sorted(meta["layers"])[0]]


def _edit_hf_config(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit,needle,json_only", [
    (_truncate, "truncated or corrupt", False),
    (lambda d: (d / "model.safetensors").write_bytes(b""), "empty", False),
    (lambda d: (d / "model.safetensors").unlink(), "holds neither model.safetensors", False),
    (_edit_meta(lambda m: _first(m).update(rank=5)), "rank 5) needs (5, 96)", False),
    (_edit_meta(lambda m: _first(m).update(in_features=32)), "needs", False),
    (_edit_meta(lambda m: _first(m).update(format="mxint4")), "qweight_codes", False),
    (_edit_meta(lambda m: _first(m).update(rank=1000)), "rank 1000", True),
    (_edit_meta(lambda m: _first(m).pop("rank")), "lacks ['rank']", True),
    (_edit_meta(lambda m: _first(m).update(weight_dtype="float99")), "unknown weight_dtype", True),
    (_edit_meta(lambda m: m.update(quant_config={"format": "mxint3", "bogus": 1})), "bogus", True),
    (_edit_meta(lambda m: m.update(quant_config={"format": "mxint3", "act_format": "mxint99"})),
     "bad quant_config: act_format: mxint: bits must be an integer in 2..8, got 99", True),
    (_edit_meta(lambda m: m.pop("layers")), "qera_config.json lacks the required key(s) ['layers']", True),
    (_edit_meta(lambda m: m.pop("bits")), "qera_config.json lacks the required key(s) ['bits']", True),
    (_edit_meta(lambda m: m["bits"].pop("bits_total")), "qera_config.json: 'bits' must be an object", True),
    (_edit_meta(lambda m: m.update(tied={"lm_head.weight": "nowhere"})), "points to nowhere", False),
    (_edit_hf_config, "config.json", False),
    (lambda d: (d / "qera_config.json").write_text("{not json"), "qera_config.json is not valid JSON", True),
    (lambda d: (d / "qera_config.json").unlink(), "qera_config.json", False),
])
def test_broken_checkpoints(tmp_path, capsys, checkpoint, edit, needle, json_only):
    """Checked before anything is built: one line naming the file, tensor or field."""
    d = broken(checkpoint, tmp_path, edit)
    one_line_error(capsys, ["eval", d, "--max-windows", "1", "--seq-len", "16"], needle)
    if json_only:  # `qera info` reads only the JSON
        one_line_error(capsys, ["info", d], needle)
    with pytest.raises(QeraError) as exc:
        load_quantized(d)
    assert needle in str(exc.value)


def test_not_a_checkpoint_and_pickles_are_never_loaded(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(capsys, ["eval", empty], "neither a model directory")
    pick = tmp_path / "pickle"
    pick.mkdir()
    torch.save({"w": torch.zeros(2)}, pick / "pytorch_model.bin")
    line = one_line_error(capsys, ["eval", pick], "never loads")
    assert "pickle" in line
    with pytest.raises(QeraError, match="never loads"):
        load_quantized(pick)
    with_cfg = tmp_path / "with_cfg"
    shutil.copytree(pick, with_cfg)
    tiny_llama().config.save_pretrained(with_cfg)
    one_line_error(capsys, ["eval", with_cfg], "never loads pickle")


# -- statistics files -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stats_file(tmp_path_factory, model_dir, text_file):
    d = tmp_path_factory.mktemp("stats")
    assert main(["calibrate", str(model_dir), "--calib-text", str(text_file), "--calib-samples", "4",
                 "--calib-seq-len", "32", "--out", str(d / "s.safetensors"), "--no-progress"]) == 0
    return d / "s.safetensors"


def _rewrite_stats(src, dst, fn):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    fn(tensors)
    save_file(tensors, str(dst), metadata=meta)
    return dst


@pytest.mark.parametrize("fn,needle", [
    (lambda t: t.pop(sorted(t)[0]), "is missing"),
    (lambda t: t.update({k: v[:-1] for k, v in t.items() if k.endswith("::xtx")}), "has shape"),
    (lambda t: [v.view(-1).__setitem__(0, float("nan")) for k, v in t.items() if k.endswith("::sq")], "NaN/Inf"),
    (lambda t: [v.view(-1).__setitem__(0, float("inf")) for k, v in t.items() if k.endswith("::xtx")], "NaN/Inf"),
])
def test_broken_statistics(tmp_path, capsys, model_dir, stats_file, fn, needle):
    bad = _rewrite_stats(stats_file, tmp_path / "bad.safetensors", fn)
    one_line_error(capsys, ["quantize", model_dir, "--stats", bad, "--out", tmp_path / "q"], needle)
    assert not (tmp_path / "q").exists()


def test_load_qpeft_without_adapter_weights(tmp_path):
    pytest.importorskip("peft")
    from qera.finetune.qpeft import QPEFTConfig, load_qpeft, prepare_qpeft_model, save_qpeft

    pm, _ = prepare_qpeft_model(tiny_llama(), QPEFTConfig(init="qlora", rank=2), progress=False)
    save_qpeft(pm, byte_tokenizer(), tmp_path / "q")
    (tmp_path / "q" / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(QeraError, match="no adapter_model.safetensors"):
        load_qpeft(tmp_path / "q")


# -- silent acceptance ------------------------------------------------------------------------------
def test_reconstruct_refuses_non_finite_weights():
    import qera

    W = torch.randn(16, 32)
    W_q = qera.quantize_weight(W, "mxint4")
    for bad in (float("nan"), float("inf")):
        Wb = W.clone()
        Wb[3, 4] = bad
        with pytest.raises(QeraError, match="NaN/Inf.*layer L"):
            qera.reconstruct(Wb, W_q, "zeroquant-v2", rank=4, name="L")


def test_reconstruct_refuses_non_finite_statistics():
    import qera

    W = torch.randn(16, 32)
    st = ActivationStats(32, {"xtx"}, "L")
    st.update(torch.randn(100, 32))
    st.sums["xtx"][0, 1] = float("nan")
    with pytest.raises(QeraError, match="NaN/Inf"):
        qera.reconstruct(W, qera.quantize_weight(W, "mxint4"), "qera-exact", rank=4, stats=st)


def test_statistics_update_is_all_or_nothing():
    st = ActivationStats(8, {"abs", "sq", "xtx"}, "L")
    st.update(torch.randn(10, 8))
    before = {k: v.clone() for k, v in st.sums.items()}
    x = torch.randn(9000, 8)  # three chunks; the bad row is in the last one
    x[-1, 2] = float("inf")
    with pytest.raises(QeraError, match="NaN/Inf.*layer L"):
        st.update(x)
    assert st.count == 10 and all(torch.equal(before[k], st.sums[k]) for k in before)
    huge = torch.full((4, 8), 1e30)
    with pytest.raises(QeraError, match="overflow"):
        st.update(huge)
    assert st.count == 10


def test_fp16_overflow_names_the_layer():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(1e8)
    with pytest.raises(QeraError, match=r"overflows fp16.*layer model\.layers\.1\.mlp\.up_proj"):
        quantize_model(model, QuantConfig(format="int4:group=32", method="w-only", rank=0), progress=False)
    assert not any(isinstance(m, QERALinear) for m in model.modules())


# -- data lost or corrupted -------------------------------------------------------------------------
def _quantized():
    model = tiny_llama()
    quantize_model(model, QuantConfig(format="mxint4", method="zeroquant-v2", rank=2), progress=False)
    return model


def test_overwrite_without_exchange_recovers_the_old_checkpoint(tmp_path, monkeypatch):
    """Killed between the two renames of the fallback overwrite: the loader puts the old one back."""
    from qera.util import atomic

    old_model = _quantized()
    save_quantized(old_model, None, tmp_path / "ck")
    want = load_quantized(tmp_path / "ck")[0].state_dict()
    monkeypatch.setattr(atomic, "_renameat2", lambda *a: False)
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new checkpoint never reaches the path
            raise KeyboardInterrupt
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    monkeypatch.setattr(atomic, "_pid_alive", lambda pid: False)  # as if this process had died
    with pytest.raises(KeyboardInterrupt):
        save_quantized(_quantized(), None, tmp_path / "ck", overwrite=True)
    monkeypatch.setattr(atomic.os, "rename", real_rename)
    assert not (tmp_path / "ck").exists()
    back = load_quantized(tmp_path / "ck")[0].state_dict()  # recovered from .ck.old-<pid>
    assert all(torch.equal(back[k], want[k]) for k in want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_overwrite_is_an_exchange(tmp_path):
    save_quantized(_quantized(), None, tmp_path / "ck")
    m2 = _quantized()
    with torch.no_grad():
        m2.model.norm.weight.add_(1.0)
    save_quantized(m2, None, tmp_path / "ck", overwrite=True)
    assert torch.equal(load_quantized(tmp_path / "ck")[0].model.norm.weight, m2.model.norm.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_racing_runs_never_replace_each_other(tmp_path, monkeypatch):
    """The target appears while this run writes it: the run fails, the other run's output stays."""
    from qera.util import atomic

    real = atomic._fsync_tree

    def other_run_wins(tmp):
        real(tmp)
        (tmp_path / "ck").mkdir()
        (tmp_path / "ck" / "theirs").write_text("x")

    monkeypatch.setattr(atomic, "_fsync_tree", other_run_wins)
    with pytest.raises(QeraError, match="appeared while"):
        save_quantized(_quantized(), None, tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_stale_temporary_folders_are_cleaned(tmp_path):
    stale = tmp_path / ".ck.tmp-999999999-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    save_quantized(_quantized(), None, tmp_path / "ck")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_scratch_of_a_killed_run_is_removed_by_the_next_one(tmp_path, monkeypatch):
    """A process that dies without cleaning up (SIGKILL, OOM killer) leaves spilled statistics and
    cached activations behind; the next run's scratch in the same folder removes them, and only
    them: scratch that is locked (a live run, even one whose process id this one cannot see), of
    other hosts and with other prefixes stays."""
    import subprocess
    import sys

    from qera.util import atomic
    from qera.util.atomic import _host_tag, scratch_dir

    child = ("import sys; from qera.util.atomic import scratch_dir; "
             "s = scratch_dir(sys.argv[1], 'qera-stats-'); (s.path / 'stats.safetensors').write_bytes(b'x'); print(s.path); "
             "a = scratch_dir(sys.argv[1], 'qera-activations-'); (a.path / '0.safetensors').write_bytes(b'x')")
    out = subprocess.run([sys.executable, "-c", child, str(tmp_path)], capture_output=True, text=True, check=True)
    left = Path(out.stdout.strip())  # the child exited without removing its scratch
    assert (left / "stats.safetensors").exists() and left.parent == tmp_path
    dead_pid = int(left.name.split("-")[-2])
    other_host = tmp_path / f"qera-stats-elsewhere_abc123-{dead_pid}-x"
    other_host.mkdir()

    live = scratch_dir(tmp_path, "qera-stats-")  # removes the child's stats scratch only
    assert not left.exists() and other_host.exists() and live.path.exists()
    assert len(list(tmp_path.glob("qera-activations-*"))) == 1  # another prefix: swept by its own kind only
    scratch_dir(tmp_path, "qera-activations-").remove()
    assert list(tmp_path.glob("qera-activations-*")) == []

    # a live run whose process id looks dead from here (another PID namespace): its lock protects it
    monkeypatch.setattr(atomic, "_pid_alive", lambda pid: False)
    scratch_dir(tmp_path, "qera-stats-").remove()
    assert live.path.exists()
    live.remove()
    assert not live.path.exists() and "_" in _host_tag()
    assert sorted(p.name for p in tmp_path.iterdir()) == [other_host.name]


def test_bf16_cast_after_quantization_round_trips(tmp_path):
    model = _quantized().to(torch.bfloat16)
    save_quantized(model, byte_tokenizer(), tmp_path / "ck")
    back, _ = load_quantized(tmp_path / "ck")
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


# -- reproducibility --------------------------------------------------------------------------------
@pytest.mark.parametrize("pipeline", ["oneshot", "sequential"])
def test_same_seed_same_checkpoint_bytes(tmp_path, pipeline):
    batches = calibration_batches(byte_tokenizer(), TEXT, n_samples=4, seq_len=32, seed=0, batch_size=2)
    for name in ("a", "b"):
        model = tiny_llama()
        rep = quantize_model(model, QuantConfig(format="mxint3", method="qera-exact", rank=4, pipeline=pipeline),
                             calibration=batches, progress=False)
        save_quantized(model, byte_tokenizer(), tmp_path / name, report=rep)
    for f in ("model.safetensors", "qera_config.json", "config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    meta = read_qera_config(tmp_path / "a")
    assert "seconds" not in json.dumps(meta)  # timings live in the report, not in the checkpoint
    assert math.isfinite(meta["quality"]["mean_output_error_ratio"])
