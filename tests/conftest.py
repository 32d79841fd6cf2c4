"""Shared fixtures: tiny image + mask data sets, tiny timm models and fast ISNet training arguments.

Everything is small enough for 2 CPU cores (16x16 or 32x32 images, a handful of rows) and works offline.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download in tests

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

LABELS = ["cat", "dog", "bird"]


def _image_rows(n, size, mask_size, soft, labels, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    mask_size = mask_size or size
    images, masks = [], []
    for _ in range(n):
        images.append(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))
        m = np.zeros((mask_size, mask_size), np.uint8)
        q = mask_size // 4
        m[q : mask_size - q, q : mask_size - q] = 255  # a centred square object
        if soft:
            m[q : 2 * q, q : 2 * q] = 128  # an intermediate value: a soft mask
        masks.append(Image.fromarray(m))  # uint8 2-D: an "L" image
    if labels is None:
        labels = [i % len(LABELS) for i in range(n)]
    return images, masks, list(labels)


@pytest.fixture
def make_image_dataset():
    """Factory: a ``datasets.Dataset`` with ``Image()`` columns ``image`` / ``mask`` and a ``label`` column.

    ``make_image_dataset(n=8, size=16, mask_size=None, soft=False, labels=None, with_mask=True, seed=0)``:
    ``n`` random RGB images of ``size`` x ``size`` with a binary centred-square mask ({0, 255} 'L' PNG) of
    ``mask_size`` (default: the image size); ``soft=True`` adds an intermediate mask value. ``labels``
    default to ``i % 3`` as a ``ClassLabel`` of :data:`LABELS`; given labels use a plain int column (so
    out-of-range values are possible).
    """
    import datasets

    def make(n=8, size=16, mask_size=None, soft=False, labels=None, with_mask=True, seed=0):
        images, masks, label_values = _image_rows(n, size, mask_size, soft, labels, seed)
        label_feature = datasets.ClassLabel(names=LABELS) if labels is None else datasets.Value("int64")
        columns = {"image": images, "label": label_values}
        features = {"image": datasets.Image(), "label": label_feature}
        if with_mask:
            columns["mask"] = masks
            features["mask"] = datasets.Image()
        return datasets.Dataset.from_dict(columns, features=datasets.Features(features))

    return make


@pytest.fixture
def make_tensor_dataset():
    """Factory: rows that already hold ``pixel_values`` [3, S, S] and ``masks`` [1, S, S] tensors.

    ``make_tensor_dataset(n=4, size=16, seed=0)``: no transform (hence no random augmentation) is applied
    to such rows, so training on them is deterministic up to the sampler's order. Labels are ``i % 3``.
    """
    import datasets

    def make(n=4, size=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        pixels = torch.randn(n, 3, size, size, generator=g)
        masks = torch.zeros(n, 1, size, size)
        q = size // 4
        masks[:, :, q : size - q, q : size - q] = 1.0
        ds = datasets.Dataset.from_dict(
            {"pixel_values": pixels.numpy(), "masks": masks.numpy(), "label": [i % len(LABELS) for i in range(n)]}
        )
        return ds.with_format("torch")

    return make


@pytest.fixture
def make_tiny_model():
    """Factory: ``create_model("resnet18", LABELS, input_size=16, **kwargs)`` with a fixed seed.

    ``batchnorm=False`` replaces every BatchNorm by ``nn.Identity`` (exact batch-size independence, for
    gradient-accumulation and DDP equivalence checks).
    """
    from hf_isnet.modeling import create_model

    def make(seed=0, input_size=16, batchnorm=True, **kwargs):
        if not batchnorm:
            kwargs["norm_layer"] = torch.nn.Identity
        torch.manual_seed(seed)
        return create_model("resnet18", labels=LABELS, input_size=input_size, **kwargs)

    return make


@pytest.fixture
def make_isnet_args(tmp_path):
    """Factory: ``ISNetTrainingArguments`` for fast CPU tests (overridable by keyword).

    Defaults: output_dir under ``tmp_path``, use_cpu, no reporting, no saving, no workers, 3 steps of
    batch 4, logging every step, ``relevance_range="1,10"`` (skips the calibration).
    """
    from hf_isnet.training_args import ISNetTrainingArguments

    def make(**overrides):
        kwargs = dict(
            output_dir=str(tmp_path / "out"),
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            dataloader_num_workers=0,
            per_device_train_batch_size=4,
            per_device_eval_batch_size=4,
            max_steps=3,
            logging_steps=1,
            relevance_range="1,10",
            disable_tqdm=True,
            seed=0,
        )
        kwargs.update(overrides)
        return ISNetTrainingArguments(**kwargs)

    return make


@pytest.fixture
def single_thread():
    """Run a test with one intra-op thread (restored afterwards).

    Tiny models gain nothing from intra-op parallelism, and on a shared 2-core machine two threads per
    process oversubscribe the cores: a tiny resnet18 step then runs ~10x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
