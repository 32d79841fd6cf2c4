"""Data sets with masks from folders the user provides (nothing is downloaded).

Every loader returns a ``datasets.Dataset`` with the columns every hf_isnet data set has: ``image``
(``datasets.Image()``), ``mask`` (``datasets.Image()``; a binary mask, foreground = non-zero, e.g. an 'L'
or '1' PNG with values {0, 255} or {0, 1}) and ``label`` (``datasets.ClassLabel``). Images and masks are
referenced by path and decoded lazily; the loaders check that every file exists and (with
``check_sizes``) that each mask has its image's size, reading only the file headers.
"""

from __future__ import annotations

import csv
import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hf_isnet.data._sources import image_mask_label_features, png_bytes

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
METADATA_FILE = "metadata.csv"
METADATA_COLUMNS = ("file_name", "mask_file_name", "label")


def _missing_error(what: str, missing: Sequence[Any], fix: str) -> FileNotFoundError:
    shown = ", ".join(str(path) for path in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return FileNotFoundError(f"{len(missing)} {what} not found: {shown}{more}. {fix}")


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:  # reads the header only
        return image.size


def _build(
    images: Sequence[Path],
    masks: Sequence[Path | dict[str, Any]],
    labels: Sequence[str],
    label_names: Sequence[str],
    check_sizes: bool,
):
    """The Dataset from image paths, masks (paths or encoded PNGs) and label names per example."""
    import datasets

    unknown = sorted(set(labels) - set(label_names))
    if unknown:
        raise ValueError(f"labels {unknown} are not in label_names {list(label_names)}")
    if check_sizes:
        for image, mask in zip(images, masks, strict=True):
            if isinstance(mask, Path) and _image_size(image) != _image_size(mask):
                raise ValueError(
                    f"mask {mask} is {_image_size(mask)} (width, height) but image {image} is {_image_size(image)}"
                )
    index = {name: i for i, name in enumerate(label_names)}
    return datasets.Dataset.from_dict(
        {
            "image": [str(path) for path in images],
            "mask": [str(mask) if isinstance(mask, Path) else mask for mask in masks],
            "label": [index[label] for label in labels],
        },
        features=image_mask_label_features(label_names),
    )


def _split_folder(root: str | os.PathLike, split: str | None) -> Path:
    folder = Path(root) if split is None else Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {folder} does not exist")
    return folder


# ------------------------------------------------------------------------------------ metadata.csv
def load_image_mask_folder(
    root: str | os.PathLike,
    split: str | None = None,
    label_names: Sequence[str] | None = None,
    check_sizes: bool = True,
):
    """Images, masks and labels listed in a ``metadata.csv``, as in ``datasets``' ``imagefolder``.

    Layout::

        root/[split/]metadata.csv      columns file_name, mask_file_name, label (others are ignored)
        root/[split/]<file_name>       paths relative to the csv's folder
        root/[split/]<mask_file_name>

    Args:
        root: the data folder.
        split: a subfolder of ``root`` holding its own ``metadata.csv`` (e.g. "train", "test").
        label_names: the class names in class-index order; default the sorted labels found. Pass the same
            list for every split so their class indices agree.
        check_sizes: check that every mask has its image's size (reads file headers only).

    Returns:
        ``datasets.Dataset`` with columns ``image``, ``mask``, ``label``.
    """
    folder = _split_folder(root, split)
    metadata = folder / METADATA_FILE
    if not metadata.is_file():
        raise FileNotFoundError(
            f"{metadata} not found: the folder needs a {METADATA_FILE} with columns {', '.join(METADATA_COLUMNS)}"
        )
    with metadata.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing_columns = [column for column in METADATA_COLUMNS if column not in (reader.fieldnames or [])]
        if missing_columns:
            raise ValueError(f"{metadata} lacks columns {missing_columns}; it has {reader.fieldnames}")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{metadata} lists no examples")
    images = [folder / row["file_name"] for row in rows]
    masks = [folder / row["mask_file_name"] for row in rows]
    missing = [path for path in images + masks if not path.is_file()]
    if missing:
        raise _missing_error(
            f"files listed in {metadata}", missing, "Paths are relative to the csv's folder."
        )
    labels = [row["label"] for row in rows]
    names = sorted(set(labels)) if label_names is None else list(label_names)
    return _build(images, masks, labels, names, check_sizes)


# ------------------------------------------------------------------------------------ Stanford Dogs
def bounding_boxes(annotation: str | os.PathLike) -> list[tuple[int, int, int, int]]:
    """The ``(xmin, ymin, xmax, ymax)`` of every ``<object><bndbox>`` in a PASCAL-VOC-like XML file."""
    tree = ElementTree.parse(annotation)
    boxes = []
    for box in tree.getroot().iter("bndbox"):
        try:
            boxes.append(tuple(int(float(box.findtext(key))) for key in ("xmin", "ymin", "xmax", "ymax")))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{annotation}: a <bndbox> lacks a numeric xmin/ymin/xmax/ymax") from err
    if not boxes:
        raise ValueError(f"{annotation} has no <object><bndbox>")
    return boxes


def box_mask(boxes: Sequence[tuple[int, int, int, int]], size: tuple[int, int]) -> np.ndarray:
    """Binary uint8 mask (height, width), 255 inside the union of the boxes, for an image of ``size``
    (width, height). Box corners are pixel indices, both inclusive, clipped to the image."""
    width, height = size
    mask = np.zeros((height, width), dtype=np.uint8)
    for xmin, ymin, xmax, ymax in boxes:
        mask[max(ymin, 0) : min(ymax, height - 1) + 1, max(xmin, 0) : min(xmax, width - 1) + 1] = 255
    return mask


def _breed(folder_name: str) -> str:
    """'n02085620-Chihuahua' -> 'Chihuahua' (the synset id is dropped)."""
    return folder_name.split("-", 1)[1] if "-" in folder_name else folder_name


def _split_list(root: Path, split: str) -> list[str]:
    """Relative image paths from the official ``<split>_list.mat`` (e.g. ``train_list.mat``)."""
    from scipy.io import loadmat

    path = root / f"{split}_list.mat"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the split lists come in Stanford Dogs' lists.tar (train_list.mat, test_list.mat)"
        )
    return [str(entry[0]) for entry in loadmat(path)["file_list"].ravel()]


def load_stanford_dogs(
    root: str | os.PathLike,
    masks_dir: str | os.PathLike | None = None,
    split: str | None = None,
    check_sizes: bool = True,
):
    """Stanford Dogs from its own layout, with segmentation masks or bounding-box masks.

    Layout (as the archives unpack)::

        root/Images/n02085620-Chihuahua/n02085620_10074.jpg
        root/Annotation/n02085620-Chihuahua/n02085620_10074     PASCAL-VOC-like XML, no extension
        root/train_list.mat, root/test_list.mat                 only with ``split``
        masks_dir/n02085620-Chihuahua/n02085620_10074.png       only with ``masks_dir``

    Args:
        root: the folder holding ``Images/`` (and ``Annotation/`` when there is no ``masks_dir``).
        masks_dir: segmentation masks, one PNG per image at the image's relative path. Without it the mask
            is the union of the annotation's bounding boxes (corners inclusive), built when loading (about
            1 ms per image).
        split: ``"train"`` or ``"test"`` to keep the images of the official ``<split>_list.mat``; default
            every image under ``Images/``.
        check_sizes: check that every mask file has its image's size (reads file headers only).

    Returns:
        ``datasets.Dataset`` with columns ``image``, ``mask``, ``label``; the class names are the breeds
        (folder names without the synset prefix) in the folders' (synset) order, the order of the
        official class indices, whatever the split.
    """
    root = Path(root)
    image_root = root / "Images"
    if not image_root.is_dir():
        raise FileNotFoundError(f"{image_root} not found: root must hold Stanford Dogs' Images/ folder")
    folders = sorted(path.name for path in image_root.iterdir() if path.is_dir())
    if not folders:
        raise FileNotFoundError(f"{image_root} has no breed folders (e.g. n02085620-Chihuahua)")
    if split is None:
        relative = [
            f"{folder}/{path.name}"
            for folder in folders
            for path in sorted((image_root / folder).iterdir())
            if path.suffix.lower() in IMAGE_EXTENSIONS
        ]
    else:
        relative = _split_list(root, split)
    images = [image_root / rel for rel in relative]
    missing = [path for path in images if not path.is_file()]
    if missing:
        raise _missing_error("images", missing, f"Check root={root}.")
    if masks_dir is not None:
        masks: list[Path | dict[str, Any]] = [
            Path(masks_dir) / Path(rel).with_suffix(".png") for rel in relative
        ]
        missing = [path for path in masks if not path.is_file()]
        if missing:
            raise _missing_error(
                "masks", missing, f"masks_dir={masks_dir} must mirror Images/ with .png files."
            )
    else:
        annotations = [root / "Annotation" / Path(rel).with_suffix("") for rel in relative]
        missing = [path for path in annotations if not path.is_file()]
        if missing:
            raise _missing_error(
                "annotations", missing, "Unpack Stanford Dogs' annotation.tar into root, or pass masks_dir."
            )
        masks = [
            png_bytes(box_mask(bounding_boxes(xml), _image_size(image)))
            for xml, image in zip(annotations, images, strict=True)
        ]
    labels = [_breed(Path(rel).parent.name) for rel in relative]
    return _build(images, masks, labels, [_breed(folder) for folder in folders], check_sizes)


# ------------------------------------------------------------------------------------------ X-rays
def load_xray_folder(
    root: str | os.PathLike,
    split: str | None = None,
    label_names: Sequence[str] | None = None,
    check_sizes: bool = True,
):
    """Chest X-rays with lung masks and labels, from either of two layouts.

    Layout 1, one folder per class (as COVID-QU-Ex and similar sets unpack)::

        root/[split/]<label>/images/<name>.png
        root/[split/]<label>/masks/<name>.png     same file name (or the same stem with .png)

    Layout 2, a ``metadata.csv`` in ``root/[split/]`` (see :func:`load_image_mask_folder`); it is used
    whenever the file exists.

    Args:
        root: the data folder.
        split: a subfolder of ``root`` (e.g. "train", "val", "test").
        label_names: the class names in class-index order; default the sorted class folders (or labels).
        check_sizes: check that every mask has its image's size (reads file headers only).

    Returns:
        ``datasets.Dataset`` with columns ``image``, ``mask``, ``label``.
    """
    folder = _split_folder(root, split)
    if (folder / METADATA_FILE).is_file():
        return load_image_mask_folder(root, split, label_names, check_sizes)
    classes = sorted(path.name for path in folder.iterdir() if path.is_dir())
    if not classes:
        raise FileNotFoundError(
            f"{folder} has neither a {METADATA_FILE} nor class folders <label>/images + <label>/masks"
        )
    images: list[Path] = []
    masks: list[Path] = []
    labels: list[str] = []
    missing: list[Path] = []
    for label in classes:
        image_dir, mask_dir = folder / label / "images", folder / label / "masks"
        if not image_dir.is_dir() or not mask_dir.is_dir():
            raise FileNotFoundError(f"class folder {folder / label} needs the subfolders images/ and masks/")
        for image in sorted(path for path in image_dir.iterdir() if path.suffix.lower() in IMAGE_EXTENSIONS):
            mask = mask_dir / image.name
            if not mask.is_file() and (mask_dir / f"{image.stem}.png").is_file():
                mask = mask_dir / f"{image.stem}.png"
            if not mask.is_file():
                missing.append(mask)
            images.append(image)
            masks.append(mask)
            labels.append(label)
    if missing:
        raise _missing_error("masks", missing, "Each image needs a mask with the same file name in masks/.")
    if not images:
        raise FileNotFoundError(f"no images under {folder}/<label>/images/")
    return _build(images, masks, labels, classes if label_names is None else list(label_names), check_sizes)
