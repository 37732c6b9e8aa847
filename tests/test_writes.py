"""Every file qera writes goes through qera.util.atomic: published whole or not at all, with the
permissions a plain open()/mkdir would have given it."""

import os
import stat

import pytest
import torch

from qera.util.atomic import atomic_directory, write_figure, write_file


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_and_folders_get_the_usual_permissions(tmp_path):
    plain_file, plain_dir = tmp_path / "plain.txt", tmp_path / "plain"
    plain_file.write_text("x")
    plain_dir.mkdir()
    write_file(tmp_path / "a.txt", lambda p: p.write_text("x"))
    with atomic_directory(tmp_path / "ckpt") as d:
        (d / "f").write_text("x")
    assert _mode(tmp_path / "a.txt") == _mode(plain_file)  # not mkstemp's 0o600
    assert _mode(tmp_path / "ckpt") == _mode(plain_dir)  # not mkdtemp's 0o700


def test_a_figure_is_written_whole_or_not_at_all(tmp_path):
    pytest.importorskip("matplotlib")
    from qera.evaluate.plots import plot_curves

    path = plot_curves({"qera-exact": [{"step": 1, "loss": 2.0, "eval_accuracy": 0.5},
                                       {"step": 2, "loss": 1.0, "eval_accuracy": 0.7}]},
                       "accuracy", tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    class Broken:
        def savefig(self, fname, **kw):
            with open(fname, "wb") as fh:
                fh.write(b"half")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_figure(tmp_path / "broken.png", Broken())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]  # no half file, no temp left


def test_merged_shards_are_published_atomically(tmp_path):
    from safetensors.torch import load_file, save_file

    from qera.io.checkpoint.files import merge_safetensors

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"x": torch.arange(6.0)}, str(a))
    save_file({"y": torch.ones(2, 3)}, str(b))
    merge_safetensors([a, b], tmp_path / "m.safetensors")
    got = load_file(str(tmp_path / "m.safetensors"))
    assert torch.equal(got["x"], torch.arange(6.0)) and torch.equal(got["y"], torch.ones(2, 3))
    b.write_bytes(b.read_bytes()[:-8])  # a truncated part: the merge fails and leaves nothing behind
    with pytest.raises(Exception, match="ended early"):
        merge_safetensors([a, b], tmp_path / "m2.safetensors")
    assert not (tmp_path / "m2.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
