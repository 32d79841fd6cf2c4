"""Shortcut metrics, all computed locally (``evaluate.load`` would need the network).

- :func:`classification_metrics`: accuracy, macro F1 and macro one-vs-one ROC-AUC (the paper's metric on
  Stanford Dogs) from logits or probabilities.
- :func:`compute_metrics`: the same, in the form ``transformers.Trainer(compute_metrics=...)`` expects.
- :func:`background_fraction`: the share of absolute heatmap relevance that falls outside the masks.
- :class:`ShortcutReport`: results per model and test version (i.i.d., o.o.d., deceiving), as a table
  or JSON.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

VERSIONS = ("iid", "ood", "deceiving")
DEFAULT_TABLE_METRICS = ("accuracy", "macro_f1", "roc_auc_ovo")


def _to_numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().float().numpy() if values.is_floating_point() else values.cpu().numpy()
    return np.asarray(values)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _is_probabilities(scores: np.ndarray) -> bool:
    if scores.ndim == 1:
        return bool(((scores >= 0) & (scores <= 1)).all())
    return bool(((scores >= 0) & (scores <= 1)).all() and np.allclose(scores.sum(axis=1), 1.0, atol=1e-4))


def classification_metrics(
    logits_or_probs: Any,
    labels: Any,
    num_classes: int | None = None,
    from_logits: bool | None = None,
) -> dict[str, float]:
    """Accuracy, macro F1 and macro one-vs-one ROC-AUC of a classifier's scores.

    Args:
        logits_or_probs: scores (N, C) as logits or probabilities (tensor, array or list). For two classes
            also (N,) or (N, 1): the positive class's logit or probability.
        labels: true class indices (N,).
        num_classes: number of classes C (default: the width of the scores, or 2 for one column); a class
            absent from ``labels`` still counts in the macro F1.
        from_logits: whether the scores are logits (softmax / sigmoid applied); default: probabilities when
            every row lies in [0, 1] and sums to 1 (one column: every value in [0, 1]), else logits.

    Returns:
        ``{"accuracy", "macro_f1", "roc_auc_ovo", "num_samples"}``. The AUC is sklearn's
        ``roc_auc_score(multi_class="ovo", average="macro")`` over the classes present in ``labels`` (the
        probabilities renormalised over them); for two classes the ordinary ROC-AUC; NaN when ``labels``
        hold fewer than two classes.
    """
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    scores = _to_numpy(logits_or_probs).astype(np.float64)
    y = _to_numpy(labels).astype(np.int64).reshape(-1)
    if scores.ndim == 2 and scores.shape[1] == 1:
        scores = scores[:, 0]
    if scores.ndim not in (1, 2) or scores.shape[0] != y.shape[0]:
        raise ValueError(
            f"scores have shape {scores.shape} but there are {y.shape[0]} labels; want (N, C) or (N,)"
        )
    width = 2 if scores.ndim == 1 else scores.shape[1]
    num_classes = width if num_classes is None else num_classes
    if num_classes != width:
        raise ValueError(
            f"num_classes is {num_classes} but the scores have {width} classes (shape {scores.shape})"
        )
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {y.min()}..{y.max()}")
    logits = (not _is_probabilities(scores)) if from_logits is None else from_logits
    if scores.ndim == 1:
        positive = 1.0 / (1.0 + np.exp(-scores)) if logits else scores
        probs = np.stack([1.0 - positive, positive], axis=1)
    else:
        probs = _softmax(scores) if logits else scores
    predictions = probs.argmax(axis=1)
    classes = list(range(num_classes))
    present = np.unique(y)
    if len(present) < 2:
        auc = math.nan
    elif len(present) == 2:
        # Binary AUC between the two present classes, from their renormalised probabilities.
        pair = probs[:, present]
        auc = roc_auc_score(y == present[1], pair[:, 1] / np.clip(pair.sum(axis=1), 1e-12, None))
    else:
        kept = probs[:, present]
        kept = kept / np.clip(kept.sum(axis=1, keepdims=True), 1e-12, None)
        auc = roc_auc_score(y, kept, multi_class="ovo", average="macro", labels=present)
    return {
        "accuracy": float(accuracy_score(y, predictions)),
        "macro_f1": float(f1_score(y, predictions, labels=classes, average="macro", zero_division=0)),
        "roc_auc_ovo": float(auc),
        "num_samples": int(y.shape[0]),
    }


def compute_metrics(eval_prediction: Any) -> dict[str, float]:
    """:func:`classification_metrics` for ``transformers.Trainer(compute_metrics=compute_metrics)``.

    Takes an ``EvalPrediction`` (or a ``(predictions, label_ids)`` pair); when the model returns a tuple,
    the first element is taken as the logits.
    """
    predictions, label_ids = eval_prediction[0], eval_prediction[1]
    if isinstance(predictions, tuple | list):
        predictions = predictions[0]
    metrics = classification_metrics(predictions, label_ids, from_logits=True)
    metrics.pop("num_samples")
    return metrics


def background_fraction(
    heatmaps: torch.Tensor, masks: torch.Tensor, reduction: str = "mean"
) -> float | torch.Tensor:
    """Fraction of absolute relevance on the background: ``sum |R| (1 - M) / sum |R|`` per image.

    Args:
        heatmaps: relevance (N, C, H, W) or (N, H, W); channels are summed after taking |R|.
        masks: foreground masks (N, 1, H, W), (N, H, W) or (N, C, H, W): bool, or floats in [0, 1]
            (1 = foreground; soft values weight the pixel).
        reduction: ``"mean"`` -> the mean over images with non-zero relevance, as a float (NaN when every
            heatmap is zero); ``"none"`` -> a tensor (N,) with NaN for all-zero heatmaps.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    relevance = heatmaps.detach().abs().double()
    if relevance.dim() == 3:
        relevance = relevance.unsqueeze(1)
    if relevance.dim() != 4:
        raise ValueError(f"heatmaps must be (N, C, H, W) or (N, H, W), got shape {tuple(heatmaps.shape)}")
    mask = masks.detach()
    if mask.dtype != torch.bool and (mask.min() < 0 or mask.max() > 1):
        raise ValueError(
            f"masks must be bool or in [0, 1], got values in [{mask.min().item()}, {mask.max().item()}] "
            "(divide {0, 255} masks by 255)"
        )
    mask = mask.double()
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.shape[0] != relevance.shape[0] or mask.shape[-2:] != relevance.shape[-2:]:
        raise ValueError(
            f"masks have shape {tuple(masks.shape)} but heatmaps are {tuple(heatmaps.shape)}: "
            "want the same N, H and W"
        )
    background = (relevance * (1.0 - mask)).sum(dim=(1, 2, 3))
    total = relevance.sum(dim=(1, 2, 3))
    fractions = torch.where(total > 0, background / total.clamp_min(torch.finfo(total.dtype).tiny), torch.nan)
    if reduction == "none":
        return fractions.float()
    valid = fractions[~fractions.isnan()]
    return float(valid.mean()) if valid.numel() else math.nan


@dataclass
class ShortcutEntry:
    """One model's results on one test version."""

    model: str
    version: str
    metrics: dict[str, float]
    background_fraction: float | None = None


@dataclass
class ShortcutReport:
    """Results per model (or variant) and test version, the Faster ISNet paper's shortcut evaluation.

    Example::

        report = ShortcutReport(title="Biased MNIST, ResNet18")
        for version in ("iid", "ood", "deceiving"):
            report.add("dual", version, classification_metrics(logits, labels), background_fraction=0.04)
        print(report.to_table())
        report.to_json("results/shortcut.json")

    A model's entries keep the order models were first added; adding the same (model, version) again
    replaces the entry.
    """

    title: str = ""
    entries: list[ShortcutEntry] = field(default_factory=list)

    def add(
        self,
        model: str,
        version: str,
        metrics: dict[str, Any],
        background_fraction: float | None = None,
    ) -> None:
        """Record ``metrics`` (e.g. from :func:`classification_metrics`) of ``model`` on ``version``.

        ``version`` is ``"iid"``, ``"ood"`` or ``"deceiving"`` (``"test_iid"`` etc. are accepted, matching
        the data sets' split names).
        """
        version = version.removeprefix("test_")
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS} (or test_<version>), got {version!r}")
        values = {name: float(value) for name, value in metrics.items()}
        fraction = None if background_fraction is None else float(background_fraction)
        self.entries = [e for e in self.entries if (e.model, e.version) != (model, version)]
        self.entries.append(ShortcutEntry(model, version, values, fraction))

    @property
    def models(self) -> list[str]:
        """Model names in the order they were first added."""
        return list(dict.fromkeys(entry.model for entry in self.entries))

    def get(self, model: str, version: str) -> ShortcutEntry | None:
        """The entry of ``model`` on ``version``, or None."""
        version = version.removeprefix("test_")
        return next((e for e in self.entries if (e.model, e.version) == (model, version)), None)

    def to_table(self, metrics: Sequence[str] = DEFAULT_TABLE_METRICS, digits: int = 3) -> str:
        """A markdown table (aligned, so it also reads as plain text): one row per model, one column per
        metric and test version, plus the background-relevance fraction where any was recorded.

        Metrics no entry has are left out; a missing value prints as "-".
        """
        present = [m for m in metrics if any(m in e.metrics for e in self.entries)]
        columns: list[tuple[str, str]] = [(m, v) for m in present for v in VERSIONS]
        if any(e.background_fraction is not None for e in self.entries):
            columns += [("background_fraction", v) for v in VERSIONS]

        def cell(model: str, metric: str, version: str) -> str:
            entry = self.get(model, version)
            if entry is None:
                return "-"
            value = (
                entry.background_fraction if metric == "background_fraction" else entry.metrics.get(metric)
            )
            return "-" if value is None else f"{value:.{digits}f}"

        header = ["model"] + [f"{metric} {version}" for metric, version in columns]
        rows = [[model] + [cell(model, *column) for column in columns] for model in self.models]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

        def line(row: list[str]) -> str:
            return (
                "| " + " | ".join(text.ljust(width) for text, width in zip(row, widths, strict=True)) + " |"
            )

        lines = [line(header), "|" + "|".join("-" * (width + 2) for width in widths) + "|"]
        lines += [line(row) for row in rows]
        return "\n".join(([f"### {self.title}", ""] if self.title else []) + lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``{"title": ..., "entries": [{"model", "version", "metrics", ...}]}``."""
        return {"title": self.title, "entries": [asdict(entry) for entry in self.entries]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShortcutReport:
        """Inverse of :meth:`to_dict`."""
        report = cls(title=data.get("title", ""))
        for entry in data["entries"]:
            report.add(entry["model"], entry["version"], entry["metrics"], entry.get("background_fraction"))
        return report

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the report as JSON (NaN written as ``NaN``, which Python's json reads back)."""
        with open(path, "w") as handle:
            json.dump(self.to_dict(), handle, indent=2)
            handle.write("\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ShortcutReport:
        """Read a report written by :meth:`to_json`."""
        with open(path) as handle:
            return cls.from_dict(json.load(handle))
