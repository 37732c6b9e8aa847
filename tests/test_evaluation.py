"""Perplexity with the LM head applied in chunks of positions equals the full-logits perplexity."""

import pytest
import torch

from qera.evaluate import perplexity as evaluation
from qera.evaluate.perplexity import ChunkedHead, perplexity
from test_architectures import build
from tiny import TEXT, byte_tokenizer


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2", "gpt2"])
def test_chunked_cross_entropy_equals_full_logits(monkeypatch, family):
    model = build(family).eval()
    if family == "gemma3":
        model.config.final_logit_softcapping = 3.0  # output processing must be reproduced too
    tok = byte_tokenizer()
    monkeypatch.setattr(evaluation, "LOGIT_ELEMS", 259 * 7)  # 7 positions per chunk: many chunks per window
    probe = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert ChunkedHead.for_model(model, probe) is not None  # the chunked path is really taken
    chunked = perplexity(model, tok, TEXT, seq_len=64, max_windows=3, progress=False)
    monkeypatch.setattr(ChunkedHead, "for_model", classmethod(lambda cls, m, p: None))
    full = perplexity(model, tok, TEXT, seq_len=64, max_windows=3, progress=False)
    assert chunked.tokens == full.tokens
    assert chunked.perplexity == pytest.approx(full.perplexity, rel=1e-6)


def test_unknown_output_processing_falls_back_to_full_logits():
    model = build("llama").eval()
    orig = model.forward

    def scaled(*a, **k):  # a model whose forward post-processes logits in a way qera does not know
        out = orig(*a, **k)
        out.logits = out.logits * 2.0
        return out

    model.forward = scaled
    with torch.no_grad():
        assert ChunkedHead.for_model(model, torch.randint(0, 256, (1, 16))) is None
