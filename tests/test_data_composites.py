"""Photo composites: exact binary masks, the number tag never touches a mask, the test versions differ
only in the tag, builds are seeded and cached."""

import numpy as np
import pytest

from hf_isnet.data import photo_composites
from hf_isnet.data._sources import FASHION_MNIST_CLASSES, FASHION_MNIST_ENV, fashion_mnist_dir
from hf_isnet.data.photo_composites import build_photo_composites, load_photo_composites, tag_images

if not (fashion_mnist_dir() / "t10k-labels-idx1-ubyte.gz").is_file():
    pytest.skip(
        f"Fashion-MNIST not installed in {fashion_mnist_dir()}: apt-get install dataset-fashion-mnist",
        allow_module_level=True,
    )

SIZES = dict(seed=0, train_size=120, validation_size=20, test_size=80)
SPLITS = ("train", "validation", "test_iid", "test_ood", "test_deceiving")
TAG = 12
MARGIN = 2


def arrays(split) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images = np.stack([np.asarray(image) for image in split["image"]])
    masks = np.stack([np.asarray(mask) for mask in split["mask"]])
    return images, masks, np.asarray(split["label"])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_isnet_cache")


@pytest.fixture(scope="module")
def data(cache):
    dataset = load_photo_composites(cache_dir=cache, **SIZES)
    return {name: arrays(dataset[name]) for name in SPLITS}


def find_tags(image: np.ndarray) -> list[tuple[int, int, int]]:
    """Every (class, row, col) where a label tag appears exactly in the RGB image."""
    tags = tag_images(TAG)
    white = (image == 255).all(axis=-1)
    found = []
    # A tag's first row and column are white: only test corners where both are.
    for row, col in np.argwhere(white[: 1 - TAG, : 1 - TAG]):
        if white[row, col : col + TAG].all() and white[row : row + TAG, col].all():
            window = image[row : row + TAG, col : col + TAG]
            found += [(k, row, col) for k in range(10) if (window == tags[k][:, :, None]).all()]
    return found


def near_mask(mask: np.ndarray, row: int, col: int) -> bool:
    """Whether the tag box at (row, col), grown by the margin, touches the mask."""
    return bool(
        mask[max(row - MARGIN, 0) : row + TAG + MARGIN, max(col - MARGIN, 0) : col + TAG + MARGIN].any()
    )


def test_splits_columns_and_formats(cache):
    dataset = load_photo_composites(cache_dir=cache, **SIZES)
    assert [dataset[name].num_rows for name in SPLITS] == [120, 20, 80, 80, 80]
    assert dataset["train"].features["label"].names == list(FASHION_MNIST_CLASSES)
    example = dataset["test_deceiving"][3]
    assert example["image"].mode == "RGB" and example["image"].size == (64, 64)
    assert example["mask"].mode == "L" and example["mask"].size == (64, 64)


def test_tags_are_distinct_white_squares():
    tags = tag_images(TAG)
    assert tags.shape == (10, TAG, TAG)
    assert len({tag.tobytes() for tag in tags}) == 10
    assert (tags[:, 0] == 255).all() and (tags[:, :, 0] == 255).all()


def test_masks_are_binary_and_sized(data):
    for name in SPLITS:
        _, masks, _ = data[name]
        assert set(np.unique(masks)) == {0, 255}
        area = (masks > 0).mean(axis=(1, 2))
        assert area.min() > 0.01 and area.max() < 0.4, name  # one object of 28-40 px in 64x64


def test_tag_of_the_true_class_lies_away_from_the_mask(data):
    for name in ("train", "validation", "test_iid"):
        images, masks, labels = data[name]
        for image, mask, label in zip(images, masks, labels, strict=True):
            ((k, row, col),) = find_tags(image)
            assert k == label, name
            assert not near_mask(mask, row, col), name
    for image in data["test_ood"][0]:
        assert find_tags(image) == []


def test_test_versions_differ_only_in_the_tag(data):
    iid, ood, deceiving = data["test_iid"], data["test_ood"], data["test_deceiving"]
    for version in (ood, deceiving):
        np.testing.assert_array_equal(iid[1], version[1])
        np.testing.assert_array_equal(iid[2], version[2])
    wrong = []
    for i, label in enumerate(iid[2]):
        ((_, row, col),) = find_tags(iid[0][i])
        ((k, row_d, col_d),) = find_tags(deceiving[0][i])
        assert (row_d, col_d) == (row, col) and k != label
        wrong.append(k)
        outside = np.ones((64, 64), dtype=bool)
        outside[row : row + TAG, col : col + TAG] = False
        np.testing.assert_array_equal(iid[0][i][outside], ood[0][i][outside])
        np.testing.assert_array_equal(deceiving[0][i][outside], ood[0][i][outside])
        assert not iid[1][i][~outside].any()  # the changed pixels are all background
    assert len(set((np.array(wrong) - iid[2]) % 10)) > 5  # the wrong class varies


def test_build_is_deterministic_and_seeded(data, monkeypatch):
    monkeypatch.setattr(photo_composites, "_CHUNK", 50)  # chunking must not change the result
    again = build_photo_composites(**SIZES)
    for name in SPLITS:
        for got, want in zip(arrays(again[name]), data[name], strict=True):
            np.testing.assert_array_equal(got, want)
    other = build_photo_composites(**{**SIZES, "seed": 1})
    assert not np.array_equal(arrays(other["test_iid"])[0], data["test_iid"][0])


def test_cache_hit_returns_the_same_data(cache, data, monkeypatch):
    folders = sorted((cache / "photo_composites").iterdir())
    assert len(folders) == 1 and (folders[0] / "hf_isnet_params.json").is_file()
    monkeypatch.setattr(
        photo_composites, "build_photo_composites", lambda **_: pytest.fail("rebuilt despite the cache")
    )
    dataset = load_photo_composites(cache_dir=cache, **SIZES)
    assert dataset["test_ood"].cache_files[0]["filename"].startswith(str(folders[0]))
    for got, want in zip(arrays(dataset["test_ood"]), data["test_ood"], strict=True):
        np.testing.assert_array_equal(got, want)


def test_photo_choice_and_errors(monkeypatch, tmp_path):
    dataset = build_photo_composites(train_size=5, test_size=5, photos=["camera"])
    images = arrays(dataset["test_ood"])[0]
    assert (images[..., 0] == images[..., 2]).all()  # camera is grey, so are Fashion-MNIST objects
    with pytest.raises(ValueError, match="unknown photos"):
        build_photo_composites(train_size=5, test_size=5, photos=["nope"])
    with pytest.raises(ValueError, match="object_size"):
        build_photo_composites(train_size=5, test_size=5, object_size=(40, 28))
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        build_photo_composites(train_size=5, test_size=5)
