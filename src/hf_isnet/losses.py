"""The ISNet heatmap loss (Faster ISNet paper, section II-C/D, eq. (7)-(8); LDS, section II-H).

Pure PyTorch. Shape conventions used throughout:

- ``heatmaps``: ``[B, K, C, H, W]`` -- B images, K heatmaps per image (one per class for the
  original ISNet, two for the Dual ISNet, one for Selective/Stochastic), C channels (3 for an RGB
  input-level map, the number of feature channels for an LRP Deep Supervision map), H x W pixels.
  Relevance is unitless (LRP relevance, in units of the explained logit).
- ``masks``: ``[B, 1, H, W]``, 1 = foreground, 0 = background, any float/int/bool dtype.

``L_LRP = w1 * L1 + w2 * L2`` (:func:`heatmap_loss`), with the background loss L1
(:func:`background_loss`) and the foreground loss L2 (:func:`foreground_loss`). Per-layer LDS losses
are aggregated with :func:`lds_aggregate`; masks are resized to intermediate maps with
:func:`resize_mask` and validated with :func:`check_masks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "HeatmapLoss",
    "background_loss",
    "check_masks",
    "foreground_loss",
    "gwrp",
    "heatmap_loss",
    "lds_aggregate",
    "range_penalty",
    "resize_mask",
]

# The "+ tiny" of the foreground-mean normaliser (method.md, L1 step 2) has two parts:
# - relative: 1e-6 x the mean of |R| over the whole map. It bounds A / normaliser by
#   (C*H*W) / 1e-6, so a map whose foreground relevance is exactly 0 while its background holds huge
#   relevance (1e30) still gives a finite loss; for any ordinary map it moves the loss by < 1e-6
#   relative, and it keeps L1 invariant to the scale of R.
# - absolute: 1e-30, so an all-zero map gives 0 / 1e-30 = 0 instead of 0 / 0, while the gradient
#   factor 1 / 1e-30 stays far below float32's maximum (3.4e38).
_REL_TINY = 1e-6
_ABS_TINY = 1e-30


class HeatmapLoss(NamedTuple):
    """Result of :func:`heatmap_loss`: three 0-d tensors.

    ``total = w1 * background + w2 * foreground`` is the quantity to optimise (``L_LRP``);
    ``background`` (L1) and ``foreground`` (L2) are the unweighted parts, for logging. Being a
    NamedTuple it also unpacks: ``total, l1, l2 = heatmap_loss(...)``.
    """

    total: torch.Tensor
    background: torch.Tensor
    foreground: torch.Tensor


def gwrp(values: torch.Tensor, d: float) -> torch.Tensor:
    """Global Weighted Ranked Pooling over the last dimension (differentiable).

    Sorts ``values[..., :]`` in descending order and returns ``sum_i d**i * v_(i) / sum_i d**i``,
    where the normaliser runs over all n positions. ``d = 0`` is max pooling, ``d = 1`` the mean.

    Args:
        values: ``[..., n]`` tensor, n >= 1; the leading dimensions are pooled independently.
        d: decay, ``0 <= d <= 1``.

    Returns:
        ``[...]`` tensor (the last dimension removed), same dtype as ``values``.
    """
    if not 0.0 <= d <= 1.0:  # also rejects NaN
        raise ValueError(f"GWRP decay d must lie in [0, 1] (0 = max pooling, 1 = mean), got {d}")
    n = values.shape[-1]
    if n == 0:
        raise ValueError("gwrp needs at least one value along the last dimension, got an empty one")
    ranked = torch.sort(values, dim=-1, descending=True).values
    # pow(0, 0) == 1 and pow(0, i > 0) == 0, so d = 0 yields the weights [1, 0, ...] (max pooling)
    # directly; computing d**i as exp(i * log d) instead would give 0 * -inf = NaN there.
    exponents = torch.arange(n, dtype=values.dtype, device=values.device)
    weights = torch.pow(torch.tensor(d, dtype=values.dtype, device=values.device), exponents)
    return (ranked * weights).sum(dim=-1) / weights.sum()


def lds_aggregate(losses: torch.Tensor | Sequence[torch.Tensor], d: float = 0.8) -> torch.Tensor:
    """LRP Deep Supervision aggregation: 1-D GWRP over the per-layer heatmap losses.

    The losses are sorted in descending order and averaged with weights ``d**i``, so the worst
    supervised layer dominates (paper, Algorithm 1 step 7).

    Args:
        losses: ``[L]`` tensor (or a sequence of 0-d tensors) of per-layer losses, input level
            included.
        d: LDS decay ``d_LDS`` in [0, 1] (default 0.8).

    Returns:
        0-d tensor, differentiable w.r.t. every loss.
    """
    if not isinstance(losses, torch.Tensor):
        losses = torch.stack(list(losses))
    if losses.dim() != 1:
        raise ValueError(
            f"lds_aggregate expects a 1-D tensor of per-layer losses, got shape {tuple(losses.shape)}"
        )
    return gwrp(losses, d)


def _check_pair(heatmaps: torch.Tensor, masks: torch.Tensor) -> None:
    """Cheap shape checks shared by the losses (values are checked by :func:`check_masks`)."""
    if heatmaps.dim() != 5:
        raise ValueError(
            f"heatmaps must have shape [B, K, C, H, W] (K maps per image), got {tuple(heatmaps.shape)}; "
            "for one map per image use heatmaps.unsqueeze(1)"
        )
    b, _, _, h, w = heatmaps.shape
    if tuple(masks.shape) != (b, 1, h, w):
        raise ValueError(
            f"masks have shape {tuple(masks.shape)} but heatmaps {tuple(heatmaps.shape)} need masks "
            f"of shape {(b, 1, h, w)}; resize masks to intermediate maps with hf_isnet.losses.resize_mask"
        )


def _as_float(heatmaps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Heatmaps in at least float32 (half precision overflows the sums), masks as [B, 1, 1, H, W]."""
    if heatmaps.dtype in (torch.float16, torch.bfloat16):
        heatmaps = heatmaps.float()
    return heatmaps, masks.to(heatmaps.dtype).unsqueeze(1)


def background_loss(
    heatmaps: torch.Tensor, masks: torch.Tensor, d: float = 0.9, E: float = 1.0
) -> torch.Tensor:
    """Background heatmap loss L1 (paper section II-C, steps 1-7; method.md "The heatmap loss").

    Per heatmap: ``A = |R|``; ``A / (mean of A over the map's foreground elements + tiny)`` (mean
    over all channels and foreground pixels together); multiply by ``1 - mask``; GWRP with decay
    ``d`` per channel over all H*W positions (foreground zeros included); then
    ``-ln(1 - x / (x + E))``, computed as ``ln(1 + x / E)``; mean over channels, maps and batch.

    The normalisation makes L1 invariant to the scale of R (the foreground loss L2 controls the
    scale). "tiny" is ``1e-6 * mean(|R| over the whole map) + 1e-30``: it keeps the loss and its
    gradient finite when the foreground holds no relevance, and moves any ordinary value by
    < 1e-6 relative.

    Maps without foreground: a mask with no foreground pixel (an image that shows only
    background) has no foreground mean, so its map is normalised by the mean of |R| over the whole
    map instead. Its L1 then measures how concentrated the (all-background) relevance is -- about
    ``ln 2`` for uniform relevance and E = 1, more for peaked relevance -- and stays finite and
    scale-invariant rather than exploding as ``|R| / tiny`` would.

    Args:
        heatmaps: ``[B, K, C, H, W]`` relevance (float; half precision is computed in float32).
        masks: ``[B, 1, H, W]`` binary, 1 = foreground.
        d: GWRP decay in [0, 1] (0 = max pooling, 1 = mean); paper default 0.9.
        E: activation constant ``E > 0`` of ``x / (x + E)``; paper default 1.

    Returns:
        0-d tensor, unitless (0 when there is no background relevance).
    """
    if not E > 0:
        raise ValueError(f"E must be positive, got {E}")
    _check_pair(heatmaps, masks)
    heatmaps, masks = _as_float(heatmaps, masks)
    b, k, c, h, w = heatmaps.shape
    a = heatmaps.abs()
    mean_all = a.mean(dim=(2, 3, 4))  # [B, K]
    fg_pixels = masks.sum(dim=(2, 3, 4))  # [B, 1]
    # clamp: an all-background mask gives 0 / 1 = 0 here instead of 0 / 0; torch.where then
    # picks the whole-map mean for it (both branches are finite, so the gradient is too).
    mean_fg = (a * masks).sum(dim=(2, 3, 4)) / (c * fg_pixels).clamp(min=1)
    mean_fg = torch.where(fg_pixels > 0, mean_fg, mean_all)
    normaliser = (mean_fg + _REL_TINY * mean_all + _ABS_TINY)[..., None, None, None]
    background = (a / normaliser) * (1 - masks)
    scores = gwrp(background.reshape(b, k, c, h * w), d)  # [B, K, C]
    return torch.log1p(scores / E).mean()


def range_penalty(s: torch.Tensor, c1: float | torch.Tensor, c2: float | torch.Tensor) -> torch.Tensor:
    """Paper eq. (8): the penalty on a total foreground relevance ``s`` outside ``[c1, c2]``.

    ``(c1 - s)^2 / c1^2`` for ``s < c1``; 0 on ``[c1, c2]``; ``(c2 - s)^2 / c1^2`` on
    ``[c2, c2 + c1]``; ``1 + s - (c2 + c1)`` above. Continuous everywhere (value 1 at
    ``c2 + c1``); the linear tail keeps the gradient bounded for exploding relevance. Elementwise,
    broadcasting ``s`` against ``c1`` and ``c2``; no validation (see :func:`foreground_loss`).
    """
    # Written with relu/minimum rather than torch.where so that no branch is evaluated outside its
    # range: (c1 - s)^2 for s = 1e30 would overflow float32 even where it is not selected.
    below = torch.relu(c1 - s)  # in [0, c1] because s >= 0
    excess = torch.relu(s - c2)
    capped = torch.minimum(excess, torch.as_tensor(c1, dtype=s.dtype, device=s.device))
    return (below**2 + capped**2) / c1**2 + torch.relu(excess - c1)


def _range_bounds(
    c1: float | torch.Tensor, c2: float | torch.Tensor, k: int, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validates ``0 < c1 <= c2`` and returns both as tensors broadcastable to ``[B, K]``."""
    bounds = []
    for name, value in (("c1", c1), ("c2", c2)):
        t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
        if t.dim() > 1 or (t.dim() == 1 and t.numel() not in (1, k)):
            raise ValueError(
                f"{name} must be a number or a tensor of shape [K] = [{k}] (one value per map), "
                f"got shape {tuple(t.shape)}"
            )
        bounds.append(t)
    lo, hi = bounds
    if not bool(torch.all((lo > 0) & (lo <= hi))):
        raise ValueError(
            f"the relevance range needs 0 < c1 <= c2, got c1={lo.tolist()}, c2={hi.tolist()}; "
            "derive it with hf_isnet.calibration.relevance_range"
        )
    return lo, hi


def foreground_loss(
    heatmaps: torch.Tensor,
    masks: torch.Tensor,
    c1: float | torch.Tensor,
    c2: float | torch.Tensor,
) -> torch.Tensor:
    """Foreground heatmap loss L2 (paper section II-C/D, eq. (8)).

    Per heatmap ``s = sum |R| * mask`` over channels and pixels, penalised by
    :func:`range_penalty` outside ``[c1, c2]``; mean over maps and batch.

    Args:
        heatmaps: ``[B, K, C, H, W]`` relevance.
        masks: ``[B, 1, H, W]`` binary, 1 = foreground.
        c1, c2: relevance range ``0 < c1 <= c2`` in units of total absolute relevance: numbers,
            or tensors of shape ``[K]`` giving each of the K maps its own range (e.g. the Dual
            ISNet's epsilon and z+ halves).

    Returns:
        0-d tensor, unitless.
    """
    _check_pair(heatmaps, masks)
    heatmaps, masks = _as_float(heatmaps, masks)
    lo, hi = _range_bounds(c1, c2, heatmaps.shape[1], heatmaps)
    s = (heatmaps.abs() * masks).sum(dim=(2, 3, 4))  # [B, K]
    return range_penalty(s, lo, hi).mean()


def heatmap_loss(
    heatmaps: torch.Tensor,
    masks: torch.Tensor,
    c1: float | torch.Tensor,
    c2: float | torch.Tensor,
    d: float = 0.9,
    E: float = 1.0,
    w1: float = 1.0,
    w2: float = 1.0,
) -> HeatmapLoss:
    """The heatmap loss ``L_LRP = w1 * L1 + w2 * L2`` (paper eq. (7)).

    Args:
        heatmaps: ``[B, K, C, H, W]`` relevance; masks: ``[B, 1, H, W]`` binary, 1 = foreground.
        c1, c2: relevance range (numbers or ``[K]`` tensors), see :func:`foreground_loss`.
        d, E: GWRP decay and activation constant of :func:`background_loss`.
        w1, w2: weights of L1 and L2, ``>= 0`` (the paper uses positive values; 0 switches a
            term off for ablations).

    Returns:
        :class:`HeatmapLoss` ``(total, background, foreground)``.
    """
    if w1 < 0 or w2 < 0:
        raise ValueError(f"loss weights must be non-negative, got w1={w1}, w2={w2}")
    l1 = background_loss(heatmaps, masks, d=d, E=E)
    l2 = foreground_loss(heatmaps, masks, c1, c2)
    return HeatmapLoss(total=w1 * l1 + w2 * l2, background=l1, foreground=l2)


def resize_mask(masks: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Conservative mask resizing for intermediate (LDS) heatmaps.

    A cell of the target grid is foreground if ANY input pixel it overlaps is foreground. This is
    adaptive max pooling, which also covers sizes that do not divide each other (7 -> 3: cell i
    spans input pixels ``floor(i*7/3)`` to ``ceil((i+1)*7/3) - 1``) and upsampling, where it equals
    nearest-neighbour interpolation for integer factors and marks a cell straddling a foreground
    pixel as foreground otherwise.

    Args:
        masks: ``[B, C, H, W]`` (normally C = 1), values {0, 1}, any dtype.
        size: target ``(h, w)`` or a single int for a square grid.

    Returns:
        ``[B, C, h, w]`` float tensor of 0s and 1s (the masks' dtype if floating, else float32).
    """
    if masks.dim() != 4:
        raise ValueError(f"masks must have shape [B, 1, H, W], got {tuple(masks.shape)}")
    target = (size, size) if isinstance(size, int) else tuple(size)
    if len(target) != 2 or min(target) < 1:
        raise ValueError(f"size must be a positive int or (height, width), got {size}")
    if not masks.is_floating_point():  # max pooling has no bool/int kernels
        masks = masks.float()
    return F.adaptive_max_pool2d(masks, target)


def check_masks(masks: torch.Tensor, images: torch.Tensor | None = None) -> None:
    """Validates a batch of segmentation masks (and their fit to the images); returns None.

    Accepted: a ``[B, 1, H, W]`` tensor of 0s and 1s in any float, int or bool dtype. ``[B, H, W]``
    is NOT silently unsqueezed: it cannot be told apart from one unbatched ``[1, H, W]`` mask, so
    the error asks for ``masks.unsqueeze(1)`` instead.

    Args:
        masks: the masks, 1 = foreground.
        images: optional ``[B, C, H, W]`` images the masks belong to; batch size and spatial size
            must match.

    Raises:
        TypeError: masks or images are not tensors.
        ValueError: wrong shape, size mismatch with the images, NaN, or values other than 0 and 1;
            the message names the problem and the fix.
    """
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"masks must be a torch.Tensor, got {type(masks).__name__}")
    shape = tuple(masks.shape)
    if masks.dim() == 3:
        raise ValueError(
            f"masks must have shape [B, 1, H, W], got 3-D shape {shape}; add the channel "
            "dimension with masks.unsqueeze(1)"
        )
    if masks.dim() != 4 or masks.shape[1] != 1:
        hint = (
            f"; masks have {masks.shape[1]} channels but ISNet uses one mask per image: merge them, "
            "e.g. masks.amax(dim=1, keepdim=True) for the union"
            if masks.dim() == 4
            else ""
        )
        raise ValueError(f"masks must have shape [B, 1, H, W], got shape {shape}{hint}")
    if images is not None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4:
            raise ValueError(f"images must have shape [B, C, H, W], got shape {tuple(images.shape)}")
        if masks.shape[0] != images.shape[0]:
            raise ValueError(
                f"masks have batch size {masks.shape[0]} but images have {images.shape[0]}: "
                "pass one mask per image"
            )
        if masks.shape[2:] != images.shape[2:]:
            h, w = images.shape[2:]
            raise ValueError(
                f"masks are {shape[1:]} but images are {tuple(images.shape[1:])}: resize masks with "
                f"nearest interpolation to the image size, e.g. "
                f"torch.nn.functional.interpolate(masks.float(), size=({h}, {w}), mode='nearest')"
            )
    if masks.is_complex():
        raise ValueError(f"masks must be real-valued 0/1, got dtype {masks.dtype}")
    if masks.is_floating_point() and bool(torch.isnan(masks).any()):
        raise ValueError(
            "masks contain NaN; masks must be binary (0 = background, 1 = foreground): "
            "fix the mask source or replace NaN, e.g. torch.nan_to_num(masks, nan=0.0)"
        )
    if masks.dtype != torch.bool:
        bad = masks[(masks != 0) & (masks != 1)]
        if bad.numel():
            examples = sorted({float(v) for v in bad.flatten()[:1000].tolist()})[:5]
            values = set(masks.unique().tolist())
            if values <= {0, 255}:
                fix = "these look like 8-bit masks {0, 255}: use masks = (masks > 127)"
            else:
                fix = "threshold soft masks, e.g. masks = (masks > 0.5).float()"
            raise ValueError(
                "masks must be binary (0 = background, 1 = foreground), found other values "
                f"{examples} (min {masks.min().item()}, max {masks.max().item()}): {fix}"
            )
