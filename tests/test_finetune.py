import json

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

from qera.cli import main  # noqa: E402
from qera.errors import QeraError  # noqa: E402
from qera.glue import read_task, regression_metrics, classification_metrics  # noqa: E402
from tiny import TEXT, byte_tokenizer, tiny_llama  # noqa: E402


def write(path, text):
    path.write_text(text)
    return path


def test_readers(tmp_path):
    sst = read_task("sst2", write(tmp_path / "s.tsv", "sentence\tlabel\ngood film \t1\nbad film \t0\n"))
    assert [(e.text_a.strip(), e.label) for e in sst] == [("good film", 1.0), ("bad film", 0.0)]
    mrpc = read_task("mrpc", write(tmp_path / "m.txt", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA \"quoted\" one.\tAnother.\n"))
    assert mrpc[0].text_a == 'A "quoted" one.' and mrpc[0].text_b == "Another." and mrpc[0].label == 1.0
    sts = read_task("stsb", write(tmp_path / "b.tsv", "index\tsentence1\tsentence2\tscore\n0\ta\tb\t3.8\n"))
    assert sts[0].label == pytest.approx(3.8)


@pytest.mark.parametrize("task,text,needle", [
    ("sst2", "sentence\tscore\nx\t1\n", "lacks column"),
    ("sst2", "sentence\tlabel\nx\t2\n", "label '2'"),
    ("stsb", "sentence1\tsentence2\tscore\na\tb\thigh\n", "non-numeric"),
    ("stsb", "sentence1\tsentence2\tscore\na\tb\t7\n", "range 0..5"),
    ("mrpc", "Quality\t#1 String\t#2 String\n1\tonly one\n", "fields"),
    ("sst2", "sentence\tlabel\n", "no examples"),
])
def test_reader_errors_name_the_problem(tmp_path, task, text, needle):
    with pytest.raises(QeraError, match=needle):
        read_task(task, write(tmp_path / "bad.tsv", text))


def test_metrics_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 5, 200).round(1)  # ties
    p = y + rng.normal(0, 1, 200)
    m = regression_metrics(p, y)
    assert m["pearson"] == pytest.approx(stats.pearsonr(p, y)[0], rel=1e-9)
    assert m["spearman"] == pytest.approx(stats.spearmanr(p, y)[0], rel=1e-9)
    logits = np.array([[2.0, 1.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    c = classification_metrics(logits, np.array([0, 1, 0, 1]))
    assert c["accuracy"] == 0.5 and c["f1"] == pytest.approx(0.5)


def test_finetune_clm_cli(tmp_path, capsys):
    d = tmp_path / "model"
    tiny_llama().save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    text = write(tmp_path / "t.txt", TEXT)
    code = main(["finetune", str(d), "--task", "clm", "--train", str(text), "--eval", str(text), "--init", "qera-exact",
                 "--format", "mxint3", "--rank", "4", "--seq-len", "64", "--max-train-samples", "16",
                 "--max-eval-samples", "4", "--epochs", "3", "--batch-size", "4", "--lr", "3e-3", "--calib-text", str(text),
                 "--calib-samples", "8", "--calib-seq-len", "32", "--out", str(tmp_path / "run"), "--json", "--no-progress",
                 "--save-model"])
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["final"]["eval_perplexity"] < result["initial"]["eval_perplexity"]
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    from qera.peft import load_qpeft

    model, _ = load_qpeft(tmp_path / "run" / "model")
    ids = torch.randint(0, 256, (1, 10))
    assert torch.isfinite(model(ids).logits).all()


def test_finetune_rejects_bad_tsv(tmp_path, capsys):
    bad = write(tmp_path / "bad.tsv", "sentence\tlabel\nx\tmaybe\n")
    code = main(["finetune", "minilm-l6", "--task", "sst2", "--train", str(bad), "--eval", str(bad), "--out",
                 str(tmp_path / "o"), "--no-progress"])
    assert code == 2 and "label 'maybe'" in capsys.readouterr().err


def test_output_error_cli(tmp_path, capsys):
    d = tmp_path / "model"
    tiny_llama().save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    text = write(tmp_path / "t.txt", TEXT)
    code = main(["output-error", str(d), "--formats", "mxint3", "--ranks", "2,8", "--loftq-iters", "2",
                 "--calib-text", str(text), "--eval-text", str(text), "--calib-samples", "8", "--calib-seq-len", "32",
                 "--eval-samples", "4", "--eval-seq-len", "32", "--out", str(tmp_path / "oe"), "--json", "--no-progress"])
    out = capsys.readouterr()
    assert code == 0, out.err
    rows = json.loads(out.out)["rows"]
    err = {(r["init"], r["rank"], r["iters"]): r["logit_mse"] for r in rows}
    assert err[("qera-exact", 8, None)] < err[("qlora", 8, None)]
    assert err[("qera-exact", 8, None)] < err[("qera-exact", 2, None)]
    assert err[("qlora", 2, None)] == err[("qlora", 8, None)]  # B = 0: rank does not matter
    assert (tmp_path / "oe" / "output_error_mxint3.png").stat().st_size > 1000
