"""Photo composites: Fashion-MNIST objects on natural photos, with the class number as a background shortcut.

Each image (``image_size`` x ``image_size`` RGB, 64 by default) is a random crop of one of the photos that
ship with scikit-image and scikit-learn (:func:`hf_isnet.data._sources.load_photos`), rescaled, with one
Fashion-MNIST object pasted on it: the 28x28 object is resized to a random side in ``object_size`` and
placed at a random position. The object's mask is exact: it is the alpha used for pasting (object pixels
above ``object_threshold``, holes filled), so every pixel outside the mask is the photo's.

The shortcut is a label tag in the background: a white ``tag_size`` square with the class number
("0".."9", Pillow's default font) in black, at a random position at least ``tag_margin`` pixels away
from the object's mask (checked for every image).

Splits, as in :mod:`hf_isnet.data.biased_mnist`: ``train`` (and ``validation`` when ``validation_size >
0``) and ``test_iid`` carry the tag with their own class number, ``test_ood`` no tag, ``test_deceiving``
a tag with another class's number (uniform over the nine wrong ones). The three test splits share the
photo crop, object, placement and tag position of each image and differ only in the tag's pixels.
Columns: ``image`` (PIL RGB), ``mask`` (PIL 'L', {0, 255}, 255 = object), ``label`` (``ClassLabel`` with
the Fashion-MNIST class names).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from hf_isnet.data._sources import (
    FASHION_MNIST_CLASSES,
    cached_build,
    encode_split,
    load_fashion_mnist,
    load_photos,
    png_bytes,
)

NUM_CLASSES = len(FASHION_MNIST_CLASSES)
TEST_SPLITS = ("test_iid", "test_ood", "test_deceiving")
_MAX_PLACEMENT_TRIES = 100
_CHUNK = 4096  # images composed and encoded at a time

# Independent random streams, so that changing one size does not reshuffle another split's choices.
_STREAM_TRAIN_SUBSET, _STREAM_TEST_SUBSET, _STREAM_TRAIN_SCENES, _STREAM_TEST_SCENES, _STREAM_DECEIVING = (
    range(5)
)


def tag_images(tag_size: int = 12) -> np.ndarray:
    """The ten label tags, uint8 (10, tag_size, tag_size): white squares with the black number 0..9."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=tag_size)
    tags = []
    for k in range(NUM_CLASSES):
        tag = Image.new("L", (tag_size, tag_size), 255)
        ImageDraw.Draw(tag).text((tag_size / 2, tag_size / 2), str(k), fill=0, font=font, anchor="mm")
        tags.append(np.asarray(tag))
    return np.stack(tags)


def _background(photos: list[np.ndarray], image_size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (side between ``image_size`` and 4x that) of a random photo, resized."""
    from PIL import Image

    photo = photos[rng.integers(len(photos))]
    height, width = photo.shape[:2]
    side = int(rng.integers(image_size, min(height, width, 4 * image_size) + 1))
    top, left = rng.integers(height - side + 1), rng.integers(width - side + 1)
    crop = Image.fromarray(photo[top : top + side, left : left + side])
    # reducing_gap: shrink by an integer factor first (box filter), then resample; ~2x faster.
    return np.asarray(crop.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=2.0))


def _object(item: np.ndarray, side: int, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """A Fashion-MNIST item resized to ``side``; returns (grey uint8 (side, side), bool alpha mask)."""
    from PIL import Image
    from scipy.ndimage import binary_fill_holes

    grey = np.asarray(Image.fromarray(item).resize((side, side), Image.Resampling.BILINEAR))
    return grey, binary_fill_holes(grey > threshold)


def _free_positions(mask: np.ndarray, tag_size: int, margin: int) -> np.ndarray:
    """Top-left corners (row, col) where a ``tag_size`` square keeps ``margin`` pixels from ``mask``."""
    height, width = mask.shape
    # Grow the box by the margin instead of dilating the mask: a box at (r, c) is free when the window
    # [r - margin, r + tag_size + margin) x [c - margin, ...) holds no mask pixel. Window sums come from
    # an integral image of the mask padded by the margin (plus a leading zero row and column).
    padded = np.zeros((height + 2 * margin + 1, width + 2 * margin + 1), dtype=np.int32)
    padded[1 + margin : 1 + margin + height, 1 + margin : 1 + margin + width] = mask
    integral = padded.cumsum(0).cumsum(1)
    window = tag_size + 2 * margin
    rows, cols = height - tag_size + 1, width - tag_size + 1
    sums = (
        integral[window : window + rows, window : window + cols]
        - integral[:rows, window : window + cols]
        - integral[window : window + rows, :cols]
        + integral[:rows, :cols]
    )
    return np.argwhere(sums == 0)


def _scenes(
    items: np.ndarray,
    photos: list[np.ndarray],
    rng: np.random.Generator,
    image_size: int,
    object_size: tuple[int, int],
    object_threshold: int,
    tag_size: int,
    tag_margin: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compose the tag-free images. Returns uint8 images (N, S, S, 3), bool masks (N, S, S) and the tag
    corners (N, 2)."""
    count = len(items)
    images = np.empty((count, image_size, image_size, 3), dtype=np.uint8)
    masks = np.zeros((count, image_size, image_size), dtype=bool)
    corners = np.empty((count, 2), dtype=np.int64)
    for i, item in enumerate(items):
        images[i] = _background(photos, image_size, rng)
        grey, alpha = _object(item, int(rng.integers(object_size[0], object_size[1] + 1)), object_threshold)
        side = grey.shape[0]
        for _ in range(_MAX_PLACEMENT_TRIES):
            top, left = rng.integers(image_size - side + 1, size=2)
            masks[i] = False
            masks[i, top : top + side, left : left + side] = alpha
            free = _free_positions(masks[i], tag_size, tag_margin)
            if len(free):
                break
        else:
            raise RuntimeError(
                f"no room for a {tag_size}px tag beside a {side}px object in a {image_size}px image; "
                "lower object_size or tag_size"
            )
        corners[i] = free[rng.integers(len(free))]
        region = images[i, top : top + side, left : left + side]
        region[alpha] = grey[alpha, None]
    for mask, (row, col) in zip(masks, corners, strict=True):  # the guarantee the benchmark rests on
        if mask[row : row + tag_size, col : col + tag_size].any():
            raise AssertionError(f"a label tag at {(row, col)} overlaps an object mask")
    return images, masks, corners


def _with_tags(
    images: np.ndarray, corners: np.ndarray, tag_class: np.ndarray, tags: np.ndarray
) -> np.ndarray:
    """Copy of ``images`` with tag ``tag_class[i]`` at ``corners[i]`` on image i (no tag where it is -1)."""
    out = images.copy()
    size = tags.shape[1]
    for i in np.flatnonzero(tag_class >= 0):
        row, col = corners[i]
        out[i, row : row + size, col : col + size] = tags[tag_class[i], :, :, None]
    return out


def build_photo_composites(
    seed: int = 0,
    train_size: int | None = None,
    validation_size: int = 0,
    test_size: int | None = None,
    image_size: int = 64,
    object_size: tuple[int, int] = (28, 40),
    object_threshold: int = 16,
    tag_size: int = 12,
    tag_margin: int = 2,
    photos: Sequence[str] | None = None,
):
    """Build the photo composites in memory (no cache); see :func:`load_photo_composites` for the arguments."""
    import datasets

    low, high = object_size
    if not 1 <= low <= high <= image_size:
        raise ValueError(
            f"object_size must be (low, high) with 1 <= low <= high <= image_size, got {object_size}"
        )
    if not 1 <= tag_size < image_size:
        raise ValueError(f"tag_size must be in 1..{image_size - 1}, got {tag_size}")
    if validation_size < 0:
        raise ValueError(f"validation_size must be >= 0, got {validation_size}")
    photo_list = list(load_photos(photos).values())
    tags = tag_images(tag_size)
    geometry = dict(
        photos=photo_list,
        image_size=image_size,
        object_size=(low, high),
        object_threshold=object_threshold,
        tag_size=tag_size,
        tag_margin=tag_margin,
    )

    def true_class_split(items: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
        # In chunks, so that a 60000-image split never holds all its pixels in memory at once.
        parts = []
        for start in range(0, len(items), _CHUNK):
            chunk = labels[start : start + _CHUNK]
            images, masks, corners = _scenes(items[start : start + _CHUNK], rng=rng, **geometry)
            tagged = _with_tags(images, corners, chunk, tags)
            parts.append(encode_split(tagged, masks.astype(np.uint8) * 255, chunk, FASHION_MNIST_CLASSES))
        return datasets.concatenate_datasets(parts)

    splits = {}
    train_items, train_labels = load_fashion_mnist("train")
    if validation_size >= len(train_labels):
        raise ValueError(f"validation_size must be below {len(train_labels)}, got {validation_size}")
    order = np.random.default_rng([seed, _STREAM_TRAIN_SUBSET]).permutation(len(train_labels))
    rest = order[validation_size:]
    if train_size is not None and not 0 < train_size <= len(rest):
        raise ValueError(f"train_size must be in 1..{len(rest)} (60000 - validation_size), got {train_size}")
    scene_rng = np.random.default_rng([seed, _STREAM_TRAIN_SCENES])
    for name, index in (
        ("train", np.sort(rest[:train_size])),
        ("validation", np.sort(order[:validation_size])),
    ):
        if len(index) == 0:
            continue
        splits[name] = true_class_split(train_items[index], train_labels[index].astype(np.int64), scene_rng)

    test_items, test_labels = load_fashion_mnist("test")
    if test_size is None:
        index = np.arange(len(test_labels))
    elif 0 < test_size <= len(test_labels):
        rng = np.random.default_rng([seed, _STREAM_TEST_SUBSET])
        index = np.sort(rng.choice(len(test_labels), size=test_size, replace=False))
    else:
        raise ValueError(f"test_size must be in 1..{len(test_labels)}, got {test_size}")
    labels = test_labels[index].astype(np.int64)
    images, masks, corners = _scenes(
        test_items[index], rng=np.random.default_rng([seed, _STREAM_TEST_SCENES]), **geometry
    )
    encoded_masks = [png_bytes(mask) for mask in masks.astype(np.uint8) * 255]  # shared by the three versions
    shift = np.random.default_rng([seed, _STREAM_DECEIVING]).integers(1, NUM_CLASSES, size=len(labels))
    tag_classes = {
        "test_iid": labels,
        "test_ood": np.full_like(labels, -1),
        "test_deceiving": (labels + shift) % NUM_CLASSES,
    }
    for name in TEST_SPLITS:
        tagged = _with_tags(images, corners, tag_classes[name], tags)
        splits[name] = encode_split(tagged, encoded_masks, labels, FASHION_MNIST_CLASSES)
    return datasets.DatasetDict(splits)


def load_photo_composites(
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    train_size: int | None = None,
    validation_size: int = 0,
    test_size: int | None = None,
    image_size: int = 64,
    object_size: tuple[int, int] = (28, 40),
    object_threshold: int = 16,
    tag_size: int = 12,
    tag_margin: int = 2,
    photos: Sequence[str] | None = None,
    use_cache: bool = True,
):
    """Fashion-MNIST-on-photos with a class-number shortcut, as a ``datasets.DatasetDict`` (cached).

    Needs the Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``) and
    scikit-image; nothing is downloaded.

    Args:
        cache_dir: cache root (default ``$HF_ISNET_CACHE`` or ``~/.cache/hf_isnet``); the data set lives in
            ``<cache_dir>/photo_composites/<hash of all the arguments below>``.
        seed: seeds every random choice (subsets, photo crops, object sizes and positions, tag positions,
            deceiving classes).
        train_size: number of training images (default: all that remain after the validation split).
        validation_size: images carved from Fashion-MNIST's training set for a ``validation`` split, tagged
            like ``train`` (default 0: no validation split).
        test_size: number of Fashion-MNIST test items behind each test split (default all 10000).
        image_size: side of the RGB images in pixels.
        object_size: (smallest, largest) side of the pasted object in pixels, drawn uniformly.
        object_threshold: an object pixel is opaque (and in the mask) when its value is above this; 16
            drops the faint speckle around most Fashion-MNIST items (at 0, 89% of them get stray dots).
        tag_size: side of the square label tag in pixels (the number is drawn at this font size).
        tag_margin: least distance in pixels between the tag and the object's mask.
        photos: names of the background photos (default: all in ``_sources.SKIMAGE_PHOTOS`` and
            ``_sources.SKLEARN_PHOTOS``).
        use_cache: ``False`` builds in memory without reading or writing the cache.

    Returns:
        ``DatasetDict`` with splits ``train``, [``validation``,] ``test_iid``, ``test_ood``,
        ``test_deceiving``; columns ``image``, ``mask``, ``label``. A full build (60000 + 3 x 10000) takes
        about 80 s of CPU time (one core), 1.7 GB of memory at its peak and 550 MB of disk.
    """
    params = dict(
        seed=seed,
        train_size=train_size,
        validation_size=validation_size,
        test_size=test_size,
        image_size=image_size,
        object_size=list(object_size),
        object_threshold=object_threshold,
        tag_size=tag_size,
        tag_margin=tag_margin,
        photos=None if photos is None else list(photos),
    )
    return cached_build(
        "photo_composites",
        params,
        lambda: build_photo_composites(**{**params, "object_size": tuple(object_size)}),
        cache_dir,
        use_cache,
    )
