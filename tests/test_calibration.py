"""hf_isnet.calibration: Welford statistics vs numpy, eq. (9)-(10), JSON round trip, calibrate()."""

import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from hf_isnet.calibration import (
    CalibrationEntry,
    RelevanceCalibration,
    WelfordAccumulator,
    calibrate,
    relevance_range,
)


def test_welford_matches_numpy_on_concatenation():
    rng = np.random.default_rng(0)
    acc = WelfordAccumulator()
    seen = {"input": [], "layer1": []}
    # uneven batch sizes, including a single-element batch and an empty one
    for size in (5, 1, 17, 0, 8, 33):
        for key, offset in (("input", 100.0), ("layer1", 3.0)):
            batch = offset + rng.normal(0, 2.5, size)
            seen[key].append(batch)
            acc.update(key, torch.from_numpy(batch))
    for key, batches in seen.items():
        all_values = np.concatenate(batches)
        assert acc.count(key) == all_values.size
        np.testing.assert_allclose(acc.mean(key), all_values.mean(), rtol=1e-12)
        np.testing.assert_allclose(acc.std(key), all_values.std(ddof=1), rtol=1e-12)
    assert acc.keys() == ["input", "layer1"]


def test_welford_is_stable_for_large_offsets():
    # values 1e8 + N(0, 2.5): a naive sum-of-squares variance loses every digit here (x^2 ~ 1e16);
    # compare with the exact statistics of the same float64 values (rational arithmetic)
    rng = np.random.default_rng(2)
    batches = [1e8 + rng.normal(0, 2.5, n) for n in (7, 64, 3, 26)]
    acc = WelfordAccumulator()
    for batch in batches:
        acc.update("input", torch.from_numpy(batch))
    values = [Fraction(float(v)) for v in np.concatenate(batches)]
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    np.testing.assert_allclose(acc.mean("input"), float(mean), rtol=1e-15)
    np.testing.assert_allclose(acc.std("input"), math.sqrt(float(var)), rtol=1e-8)


def test_welford_merge_equals_single_stream():
    rng = np.random.default_rng(1)
    values = rng.exponential(4.0, 40)
    whole, left, right = WelfordAccumulator(), WelfordAccumulator(), WelfordAccumulator()
    whole.update("input", torch.from_numpy(values))
    left.update("input", torch.from_numpy(values[:13]))
    right.update("input", torch.from_numpy(values[13:]))
    left.merge(right)
    assert left.count("input") == 40
    np.testing.assert_allclose(left.mean("input"), whole.mean("input"), rtol=1e-12)
    np.testing.assert_allclose(left.std("input"), whole.std("input"), rtol=1e-12)


def test_welford_errors():
    acc = WelfordAccumulator()
    with pytest.raises(KeyError, match="input"):
        acc.mean("input")
    acc.update("input", torch.tensor([1.0]))
    with pytest.raises(ValueError, match="at least 2"):
        acc.std("input")
    with pytest.raises(ValueError, match="1-D"):
        acc.update("input", torch.ones(2, 2))
    with pytest.raises(ValueError, match="non-finite"):
        acc.update("input", torch.tensor([1.0, float("inf")]))
    with pytest.raises(KeyError, match=r"\['input'\]"):
        acc.count("layer9")
    with pytest.raises(ValueError, match="no values"):
        WelfordAccumulator().result()


@pytest.mark.parametrize(
    ("mean", "std", "c1", "c2"),
    [
        # M - 3S = 10 - 3 = 7 > M/5 = 2 -> C1 = 7; 25*7 = 175 > M + 3S = 13 -> C2 = 13
        (10.0, 1.0, 7.0, 13.0),
        # M - 3S = 10 - 12 < M/5 = 2 -> C1 = 2; 25*2 = 50 > M + 3S = 22 -> C2 = 22
        (10.0, 4.0, 2.0, 22.0),
        # M - 3S < M/5 = 2 -> C1 = 2; 25*2 = 50 < M + 3S = 100 -> C2 = 50
        (10.0, 30.0, 2.0, 50.0),
        # S = 0: C1 = C2 = M
        (5.0, 0.0, 5.0, 5.0),
    ],
)
def test_relevance_range_branches(mean, std, c1, c2):
    got = relevance_range(mean, std)
    assert isinstance(got[0], float)
    assert got == pytest.approx((c1, c2))


def test_relevance_range_tensor_elementwise_and_validation():
    mean = torch.tensor([10.0, 10.0, 10.0], dtype=torch.float64)
    std = torch.tensor([1.0, 4.0, 30.0], dtype=torch.float64)
    c1, c2 = relevance_range(mean, std)
    torch.testing.assert_close(c1, torch.tensor([7.0, 2.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(c2, torch.tensor([13.0, 22.0, 50.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="mean > 0"):
        relevance_range(0.0, 1.0)
    with pytest.raises(ValueError, match="std >= 0"):
        relevance_range(torch.tensor([1.0]), torch.tensor([-1.0]))


def test_result_and_json_round_trip(tmp_path):
    acc = WelfordAccumulator()
    acc.update("input/epsilon", torch.tensor([9.0, 10.0, 11.0]))  # M = 10, S = 1
    acc.update("input/zplus", torch.tensor([0.1, 0.2, 0.3]) / 3)
    cal = acc.result(variant="dual", notes="unit test")
    assert cal["input/epsilon"] == pytest.approx((7.0, 13.0))
    entry = cal.entries["input/epsilon"]
    assert (entry.mean, entry.std, entry.count) == pytest.approx((10.0, 1.0, 3))
    assert cal.metadata == {"variant": "dual", "notes": "unit test"}
    assert cal.keys() == ["input/epsilon", "input/zplus"]
    assert "input/zplus" in cal and len(cal) == 2

    path = tmp_path / "relevance_calibration.json"
    cal.to_json(path)
    loaded = RelevanceCalibration.from_json(path)
    assert loaded == cal  # exact: JSON floats round-trip
    assert loaded.ranges() == cal.ranges()
    assert json.loads(path.read_text())["format"] == "hf_isnet.relevance_calibration"
    assert RelevanceCalibration.from_dict(cal.to_dict()) == cal

    with pytest.raises(KeyError, match=r"input/epsilon.*input/zplus"):
        cal["layer1"]
    with pytest.raises(ValueError, match="format"):
        RelevanceCalibration.from_dict({"entries": {}})
    with pytest.raises(ValueError, match="0 < c1 <= c2"):
        CalibrationEntry(c1=2.0, c2=1.0, mean=1.0, std=0.0, count=2)


def test_calibrate_with_fake_heatmap_fn():
    torch.manual_seed(0)
    # a "dataloader" of 4 batches of 3 images; the fake heatmaps are the images themselves (input,
    # [B, 3, 4, 4]) and a coarser map (layer1, [B, 8, 2, 2]) with a known scale
    loader = [torch.randn(3, 3, 4, 4) for _ in range(4)]

    def heatmap_fn(batch):
        return {"input": batch, "layer1": 2 * batch.reshape(3, 8, 2, 3)[..., :2]}

    cal = calibrate(heatmap_fn, loader, metadata={"variant": "selective"})
    totals = torch.cat([b.abs().flatten(1).sum(1) for b in loader]).double().numpy()
    assert cal.entries["input"].count == 12
    np.testing.assert_allclose(cal.entries["input"].mean, totals.mean(), rtol=1e-6)
    np.testing.assert_allclose(cal.entries["input"].std, totals.std(ddof=1), rtol=1e-6)
    expected = relevance_range(float(totals.mean()), float(totals.std(ddof=1)))
    np.testing.assert_allclose(cal["input"], expected, rtol=1e-6)
    layer_totals = torch.cat([2 * b.reshape(3, 8, 2, 3)[..., :2].abs().flatten(1).sum(1) for b in loader])
    np.testing.assert_allclose(cal.entries["layer1"].mean, layer_totals.double().mean().item(), rtol=1e-6)
    assert cal.metadata == {"variant": "selective"}

    # max_batches stops early without touching the rest of the iterable
    calls = []

    def counting_fn(batch):
        calls.append(1)
        return {"input": batch}

    cal2 = calibrate(counting_fn, iter(loader), max_batches=2, progress=True)
    assert len(calls) == 2 and cal2.entries["input"].count == 6
    assert math.isclose(cal2.entries["input"].mean, float(totals[:6].mean()), rel_tol=1e-6)


def test_calibrate_errors():
    batch = torch.ones(2, 3)
    with pytest.raises(ValueError, match="no batches"):
        calibrate(lambda b: {"input": b}, [])
    with pytest.raises(ValueError, match="same maps"):
        keys = iter([["input"], ["input", "layer1"]])
        calibrate(lambda b: dict.fromkeys(next(keys), b), [batch, batch])
    with pytest.raises(ValueError, match=r"\[B, \.\.\.\]"):
        calibrate(lambda b: {"input": b[0]}, [batch])
    with pytest.raises(ValueError, match="max_batches"):
        calibrate(lambda b: {"input": b}, [batch], max_batches=0)
