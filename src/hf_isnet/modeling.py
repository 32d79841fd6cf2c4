"""timm backbones for the ISNet: building a classifier, loading local weights, aligned image + mask transforms.

A model made here is a plain timm ``nn.Module`` whose ``pretrained_cfg`` carries the label names and the
preprocessing (input size, mean/std, interpolation, crop) it is used with. ``hf_isnet.hub`` saves it in
timm's native Hub layout, so the saved folder loads without hf_isnet in timm and transformers.

Nothing here downloads: ``pretrained`` is always a local file or folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import resolve_data_config
from timm.data.transforms import str_to_interp_mode
from timm.models import load_state_dict
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2

__all__ = ["create_model", "data_config", "build_transforms", "ImageMaskTransform"]

_logger = logging.getLogger(__name__)

# Weight files that ``pretrained`` may name directly (a folder is searched like timm's "local-dir:").
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".tar", ".ckpt")
# pretrained_cfg keys describing the preprocessing the weights were trained with: taken over from the
# config.json of a weights folder, since they belong to the weights, not to the architecture.
_PREPROCESSING_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
# Prefix transformers' TimmWrapper puts before every timm key when it saves.
_TIMM_WRAPPER_PREFIX = "timm_model."


def create_model(
    model_name: str,
    labels: Sequence[str],
    pretrained: str | os.PathLike[str] | bool | None = None,
    in_chans: int = 3,
    input_size: int | tuple[int, int] | None = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """Build a timm classifier with one output per label, optionally loading local weights.

    Args:
        model_name: a timm architecture (``"resnet18"``, ``"resnet50"``, ``"densenet121"``, ...). Any timm
            model works here; the LRP engine checks later that it only uses ReLU-family activations.
        labels: class names, in logit order; ``num_classes = len(labels)``. They are stored in
            ``model.pretrained_cfg["label_names"]`` and travel to the Hub config.
        pretrained: ``None``/``False`` for random initialisation, or a LOCAL path: a weight file
            (``.safetensors``, ``.pth``, ``.pt``, ``.bin``, ``.pth.tar``) or a folder saved by
            ``hf_isnet.hub.save_pretrained`` / ``timm.models.save_for_hf`` / a Hub snapshot. ``True`` is
            refused: nothing is ever downloaded. If the file's classifier has another number of classes,
            its classifier weights are dropped (with a log line) and the new classifier stays freshly
            initialised; every other key must match exactly.
        in_chans: input channels (3 for RGB; 1 for single-channel images).
        input_size: ``(height, width)`` or one int for a square; the size images are resized to.
            ``None`` keeps the architecture's default (224 for ImageNet models).
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``drop_rate``, or
            ``pretrained_cfg_overlay=dict(crop_pct=1.0, crop_mode="squash")`` to change the preprocessing).

    Returns:
        The timm model (``nn.Module``) in training mode, with ``pretrained_cfg`` (and ``default_cfg``, the
        same dict) describing labels and preprocessing.
    """
    labels = _check_labels(labels)
    for reserved in ("num_classes", "pretrained", "checkpoint_path"):
        if reserved in timm_kwargs:
            raise TypeError(
                f"create_model() does not take {reserved!r}: the number of classes comes from `labels` and "
                "weights from `pretrained` (a local path)."
            )
    if pretrained is True:
        raise ValueError(
            f"pretrained=True would download weights for {model_name!r}, and hf_isnet never downloads "
            "(HF_HUB_OFFLINE-safe by design). Pass a local file or folder instead, e.g. "
            f"create_model({model_name!r}, labels, pretrained='path/to/model.safetensors'); to start from "
            "Hub weights, fetch them yourself first (huggingface_hub.snapshot_download(repo_id)) and pass "
            "the folder."
        )

    model = timm.create_model(
        model_name, pretrained=False, num_classes=len(labels), in_chans=in_chans, **timm_kwargs
    )
    cfg = deepcopy(dict(model.pretrained_cfg))

    state_dict = None
    if pretrained not in (None, False):
        state_dict, file_cfg = _read_weights(Path(pretrained).expanduser())
        if file_cfg is not None:
            saved_arch = file_cfg.get("architecture")
            if saved_arch is not None and saved_arch != cfg.get("architecture", model_name):
                raise ValueError(
                    f"the weights in {str(pretrained)!r} are for architecture {saved_arch!r}, "
                    f"not {model_name!r}: call create_model({saved_arch!r}, ...)."
                )
            saved_pre = file_cfg.get("pretrained_cfg", {})
            cfg.update({k: saved_pre[k] for k in _PREPROCESSING_KEYS if k in saved_pre})

    _set_input_config(cfg, in_chans, input_size)
    cfg["num_classes"] = len(labels)
    cfg["label_names"] = list(labels)
    model.pretrained_cfg = model.default_cfg = cfg

    if state_dict is not None:
        _load_weights(model, state_dict, source=str(pretrained))
    return model


def _check_labels(labels: Sequence[str]) -> list[str]:
    if isinstance(labels, str) or not isinstance(labels, Sequence):
        raise TypeError(f"labels must be a sequence of class names, got {type(labels).__name__}: {labels!r}")
    labels = list(labels)
    if not labels:
        raise ValueError("labels is empty: give one name per class, in logit order.")
    bad = [label for label in labels if not isinstance(label, str)]
    if bad:
        raise TypeError(f"labels must be strings; got {bad[:5]!r}")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"labels must be unique (they become label2id on the Hub); duplicates: {duplicates}")
    return labels


def _set_input_config(cfg: dict[str, Any], in_chans: int, input_size: int | tuple[int, int] | None) -> None:
    """Make ``cfg``'s input size and mean/std agree with ``in_chans`` and the requested ``input_size``."""
    height, width = cfg.get("input_size", (3, 224, 224))[1:]
    if input_size is not None:
        height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        # Test-time sizes and the pooled feature size belonged to the old input size.
        cfg.pop("test_input_size", None)
        cfg.pop("pool_size", None)
    cfg["input_size"] = (in_chans, int(height), int(width))
    for key in ("mean", "std"):
        values = tuple(cfg.get(key, ()))
        if values and len(values) != in_chans:
            # One channel: the average statistic (as for a grey image from RGB); otherwise repeat channels,
            # like timm's adapt_input_conv does with first-layer weights.
            if in_chans == 1:
                values = (sum(values) / len(values),)
            else:
                values = tuple(values[i % len(values)] for i in range(in_chans))
            cfg[key] = values


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Read a state dict (and the folder's ``config.json``, if any) from a local file or folder."""
    if not path.exists():
        raise FileNotFoundError(
            f"pretrained={str(path)!r} is not an existing file or folder. hf_isnet reads weights only from "
            "local paths (nothing is downloaded): give a .safetensors/.pth file or a saved model folder."
        )
    config = None
    if path.is_dir():
        files = [p for p in sorted(path.iterdir()) if p.name.endswith(WEIGHT_SUFFIXES)]
        if not files:
            raise FileNotFoundError(f"no weight file ({', '.join(WEIGHT_SUFFIXES)}) in folder {str(path)!r}.")
        preferred = [p for p in files if p.name == "model.safetensors"] or [
            p for p in files if p.suffix == ".safetensors"
        ]
        weights = (preferred or files)[0]
        if (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    else:
        weights = path
    state_dict = load_state_dict(str(weights), use_ema=True, weights_only=True)
    if state_dict and all(k.startswith(_TIMM_WRAPPER_PREFIX) for k in state_dict):
        state_dict = {k[len(_TIMM_WRAPPER_PREFIX) :]: v for k, v in state_dict.items()}
    return state_dict, config


def _classifier_names(model: nn.Module) -> tuple[str, ...]:
    names = model.pretrained_cfg.get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def _load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Strictly load ``state_dict``, except a classifier of another size, which is dropped with a log line."""
    state_dict = dict(state_dict)
    own = model.state_dict()
    classifiers = _classifier_names(model)
    dropped = []
    for key in list(state_dict):
        in_classifier = any(key == c or key.startswith(c + ".") for c in classifiers)
        if in_classifier and key in own and state_dict[key].shape != own[key].shape:
            dropped.append(f"{key} {tuple(state_dict[key].shape)} -> {tuple(own[key].shape)}")
            del state_dict[key]
    dropped_keys = {d.split(" ")[0] for d in dropped}
    if dropped:
        _logger.warning(
            "create_model: the classifier in %s has another number of classes; dropped its weights (%s). "
            "The classifier '%s' keeps its fresh initialisation.",
            source,
            ", ".join(dropped),
            "', '".join(classifiers),
        )
    missing = [k for k in own if k not in state_dict and k not in dropped_keys]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k}: {tuple(v.shape)} in file, {tuple(own[k].shape)} in model"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append("shape mismatch: " + "; ".join(mismatched[:20]))
        if missing:
            parts.append(f"missing in file ({len(missing)}): " + ", ".join(missing[:20]))
        if unexpected:
            parts.append(f"unexpected in file ({len(unexpected)}): " + ", ".join(unexpected[:20]))
        raise ValueError(
            f"the weights in {source} do not fit {model.pretrained_cfg.get('architecture', type(model).__name__)} "
            f"(in_chans={model.pretrained_cfg['input_size'][0]}): " + " | ".join(parts)
        )
    model.load_state_dict(state_dict, strict=False)


def data_config(model: nn.Module) -> dict[str, Any]:
    """The model's preprocessing: ``timm.data.resolve_data_config(model=model)``.

    Keys: ``input_size`` (C, H, W), ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``.
    """
    return resolve_data_config(model=model)


def build_transforms(
    model: nn.Module | Mapping[str, Any], train: bool = False, augment: bool = True
) -> v2.Compose:
    """torchvision v2 transforms applied jointly to an image and its ``tv_tensors.Mask``.

    The geometry is timm's: for evaluation (``train=False``, or ``augment=False``) exactly what
    ``timm.data.create_transform(**data_config, is_training=False)`` does to the image (resize to
    ``input_size / crop_pct``, center crop to ``input_size``), so a model served through transformers'
    ``pipeline`` sees the same pixels as in evaluation here. For training with ``augment=True``: an aligned
    ``RandomResizedCrop(input_size, scale=(0.8, 1))`` and ``RandomHorizontalFlip``. Masks are resized with
    nearest interpolation and never normalised; the image is converted to float in [0, 1] and normalised
    with the model's mean/std.

    Args:
        model: a timm model, or a data config as returned by :func:`data_config`.
        train: transforms for training.
        augment: random crop and flip when ``train``.

    Input/output: ``(image, mask)`` with the image a PIL image (``in_chans`` bands) or ``tv_tensors.Image``
    and the mask a ``tv_tensors.Mask`` ``[1, H, W]``; returns ``(tv_tensors.Image float [C, h, w],
    tv_tensors.Mask [1, h, w])``.
    """
    cfg = dict(model) if isinstance(model, Mapping) else data_config(model)
    size = tuple(cfg["input_size"][1:])
    interpolation = str_to_interp_mode(cfg.get("interpolation", "bilinear"))
    if train and augment:
        geometry = [
            v2.RandomResizedCrop(size, scale=(0.8, 1.0), interpolation=interpolation, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    else:
        geometry = _eval_geometry(cfg, size, interpolation)
    return v2.Compose(
        [
            *geometry,
            v2.ToImage(),
            v2.Lambda(_to_unit_float, tv_tensors.Image),  # images only; masks keep their dtype
            v2.Normalize(mean=list(cfg["mean"]), std=list(cfg["std"])),
        ]
    )


def _to_unit_float(image: tv_tensors.Image) -> tv_tensors.Image:
    """uint8 [0, 255] -> float32 [0, 1], computed as timm's ToTensor does (``div(255)``) so results match."""
    if image.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}; give PIL images or uint8 tensors")
    return tv_tensors.wrap(image.to(torch.float32).div(255), like=image)


def _eval_geometry(
    cfg: Mapping[str, Any], size: tuple[int, int], interpolation: v2.InterpolationMode
) -> list:
    """timm's evaluation resize + crop (``transforms_imagenet_eval``), written with v2 so masks follow."""
    crop_pct = cfg.get("crop_pct") or 0.875  # timm's DEFAULT_CROP_PCT
    crop_mode = cfg.get("crop_mode") or "center"
    scale_size = tuple(math.floor(s / crop_pct) for s in size)
    if crop_mode == "squash":
        resize = v2.Resize(scale_size, interpolation=interpolation, antialias=True)
    elif crop_mode == "center" and scale_size[0] == scale_size[1]:
        resize = v2.Resize(scale_size[0], interpolation=interpolation, antialias=True)  # shortest edge
    else:
        raise ValueError(
            f"crop_mode={crop_mode!r} with input size {size} is not supported for image + mask pairs; use "
            "a square input_size with crop_mode 'center', or crop_mode 'squash' "
            "(create_model(..., pretrained_cfg_overlay=dict(crop_mode='squash')))."
        )
    return [resize, v2.CenterCrop(size)]


class ImageMaskTransform:
    """Callable turning ``(PIL image, PIL mask)`` into ``(pixel_values [C, H, W], mask [1, H, W])``.

    The image is converted to the model's channel count (grey -> RGB for 3 channels, RGB -> grey for 1),
    then image and mask go through :func:`build_transforms` together. Masks are binary: foreground is
    any non-zero value ('L' or '1' PNGs with {0, 255} or {0, 1}). Soft masks (more than one non-zero
    value) need ``mask_threshold``: foreground is ``value > mask_threshold * max`` (max = 255 for 8-bit).

    Args:
        model: a timm model, or a data config as returned by :func:`data_config`.
        train: training transforms (see :func:`build_transforms`).
        augment: random crop and flip when ``train``.
        mask_threshold: in [0, 1); ``None`` refuses soft masks with an error.

    Returns from a call: ``pixel_values`` float32 normalised, ``mask`` float32 in {0, 1} (``None`` when
    the mask given is ``None``).
    """

    def __init__(
        self,
        model: nn.Module | Mapping[str, Any],
        train: bool = False,
        augment: bool = True,
        mask_threshold: float | None = None,
    ) -> None:
        if mask_threshold is not None and not 0.0 <= mask_threshold < 1.0:
            raise ValueError(
                f"mask_threshold must be in [0, 1) (a fraction of the mask's maximum), got {mask_threshold}"
            )
        self.config = dict(model) if isinstance(model, Mapping) else data_config(model)
        self.in_chans = int(self.config["input_size"][0])
        self.mask_threshold = mask_threshold
        self.transforms = build_transforms(self.config, train=train, augment=augment)

    def __call__(
        self, image: Image.Image | np.ndarray, mask: Image.Image | np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        image = self._image(image)
        if mask is None:
            pixels = self.transforms(image)
            return pixels.as_subclass(torch.Tensor), None
        mask_tensor = self._mask(mask)
        if tuple(mask_tensor.shape[1:]) != (image.height, image.width):
            raise ValueError(
                f"mask has shape {tuple(mask_tensor.shape[1:])} (H, W) but the image is "
                f"{(image.height, image.width)}: masks must have the image's size."
            )
        pixels, mask_out = self.transforms(image, mask_tensor)
        return pixels.as_subclass(torch.Tensor), mask_out.as_subclass(torch.Tensor).to(torch.float32)

    def _image(self, image: Image.Image | np.ndarray) -> Image.Image:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL image or a numpy array, got {type(image).__name__}")
        if self.in_chans == 3:
            return image.convert("RGB")
        if self.in_chans == 1:
            return image.convert("L")
        if len(image.getbands()) != self.in_chans:
            raise ValueError(
                f"image has {len(image.getbands())} bands but the model takes {self.in_chans} channels"
            )
        return image

    def _mask(self, mask: Image.Image | np.ndarray) -> tv_tensors.Mask:
        array = np.asarray(mask)
        if array.ndim == 3:
            if not (array == array[..., :1]).all():
                raise ValueError(
                    f"mask has {array.shape[-1]} different channels; give a single-channel ('L' or '1') mask."
                )
            array = array[..., 0]
        if array.ndim != 2:
            raise ValueError(f"mask must be 2-D (H, W), got shape {array.shape}")
        if self.mask_threshold is None:
            values = np.unique(array)
            nonzero = values[values != 0]
            if len(nonzero) > 1:
                raise ValueError(
                    f"mask is not binary: {len(nonzero)} distinct non-zero values "
                    f"(e.g. {nonzero[:5].tolist()}). Soft masks need a rule: pass mask_threshold "
                    "(foreground = value > mask_threshold * max)."
                )
            foreground = array != 0
        else:
            top = np.iinfo(array.dtype).max if np.issubdtype(array.dtype, np.integer) else 1.0
            foreground = array.astype(np.float64) > self.mask_threshold * top
        return tv_tensors.Mask(torch.from_numpy(foreground.astype(np.uint8))[None])
