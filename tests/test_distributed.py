"""torchrun with 2 gloo processes on the CPU gives the checkpoint one process gives (within solver tolerance)."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny import TEXT, byte_tokenizer, tiny_llama

pytest.importorskip("torch.distributed")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": str(HERE.parent / "src"), "OMP_NUM_THREADS": "1"}


def args(src, text, out):
    return ["quantize", str(src), "--format", "mxint3", "--method", "qera-exact", "--rank", "4", "--pipeline",
            "sequential", "--propagate", "quantized", "--calib-text", str(text), "--calib-samples", "8",
            "--calib-seq-len", "32", "--calib-batch-size", "2", "--no-progress", "--out", str(out)]


def torchrun(argv, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "qera", *argv]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


def assert_same_checkpoint(a_dir, b_dir):
    """Every stored tensor bitwise equal: packed codes and exponents, the low-rank factors A and B, the
    unquantized weights.

    Bitwise, not allclose: each rank forms the same per-batch float32 chunk sums a single process forms
    (the same batches, the same GEMMs), and only the order of their float64 sums differs (per rank, then
    the all-reduce). A float64 sum of a few float32 values is exact (53 bits hold 24 bits plus their
    exponent spread), so the summed statistics are bitwise those of one process, and so is everything
    solved or rounded from them: A and B, and GPTQ's codes, which follow R column by column."""
    import json

    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    assert set(a) == set(b)
    layers = json.loads((a_dir / "qera_config.json").read_text())["layers"]
    assert layers and all(f"{n}.{f}" in a for n in layers for f in ("A", "B", "qweight_codes"))
    for k in sorted(a):
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if not torch.equal(a[k], b[k]):
            diff = (a[k].double() - b[k].double()).abs().max().item()
            pytest.fail(f"{k} differs: {int((a[k] != b[k]).sum())} of {a[k].numel()} entries, max |diff| {diff:.3g}")


def codes(d):
    t = load_file(str(d / "model.safetensors"))
    return {k: v for k, v in t.items() if k.endswith("qweight_codes")}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    tiny_llama(layers=3).save_pretrained(d / "src")
    byte_tokenizer().save_pretrained(d / "src")
    (d / "t.txt").write_text(TEXT)
    from qera.cli import main

    assert main(args(d / "src", d / "t.txt", d / "one")) == 0
    return d


def test_two_gloo_processes_equal_one(setup):
    d = setup
    proc = torchrun(args(d / "src", d / "t.txt", d / "two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("saved ") == 1  # rank 0 alone reports
    assert "calibration_tokens" in (d / "two" / "qera_config.json").read_text()
    assert_same_checkpoint(d / "one", d / "two")
    import json

    q1 = json.loads((d / "one" / "qera_config.json").read_text())["quality"]
    q2 = json.loads((d / "two" / "qera_config.json").read_text())["quality"]
    assert q1["calibration_tokens"] == q2["calibration_tokens"] == 8 * 32


def test_two_processes_resume_a_killed_run(setup, tmp_path):
    """A one-process run killed after block 1 is finished by two processes (rank 0 broadcasts the saved layers)."""
    d = setup
    shutil.copytree(d / "src", tmp_path / "src")
    script = tmp_path / "kill.py"
    script.write_text(
        "import os, signal, sys\n"
        "from qera.io.checkpoint import writer as w\n"
        "orig = w.CheckpointWriter.add_block\n"
        "def add_block(self, i, *a, **k):\n"
        "    if i == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return orig(self, i, *a, **k)\n"
        "w.CheckpointWriter.add_block = add_block\n"
        "from qera.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "q"
    proc = subprocess.run([sys.executable, str(script), *args(tmp_path / "src", d / "t.txt", out)], env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL
    proc = torchrun([*args(tmp_path / "src", d / "t.txt", out), "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_checkpoint(d / "one", out)
    assert not (tmp_path / ".q.partial").exists()


def test_two_processes_allocate_ranks_like_one(setup, tmp_path):
    """--rank-budget under torchrun: every rank allocates the same per-block ranks as one process."""
    import json

    d = setup
    argv = [*args(d / "src", d / "t.txt", tmp_path / "one"), "--rank-budget", "3"]
    from qera.cli import main

    assert main(argv) == 0
    proc = torchrun([*args(d / "src", d / "t.txt", tmp_path / "two"), "--rank-budget", "3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [{n: m["rank"] for n, m in json.loads((tmp_path / k / "qera_config.json").read_text())["layers"].items()}
             for k in ("one", "two")]
    assert ranks[0] == ranks[1] and len(set(ranks[0].values())) > 1
    assert_same_checkpoint(tmp_path / "one", tmp_path / "two")


def test_two_gloo_processes_equal_one_with_gptq_rounding(setup, tmp_path):
    """GPTQ's codes follow the summed Σxᵀx column by column (unlike RTN's, which depend on W alone):
    two processes must sum their shares into exactly the statistics of one."""
    from qera.cli import main

    d = setup
    gptq = ["--rounding", "gptq"]
    assert main([*args(d / "src", d / "t.txt", tmp_path / "one"), *gptq]) == 0
    proc = torchrun([*args(d / "src", d / "t.txt", tmp_path / "two"), *gptq])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_checkpoint(tmp_path / "one", tmp_path / "two")
    # the comparison has teeth: the codes do depend on the statistics. Other codes than RTN's, and
    # other codes from one rank's share of the data (4 of the 8 windows) alone.
    assert main([*args(d / "src", d / "t.txt", tmp_path / "half"), *gptq, "--calib-samples", "4"]) == 0
    one = codes(tmp_path / "one")
    for other in (codes(d / "one"), codes(tmp_path / "half")):
        assert sum(not torch.equal(one[k], other[k]) for k in one) > len(one) // 2
