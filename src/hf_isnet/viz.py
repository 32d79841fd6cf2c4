"""Heatmap figures: images beside their LRP heatmaps, with the foreground mask outlined.

Part of the Hugging Face layer (uses matplotlib; ``hf_isnet.lrp`` never imports it). Figures are built
with :class:`matplotlib.figure.Figure` directly, not ``pyplot``: nothing is displayed, no global backend
is switched, and ``savefig`` renders with Agg.

Colours: relevance is drawn with a diverging colormap centred at 0 (red = evidence for the explained
class, blue = against, white = none), with symmetric limits ``[-v, v]`` per heatmap, ``v`` the
``percentile``-th percentile of ``|R|`` (100 = the maximum), so one extreme pixel does not wash out
the map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

__all__ = ["heatmap_to_rgb", "plot_heatmaps", "symmetric_limit"]

ArrayLike = torch.Tensor | np.ndarray


def _numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float32).numpy()
    return np.asarray(x, dtype=np.float32)


def _as_maps(heatmaps: ArrayLike) -> np.ndarray:
    """``[B, C, H, W]`` (summed over channels) or ``[B, H, W]`` -> ``[B, H, W]``."""
    h = _numpy(heatmaps)
    if h.ndim == 4:
        return h.sum(1)
    if h.ndim == 3:
        return h
    raise ValueError(f"heatmaps must be [B, C, H, W] or [B, H, W], got shape {h.shape}; for one map add a "
                     "batch dimension, for several maps per image (target='all', Dual) pick one: heatmaps[:, k]")


def symmetric_limit(heatmap: ArrayLike, percentile: float = 99.5) -> float:
    """``v`` of the symmetric colour range ``[-v, v]``: the ``percentile`` of ``|R|`` (1.0 for an all-zero map)."""
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must lie in (0, 100], got {percentile}")
    v = float(np.percentile(np.abs(_numpy(heatmap)), percentile))
    return v if v > 0 else 1.0


def heatmap_to_rgb(heatmap: ArrayLike, *, percentile: float = 99.5, cmap: str = "bwr") -> np.ndarray:
    """One heatmap (``[C, H, W]``, summed over channels, or ``[H, W]``) as an ``[H, W, 3]`` float RGB array
    in [0, 1], coloured as in :func:`plot_heatmaps` (for logging to TensorBoard or W&B)."""
    h = _numpy(heatmap)
    if h.ndim == 3:
        h = h.sum(0)
    if h.ndim != 2:
        raise ValueError(f"heatmap must be [C, H, W] or [H, W], got shape {h.shape}")
    v = symmetric_limit(h, percentile)
    return matplotlib.colormaps[cmap](Normalize(-v, v, clip=True)(h))[..., :3].astype(np.float32)


def _display_images(images: ArrayLike, mean, std) -> np.ndarray:
    """``[B, C, H, W]`` (C = 1 or 3) -> ``[B, H, W, C]`` in [0, 1] for display."""
    x = _numpy(images)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be [B, C, H, W] with C = 1 or 3, got shape {x.shape}")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std (the normalisation x = (pixel - mean) / std) or neither")
    if mean is not None:
        shape = (1, -1, 1, 1)
        x = x * np.asarray(std, dtype=np.float32).reshape(shape) + np.asarray(mean, dtype=np.float32).reshape(shape)
    else:  # unknown normalisation: stretch each image to [0, 1] if it leaves that range
        lo, hi = x.min(axis=(1, 2, 3), keepdims=True), x.max(axis=(1, 2, 3), keepdims=True)
        out = (lo < 0) | (hi > 1)
        x = np.where(out, (x - lo) / np.maximum(hi - lo, 1e-12), x)
    return np.clip(x, 0.0, 1.0).transpose(0, 2, 3, 1)


def plot_heatmaps(
    images: ArrayLike,
    heatmaps: ArrayLike,
    masks: ArrayLike | None = None,
    titles: Sequence[str] | None = None,
    path: str | Path | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    ncols: int = 4,
    *,
    percentile: float = 99.5,
    cmap: str = "bwr",
    panel_size: float = 2.0,
    dpi: int = 100,
) -> Figure:
    """A grid of (image, heatmap) pairs, ``ncols`` pairs per row.

    Args:
        images: ``[B, C, H, W]``, C = 1 (grayscale) or 3, as fed to the model.
        heatmaps: ``[B, C, H, W]`` relevance (summed over channels for display) or ``[B, H, W]``.
        masks: optional ``[B, 1, H, W]`` or ``[B, H, W]`` foreground masks (1 = foreground), outlined
            on both panels.
        titles: optional one title per image (e.g. the label and the explained class).
        path: if given, the figure is saved there as PNG (parent folders are created).
        mean, std: the per-channel normalisation of ``images`` (``x = (pixel - mean) / std``), undone for
            display. Without them, images outside [0, 1] are stretched per image to [0, 1].
        ncols: image/heatmap pairs per row.
        percentile: the colour range of each heatmap is ``[-v, v]`` with ``v`` this percentile of ``|R|``.
        cmap: a diverging matplotlib colormap whose centre is white (``"bwr"``, ``"seismic"``).
        panel_size: inches per panel; dpi: resolution of the saved PNG.

    Returns:
        The :class:`matplotlib.figure.Figure` (heatmap panels hold ``AxesImage`` artists whose norm is
        ``[-v, v]``).
    """
    shown = _display_images(images, mean, std)
    maps = _as_maps(heatmaps)
    b, h, w = maps.shape
    if shown.shape[0] != b or shown.shape[1:3] != (h, w):
        raise ValueError(f"images {tuple(_numpy(images).shape)} and heatmaps {tuple(_numpy(heatmaps).shape)} "
                         "must have the same batch size and spatial size")
    outlines = None
    if masks is not None:
        outlines = _numpy(masks)
        if outlines.ndim == 4 and outlines.shape[1] == 1:
            outlines = outlines[:, 0]
        if outlines.shape != (b, h, w):
            raise ValueError(f"masks must be [B, 1, H, W] or [B, H, W] matching heatmaps {(b, h, w)}, "
                             f"got shape {tuple(_numpy(masks).shape)}")
    if titles is not None and len(titles) != b:
        raise ValueError(f"got {len(titles)} titles for {b} images")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")

    ncols = min(ncols, b)
    nrows = math.ceil(b / ncols)
    fig = Figure(figsize=(2 * ncols * panel_size, nrows * panel_size * 1.1), dpi=dpi)
    axes = fig.subplots(nrows, 2 * ncols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for i in range(b):
        ax_img, ax_map = axes[i // ncols, 2 * (i % ncols)], axes[i // ncols, 2 * (i % ncols) + 1]
        if shown.shape[-1] == 1:
            ax_img.imshow(shown[i, ..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        else:
            ax_img.imshow(shown[i], interpolation="nearest")
        v = symmetric_limit(maps[i], percentile)
        ax_map.imshow(maps[i], cmap=cmap, norm=Normalize(-v, v, clip=True), interpolation="nearest")
        if outlines is not None and 0 < outlines[i].max() and outlines[i].min() < 1:
            for ax, colour in ((ax_img, "lime"), (ax_map, "black")):
                ax.contour(outlines[i], levels=[0.5], colors=colour, linewidths=0.8)
        if titles is not None:
            ax_img.set_title(str(titles[i]), fontsize=8)
        ax_map.set_title(f"R in [-{v:.2g}, {v:.2g}]", fontsize=7)
    fig.tight_layout()
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=dpi)
    return fig
