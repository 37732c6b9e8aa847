"""lm-eval-harness on a model in memory (quantized or not), with a local text task that needs no hub.

``run_harness`` wraps the model object in lm-eval's ``HFLM`` (nothing is re-loaded from disk) and
runs any task lm-eval knows by name (ARC, BoolQ, PIQA, Winogrande, HellaSwag, WikiText … where the
hub is reachable), task YAMLs from ``include_path``, and ``qera_text``: rolling log-likelihood over
documents of a plain-text file, written as a JSON-lines data set plus a task YAML in a temporary
folder. Needs the optional extra: ``pip install 'qera[eval]'``.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from qera.util.errors import QeraError

log = logging.getLogger(__name__)

TEXT_TASK = "qera_text"
TEXT_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def split_documents(text: str, min_chars: int = 4000) -> list[str]:
    """Cut ``text`` at paragraph breaks (blank lines) into documents of at least ``min_chars``
    characters (the last may be shorter); each is stripped, empty ones dropped."""
    if min_chars < 1:
        raise QeraError(f"min_chars must be >= 1, got {min_chars}")
    docs, start = [], 0
    for m in re.finditer(r"\n[ \t]*\n", text):
        if m.start() - start >= min_chars:
            docs.append(text[start:m.start()])
            start = m.end()
    docs.append(text[start:])
    return [d.strip() for d in docs if d.strip()]


def write_text_task(docs: list[str], folder: Path) -> Path:
    """``folder/qera_text.yaml`` + ``folder/qera_text.jsonl``: a ``loglikelihood_rolling`` task over ``docs``."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{TEXT_TASK}.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    metrics = "".join(f"  - metric: {m}\n" for m in TEXT_METRICS)
    yaml = (f"task: {TEXT_TASK}\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data.resolve()))}\n"
            f"  cache_dir: {json.dumps(str((folder / 'cache').resolve()))}\n"  # gone with the folder
            "test_split: test\n"
            "output_type: loglikelihood_rolling\n"
            'doc_to_text: ""\n'
            'doc_to_target: "{{text}}"\n'
            f"metric_list:\n{metrics}"
            "metadata:\n  version: 1.0\n")
    path = folder / f"{TEXT_TASK}.yaml"
    path.write_text(yaml, encoding="utf-8")
    return path


@dataclass
class HarnessResult:
    """lm-eval's results (``results``: task → metric → value) and its own rendering of them."""

    results: dict
    table: str
    settings: dict = field(default_factory=dict)

    def metric(self, task: str, name: str) -> float:
        """``name`` of ``task`` (lm-eval keys metrics as ``"name,filter"``)."""
        row = self.results.get(task)
        if row is None:
            raise QeraError(f"task {task!r} not in the results; have {sorted(self.results)}")
        for key, value in row.items():
            if key.split(",")[0] == name:
                return float(value)
        raise QeraError(f"task {task!r} has no metric {name!r}; have {sorted(row)}")


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table
    except ImportError as exc:
        raise QeraError(f"lm-eval-harness is not installed ({exc}); install the extra: pip install 'qera[eval]'") from None
    return lm_eval, HFLM, TaskManager, make_table


def lm_eval_settings(tokenizer, max_length: int) -> dict:
    """How documents are tokenized and windowed, the same for lm-eval and :func:`qera.evaluate.perplexity.rolling_loglikelihood`.

    BOS is added where the tokenizer adds it (as qera's own evaluation does); the token before each
    document is BOS, else EOS (lm-eval's default).
    """
    from qera.io.data import bos_id

    add_bos = bos_id(tokenizer) is not None
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is None:
        raise QeraError("the tokenizer has neither a BOS nor an EOS token to start a document with")
    return {"add_bos": add_bos, "prefix": int(prefix), "max_length": int(max_length)}


def _task_manager(TaskManager, paths: list[str], tasks: list[str]):
    """Index only the local task folders when they hold every task asked for (lm-eval's own index
    of several thousand YAMLs takes seconds), else local folders first, then lm-eval's."""
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=paths or None)


def run_harness(model, tokenizer, tasks: list[str], *, text_docs: list[str] | None = None,
                include_path: str | None = None, limit: int | float | None = None, batch_size: int = 1,
                max_length: int = 2048, num_fewshot: int | None = None, seed: int = 0) -> HarnessResult:
    """Run lm-eval ``tasks`` in-process on ``model`` (any ``PreTrainedModel``, e.g. qera-quantized).

    ``qera_text`` among ``tasks`` needs ``text_docs``. ``limit`` caps the documents per task (a
    fraction below 1 is a share). Raises :class:`QeraError` naming unknown tasks before any work.
    """
    lm_eval, HFLM, TaskManager, make_table = _import_lm_eval()
    if not tasks:
        raise QeraError("no tasks given")
    settings = lm_eval_settings(tokenizer, max_length)
    with tempfile.TemporaryDirectory(prefix="qera-lmeval-") as tmp:
        paths = [p for p in (include_path,) if p]
        if TEXT_TASK in tasks:
            if not text_docs:
                raise QeraError(f"task {TEXT_TASK} needs documents: pass an evaluation text")
            write_text_task(text_docs, Path(tmp))
            paths.append(tmp)
        manager = _task_manager(TaskManager, paths, tasks)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise QeraError(f"unknown lm-eval task(s) {unknown}; local YAMLs go in --include-path, and "
                            f"{TEXT_TASK} evaluates the evaluation text")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                  add_bos_token=settings["add_bos"], prefix_token_id=settings["prefix"])
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                                      task_manager=manager, log_samples=False, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    if out is None:
        raise QeraError("lm-eval returned no results")
    return HarnessResult(results=out["results"], table=make_table(out), settings=settings)
