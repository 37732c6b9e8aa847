"""Calibration windows: the same first-token convention as the evaluation windows (issue 15)."""

import pytest
import torch

pytest.importorskip("transformers")

from qera.io.data import bos_id, calibration_batches, tokenize  # noqa: E402
from qera.util.errors import QeraError  # noqa: E402
from qera.evaluate.perplexity import perplexity  # noqa: E402

from tiny import byte_tokenizer, tiny_llama  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def _windows(batches):
    return torch.cat([b["input_ids"] for b in batches])


def test_bos_id_follows_the_tokenizer():
    assert bos_id(byte_tokenizer()) is None
    tok = byte_tokenizer(add_bos=True)
    assert bos_id(tok) == tok.bos_token_id
    assert tok("a")["input_ids"][0] == tok.bos_token_id


def test_calibration_windows_start_with_bos_when_the_tokenizer_adds_it():
    plain_tok, bos_tok = byte_tokenizer(), byte_tokenizer(add_bos=True)
    plain = _windows(calibration_batches(plain_tok, TEXT, n_samples=6, seq_len=32, seed=3, batch_size=4))
    with_bos = _windows(calibration_batches(bos_tok, TEXT, n_samples=6, seq_len=32, seed=3, batch_size=4))
    assert plain.shape == with_bos.shape == (6, 32)
    assert (plain != plain_tok.bos_token_id).all()  # text tokens only: no BOS inside the text
    assert (with_bos[:, 0] == bos_tok.bos_token_id).all()
    assert torch.equal(with_bos[:, 1:], plain[:, :-1])  # the same windows, shifted right by the BOS
    # each window is a contiguous slice of the text's tokens
    ids = tokenize(plain_tok, TEXT).tolist()
    for w in plain.tolist():
        assert any(ids[s:s + 32] == w for s in range(len(ids) - 31))


def test_calibration_bos_can_be_forced_either_way():
    bos_tok = byte_tokenizer(add_bos=True)
    off = _windows(calibration_batches(bos_tok, TEXT, n_samples=4, seq_len=16, seed=0, bos=False))
    assert (off[:, 0] != bos_tok.bos_token_id).all()
    on = _windows(calibration_batches(byte_tokenizer(), TEXT, n_samples=4, seq_len=16, seed=0, bos=True))
    assert (on[:, 0] == bos_tok.bos_token_id).all()


def test_forcing_bos_without_a_bos_token_is_a_clear_error():
    tok = byte_tokenizer()
    tok.bos_token = None
    with pytest.raises(QeraError, match="no BOS token"):
        calibration_batches(tok, TEXT, n_samples=2, seq_len=16, bos=True)


def test_evaluation_and_calibration_see_the_same_first_token():
    """Perplexity windows start with BOS exactly when calibration windows do."""
    model = tiny_llama()
    for tok in (byte_tokenizer(), byte_tokenizer(add_bos=True)):
        seen = []
        handle = model.model.embed_tokens.register_forward_hook(lambda m, a, o: seen.append(a[0][:, 0].clone()))
        try:
            perplexity(model, tok, TEXT, seq_len=32, max_windows=2, progress=False)
        finally:
            handle.remove()
        calib = _windows(calibration_batches(tok, TEXT, n_samples=4, seq_len=32, seed=0))
        eval_first = torch.cat(seen)
        assert bool((eval_first == tok.bos_token_id).all()) == bool((calib[:, 0] == tok.bos_token_id).all())
