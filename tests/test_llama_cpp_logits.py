"""The reader of llama-perplexity's logits file and the agreement score, on files laid out as
llama.cpp writes them (the writer below follows tools/perplexity/perplexity.cpp's log_softmax)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qera.evaluate.llama_cpp import agreement, read_logits_file
from qera.util.errors import QeraError
from tiny import tiny_llama


def write_logits_file(path, tokens: np.ndarray, logits: list[np.ndarray], n_vocab: int) -> None:
    """``tokens`` (n_chunk, n_ctx) int32; ``logits[c]`` (n_ctx - 1 - n_ctx//2, n_vocab) float32 of the
    scored positions: each row stored as llama.cpp stores it (scale, min log-prob, uint16 codes)."""
    n_chunk, n_ctx = tokens.shape
    nv = 2 * ((n_vocab + 1) // 2) + 4
    with open(path, "wb") as f:
        f.write(b"_logits_")
        f.write(np.array([n_ctx, n_vocab, n_chunk], dtype="<i4").tobytes())
        f.write(tokens.astype("<i4").tobytes())
        for rows in logits:
            out = np.zeros((rows.shape[0], nv), dtype="<u2")
            for i, x in enumerate(rows.astype(np.float32)):
                top, low = np.float32(x.max()), np.float32(max(x.min(), x.max() - 16))
                lse = np.float32(np.log(np.exp((x - top).astype(np.float64)).sum()))
                scale = np.float32((top - low) / np.float32(65535))
                head = np.array([scale, low - top - lse], dtype="<f4").view("<u2")
                out[i, :4] = head
                q = np.where(x > low, np.rint((x - low) / scale), 0) if scale else np.zeros_like(x)
                out[i, 4:4 + n_vocab] = q.astype("<u2")
            f.write(out.tobytes())


@pytest.fixture
def model():
    return tiny_llama(seed=0)


def _windows(model, n_chunk=3, n_ctx=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (n_chunk, n_ctx), generator=g)
    first = n_ctx // 2
    rows = []
    with torch.no_grad():
        for c in range(n_chunk):
            ids = tokens[c].clone()
            ids[0] = 256  # BOS at each window's start, as llama.cpp does
            rows.append(model(input_ids=ids[None]).logits[0, first:-1].float().numpy())
    return tokens.numpy().astype(np.int32), rows


def test_reader_decodes_llama_cpps_log_probabilities(tmp_path, model):
    tokens, rows = _windows(model)
    write_logits_file(tmp_path / "l.bin", tokens, rows, 259)
    f = read_logits_file(tmp_path / "l.bin")
    assert (f.n_ctx, f.n_vocab, f.n_chunk, f.first) == (32, 259, 3, 16)
    assert np.array_equal(f.tokens, tokens)
    for c in range(3):
        want = torch.log_softmax(torch.from_numpy(rows[c]), -1)
        got = f.log_probs(c)
        near = want >= want.max(-1, keepdim=True).values - 15.9  # within 16 nats of the top: stored to scale/2
        step = float((want.max() - want.min())) / 65535
        assert got.shape == (15, 259)
        assert torch.allclose(got[near], want[near], atol=step + 1e-5)


def test_agreement_of_a_model_with_its_own_logits_and_with_another(tmp_path, model):
    tokens, rows = _windows(model)
    write_logits_file(tmp_path / "l.bin", tokens, rows, 259)
    f = read_logits_file(tmp_path / "l.bin")
    same = agreement(model, f, bos=256, progress=False)
    assert same["top1_agreement"] == 1.0 and same["scored_tokens"] == 3 * 15
    assert abs(same["ppl_rel_diff"]) < 1e-4 and same["kl_llama_cpp_to_qera"] < 1e-4
    other = agreement(tiny_llama(seed=1), f, bos=256, progress=False)
    assert other["top1_agreement"] < 0.5 and other["kl_llama_cpp_to_qera"] > 0.1
    assert other["llama_cpp_ppl"] == pytest.approx(same["llama_cpp_ppl"])  # the file's side does not change
    # without the BOS substitution the model sees other inputs: its side changes
    assert agreement(model, f, bos=None, progress=False)["qera_ppl"] != same["qera_ppl"]
    assert agreement(model, f, bos=256, max_windows=1, progress=False)["scored_tokens"] == 15


def test_reader_refuses_other_files(tmp_path, model):
    (tmp_path / "x.bin").write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(QeraError, match="not a llama-perplexity logits file"):
        read_logits_file(tmp_path / "x.bin")
    tokens, rows = _windows(model)
    write_logits_file(tmp_path / "l.bin", tokens, rows, 259)
    data = (tmp_path / "l.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-10])
    with pytest.raises(QeraError, match="stopped early"):
        read_logits_file(tmp_path / "cut.bin")
    with pytest.raises(QeraError, match="out of range"):
        read_logits_file(tmp_path / "l.bin").log_probs(3)


def test_window_bos_follows_the_gguf_tokenizer_flag(tmp_path):
    from gguf import GGUFWriter

    from qera.evaluate.llama_cpp import gguf_window_bos

    for add, want in ((True, 7), (False, None)):
        path = tmp_path / f"m{add}.gguf"
        w = GGUFWriter(str(path), "llama")
        w.add_bos_token_id(7)
        w.add_add_bos_token(add)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        assert gguf_window_bos(path) == want


def test_cli_eval_reports_the_agreement(tmp_path, model, capsys):
    """``qera eval MODEL --llama-cpp-logits FILE --json``: the model scored on llama.cpp's windows."""
    import json

    from qera.cli.main import main
    from tiny import byte_tokenizer

    tok = byte_tokenizer(add_bos=True)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    tokens, rows = _windows(model)
    write_logits_file(tmp_path / "l.bin", tokens, rows, 259)
    assert main(["eval", str(tmp_path / "m"), "--llama-cpp-logits", str(tmp_path / "l.bin"), "--json",
                 "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["top1_agreement"] == 1.0 and abs(res["ppl_rel_diff"]) < 1e-4 and res["windows"] == 3
    assert main(["eval", str(tmp_path / "m"), "--llama-cpp-logits", str(tmp_path / "l.bin"), "--max-windows", "1",
                 "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["windows"] == 1


def test_cli_refuses_a_bad_logits_file_before_loading_the_model(tmp_path, capsys):
    """The logits file is checked first: a missing model is not even looked at."""
    from qera.cli.main import main

    (tmp_path / "x.bin").write_bytes(b"GGUF" + bytes(100))
    for path, msg in ((tmp_path / "x.bin", "not a llama-perplexity logits file"),
                      (tmp_path / "none.bin", "no such llama-perplexity logits file")):
        assert main(["eval", str(tmp_path / "no-model"), "--llama-cpp-logits", str(path), "--no-progress"]) != 0
        assert msg in capsys.readouterr().err
