"""Shared fixtures: synthetic correlated, heavy-tailed activations and small weights."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub


def correlated_inputs(n: int, d: int, seed: int = 0, outliers: int = 4) -> torch.Tensor:
    """Rows of Student-t(3) noise mixed by a random matrix, with a few large outlier channels."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    t = torch.distributions.StudentT(3.0)
    torch.manual_seed(seed)
    x = t.sample((n, d)) @ mix
    x[:, :outliers] *= 15.0
    return x


def output_error(W: torch.Tensor, Wq: torch.Tensor, R: torch.Tensor) -> float:
    """``trace((W − W̃) R (W − W̃)ᵀ)`` in float64: a layer's output error for inputs with autocorrelation ``R``."""
    D = (W - Wq).double()
    return float(((D @ R) * D).sum())


@pytest.fixture
def problem():
    """(W, x): a 48×64 weight and 2000 correlated input rows."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(48, 64, generator=g) * 0.05
    return W, correlated_inputs(2000, 64, seed=2)


@pytest.fixture(scope="module")
def tok():
    from tiny import byte_tokenizer

    return byte_tokenizer()


@pytest.fixture(scope="module")
def batches(tok):
    """12 windows of 48 tokens of the tiny text, in batches of 4."""
    from qera.io.data import calibration_batches
    from tiny import TEXT

    return calibration_batches(tok, TEXT, n_samples=12, seq_len=48, seed=0, batch_size=4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama and the byte tokenizer saved as a Hugging Face directory."""
    from tiny import byte_tokenizer, tiny_llama

    d = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama().save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from tiny import TEXT

    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text(TEXT)
    return p
