"""Fine-tuning with the Hugging Face Trainer: GLUE-format classification/regression and causal LM.

The model passed in is usually a QPEFT model (:func:`qera.finetune.qpeft.prepare_qpeft_model`); a plain
PEFT LoRA model gives the 16-bit reference. Training logs (loss, eval metric per evaluation) are
returned and written as JSON; curves are drawn by :mod:`qera.evaluate.plots`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from qera.util.errors import QeraError
from qera.evaluate.glue import TASKS, Example

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    lr: float = 3e-4
    epochs: float = 3.0
    batch_size: int = 16
    max_length: int = 128
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    eval_steps: int | None = None  # None: evaluate once per epoch
    logging_steps: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.epochs <= 0 or self.batch_size < 1 or self.max_length < 8:
            raise QeraError("need lr > 0, epochs > 0, batch_size >= 1 and max_length >= 8")


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def _encode(tokenizer, examples: Sequence[Example], max_length: int, regression: bool) -> _ListDataset:
    a = [e.text_a for e in examples]
    b = [e.text_b for e in examples] if examples[0].text_b is not None else None
    enc = tokenizer(a, b, truncation=True, max_length=max_length)
    rows = []
    for i, e in enumerate(examples):
        row = {k: enc[k][i] for k in enc.keys()}
        row["labels"] = float(e.label) if regression else int(e.label)
        rows.append(row)
    return _ListDataset(rows)


def _args(cfg: TrainConfig, out_dir: Path, progress: bool, steps_per_epoch: int):
    from transformers import TrainingArguments

    strategy = "steps" if cfg.eval_steps else "epoch"
    logging_steps = max(1, min(cfg.logging_steps, steps_per_epoch))
    return TrainingArguments(
        output_dir=str(out_dir / "trainer"), learning_rate=cfg.lr, num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=max(cfg.batch_size, 32),
        warmup_steps=int(cfg.warmup_ratio * cfg.epochs * steps_per_epoch), weight_decay=cfg.weight_decay,
        eval_strategy=strategy, eval_steps=cfg.eval_steps, logging_steps=logging_steps,
        save_strategy="no", report_to=[], seed=cfg.seed, data_seed=cfg.seed, use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not progress, remove_unused_columns=False, dataloader_num_workers=0,
    )


def _history(trainer) -> list[dict]:
    return [dict(h) for h in trainer.state.log_history]


def finetune_classifier(
    model, tokenizer, task: str, train: Sequence[Example], evaluation: Sequence[Example],
    cfg: TrainConfig, out_dir: str | Path, progress: bool = True,
) -> dict:
    """Train on ``train``, evaluate on ``evaluation`` every epoch; returns history and final metrics."""
    from transformers import DataCollatorWithPadding, Trainer

    spec = TASKS.get(task)
    out_dir = Path(out_dir)
    train_ds = _encode(tokenizer, train, cfg.max_length, spec.is_regression)
    eval_ds = _encode(tokenizer, evaluation, cfg.max_length, spec.is_regression)

    def metrics(p):
        preds, labels = p.predictions, p.label_ids
        preds = preds[0] if isinstance(preds, tuple) else preds
        return spec.metric(np.asarray(preds), np.asarray(labels))

    steps = math.ceil(len(train_ds) / cfg.batch_size)
    trainer = Trainer(model=model, args=_args(cfg, out_dir, progress, steps), train_dataset=train_ds,
                      eval_dataset=eval_ds, data_collator=DataCollatorWithPadding(tokenizer),
                      compute_metrics=metrics)
    before = trainer.evaluate()  # step 0: where the initializations differ
    trainer.train()
    final = trainer.evaluate()
    history = _history(trainer)
    return {"task": task, "metric": spec.main_metric, "initial": before, "final": final, "history": history,
            "train_examples": len(train_ds), "eval_examples": len(eval_ds), "config": asdict(cfg)}


def finetune_causal_lm(
    model, tokenizer, train_ids: torch.Tensor, eval_ids: torch.Tensor, cfg: TrainConfig,
    out_dir: str | Path, progress: bool = True,
) -> dict:
    """Causal LM on fixed windows ``(n, L)`` of token ids; the eval metric is perplexity = exp(eval loss)."""
    from transformers import Trainer, default_data_collator

    out_dir = Path(out_dir)

    def rows(ids):
        return _ListDataset([{"input_ids": w, "attention_mask": torch.ones_like(w), "labels": w.clone()} for w in ids])

    train_ds, eval_ds = rows(train_ids), rows(eval_ids)
    steps = math.ceil(len(train_ds) / cfg.batch_size)

    class _PPLTrainer(Trainer):
        def evaluate(self, *a, **k):
            out = super().evaluate(*a, **k)
            out["eval_perplexity"] = math.exp(out["eval_loss"])
            self.log({"eval_perplexity": out["eval_perplexity"]})
            return out

    trainer = _PPLTrainer(model=model, args=_args(cfg, out_dir, progress, steps), train_dataset=train_ds,
                          eval_dataset=eval_ds, data_collator=default_data_collator)
    before = trainer.evaluate()
    trainer.train()
    final = trainer.evaluate()
    history = _history(trainer)
    for h in history:  # merge the separately logged perplexity into the eval rows
        if "eval_loss" in h and "eval_perplexity" not in h:
            h["eval_perplexity"] = math.exp(h["eval_loss"])
    return {"task": "clm", "metric": "perplexity", "initial": before, "final": final, "history": history,
            "train_windows": len(train_ds), "eval_windows": len(eval_ds), "config": asdict(cfg)}


def write_result(result: dict, path: str | Path) -> Path:
    """Write a JSON result atomically (a reader never sees half a file)."""
    from qera.util.atomic import write_json

    return write_json(path, result)
