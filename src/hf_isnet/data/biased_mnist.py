"""Biased MNIST: real MNIST digits with a synthetic background shortcut whose position encodes the class.

Each 28x28 digit is padded with ``padding`` black pixels on every side (32x32 by default). The bias is
a bright ``patch_size`` x ``patch_size`` square in that padded border ring, at one of ten positions
spread evenly around the ring, one per class (:func:`patch_positions`). Digit pixels lie only inside
the original 28x28 frame and the mask is dilated inside that frame, so a bias patch never touches a
mask, for every image, by construction.

Splits (the evaluation protocol of the Faster ISNet paper):

- ``train`` (and ``validation`` when ``validation_size > 0``, carved from MNIST's training set): the
  patch of the true class (on a ``bias_fraction`` of the images; 1.0 as in the paper).
- ``test_iid``: the patch of the true class, on every image.
- ``test_ood``: no patch.
- ``test_deceiving``: the patch of another class, drawn uniformly from the nine wrong ones.

The three test splits hold the same MNIST test images in the same order and differ only in the patch
pixels. Columns: ``image`` (PIL 'L'), ``mask`` (PIL 'L', values {0, 255}, 255 = digit) and ``label``
(``ClassLabel`` with names "0".."9").
"""

from __future__ import annotations

import os

import numpy as np

from hf_isnet.data._sources import cached_build, encode_split, load_mnist, png_bytes

NUM_CLASSES = 10
LABEL_NAMES = tuple(str(digit) for digit in range(NUM_CLASSES))
MNIST_SIZE = 28
TEST_SPLITS = ("test_iid", "test_ood", "test_deceiving")

# Independent random streams, so that changing one size does not reshuffle another split's choices.
_STREAM_TRAIN_SUBSET, _STREAM_TEST_SUBSET, _STREAM_BIAS_FLAGS, _STREAM_DECEIVING = range(4)


def patch_positions(image_size: int = 32, patch_size: int = 2) -> list[tuple[int, int]]:
    """Top-left (row, column) of each class's bias patch, class 0 first.

    The ten positions are spread evenly, clockwise from the top-left corner, along the path the patch's
    top-left corner takes around the image border; neighbouring patches never overlap.
    """
    side = image_size - patch_size  # the top-left corner moves along a square of this side
    perimeter = 4 * side
    if perimeter / NUM_CLASSES < patch_size:
        raise ValueError(
            f"patch_size {patch_size} is too large: ten patches do not fit around a {image_size}px border"
        )
    positions = []
    for k in range(NUM_CLASSES):
        t = round(k * perimeter / NUM_CLASSES)
        edge, offset = divmod(t, side)
        positions.append([(0, offset), (offset, side), (side, side - offset), (side - offset, 0)][edge])
    return positions


def digit_masks(images: np.ndarray, threshold: int = 0, dilation: int = 1) -> np.ndarray:
    """Boolean digit masks for uint8 images (N, H, W): pixels above ``threshold`` dilated by ``dilation``.

    The dilation is a (2*dilation+1)-square maximum filter that stays inside the image frame.
    """
    ink = images > threshold
    padded = np.pad(ink, ((0, 0), (dilation, dilation), (dilation, dilation)))
    height, width = ink.shape[1:]
    out = np.zeros_like(ink)
    for dy in range(2 * dilation + 1):
        for dx in range(2 * dilation + 1):
            out |= padded[:, dy : dy + height, dx : dx + width]
    return out


def _test_subset(seed: int, total: int, size: int | None) -> np.ndarray:
    if size is None:
        return np.arange(total)
    if not 0 < size <= total:
        raise ValueError(f"test_size must be in 1..{total}, got {size}")
    return np.sort(np.random.default_rng([seed, _STREAM_TEST_SUBSET]).choice(total, size=size, replace=False))


def _add_patches(
    images: np.ndarray, bias_class: np.ndarray, positions, patch_size: int, value: int
) -> np.ndarray:
    """Copy of ``images`` with class ``bias_class[i]``'s patch on image i (no patch where it is -1)."""
    out = images.copy()
    for k, (row, col) in enumerate(positions):
        out[bias_class == k, row : row + patch_size, col : col + patch_size] = value
    return out


def build_biased_mnist(
    seed: int = 0,
    train_size: int | None = None,
    validation_size: int = 0,
    test_size: int | None = None,
    padding: int = 2,
    patch_size: int = 2,
    patch_value: int = 255,
    bias_fraction: float = 1.0,
    mask_threshold: int = 0,
    mask_dilation: int = 1,
):
    """Build Biased MNIST in memory (no cache); see :func:`load_biased_mnist` for the arguments."""
    import datasets

    if not 1 <= patch_size <= padding:
        raise ValueError(
            f"patch_size ({patch_size}) must be between 1 and padding ({padding}) so that the patch lies in the "
            "padded border, away from every digit"
        )
    if not 0.0 <= bias_fraction <= 1.0:
        raise ValueError(f"bias_fraction must be in [0, 1], got {bias_fraction}")
    if not 0 < patch_value <= 255:
        raise ValueError(f"patch_value must be in 1..255, got {patch_value}")
    if validation_size < 0 or mask_dilation < 0:
        raise ValueError(
            f"validation_size and mask_dilation must be >= 0, got {validation_size}, {mask_dilation}"
        )
    image_size = MNIST_SIZE + 2 * padding
    positions = patch_positions(image_size, patch_size)
    pad = ((0, 0), (padding, padding), (padding, padding))

    def prepare(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        masks = digit_masks(images, mask_threshold, mask_dilation)
        return np.pad(images, pad), np.pad(masks, pad).astype(np.uint8) * 255

    train_images, train_labels = load_mnist("train")
    if validation_size >= len(train_labels):
        raise ValueError(f"validation_size must be below {len(train_labels)}, got {validation_size}")
    order = np.random.default_rng([seed, _STREAM_TRAIN_SUBSET]).permutation(len(train_labels))
    validation_index = np.sort(order[:validation_size])
    rest = order[validation_size:]
    if train_size is not None and not 0 < train_size <= len(rest):
        raise ValueError(f"train_size must be in 1..{len(rest)} (60000 - validation_size), got {train_size}")
    train_index = np.sort(rest[:train_size])  # `rest` is already in random order

    flag_rng = np.random.default_rng([seed, _STREAM_BIAS_FLAGS])
    splits = {}
    for name, index in (("train", train_index), ("validation", validation_index)):
        if name == "validation" and validation_size == 0:
            continue
        images, masks = prepare(train_images[index])
        labels = train_labels[index].astype(np.int64)
        carries = flag_rng.random(len(index)) < bias_fraction
        bias_class = np.where(carries, labels, -1)
        splits[name] = encode_split(
            _add_patches(images, bias_class, positions, patch_size, patch_value), masks, labels, LABEL_NAMES
        )

    test_images, test_labels = load_mnist("test")
    test_index = _test_subset(seed, len(test_labels), test_size)
    images, masks = prepare(test_images[test_index])
    labels = test_labels[test_index].astype(np.int64)
    encoded_masks = [png_bytes(mask) for mask in masks]  # shared by the three versions
    shift = np.random.default_rng([seed, _STREAM_DECEIVING]).integers(1, NUM_CLASSES, size=len(labels))
    bias_classes = {
        "test_iid": labels,
        "test_ood": np.full_like(labels, -1),
        "test_deceiving": (labels + shift) % NUM_CLASSES,
    }
    for name in TEST_SPLITS:
        biased = _add_patches(images, bias_classes[name], positions, patch_size, patch_value)
        splits[name] = encode_split(biased, encoded_masks, labels, LABEL_NAMES)
    return datasets.DatasetDict(splits)


def load_biased_mnist(
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    train_size: int | None = None,
    validation_size: int = 0,
    test_size: int | None = None,
    padding: int = 2,
    patch_size: int = 2,
    patch_value: int = 255,
    bias_fraction: float = 1.0,
    mask_threshold: int = 0,
    mask_dilation: int = 1,
    use_cache: bool = True,
):
    """Biased MNIST as a ``datasets.DatasetDict``, built from the real MNIST once and then cached.

    Args:
        cache_dir: cache root (default ``$HF_ISNET_CACHE`` or ``~/.cache/hf_isnet``); the data set lives in
            ``<cache_dir>/biased_mnist/<hash of all the arguments below>``.
        seed: seeds every random choice (subsets, which training images carry the bias, deceiving classes).
        train_size: number of training images, sampled without replacement (default: all that remain after
            the validation split, 60000 - validation_size).
        validation_size: images carved from MNIST's training set for a ``validation`` split, biased like
            ``train`` (default 0: no validation split).
        test_size: number of MNIST test images behind each of the three test splits (default all 10000).
        padding: black border added on every side of the 28x28 digits, in pixels; the image side is
            ``28 + 2 * padding`` (32 by default).
        patch_size: side of the square bias patch in pixels; at most ``padding``.
        patch_value: grey value of the patch (1..255).
        bias_fraction: fraction of ``train``/``validation`` images that carry their class's patch; 1.0 as
            in the paper, 0.0 for a reference classifier trained without bias. Test splits are unaffected.
        mask_threshold: a pixel is part of the digit when its value is above this (0: any ink).
        mask_dilation: the digit mask is dilated by this many pixels (inside the 28x28 frame).
        use_cache: ``False`` builds in memory without reading or writing the cache.

    Returns:
        ``DatasetDict`` with splits ``train``, [``validation``,] ``test_iid``, ``test_ood``,
        ``test_deceiving``; columns ``image``, ``mask``, ``label``. A full build (60000 + 3 x 10000) takes
        about 10 s of CPU time (one core) and 44 MB of disk; a cache hit, a fraction of a second.
    """
    params = dict(
        seed=seed,
        train_size=train_size,
        validation_size=validation_size,
        test_size=test_size,
        padding=padding,
        patch_size=patch_size,
        patch_value=patch_value,
        bias_fraction=bias_fraction,
        mask_threshold=mask_threshold,
        mask_dilation=mask_dilation,
    )
    return cached_build("biased_mnist", params, lambda: build_biased_mnist(**params), cache_dir, use_cache)
