import json

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

from qera.cli import main  # noqa: E402
from qera.util.errors import QeraError  # noqa: E402
from qera.evaluate.glue import read_task, regression_metrics, classification_metrics  # noqa: E402
from tiny import TEXT, byte_tokenizer, tiny_bert_dir, tiny_llama  # noqa: E402


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


@pytest.mark.parametrize("refine", [[], ["--refine", "4", "--refine-train", "lowrank,rounding"]])
def test_finetune_clm_cli(tmp_path, capsys, refine):
    d = tmp_path / "model"
    tiny_llama().save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    text = write(tmp_path / "t.txt", TEXT)
    code = main(["finetune", str(d), "--task", "clm", "--train", str(text), "--eval", str(text), "--init", "qera-exact",
                 "--format", "mxint3", "--rank", "4", "--seq-len", "64", "--max-train-samples", "16",
                 "--max-eval-samples", "4", "--epochs", "3", "--batch-size", "4", "--lr", "3e-3", "--calib-text", str(text),
                 "--calib-samples", "8", "--calib-seq-len", "32", "--out", str(tmp_path / "run"), "--json", "--no-progress",
                 "--save-model", *refine])
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["refine_steps"] == (4 if refine else 0)
    assert result["final"]["eval_perplexity"] < result["initial"]["eval_perplexity"]
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    from qera.finetune.qpeft import load_qpeft

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
    saved = json.loads((tmp_path / "oe" / "output_error.json").read_text())
    assert saved["complete"] and len(saved["rows"]) == len(rows)


def test_loftq_sweep_matches_peft_model_at_every_iteration():
    """One LoftQ run measures each iteration count; each equals a PEFT model initialized with that many."""
    from qera.analyze.init_error import _outputs, compare_outputs, output_error_sweep
    from qera.finetune.qpeft import QPEFTConfig, prepare_qpeft_model

    load = lambda: tiny_llama(seed=0)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 256, (2, 16), generator=g)}]
    rows = output_error_sweep(load, "mxint3", None, batches, inits=["loftq"], ranks=[4], loftq_iters=3, progress=False)
    assert [r["iters"] for r in rows] == [1, 2, 3]
    ref = _outputs(load(), batches)
    for r in rows:
        cfg = QPEFTConfig(format="mxint3", init="loftq", rank=4, alpha=8.0, init_options={"iters": r["iters"]})
        model, _ = prepare_qpeft_model(load(), cfg, progress=False)
        direct = compare_outputs(_outputs(model, batches), ref, logits=True)
        assert abs(direct["logit_mse"] - r["logit_mse"]) <= 1e-5 * direct["logit_mse"]


def test_seed_curves_average_over_seeds(tmp_path):
    from qera.evaluate.plots import _mean_std, plot_seed_curves

    steps, mean, std = _mean_std([[(0, 1.0), (10, 3.0)], [(0, 3.0), (10, 5.0), (20, 9.0)]])
    assert steps == [0, 10] and mean == [2.0, 4.0] and std == [1.0, 1.0]  # step 20 is not in every run
    run = lambda s: {"initial": {"eval_f1": 0.5}, "history": [{"step": 5, "loss": 1.0 + s},  # noqa: E731
                                                             {"step": 5, "eval_f1": 0.6 + s}]}
    path = plot_seed_curves({"qlora": [run(0.0), run(0.1)]}, "f1", tmp_path / "c.png")
    assert path.stat().st_size > 1000


def test_classifier_finetune_is_reproducible_per_seed(tmp_path):
    """Same seed: the same classification head, data order and result; another seed differs."""
    d = tiny_bert_dir(tmp_path / "bert")
    rows = "".join(f"{'good fine' if i % 2 else 'bad awful'} {i}\t{i % 2}\n" for i in range(24))
    tsv = write(tmp_path / "train.tsv", "sentence\tlabel\n" + rows)

    def run(seed: int, name: str) -> dict:
        code = main(["finetune", str(d), "--task", "sst2", "--train", str(tsv), "--eval", str(tsv), "--init", "qera-approx",
                     "--format", "mxint4", "--rank", "4", "--calib-text", str(write(tmp_path / "c.txt", TEXT)),
                     "--calib-samples", "4", "--calib-seq-len", "32", "--epochs", "1", "--batch-size", "8",
                     "--seed", str(seed), "--out", str(tmp_path / name), "--no-progress"])
        assert code == 0
        return json.loads((tmp_path / name / "result.json").read_text())

    a, b, c = run(0, "a"), run(0, "b"), run(1, "c")
    losses = lambda r: [h["loss"] for h in r["history"] if "loss" in h and "eval_loss" not in h]  # noqa: E731
    assert a["initial"]["eval_loss"] == b["initial"]["eval_loss"] and losses(a) == losses(b)
    assert a["initial"]["eval_loss"] != c["initial"]["eval_loss"]
