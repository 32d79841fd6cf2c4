"""Biased MNIST: the bias never touches a mask, the test versions differ only in the bias, builds are
seeded and cached."""

import numpy as np
import pytest

from hf_isnet.data import biased_mnist
from hf_isnet.data.biased_mnist import build_biased_mnist, load_biased_mnist, patch_positions

SIZES = dict(seed=0, train_size=300, validation_size=50, test_size=200)
SPLITS = ("train", "validation", "test_iid", "test_ood", "test_deceiving")


def arrays(split) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images = np.stack([np.asarray(image) for image in split["image"]])
    masks = np.stack([np.asarray(mask) for mask in split["mask"]])
    return images, masks, np.asarray(split["label"])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_isnet_cache")


@pytest.fixture(scope="module")
def data(cache):
    dataset = load_biased_mnist(cache_dir=cache, **SIZES)
    return {name: arrays(dataset[name]) for name in SPLITS}


def patch_box(label: int, size: int = 32, patch: int = 2) -> np.ndarray:
    box = np.zeros((size, size), dtype=bool)
    row, col = patch_positions(size, patch)[label]
    box[row : row + patch, col : col + patch] = True
    return box


def bias_class(image: np.ndarray, mask: np.ndarray) -> int:
    """The class whose patch (and nothing else) is lit in the background; -1 for an empty background."""
    background = (image > 0) & (mask == 0)
    if not background.any():
        return -1
    matches = [k for k in range(10) if np.array_equal(background, patch_box(k))]
    assert len(matches) == 1, "the background holds something other than one bias patch"
    return matches[0]


def test_splits_columns_and_formats(cache):
    dataset = load_biased_mnist(cache_dir=cache, **SIZES)
    assert set(dataset) == set(SPLITS)
    assert [dataset[name].num_rows for name in SPLITS] == [300, 50, 200, 200, 200]
    features = dataset["train"].features
    assert features["label"].names == [str(d) for d in range(10)]
    example = dataset["test_iid"][0]
    assert example["image"].mode == "L" and example["image"].size == (32, 32)
    assert example["mask"].mode == "L" and example["mask"].size == (32, 32)


def test_patch_positions_are_distinct_and_in_the_border():
    positions = patch_positions(32, 2)
    assert len(set(positions)) == 10
    boxes = [patch_box(k) for k in range(10)]
    assert sum(box.sum() for box in boxes) == np.logical_or.reduce(boxes).sum() == 40  # no overlaps
    frame = np.zeros((32, 32), dtype=bool)
    frame[2:30, 2:30] = True
    assert not (np.logical_or.reduce(boxes) & frame).any()
    with pytest.raises(ValueError, match="padding"):
        build_biased_mnist(train_size=10, test_size=10, padding=2, patch_size=3)


def test_masks_are_binary_and_cover_every_digit_pixel(data):
    for name in SPLITS:
        images, masks, _ = data[name]
        assert set(np.unique(masks)) <= {0, 255}
        digits = images.copy()
        digits[:, :2], digits[:, -2:], digits[:, :, :2], digits[:, :, -2:] = 0, 0, 0, 0  # drop the ring
        assert not ((digits > 0) & (masks == 0)).any()


def test_bias_lies_outside_the_masks_at_the_right_position(data):
    for name, expected in (
        ("train", "label"),
        ("validation", "label"),
        ("test_iid", "label"),
        ("test_ood", None),
    ):
        images, masks, labels = data[name]
        found = np.array([bias_class(image, mask) for image, mask in zip(images, masks, strict=True)])
        want = labels if expected == "label" else np.full_like(labels, -1)
        np.testing.assert_array_equal(found, want, err_msg=name)


def test_test_versions_differ_only_in_the_bias(data):
    iid, ood, deceiving = data["test_iid"], data["test_ood"], data["test_deceiving"]
    np.testing.assert_array_equal(iid[2], ood[2])
    np.testing.assert_array_equal(iid[2], deceiving[2])
    np.testing.assert_array_equal(iid[1], ood[1])
    np.testing.assert_array_equal(iid[1], deceiving[1])
    labels = iid[2]
    deceiving_classes = []
    for i, label in enumerate(labels):
        np.testing.assert_array_equal(iid[0][i] != ood[0][i], patch_box(label))
        changed = deceiving[0][i] != ood[0][i]
        k = next(k for k in range(10) if np.array_equal(changed, patch_box(k)))
        assert k != label
        deceiving_classes.append(k)
    assert len(set((np.array(deceiving_classes) - labels) % 10)) > 5  # the wrong class varies


def test_bias_fraction_zero_leaves_training_unbiased():
    dataset = build_biased_mnist(train_size=100, test_size=20, bias_fraction=0.0)
    images, masks, _ = arrays(dataset["train"])
    assert not ((images > 0) & (masks == 0)).any()
    iid_images, iid_masks, labels = arrays(dataset["test_iid"])  # test splits are unaffected
    assert [bias_class(i, m) for i, m in zip(iid_images, iid_masks, strict=True)] == labels.tolist()


def test_build_is_deterministic_and_seeded(data):
    again = build_biased_mnist(**SIZES)
    for name in SPLITS:
        for got, want in zip(arrays(again[name]), data[name], strict=True):
            np.testing.assert_array_equal(got, want)
    other = build_biased_mnist(**{**SIZES, "seed": 1})
    assert not np.array_equal(arrays(other["train"])[0], data["train"][0])
    assert not np.array_equal(arrays(other["test_deceiving"])[0], data["test_deceiving"][0])


def test_cache_hit_returns_the_same_data(cache, data, monkeypatch):
    folders = sorted((cache / "biased_mnist").iterdir())
    assert len(folders) == 1 and (folders[0] / "hf_isnet_params.json").is_file()
    monkeypatch.setattr(
        biased_mnist, "build_biased_mnist", lambda **_: pytest.fail("rebuilt despite the cache")
    )
    dataset = load_biased_mnist(cache_dir=cache, **SIZES)
    assert dataset["train"].cache_files[0]["filename"].startswith(str(folders[0]))
    for got, want in zip(arrays(dataset["test_deceiving"]), data["test_deceiving"], strict=True):
        np.testing.assert_array_equal(got, want)
    monkeypatch.undo()
    load_biased_mnist(cache_dir=cache, **{**SIZES, "test_size": 20})  # every argument is in the key
    assert len(list((cache / "biased_mnist").iterdir())) == 2


def test_argument_errors():
    with pytest.raises(ValueError, match="test_size"):
        build_biased_mnist(train_size=10, test_size=0)
    with pytest.raises(ValueError, match="train_size"):
        build_biased_mnist(train_size=60001, test_size=10)
    with pytest.raises(ValueError, match="bias_fraction"):
        build_biased_mnist(train_size=10, test_size=10, bias_fraction=1.5)
