"""hf_isnet.viz: heatmap figures (PNG output, colours centred at 0, un-normalised images, masks)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from matplotlib.image import AxesImage

from hf_isnet.viz import heatmap_to_rgb, plot_heatmaps, symmetric_limit

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _batch(b: int = 3, c: int = 3, size: int = 12):
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(b, c, size, size, generator=g)
    images = (pixels - torch.tensor(MEAN[:c]).view(1, -1, 1, 1)) / torch.tensor(STD[:c]).view(1, -1, 1, 1)
    heatmaps = torch.randn(b, c, size, size, generator=g)
    heatmaps[:, :, 0, 0] = 50.0  # one extreme pixel
    masks = torch.zeros(b, 1, size, size)
    masks[..., 3:9, 3:9] = 1
    return pixels, images, heatmaps, masks


def _panels(fig, cmap: str = "bwr"):
    """(image artists, heatmap artists) in batch order."""
    arts = [a for ax in fig.axes for a in ax.get_images()]
    assert all(isinstance(a, AxesImage) for a in arts)
    maps = [a for a in arts if a.get_cmap().name == cmap]
    return [a for a in arts if a not in maps], maps


def test_writes_a_png(tmp_path):
    _, images, heatmaps, masks = _batch()
    path = tmp_path / "sub" / "heatmaps.png"
    fig = plot_heatmaps(images, heatmaps, masks, titles=["a", "b", "c"], path=path, mean=MEAN, std=STD, ncols=2)
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes) == 2 * 2 * 2  # 2 rows of 2 (image, heatmap) pairs, the last pair empty
    assert [ax.get_title() for ax in fig.axes[::2][:3]] == ["a", "b", "c"]


@pytest.mark.parametrize("percentile", [100.0, 99.0])
def test_colours_are_centred_at_zero(percentile):
    _, images, heatmaps, _ = _batch()
    fig = plot_heatmaps(images, heatmaps, mean=MEAN, std=STD, percentile=percentile)
    _, maps = _panels(fig)
    assert len(maps) == 3
    for i, art in enumerate(maps):
        summed = heatmaps[i].sum(0).numpy()
        assert art.norm.vmin == -art.norm.vmax
        want = float(np.percentile(np.abs(summed), percentile))
        assert art.norm.vmax == pytest.approx(want, rel=1e-6)
        np.testing.assert_allclose(art.get_array(), summed, rtol=1e-6)
    if percentile < 100:  # the extreme pixel is clipped, not allowed to wash out the map
        assert maps[0].norm.vmax < heatmaps[0].sum(0).abs().max().item()


def test_images_are_unnormalised_for_display():
    pixels, images, heatmaps, _ = _batch()
    imgs, _ = _panels(plot_heatmaps(images, heatmaps, mean=MEAN, std=STD))
    for i, art in enumerate(imgs):
        np.testing.assert_allclose(art.get_array(), pixels[i].permute(1, 2, 0).numpy(), atol=1e-6)


def test_grayscale_and_channel_free_heatmaps():
    pixels, _, heatmaps, masks = _batch(b=2, c=1)
    fig = plot_heatmaps(pixels, heatmaps[:, 0], masks[:, 0])
    imgs, maps = _panels(fig)
    assert imgs[0].get_cmap().name == "gray" and imgs[0].get_array().shape == (12, 12)
    np.testing.assert_allclose(imgs[0].get_array(), pixels[0, 0].numpy())
    assert all(m.norm.vmin == -m.norm.vmax for m in maps)


def test_mask_is_outlined():
    _, images, heatmaps, masks = _batch(b=2)
    with_mask = plot_heatmaps(images, heatmaps, masks, mean=MEAN, std=STD)
    without = plot_heatmaps(images, heatmaps, mean=MEAN, std=STD)
    assert all(ax.collections for ax in with_mask.axes)
    assert not any(ax.collections for ax in without.axes)


def test_all_zero_heatmap_and_seismic():
    _, images, _, _ = _batch(b=1)
    fig = plot_heatmaps(images, torch.zeros(1, 12, 12), cmap="seismic")
    (art,) = _panels(fig, "seismic")[1]
    assert (art.norm.vmin, art.norm.vmax) == (-1.0, 1.0)


def test_heatmap_to_rgb():
    h = torch.zeros(3, 4, 5)
    h[0, 0, 0], h[1, 0, 1] = 2.0, -2.0
    rgb = heatmap_to_rgb(h, percentile=100)
    assert rgb.shape == (4, 5, 3) and rgb.dtype == np.float32
    np.testing.assert_allclose(rgb[0, 0], [1, 0, 0], atol=1e-6)  # positive: red
    np.testing.assert_allclose(rgb[0, 1], [0, 0, 1], atol=1e-6)  # negative: blue
    np.testing.assert_allclose(rgb[2, 2], [1, 1, 1], atol=1e-2)  # zero: white
    assert symmetric_limit(h, 100) == 2.0 and symmetric_limit(torch.zeros(2, 2)) == 1.0


@pytest.mark.parametrize("call,match", [
    (lambda i, h, m: plot_heatmaps(i[:2], h), "same batch size"),
    (lambda i, h, m: plot_heatmaps(i, h[0, 0]), r"\[B, C, H, W\] or \[B, H, W\]"),
    (lambda i, h, m: plot_heatmaps(i[:, :2], h), "C = 1 or 3"),
    (lambda i, h, m: plot_heatmaps(i, h, m[:, :, :6]), "masks must be"),
    (lambda i, h, m: plot_heatmaps(i, h, titles=["x"]), "1 titles for 3 images"),
    (lambda i, h, m: plot_heatmaps(i, h, mean=MEAN), "both mean and std"),
    (lambda i, h, m: plot_heatmaps(i, h, percentile=0), "percentile"),
])
def test_errors(call, match):
    _, images, heatmaps, masks = _batch()
    with pytest.raises(ValueError, match=match):
        call(images, heatmaps, masks)


def test_lrp_does_not_import_matplotlib():
    code = "import sys, hf_isnet.lrp; assert 'matplotlib' not in sys.modules and 'hf_isnet.viz' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
