"""lm-eval-harness on qera models in memory: the local text task, include paths, and qera's own check."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from qera import QuantConfig, quantize_model
from qera.util.errors import QeraError
from qera.evaluate.perplexity import rolling_loglikelihood, rolling_windows
from qera.evaluate.harness import TEXT_TASK, run_harness, split_documents

PARAGRAPHS = [
    ("Quantization maps each weight to one of a few levels; the error left behind has structure. " * k).strip()
    for k in (3, 5, 2, 7, 4, 6)
]
TEXT = "\n\n".join(PARAGRAPHS)


@pytest.mark.parametrize("n,length", [(1, 1), (5, 1), (10, 3), (10, 10), (10, 64), (257, 64)])
def test_rolling_windows_score_every_token_once_with_full_context(n, length):
    scored = []
    for start, stop, first in rolling_windows(n, length):
        assert stop - start <= length and start <= first < stop
        assert start == max(0, stop - length)  # as much context as the window allows
        scored.extend(range(first, stop))
    assert scored == list(range(n))


def test_split_documents_cuts_at_paragraph_breaks():
    docs = split_documents(TEXT, min_chars=600)
    assert all(len(d) >= 600 for d in docs[:-1]) and len(docs) > 1
    assert "\n\n".join(docs) == TEXT  # nothing lost, nothing cut inside a paragraph
    assert split_documents("\n\n  \n\n") == []


def test_rolling_loglikelihood_equals_one_forward_when_a_document_fits(tok):
    from tiny import tiny_llama

    model = tiny_llama()
    doc = PARAGRAPHS[2]
    ids = [tok.eos_token_id] + tok(doc)["input_ids"]
    assert len(ids) <= 256
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), -1)
    want = float(logp.gather(1, torch.tensor(ids[1:])[:, None]).sum())
    fits = rolling_loglikelihood(model, tok, [doc], 256, add_bos=False, prefix=tok.eos_token_id, progress=False)
    assert fits.tokens == len(ids) - 1 and fits.loglikelihood == pytest.approx(want, rel=1e-5)
    short = rolling_loglikelihood(model, tok, [doc], 32, add_bos=False, prefix=tok.eos_token_id, progress=False)
    assert short.tokens == fits.tokens and short.loglikelihood != pytest.approx(want, rel=1e-5)  # less context


@pytest.fixture(scope="module")
def quantized(batches):
    from tiny import tiny_llama

    model = tiny_llama()
    quantize_model(model, QuantConfig(format="mxint3", method="qera-exact", rank=4), calibration=batches, progress=False)
    return model


@pytest.mark.parametrize("add_bos", [False, True])
def test_lm_eval_word_perplexity_equals_qera_on_a_quantized_model(quantized, add_bos):
    """lm-eval's batching, padding and windows through HFLM, and qera's own rolling evaluation: the same number."""
    pytest.importorskip("lm_eval")
    from tiny import byte_tokenizer

    tok = byte_tokenizer(add_bos=add_bos)
    docs = split_documents(TEXT, min_chars=400)
    res = run_harness(quantized, tok, [TEXT_TASK], text_docs=docs, max_length=96, batch_size=3)
    s = res.settings
    assert s["add_bos"] is add_bos
    own = rolling_loglikelihood(quantized, tok, docs, 96, s["add_bos"], s["prefix"], progress=False)
    assert res.metric(TEXT_TASK, "word_perplexity") == pytest.approx(own.word_perplexity, rel=1e-5)
    assert res.metric(TEXT_TASK, "bits_per_byte") == pytest.approx(own.bits_per_byte, rel=1e-6)
    assert TEXT_TASK in res.table


def test_local_task_through_include_path(quantized, tmp_path):
    """A multiple-choice YAML of the user's: lm-eval's accuracy equals the argmax of qera-computed log-likelihoods."""
    pytest.importorskip("lm_eval")
    from tiny import byte_tokenizer

    tok = byte_tokenizer()
    rows = [{"q": f"Question {i}: the error", "choices": [" has structure", " is random", " vanishes"], "label": i % 3}
            for i in range(6)]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(tmp_path / 'mc.jsonl'))}\n"
        f"  cache_dir: {json.dumps(str(tmp_path / 'cache'))}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    res = run_harness(quantized, tok, ["tiny_mc"], include_path=str(tmp_path), max_length=96)

    def ll(context: str, cont: str) -> float:
        c, x = tok(context)["input_ids"], tok(cont)["input_ids"]
        with torch.no_grad():
            logp = F.log_softmax(quantized(input_ids=torch.tensor([c + x])).logits[0, :-1].double(), -1)
        return float(logp[len(c) - 1:].gather(1, torch.tensor(x)[:, None]).sum())

    hits = [max(range(3), key=lambda j: ll(r["q"], r["choices"][j])) == r["label"] for r in rows]
    assert res.metric("tiny_mc", "acc") == pytest.approx(sum(hits) / len(hits))


def test_unknown_task_and_missing_extra_are_clear(quantized, tok, monkeypatch, tmp_path):
    pytest.importorskip("lm_eval")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QeraError, match="no_such_task"):
        run_harness(quantized, tok, ["no_such_task"], include_path=str(tmp_path / "empty"))
    with pytest.raises(QeraError, match="needs documents"):
        run_harness(quantized, tok, [TEXT_TASK])
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(QeraError, match=r"qera\[eval\]"):
        run_harness(quantized, tok, [TEXT_TASK], text_docs=["a b"])


def test_cli_eval_tasks(tmp_path, capsys, model_dir):
    pytest.importorskip("lm_eval")
    from qera.cli import main

    text = tmp_path / "eval.txt"
    text.write_text(TEXT)
    code = main(["eval", str(model_dir), "--eval-text", str(text), "--seq-len", "64", "--tasks", TEXT_TASK,
                 "--limit", "2", "--doc-chars", "300", "--json", "--no-progress"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    check = out["lm_eval"]["qera_text"]
    assert check["documents"] == 2 and check["relative_difference"] < 1e-5
    assert math.isfinite(out["perplexity"]) and out["lm_eval"]["settings"]["max_length"] == 64
