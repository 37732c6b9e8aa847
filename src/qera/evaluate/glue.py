"""GLUE-format task readers (SST-2, MRPC in the MSR paraphrase release, STS-B) and their metrics."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from qera.util.registry import Registry
from qera.util.errors import QeraError


@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: str | None
    label: float


@dataclass(frozen=True)
class TaskSpec:
    """A task: its columns, label set (None = regression), metrics and the headline metric."""

    name: str
    text_a: str
    text_b: str | None
    label: str
    labels: tuple[str, ...] | None
    metric: Callable[[np.ndarray, np.ndarray], dict[str, float]]
    main_metric: str

    @property
    def num_labels(self) -> int:
        return len(self.labels) if self.labels else 1

    @property
    def is_regression(self) -> bool:
        return self.labels is None


TASKS: Registry[TaskSpec] = Registry("task")


def _rank(x: np.ndarray) -> np.ndarray:
    order = x.argsort(kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x))
    # average ranks of ties
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return (sums / counts)[inv]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else 0.0


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    pred = logits.argmax(-1)
    out = {"accuracy": float((pred == labels).mean())}
    if logits.shape[-1] == 2:
        tp = float(((pred == 1) & (labels == 1)).sum())
        fp = float(((pred == 1) & (labels == 0)).sum())
        fn = float(((pred == 0) & (labels == 1)).sum())
        out["f1"] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return out


def regression_metrics(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    p = preds.reshape(-1).astype(np.float64)
    y = labels.reshape(-1).astype(np.float64)
    pearson, spearman = _pearson(p, y), _pearson(_rank(p), _rank(y))
    return {"pearson": pearson, "spearman": spearman, "corr": (pearson + spearman) / 2}


for spec in (
    TaskSpec("sst2", "sentence", None, "label", ("0", "1"), classification_metrics, "accuracy"),
    TaskSpec("mrpc", "#1 String", "#2 String", "Quality", ("0", "1"), classification_metrics, "f1"),
    TaskSpec("stsb", "sentence1", "sentence2", "score", None, regression_metrics, "corr"),
):
    TASKS.register(spec.name)(spec)


def read_task(task: str, path: str | Path, max_samples: int | None = None, seed: int = 0) -> list[Example]:
    """Read a GLUE-format TSV; every problem (missing column, unknown label, bad score) names the line."""
    spec = TASKS.get(task)
    path = Path(path)
    if not path.is_file():
        raise QeraError(f"{task}: file not found: {path}")
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            header = next(reader)
        except StopIteration:
            raise QeraError(f"{task}: {path} is empty") from None
        cols = [c.strip() for c in header]
        need = [c for c in (spec.text_a, spec.text_b, spec.label) if c]
        missing = [c for c in need if c not in cols]
        if missing:
            raise QeraError(f"{task}: {path} lacks column(s) {missing}; header has {cols}")
        ia, il = cols.index(spec.text_a), cols.index(spec.label)
        ib = cols.index(spec.text_b) if spec.text_b else None
        out = []
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) < len(cols):
                raise QeraError(f"{task}: {path}:{lineno} has {len(row)} fields, expected {len(cols)}")
            raw = row[il].strip()
            if spec.labels is not None:
                if raw not in spec.labels:
                    raise QeraError(f"{task}: {path}:{lineno} has label {raw!r}; allowed: {list(spec.labels)}")
                label = float(spec.labels.index(raw))
            else:
                try:
                    label = float(raw)
                except ValueError:
                    raise QeraError(f"{task}: {path}:{lineno} has a non-numeric score {raw!r}") from None
                if not 0.0 <= label <= 5.0:
                    raise QeraError(f"{task}: {path}:{lineno} has score {label}; allowed range 0..5")
            out.append(Example(row[ia], row[ib] if ib is not None else None, label))
    if not out:
        raise QeraError(f"{task}: {path} has no examples")
    if max_samples is not None and len(out) > max_samples:
        rng = np.random.default_rng(seed)
        out = [out[i] for i in sorted(rng.choice(len(out), max_samples, replace=False))]
    return out
