"""Shortcut evaluation of a trained classifier: the three test versions side by side, and heatmap figures.

    report = shortcut_report(trainer, {"iid": ds["test_iid"], "ood": ds["test_ood"],
                                       "deceiving": ds["test_deceiving"]}, model_name="selective")
    print(report.to_table()); report.to_json("out/shortcut.json")
    heatmap_figure(trainer, ds["test_deceiving"], "out/heatmaps.png")
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from .lrp import explain
from .metrics import ShortcutReport, background_fraction, classification_metrics
from .trainer import ISNetTrainer, _timm_model


def _batch(trainer: ISNetTrainer, dataset, n: int) -> dict[str, torch.Tensor]:
    rows = [dataset[i] for i in range(min(n, len(dataset)))]
    return trainer._eval_collator(rows)


def heatmaps(trainer: ISNetTrainer, dataset, n: int = 8, target="predicted") -> tuple[torch.Tensor, ...]:
    """``(pixel_values, heatmaps, masks or None, explained classes)`` of the first ``n`` rows (eval mode,
    LRP-epsilon with the run's eps and first-layer rule)."""
    batch = _batch(trainer, dataset, n)
    model = _timm_model(trainer.model)
    model.eval()
    obj = trainer.objective
    pv = batch["pixel_values"].to(trainer.args.device)
    e = explain(model, pv, target=target, eps=obj.lrp_eps, first_layer=obj.first_layer,
                input_bounds=obj.input_bounds)
    return pv.cpu(), e.heatmap.cpu(), batch.get("masks"), e.targets.cpu()


def shortcut_report(
    trainer: ISNetTrainer,
    test_sets: Mapping[str, object],
    model_name: str | None = None,
    report: ShortcutReport | None = None,
    heatmap_samples: int = 64,
) -> ShortcutReport:
    """Accuracy, macro F1 and macro one-vs-one AUC on each test version (``"iid"``, ``"ood"``,
    ``"deceiving"``), plus the background-relevance fraction of LRP-epsilon maps of the predicted class on
    the first ``heatmap_samples`` images of each (when the set has masks)."""
    report = report or ShortcutReport()
    name = model_name or trainer.args.variant
    for version, dataset in test_sets.items():
        pred = trainer.predict(dataset, metric_key_prefix=f"test_{version.removeprefix('test_')}")
        metrics = classification_metrics(pred.predictions, pred.label_ids)
        frac = None
        if heatmap_samples:
            _, heat, masks, _ = heatmaps(trainer, dataset, heatmap_samples)
            if masks is not None:
                frac = background_fraction(heat, masks)
        report.add(name, version, metrics, background_fraction=frac)
    return report


def heatmap_figure(trainer: ISNetTrainer, dataset, path: str | os.PathLike, n: int = 8, title: str | None = None):
    """Save images beside their LRP-epsilon heatmaps (predicted class) as a PNG; returns the figure."""
    from .viz import plot_heatmaps

    pv, heat, masks, targets = heatmaps(trainer, dataset, n)
    cfg = trainer._data_config
    labels = _timm_model(trainer.model).pretrained_cfg.get("label_names")
    titles = [f"pred: {labels[int(t)] if labels else int(t)}" for t in targets]
    return plot_heatmaps(pv, heat, masks=masks, titles=titles, path=path, mean=cfg.get("mean"), std=cfg.get("std"))
