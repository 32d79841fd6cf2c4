"""hf_isnet.metrics against hand-computed values."""

import json
import math

import numpy as np
import pytest
import torch

from hf_isnet.metrics import ShortcutReport, background_fraction, classification_metrics, compute_metrics


def test_accuracy_and_macro_f1_by_hand():
    # predictions 0, 0, 1, 2 for labels 0, 1, 1, 2:
    # class 0: P = 1/2, R = 1 -> F1 = 2/3; class 1: P = 1, R = 1/2 -> 2/3; class 2: 1.
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    out = classification_metrics(probs, torch.tensor([0, 1, 1, 2]))
    assert out["accuracy"] == pytest.approx(0.75)
    assert out["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert out["num_samples"] == 4


def test_logits_are_detected_and_softmaxed():
    logits = np.array([[3.0, -1.0, 0.5], [-2.0, 4.0, 0.0], [0.0, 1.0, 5.0]])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = [0, 1, 2]
    assert classification_metrics(logits, labels) == classification_metrics(probs, labels)
    assert classification_metrics(logits, labels, from_logits=True)["roc_auc_ovo"] == 1.0


def test_auc_perfect_and_chance():
    labels = np.array([0, 0, 1, 1, 2, 2])
    perfect = np.eye(3)[labels] * 0.7 + 0.1
    assert classification_metrics(perfect, labels)["roc_auc_ovo"] == pytest.approx(1.0)
    constant = np.full((6, 3), 1 / 3)
    assert classification_metrics(constant, labels)["roc_auc_ovo"] == pytest.approx(0.5)


def test_binary_auc_from_two_columns_and_one_logit():
    labels = np.array([0, 0, 1, 1])
    positive = np.array([0.1, 0.6, 0.4, 0.9])
    # positives {0.4, 0.9} vs negatives {0.1, 0.6}: 3 of 4 pairs ranked right -> AUC 0.75
    two_columns = np.stack([1 - positive, positive], axis=1)
    assert classification_metrics(two_columns, labels)["roc_auc_ovo"] == pytest.approx(0.75)
    assert classification_metrics(positive, labels)["roc_auc_ovo"] == pytest.approx(0.75)
    one_logit = np.log(positive / (1 - positive))[:, None]
    out = classification_metrics(one_logit, labels, from_logits=True)
    assert out["roc_auc_ovo"] == pytest.approx(0.75)
    assert out["accuracy"] == pytest.approx(0.5)  # predictions 0, 1, 0, 1


def test_auc_with_an_absent_class_and_single_class():
    # Class 2 never occurs: AUC over classes 0 and 1 (renormalised), still perfect; F1 counts class 2 as 0.
    probs = np.array([[0.5, 0.1, 0.4], [0.1, 0.5, 0.4]])
    out = classification_metrics(probs, [0, 1])
    assert out["roc_auc_ovo"] == pytest.approx(1.0)
    assert out["macro_f1"] == pytest.approx(2 / 3)
    assert math.isnan(classification_metrics(probs, [0, 0])["roc_auc_ovo"])


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="3 labels"):
        classification_metrics(np.zeros((2, 3)), [0, 1, 2])
    with pytest.raises(ValueError, match="num_classes is 4"):
        classification_metrics(np.zeros((2, 3)), [0, 1], num_classes=4)
    with pytest.raises(ValueError, match="labels must lie in 0..2"):
        classification_metrics(np.zeros((2, 3)), [0, 3])


def test_compute_metrics_for_trainer():
    logits = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    out = compute_metrics((logits, np.array([0, 1, 1])))
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert set(out) == {"accuracy", "macro_f1", "roc_auc_ovo"}
    assert compute_metrics(((logits, "extra"), np.array([0, 1, 1]))) == out


def test_background_fraction_by_hand():
    heatmaps = torch.zeros(2, 1, 2, 2)
    heatmaps[0, 0] = torch.tensor([[1.0, -3.0], [0.0, 0.0]])  # |R| = 4, 3 of it on the background
    heatmaps[1, 0] = torch.tensor([[2.0, 0.0], [0.0, 0.0]])  # all on the foreground
    masks = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).expand(2, 2, 2)
    assert background_fraction(heatmaps, masks) == pytest.approx((0.75 + 0.0) / 2)
    per_image = background_fraction(heatmaps, masks.bool().unsqueeze(1), reduction="none")
    assert torch.allclose(per_image, torch.tensor([0.75, 0.0]))


def test_background_fraction_sums_channels_and_skips_empty_heatmaps():
    heatmaps = torch.zeros(2, 3, 2, 2)
    heatmaps[0, :, 0, 0] = 1.0  # 3 on the foreground
    heatmaps[0, 0, 1, 1] = -1.0  # 1 on the background
    masks = torch.zeros(2, 1, 2, 2)
    masks[:, 0, 0, 0] = 1.0
    assert background_fraction(heatmaps, masks) == pytest.approx(0.25)  # image 1 is all zero: skipped
    assert torch.isnan(background_fraction(heatmaps, masks, reduction="none")[1])
    assert math.isnan(background_fraction(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)))


def test_background_fraction_errors():
    with pytest.raises(ValueError, match="divide"):
        background_fraction(torch.ones(1, 2, 2), torch.full((1, 2, 2), 255.0))
    with pytest.raises(ValueError, match="same N, H and W"):
        background_fraction(torch.ones(1, 2, 2), torch.ones(1, 3, 3))


def _report() -> ShortcutReport:
    report = ShortcutReport(title="Biased MNIST")
    report.add("standard", "iid", {"accuracy": 1.0, "macro_f1": 1.0, "roc_auc_ovo": 1.0})
    report.add("standard", "ood", {"accuracy": 0.654, "macro_f1": 0.6, "roc_auc_ovo": 0.9})
    report.add("standard", "test_deceiving", {"accuracy": 0.124, "macro_f1": 0.1, "roc_auc_ovo": 0.5})
    for version in ("iid", "ood", "deceiving"):
        report.add("dual", version, {"accuracy": 0.979, "macro_f1": 0.97, "roc_auc_ovo": 0.99}, 0.0421)
    return report


def test_report_table_holds_the_numbers():
    table = _report().to_table()
    assert "### Biased MNIST" in table
    assert "accuracy iid" in table and "background_fraction deceiving" in table
    standard = next(line for line in table.splitlines() if line.startswith("| standard"))
    for number in ("1.000", "0.654", "0.124"):
        assert number in standard
    assert "| -" in standard  # no background fraction recorded for it
    dual = next(line for line in table.splitlines() if line.startswith("| dual"))
    assert dual.count("0.979") == 3 and "0.042" in dual
    lines = table.splitlines()[2:]
    assert len({len(line) for line in lines}) == 1  # aligned columns


def test_report_add_replaces_and_validates():
    report = _report()
    report.add("standard", "iid", {"accuracy": 0.5})
    assert report.get("standard", "iid").metrics == {"accuracy": 0.5}
    assert report.models == ["standard", "dual"]
    with pytest.raises(ValueError, match="version must be one of"):
        report.add("standard", "validation", {"accuracy": 0.5})


def test_report_json_round_trip(tmp_path):
    report = _report()
    report.add("nan model", "iid", {"roc_auc_ovo": float("nan")})
    path = tmp_path / "report.json"
    report.to_json(path)
    assert json.loads(path.read_text())["title"] == "Biased MNIST"
    loaded = ShortcutReport.from_json(path)
    assert loaded.to_table() == report.to_table()
    assert loaded.get("dual", "ood").background_fraction == pytest.approx(0.0421)
    assert math.isnan(loaded.get("nan model", "iid").metrics["roc_auc_ovo"])
