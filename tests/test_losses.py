"""hf_isnet.losses against hand-computed values (method.md, "The heatmap loss"; paper eq. (8))."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_isnet.losses import (
    HeatmapLoss,
    background_loss,
    check_masks,
    foreground_loss,
    gwrp,
    heatmap_loss,
    lds_aggregate,
    range_penalty,
    resize_mask,
)

# ---------------------------------------------------------------- GWRP


def test_gwrp_closed_forms_on_unsorted_input():
    v = torch.tensor([1.0, 3.0, 2.0])
    assert gwrp(v, 0.0).item() == pytest.approx(3.0)  # max
    assert gwrp(v, 1.0).item() == pytest.approx(2.0)  # mean
    # d = 0.5: ranked 3, 2, 1 with weights 1, 0.5, 0.25 -> (3 + 1 + 0.25) / 1.75
    assert gwrp(v, 0.5).item() == pytest.approx(4.25 / 1.75)


def test_gwrp_d0_is_max_despite_zero_pow_zero():
    # a ranked value list full of zeros after the max must not leak NaN/extra weight at d = 0
    v = torch.tensor([[0.0, 5.0, 0.0, -1.0], [-2.0, -3.0, -1.0, -4.0]])
    torch.testing.assert_close(gwrp(v, 0.0), torch.tensor([5.0, -1.0]))


def test_gwrp_batched_leading_dims():
    torch.manual_seed(0)
    v = torch.randn(2, 3, 5, dtype=torch.float64)
    out = gwrp(v, 0.7)
    assert out.shape == (2, 3)
    w = [0.7**i for i in range(5)]
    for i in range(2):
        for j in range(3):
            ranked = sorted(v[i, j].tolist(), reverse=True)
            expected = sum(wi * x for wi, x in zip(w, ranked, strict=True)) / sum(w)
            assert out[i, j].item() == pytest.approx(expected, rel=1e-12)


def test_gwrp_gradient_goes_to_ranked_positions():
    v = torch.tensor([1.0, 3.0, 2.0], requires_grad=True)
    (g,) = torch.autograd.grad(gwrp(v, 0.5), v)
    # value 1 is ranked third (weight 0.25), 3 first (1), 2 second (0.5); normaliser 1.75
    torch.testing.assert_close(g, torch.tensor([0.25, 1.0, 0.5]) / 1.75)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("d", [-0.1, 1.5, float("nan")])
def test_gwrp_rejects_bad_decay(d):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        gwrp(torch.ones(3), d)


# ---------------------------------------------------------------- background loss L1


def _hand_pair():
    # R = [[2, -1], [0.5, 3]], foreground = top-left pixel only.
    r = torch.tensor([[2.0, -1.0], [0.5, 3.0]]).view(1, 1, 1, 2, 2)
    m = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    return r, m


def test_background_loss_by_hand():
    # rel=1e-5 below absorbs the documented relative tiny (1e-6 x the whole-map mean)
    r, m = _hand_pair()
    # A = [[2, 1], [0.5, 3]]; foreground mean = 2 -> A / 2 = [[1, .5], [.25, 1.5]]
    # background only: [0, .5, .25, 1.5] -> ranked 1.5, .5, .25, 0
    # d = 0.5: weights 1, .5, .25, .125 (sum 1.875): (1.5 + .25 + .0625) / 1.875
    x = 1.8125 / 1.875
    assert background_loss(r, m, d=0.5, E=1.0).item() == pytest.approx(math.log(1 + x), rel=1e-5)
    # -ln(1 - x / (x + E)) with E = 2
    assert background_loss(r, m, d=0.5, E=2.0).item() == pytest.approx(-math.log(1 - x / (x + 2.0)), rel=1e-5)
    # d = 0 -> max = 1.5; d = 1 -> mean = 2.25 / 4
    assert background_loss(r, m, d=0.0).item() == pytest.approx(math.log(2.5), rel=1e-5)
    assert background_loss(r, m, d=1.0).item() == pytest.approx(math.log(1 + 2.25 / 4), rel=1e-5)
    # a larger E and a smaller d (closer to the mean) give a smaller loss
    assert background_loss(r, m, d=0.5, E=2.0) < background_loss(r, m, d=0.5, E=1.0)
    assert background_loss(r, m, d=0.9) < background_loss(r, m, d=0.5)


def test_background_loss_scale_invariant_and_averages_maps():
    r, m = _hand_pair()
    base = background_loss(r, m, d=0.5)
    torch.testing.assert_close(background_loss(1e3 * r, m, d=0.5), base)
    # K = 2 maps and C = 2 channels: a channel with no background relevance gives 0, so the mean
    # over channels and maps is base * (number of maps equal to r) / 4.
    quiet = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 1, 2, 2)
    heatmaps = torch.cat([torch.cat([r, quiet], dim=2), torch.cat([r, r], dim=2)], dim=1)  # [1,2,2,2,2]
    # first map: channels r and quiet share one foreground mean (2 + 1) / 2 = 1.5
    a = torch.tensor([1.0, 0.5, 3.0]) / 1.5  # background of r's channel
    ranked = sorted(a.tolist(), reverse=True) + [0.0]
    w = [1, 0.5, 0.25, 0.125]
    x0 = sum(wi * v for wi, v in zip(w, ranked, strict=True)) / sum(w)
    expected = (math.log1p(x0) + 0.0 + 2 * base.item()) / 4
    assert background_loss(heatmaps, m, d=0.5).item() == pytest.approx(expected, rel=1e-5)


def test_background_loss_zero_heatmap_is_zero_with_finite_gradient():
    r = torch.zeros(2, 1, 3, 4, 4, requires_grad=True)
    m = torch.zeros(2, 1, 4, 4)
    m[:, :, 1:3, 1:3] = 1
    loss = background_loss(r, m)
    assert loss.item() == 0.0
    (g,) = torch.autograd.grad(loss, r)
    assert torch.isfinite(g).all()


def _finite_loss_and_grad(r, m):
    r = r.clone().requires_grad_(True)
    loss = background_loss(r, m)
    (g,) = torch.autograd.grad(loss, r)
    assert torch.isfinite(loss), loss
    assert torch.isfinite(g).all()
    return loss, g


def test_background_loss_all_background_mask_uses_whole_map_mean():
    torch.manual_seed(0)
    m = torch.zeros(1, 1, 4, 4)
    # uniform relevance normalised by its own mean -> x = 1 -> ln 2 (method's documented choice)
    loss, _ = _finite_loss_and_grad(torch.full((1, 1, 1, 4, 4), 7.0), m)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-5)
    # peaked relevance counts more; still finite, gradient too
    peaked = torch.ones(1, 1, 1, 4, 4)
    peaked[..., 0, 0] = 5.0
    loss_peaked, g = _finite_loss_and_grad(peaked, m)
    assert loss_peaked > loss
    assert g.abs().sum() > 0


def test_background_loss_all_foreground_is_zero():
    torch.manual_seed(0)
    loss, _ = _finite_loss_and_grad(torch.randn(2, 2, 3, 5, 5), torch.ones(2, 1, 5, 5))
    assert loss.item() == 0.0


def test_background_loss_huge_and_degenerate_relevance_stays_finite():
    torch.manual_seed(0)
    m = torch.zeros(2, 1, 6, 6)
    m[:, :, 2:4, 2:4] = 1
    _finite_loss_and_grad(1e30 * torch.randn(2, 1, 3, 6, 6), m)
    # foreground relevance exactly 0 while the background holds 1e30: the relative tiny bounds it
    r = 1e30 * torch.randn(2, 1, 3, 6, 6) * (1 - m).unsqueeze(1)
    loss, _ = _finite_loss_and_grad(r, m)
    assert loss.item() > 10  # heavily penalised, but finite
    _finite_loss_and_grad(1e-35 * torch.randn(2, 1, 3, 6, 6), m)


def test_background_loss_gradcheck():
    torch.manual_seed(0)
    # magnitudes >= 0.1 keep |R| away from its kink at 0; random signs exercise the abs
    signs = torch.where(torch.rand(1, 2, 2, 3, 3) > 0.5, 1.0, -1.0)
    r = ((torch.rand(1, 2, 2, 3, 3) + 0.1) * signs).double().requires_grad_(True)
    m = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    m[..., 1, 1] = 1
    m[..., 0, 1] = 1
    assert torch.autograd.gradcheck(lambda t: background_loss(t, m, d=0.7), (r,))


def test_background_loss_accepts_bool_masks_and_half_heatmaps():
    r, m = _hand_pair()
    expected = background_loss(r, m, d=0.5)
    torch.testing.assert_close(background_loss(r, m.bool(), d=0.5), expected)
    out = background_loss(r.half(), m, d=0.5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=0)


def test_losses_reject_mismatched_shapes():
    r, m = _hand_pair()
    with pytest.raises(ValueError, match=r"\[B, K, C, H, W\].*unsqueeze\(1\)"):
        background_loss(r[:, 0], m)
    with pytest.raises(ValueError, match="resize_mask"):
        foreground_loss(r, torch.ones(1, 1, 3, 3), 1.0, 2.0)
    with pytest.raises(ValueError, match="E must be positive"):
        background_loss(r, m, E=0.0)


# ---------------------------------------------------------------- foreground loss L2


def _fg(s, c1, c2):
    """L2 of a single 1x1 map whose total foreground relevance is s."""
    r = torch.tensor([s], dtype=torch.float64).view(1, 1, 1, 1, 1)
    return foreground_loss(r, torch.ones(1, 1, 1, 1), c1, c2).item()


@pytest.mark.parametrize(
    ("s", "expected"),
    [
        (0.0, 1.0),  # (2 - 0)^2 / 4
        (1.0, 0.25),  # (2 - 1)^2 / 4
        (2.0, 0.0),
        (4.0, 0.0),
        (6.0, 0.0),
        (7.0, 0.25),  # (6 - 7)^2 / 4
        (8.0, 1.0),  # (6 - 8)^2 / 4 == 1 + 8 - 8
        (10.0, 3.0),  # 1 + 10 - (6 + 2)
        (1e30, 1e30),  # linear tail, no overflow
    ],
)
def test_foreground_loss_pieces_of_eq8(s, expected):
    assert _fg(s, 2.0, 6.0) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("boundary", [2.0, 6.0, 8.0])
def test_foreground_loss_continuous_at_boundaries(boundary):
    h = 1e-7
    left, at, right = (_fg(boundary + off, 2.0, 6.0) for off in (-h, 0.0, h))
    assert abs(left - at) < 1e-6 and abs(right - at) < 1e-6


def test_foreground_loss_sums_channels_in_foreground_only_with_per_map_ranges():
    # two maps, two channels, 2x2 pixels, foreground = left column
    m = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(1, 1, 2, 2)
    r = torch.zeros(1, 2, 2, 2, 2)
    r[0, 0, 0] = torch.tensor([[0.5, 100.0], [-0.25, 100.0]])  # s = 0.75 (+ channel 1)
    r[0, 0, 1] = torch.tensor([[0.75, 0.0], [0.0, 0.0]])  # s = 1.5 in total
    r[0, 1, 0] = torch.tensor([[-5.0, 0.0], [0.0, 9.0]])  # s = 5
    c1, c2 = torch.tensor([1.0, 10.0]), torch.tensor([2.0, 20.0])
    # map 0: 1.5 in [1, 2] -> 0; map 1: 5 < 10 -> (10 - 5)^2 / 100 = 0.25; mean 0.125
    assert foreground_loss(r, m, c1, c2).item() == pytest.approx(0.125)
    # a shared range instead: map 0 is 1.5 < 10 -> 0.7225, map 1 -> 0.25
    assert foreground_loss(r, m, 10.0, 20.0).item() == pytest.approx((0.7225 + 0.25) / 2)


def test_foreground_loss_gradient_finite_and_validation():
    r = torch.full((1, 1, 1, 2, 2), 1e30, requires_grad=True)
    loss = foreground_loss(r, torch.ones(1, 1, 2, 2), 1.0, 3.0)
    (g,) = torch.autograd.grad(loss, r)
    torch.testing.assert_close(g, torch.ones_like(g))  # slope 1 on the linear tail
    with pytest.raises(ValueError, match="0 < c1 <= c2"):
        foreground_loss(r, torch.ones(1, 1, 2, 2), 3.0, 1.0)
    with pytest.raises(ValueError, match="0 < c1 <= c2"):
        foreground_loss(r, torch.ones(1, 1, 2, 2), 0.0, 1.0)
    with pytest.raises(ValueError, match=r"shape \[K\]"):
        foreground_loss(r, torch.ones(1, 1, 2, 2), torch.ones(3), torch.ones(3))


def test_range_penalty_elementwise():
    s = torch.tensor([0.0, 1.0, 4.0, 7.0, 10.0])
    torch.testing.assert_close(range_penalty(s, 2.0, 6.0), torch.tensor([1.0, 0.25, 0.0, 0.25, 3.0]))


# ---------------------------------------------------------------- heatmap loss and LDS


def test_heatmap_loss_combines_parts():
    torch.manual_seed(0)
    r = torch.randn(2, 2, 3, 4, 4)
    m = torch.zeros(2, 1, 4, 4)
    m[:, :, :2] = 1
    out = heatmap_loss(r, m, 1.0, 5.0, d=0.8, E=2.0, w1=1.5, w2=3.0)
    assert isinstance(out, HeatmapLoss)
    l1 = background_loss(r, m, d=0.8, E=2.0)
    l2 = foreground_loss(r, m, 1.0, 5.0)
    torch.testing.assert_close(out.background, l1)
    torch.testing.assert_close(out.foreground, l2)
    torch.testing.assert_close(out.total, 1.5 * l1 + 3.0 * l2)
    total, _, _ = out
    assert total is out.total
    with pytest.raises(ValueError, match="non-negative"):
        heatmap_loss(r, m, 1.0, 5.0, w1=-1.0)


def test_lds_aggregate_by_hand():
    losses = torch.tensor([0.2, 0.5, 0.1], requires_grad=True)
    out = lds_aggregate(losses, d=0.8)
    # ranked 0.5, 0.2, 0.1 with weights 1, 0.8, 0.64 (sum 2.44)
    assert out.item() == pytest.approx((0.5 + 0.16 + 0.064) / 2.44)
    (g,) = torch.autograd.grad(out, losses)
    torch.testing.assert_close(g, torch.tensor([0.8, 1.0, 0.64]) / 2.44)
    listed = lds_aggregate([torch.tensor(0.2), torch.tensor(0.5), torch.tensor(0.1)], d=0.8)
    torch.testing.assert_close(listed, out.detach())
    with pytest.raises(ValueError, match="1-D"):
        lds_aggregate(torch.ones(2, 2))


# ---------------------------------------------------------------- masks


def _conservative_reference(mask, h, w):
    """Cell (i, j) is foreground iff some foreground input pixel overlaps it (integer arithmetic)."""
    big_h, big_w = mask.shape
    out = torch.zeros(h, w)
    for i in range(h):
        for j in range(w):
            for p in range(big_h):
                for q in range(big_w):
                    # pixel [p, p+1) overlaps cell [i*H/h, (i+1)*H/h) (scaled by h to stay integral)
                    rows = p * h < (i + 1) * big_h and (p + 1) * h > i * big_h
                    cols = q * w < (j + 1) * big_w and (q + 1) * w > j * big_w
                    if rows and cols and mask[p, q]:
                        out[i, j] = 1
    return out


def test_resize_mask_single_pixel_survives_downsampling():
    m = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    m[0, 0, 5, 6] = True
    out = resize_mask(m, 2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 0.0], [0.0, 1.0]]))


def test_resize_mask_non_divisible_sizes_every_pixel():
    for p in range(7):
        for q in range(7):
            m = torch.zeros(1, 1, 7, 7)
            m[0, 0, p, q] = 1
            out = resize_mask(m, (3, 3))
            assert out.sum() >= 1
            torch.testing.assert_close(out[0, 0], _conservative_reference(m[0, 0], 3, 3))


def test_resize_mask_upsampling():
    torch.manual_seed(0)
    m = (torch.rand(2, 1, 3, 4) > 0.5).float()
    # integer factors: exactly nearest-neighbour interpolation
    torch.testing.assert_close(resize_mask(m, (6, 8)), F.interpolate(m, size=(6, 8), mode="nearest"))
    # non-integer factor: conservative (a cell straddling a foreground pixel is foreground)
    out = resize_mask(m, (5, 7))
    for b in range(2):
        torch.testing.assert_close(out[b, 0], _conservative_reference(m[b, 0], 5, 7))
    assert set(out.unique().tolist()) <= {0.0, 1.0}


def test_check_masks_accepts_binary_dtypes():
    images = torch.zeros(2, 3, 4, 4)
    m = torch.zeros(2, 1, 4, 4)
    m[:, :, 1, 1] = 1
    for masks in (m, m.bool(), m.long(), m.to(torch.uint8), m.double()):
        assert check_masks(masks, images) is None
    check_masks(torch.zeros(2, 1, 4, 4))  # no foreground at all is allowed


@pytest.mark.parametrize(
    ("masks", "images", "words"),
    [
        (torch.zeros(2, 4, 4), None, ["shape", "unsqueeze(1)"]),
        (torch.zeros(2, 3, 4, 4), None, ["shape", "3 channels"]),
        (torch.zeros(4, 4), None, ["shape"]),
        (torch.zeros(2, 1, 28, 28), torch.zeros(2, 3, 32, 32), ["(1, 28, 28)", "(3, 32, 32)", "nearest"]),
        (torch.zeros(2, 1, 4, 4), torch.zeros(3, 3, 4, 4), ["batch size 2", "3"]),
        (torch.full((1, 1, 2, 2), 0.5), None, ["binary", "> 0.5"]),
        (torch.tensor([0.0, 255.0, 255.0, 0.0]).view(1, 1, 2, 2), None, ["binary", "255", "> 127"]),
        (torch.tensor([0.0, float("nan"), 1.0, 0.0]).view(1, 1, 2, 2), None, ["NaN", "binary"]),
        (torch.tensor([0, 2, 1, 0]).view(1, 1, 2, 2), None, ["binary", "2.0"]),
    ],
)
def test_check_masks_errors_name_problem_and_fix(masks, images, words):
    with pytest.raises(ValueError) as info:
        check_masks(masks, images)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_check_masks_type_error():
    with pytest.raises(TypeError, match="torch.Tensor"):
        check_masks([[0, 1]])
