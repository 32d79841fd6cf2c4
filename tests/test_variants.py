"""ISNetObjective and the variants (hf_isnet.variants): numbers, not smoke.

- every variant's maps are the LRP-Flex maps of ``hf_isnet.lrp.explain`` for the quantity method.md
  ("What is explained") names, to 1e-10 in float64;
- the Stochastic ISNet explains the top logit half of the time, drawn per sample from the objective's
  generator;
- the loss is ``(1 - P) L_C + P L_LRP`` with L_LRP recomputed by hand from the returned maps and the
  functions of ``hf_isnet.losses`` (LDS: the 1-D GWRP of the per-level losses), with the relevance range
  looked up per map key;
- background attenuation, LDS layer discovery, input validation, numerics at the edges;
- a few ISNet steps remove the relevance a standard classifier puts on a background shortcut;
- no step's autograd graph outlives the step (method.md, "Implementation pitfall").
"""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import timm
import torch
import torch.nn.functional as F
from lrp_reference import randomize_bn
from torch import nn

from hf_isnet.calibration import CalibrationEntry, RelevanceCalibration, relevance_range
from hf_isnet.losses import background_loss, foreground_loss, lds_aggregate, resize_mask
from hf_isnet.lrp import explain, select_targets
from hf_isnet.variants import (
    VARIANTS,
    ISNetObjective,
    ISNetOutput,
    attenuate_background,
    default_lds_layers,
)

EXACT = 1e-10
HEAT_VARIANTS = ("original", "dual", "selective", "stochastic")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These nets are tiny: one intra-op thread is faster than two fighting over a loaded CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------- nets


class Block(nn.Module):
    """A residual block (conv-BN-ReLU-conv-BN, + skip, ReLU); the ReLU module is reused."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(ch)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(h)) + x)


class TinyNet(nn.Module):
    """stem - layer1 (residual) - maxpool - layer2 (residual) - avgpool - linear.

    Its stages are called ``layer1``/``layer2`` like a ResNet's, so ``lds_layers="auto"`` finds them.
    """

    def __init__(self, classes: int = 5, ch: int = 6, in_ch: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU())
        self.layer1 = Block(ch)
        self.pool = nn.MaxPool2d(2)
        self.layer2 = Block(ch)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * ch, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer2(self.pool(self.layer1(self.stem(x)))))


class Wrapper(nn.Module):
    """What DistributedDataParallel looks like from the outside: the model under ``module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)





def tiny(classes: int = 5, *, seed: int = 0, dtype=torch.float64, in_ch: int = 3, ch: int = 6) -> TinyNet:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TinyNet(classes, ch=ch, in_ch=in_ch)
    randomize_bn(model, seed)
    return model.to(dtype).eval()


def images(b: int = 3, size: int = 8, *, c: int = 3, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, size, size, generator=g, dtype=dtype)


def box_masks(b: int = 3, size: int = 8, lo: int = 2, hi: int = 6, dtype=torch.float64) -> torch.Tensor:
    m = torch.zeros(b, 1, size, size, dtype=dtype)
    m[:, :, lo:hi, lo:hi] = 1
    return m


def assert_exact(a: torch.Tensor, b: torch.Tensor, atol: float = EXACT) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


LABELS = torch.tensor([0, 3, 4])
RANGE = (0.5, 5.0)


# ------------------------------------------------------------------------- what each variant explains


def test_dual_gives_two_maps_per_image_equal_to_joint_epsilon_and_zplus():
    model, x = tiny(), images()
    obj = ISNetObjective("dual", relevance_range=RANGE, lds_layers=["layer2"])
    logits, maps = obj.heatmaps(model, x)
    assert set(maps) == {"input/epsilon", "input/zplus", "layer2/epsilon", "layer2/zplus"}
    for rule in ("epsilon", "zplus"):
        e = explain(model, x, "joint", rule=rule, layers=["layer2"])
        assert maps[f"input/{rule}"].shape == (3, 1, 3, 8, 8)  # [B, 1, C, H, W]: one map per rule
        assert_exact(maps[f"input/{rule}"][:, 0], e.heatmap)
        assert_exact(maps[f"layer2/{rule}"][:, 0], e.layers["layer2"])
        assert_exact(logits.detach(), e.logits.detach())
    # the two maps are different maps (z+ is not epsilon)
    assert (maps["input/epsilon"] - maps["input/zplus"]).abs().max() > 1e-3
    # the objective's own call returns the same maps (two per image, nothing else)
    out = obj(model, x, box_masks(), LABELS)
    assert set(out.heatmaps) == set(maps)
    for k in maps:
        assert_exact(out.heatmaps[k], maps[k].detach())


def test_original_gives_one_map_per_class_equal_to_explain_all():
    model, x = tiny(classes=5), images()
    obj = ISNetObjective("original", relevance_range=RANGE, max_maps_per_pass=2)  # chunks 2 + 2 + 1
    _, maps = obj.heatmaps(model, x)
    assert maps["input"].shape == (3, 5, 3, 8, 8)
    assert_exact(maps["input"], explain(model, x, "all").heatmap)
    for c in range(5):  # and each is the plain explanation of logit c
        e = explain(model, x, torch.full((3,), c))
        assert_exact(maps["input"][:, c], e.heatmap)


def test_selective_equals_explain_selective():
    model, x = tiny(), images()
    obj = ISNetObjective("selective", relevance_range=RANGE, lds_layers=["layer1"])
    logits, maps = obj.heatmaps(model, x)
    e = explain(model, x, "selective", layers=["layer1"])
    assert maps["input"].shape == (3, 1, 3, 8, 8)
    assert_exact(maps["input"][:, 0], e.heatmap)
    assert_exact(maps["layer1"][:, 0], e.layers["layer1"])
    # lowest logit: eta-tilde of the argmin class, not of the label or the prediction
    assert torch.equal(e.targets, logits.detach().argmin(1))


def test_stochastic_equals_explain_with_the_same_generator():
    model, x = tiny(classes=7), images(b=6)
    obj = ISNetObjective("stochastic", relevance_range=RANGE, generator=torch.Generator().manual_seed(11))
    _, maps = obj.heatmaps(model, x)
    e = explain(model, x, "stochastic", generator=torch.Generator().manual_seed(11))
    assert_exact(maps["input"][:, 0], e.heatmap)
    # a differently seeded draw explains other classes for some samples: the seed matters
    f = explain(model, x, "stochastic", generator=torch.Generator().manual_seed(12))
    assert not torch.equal(e.targets, f.targets)


def _identity_classifier(classes: int) -> nn.Module:
    """logits = x (flattened): class c's map is nonzero only at input position c."""
    lin = nn.Linear(classes, classes, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.eye(classes, dtype=torch.float64))
    return nn.Sequential(nn.Flatten(), lin).eval()


def test_stochastic_explains_the_top_logit_half_of_the_time_drawn_per_sample():
    classes, batch = 5, 4000
    model = _identity_classifier(classes)
    x = torch.rand(batch, 1, 1, classes, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    top = x.flatten(1).argmax(1)
    obj = ISNetObjective("stochastic", relevance_range=RANGE, generator=torch.Generator().manual_seed(5))
    _, maps = obj.heatmaps(model, x)
    heat = maps["input"][:, 0].flatten(1)  # [B, C]
    explained = heat.abs().argmax(1)
    assert torch.equal((heat != 0).sum(1), torch.ones(batch, dtype=torch.long))  # exactly one class each
    freq_top = (explained == top).double().mean().item()
    assert abs(freq_top - 0.5) < 0.04  # sigma = 0.008
    # the others are uniform over the C - 1 non-top classes: rank of the explained class among logits
    rank = (x.flatten(1) > x.flatten(1).gather(1, explained[:, None])).sum(1)  # 0 = top
    for r in range(1, classes):
        assert abs((rank == r).double().mean().item() - 0.5 / (classes - 1)) < 0.03  # sigma = 0.005
    # the objective's generator drives the draw: same seed, same classes; and it advances per call
    obj2 = ISNetObjective("stochastic", relevance_range=RANGE, generator=torch.Generator().manual_seed(5))
    _, maps2 = obj2.heatmaps(model, x)
    assert torch.equal(maps2["input"], maps["input"])
    _, maps3 = obj2.heatmaps(model, x)
    assert not torch.equal(maps3["input"], maps["input"])
    # select_targets with the same seed makes the same choices
    ref = select_targets(x.flatten(1), "stochastic", torch.Generator().manual_seed(5))
    assert torch.equal(ref, explained)


# ------------------------------------------------------------------------------------------ the loss


def _hand_loss(heat: torch.Tensor, masks: torch.Tensor, c1, c2, *, d=0.9, E=1.0, w1=1.0, w2=1.0):
    return w1 * background_loss(heat, masks, d=d, E=E) + w2 * foreground_loss(heat, masks, c1, c2)


@pytest.mark.parametrize("variant", HEAT_VARIANTS)
def test_loss_is_the_weighted_sum_of_ce_and_the_heatmap_loss(variant):
    model, x, masks = tiny(), images(), box_masks()
    kw = dict(gwrp_decay=0.5, E=2.0, w1=0.5, w2=2.0)
    obj = ISNetObjective(variant, 0.7, RANGE, generator=torch.Generator().manual_seed(0), **kw)
    out = obj(model, x, masks, LABELS)
    assert isinstance(out, ISNetOutput)
    assert torch.equal(out.loss, (1 - 0.7) * out.classification_loss + 0.7 * out.heatmap_loss)
    assert_exact(out.classification_loss, F.cross_entropy(model(x), LABELS), atol=1e-12)
    assert_exact(out.logits, model(x), atol=1e-12)
    heat = torch.cat([out.heatmaps[k] for k in sorted(out.heatmaps)], dim=1)
    expected = _hand_loss(heat, masks, *RANGE, d=0.5, E=2.0, w1=0.5, w2=2.0)
    assert_exact(out.heatmap_loss, expected, atol=1e-12)
    assert out.heatmap_loss.requires_grad and out.loss.requires_grad
    # background fraction: share of |R| outside the mask
    a = heat.abs().sum(2)
    frac = ((a * (1 - masks)).flatten(2).sum(-1) / a.flatten(2).sum(-1)).mean()
    assert_exact(out.background_fraction, frac, atol=1e-12)


def test_variant_none_is_plain_cross_entropy():
    model, x = tiny(), images()
    out = ISNetObjective("none")(model, x, None, LABELS)
    assert torch.equal(out.loss, out.classification_loss)
    assert torch.equal(out.loss, F.cross_entropy(model(x), LABELS))
    assert out.heatmap_loss is None and out.background_fraction is None and out.heatmaps == {}
    # compute_heatmap_loss=False gives the same for a heatmap variant
    out2 = ISNetObjective("selective", 0.7, RANGE)(model, x, box_masks(), LABELS, compute_heatmap_loss=False)
    assert torch.equal(out2.loss, out.loss) and out2.heatmap_loss is None


def _timm_resnet18(classes: int = 4) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model("resnet18", pretrained=False, num_classes=classes)
    randomize_bn(model, 0)
    return model.double().eval()


@pytest.mark.parametrize("variant", ["selective", "dual"])
def test_lds_heatmap_loss_is_the_gwrp_of_per_level_losses(variant):
    model = _timm_resnet18()
    x = images(b=2, size=32, seed=3)
    masks = box_masks(b=2, size=32, lo=9, hi=21)
    masks[1] = 0
    masks[1, :, 3:13, 20:30] = 1  # a box that does not align with the 4x / 8x grid
    labels = torch.tensor([1, 2])
    levels = ["input", "layer1", "layer2"]
    rules = ["epsilon", "zplus"] if variant == "dual" else [None]
    ranges = {}
    for i, lev in enumerate(levels):
        for j, r in enumerate(rules):
            ranges[lev if r is None else f"{lev}/{r}"] = (0.2 + i + 0.5 * j, 2.0 + 3 * i + j)
    obj = ISNetObjective(variant, 0.8, ranges, lds_layers=["layer1", "layer2"], lds_decay=0.6)
    out = obj(model, x, masks, labels)
    assert set(out.heatmaps) == set(ranges)
    per_level = []
    for lev in levels:
        losses = []
        for r in rules:
            key = lev if r is None else f"{lev}/{r}"
            h = out.heatmaps[key]
            m = masks if lev == "input" else resize_mask(masks, h.shape[-2:])
            losses.append(_hand_loss(h, m, *ranges[key]))
        # the Dual ISNet's two maps share a level: mean of the two (same B, C, H, W each)
        per_level.append(sum(losses) / len(losses))
    # conservative resizing: every cell touched by the box is foreground
    m8 = resize_mask(masks, (8, 8))
    assert m8[1, 0, 0:4, 5:8].eq(1).all() and m8[1, 0].sum() == 12
    expected = lds_aggregate(torch.stack(per_level), d=0.6)
    assert_exact(out.heatmap_loss, expected, atol=1e-12)
    assert torch.equal(out.loss, (1 - 0.8) * out.classification_loss + 0.8 * out.heatmap_loss)
    # the LDS maps are the explain() layer relevances
    target = "joint" if variant == "dual" else "selective"
    e = explain(model, x, target, layers=["layer1", "layer2"])
    key = "layer1/epsilon" if variant == "dual" else "layer1"
    assert_exact(out.heatmaps[key][:, 0], e.layers["layer1"])


def _calibration(ranges: dict[str, tuple[float, float]]) -> RelevanceCalibration:
    return RelevanceCalibration(
        entries={k: CalibrationEntry(c1=c1, c2=c2, mean=c1, std=0.0, count=1) for k, (c1, c2) in ranges.items()}
    )


def test_dual_relevance_ranges_are_looked_up_per_key():
    model, x, masks = tiny(), images(), box_masks()
    _, maps = ISNetObjective("dual", relevance_range=RANGE).heatmaps(model, x)
    s = {r: (maps[f"input/{r}"].abs() * masks[:, None]).sum(dim=(1, 2, 3, 4)) for r in ("epsilon", "zplus")}
    # epsilon map inside its range (no penalty); z+ map below its range
    inside = (0.5 * s["epsilon"].min().item(), 2.0 * s["epsilon"].max().item())
    above = (2.0 * s["zplus"].max().item(), 3.0 * s["zplus"].max().item())
    cal = _calibration({"input/epsilon": inside, "input/zplus": above})
    out = ISNetObjective("dual", 0.7, cal)(model, x, masks, LABELS)
    c1 = above[0]
    pen = ((c1 - s["zplus"]) / c1) ** 2
    expected_fg = (0.0 + pen.mean()) / 2  # mean over the batch and the two maps
    assert out.parts["foreground_loss/input"] == pytest.approx(expected_fg.item(), rel=1e-10, abs=1e-12)
    heat = torch.cat([maps["input/epsilon"], maps["input/zplus"]], dim=1)
    assert_exact(out.heatmap_loss, background_loss(heat, masks) + expected_fg, atol=1e-12)
    # swapping the two ranges changes the loss (each key has its own range)
    swapped = ISNetObjective("dual", 0.7, _calibration({"input/epsilon": above, "input/zplus": inside}))
    out2 = swapped(model, x, masks, LABELS)
    assert abs(out2.parts["foreground_loss/input"] - out.parts["foreground_loss/input"]) > 1e-3
    # a plain mapping works the same way as a RelevanceCalibration
    out3 = ISNetObjective("dual", 0.7, {"input/epsilon": inside, "input/zplus": above})(model, x, masks, LABELS)
    assert torch.equal(out3.loss, out.loss)
    # a missing key is named
    with pytest.raises(KeyError, match="input/zplus"):
        ISNetObjective("dual", 0.7, _calibration({"input/epsilon": inside}))(model, x, masks, LABELS)
    with pytest.raises(KeyError, match="layer1/epsilon"):
        ISNetObjective("dual", 0.7, cal, lds_layers=["layer1"])(model, x, masks, LABELS)
    assert ISNetObjective("dual", 0.7, cal, lds_layers="auto").map_keys(model) == [
        "input/epsilon", "input/zplus", "layer1/epsilon", "layer1/zplus", "layer2/epsilon", "layer2/zplus"]


def test_relevance_range_is_required_for_heatmap_variants():
    for v in HEAT_VARIANTS:
        with pytest.raises(ValueError, match="relevance_range"):
            ISNetObjective(v, 0.7)
    ISNetObjective("none")  # no range needed
    with pytest.raises(ValueError, match="variant"):
        ISNetObjective("fast", 0.7, RANGE)
    with pytest.raises(ValueError, match=r"\(P\)"):
        ISNetObjective("selective", 1.0, RANGE)


def test_no_grad_evaluation_gives_detached_losses():
    model, x, masks = tiny(), images(), box_masks()
    obj = ISNetObjective("selective", 0.7, RANGE)
    with torch.no_grad():
        out = obj(model, x, masks, LABELS)
    ref = obj(model, x, masks, LABELS)
    assert not out.loss.requires_grad and not out.heatmap_loss.requires_grad
    assert_exact(out.loss, ref.loss.detach(), atol=1e-12)


# ----------------------------------------------------------------------------------- LDS layer names


def test_default_lds_layers_timm_resnet_densenet_wrapped_and_unknown():
    assert default_lds_layers(timm.create_model("resnet18", num_classes=3)) == ["layer1", "layer2", "layer3", "layer4"]
    dense = timm.create_model("densenet121", num_classes=3)
    assert default_lds_layers(dense) == [
        "features.transition1", "features.transition2", "features.transition3", "features.norm5"]
    wrapped = Wrapper(TinyNet())
    assert default_lds_layers(wrapped) == ["module.layer1", "module.layer2"]
    obj = ISNetObjective("selective", 0.7, {"input": RANGE, "layer1": RANGE, "layer2": (0.1, 9.0)}, lds_layers="auto")
    assert obj.layer_names(wrapped) == ["module.layer1", "module.layer2"]
    assert obj.map_keys(wrapped) == ["input", "layer1", "layer2"]  # keys do not depend on the wrapper
    # and the wrapped model trains with ranges keyed by the unwrapped names, with the same loss
    model = tiny()
    out_w = obj(Wrapper(model), images(), box_masks(), LABELS)
    out = obj(model, images(), box_masks(), LABELS)
    assert_exact(out_w.loss, out.loss)
    # an unknown model: ValueError naming its children
    odd = nn.Sequential()
    odd.add_module("encoder", nn.Conv2d(3, 4, 3))
    odd.add_module("classifier", nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"encoder.*classifier"):
        default_lds_layers(odd)
    with pytest.raises(ValueError, match="encoder"):
        ISNetObjective("selective", 0.7, RANGE, lds_layers="auto").map_keys(odd)


# ---------------------------------------------------------------------------- background attenuation


def test_attenuate_background_exact_at_the_ends_and_foreground_untouched():
    x = images(b=4, size=8, seed=5, dtype=torch.float32) * 3
    m = box_masks(b=4, size=8, dtype=torch.float32)
    fg, bg = m.bool().expand_as(x), ~m.bool().expand_as(x)
    for baseline in (0.0, -0.7, torch.tensor([0.3, -1.2, 2.1])):
        assert torch.equal(attenuate_background(x, m, baseline, torch.ones(4)), x)
        for factor in (torch.zeros(4), torch.rand(4, generator=torch.Generator().manual_seed(1)),
                       torch.tensor([0.0, 0.25, 1.0, 0.9])):
            out = attenuate_background(x, m, baseline, factor)
            assert torch.equal(out[fg], x[fg])  # the foreground is never changed
        out0 = attenuate_background(x, m, baseline, torch.zeros(4))
        b = torch.as_tensor(baseline, dtype=x.dtype).reshape(1, -1, 1, 1).expand_as(x)
        assert torch.equal(out0[bg], b[bg])  # factor 0: the background is the baseline
        # in between: the straight line from the baseline to the image, per sample
        f = torch.tensor([0.0, 0.25, 0.5, 0.9])
        half = attenuate_background(x, m, baseline, f)
        expect = b + f.reshape(-1, 1, 1, 1) * (x - b)
        torch.testing.assert_close(half[bg], expect[bg], rtol=1e-6, atol=1e-6)


def _seen_inputs(model: nn.Module) -> tuple[list[torch.Tensor], object]:
    seen: list[torch.Tensor] = []
    handle = model.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    return seen, handle


@pytest.mark.parametrize("baseline", [0.0, [0.1, -0.2, 0.3]])
def test_objective_attenuates_only_in_training(baseline):
    model, x, masks = tiny(), images(b=4, seed=2), box_masks(b=4)
    labels = torch.tensor([0, 1, 2, 3])
    obj = ISNetObjective("stochastic", 0.7, RANGE, background_attenuation=True, attenuation_baseline=baseline,
                         generator=torch.Generator().manual_seed(0))
    seen, handle = _seen_inputs(model)
    try:
        out = obj(model, x, masks, labels)  # eval: the real image
        assert torch.equal(seen[-1], x)
        assert torch.equal(out.logits.detach(), model(x).detach())
        model.train()
        obj(model, x, masks, labels)  # train: a dimmed background
    finally:
        handle.remove()
        model.eval()
    assert len(seen) == 3  # the eval call, model(x) above, the train-mode call
    dimmed = seen[2]
    fg = masks.bool().expand_as(x)
    assert torch.equal(dimmed[fg], x[fg])
    b = torch.as_tensor(baseline, dtype=x.dtype).reshape(1, -1, 1, 1).expand_as(x)
    factor = ((dimmed - b) / (x - b))[~fg].reshape(4, -1)  # per sample, one factor for every pixel
    assert (factor.std(1) < 1e-8).all()
    assert ((factor >= 0) & (factor <= 1)).all()
    assert (factor.mean(1) < 1 - 1e-6).all()  # it really moved toward the baseline


# ----------------------------------------------------------------------------------------- numerics


def _zero_model() -> nn.Module:
    model = tiny(dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


CASES = ["all_background", "all_foreground", "zero_model", "huge_input"]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_finite_loss_and_gradients_at_the_edges(variant, mode):
    for case in CASES:
        model = _zero_model() if case == "zero_model" else tiny(dtype=torch.float32)
        model.train(mode == "train")
        x = images(b=3, dtype=torch.float32) * (1e6 if case == "huge_input" else 1.0)
        masks = box_masks(dtype=torch.float32)
        if case == "all_background":
            masks.zero_()
        if case == "all_foreground":
            masks.fill_(1)
        obj = ISNetObjective(variant, 0.7, None if variant == "none" else RANGE, lds_layers="auto",
                             generator=torch.Generator().manual_seed(0))
        out = obj(model, x, masks, LABELS)
        out.loss.backward()
        assert torch.isfinite(out.loss), (case, out.loss)
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (case, name)
        if variant != "none":
            assert torch.isfinite(out.heatmap_loss) and torch.isfinite(out.background_fraction), case
            for k, h in out.heatmaps.items():
                assert torch.isfinite(h).all(), (case, k)
                if case == "zero_model":
                    assert torch.equal(h, torch.zeros_like(h)), k
        if case == "zero_model":
            assert out.classification_loss.item() == pytest.approx(math.log(5), rel=1e-6)


# ------------------------------------------------------------------------------------ input checks


@pytest.mark.parametrize("variant", HEAT_VARIANTS)
def test_bad_masks_raise_clear_errors(variant):
    model, x = tiny(), images()
    obj = ISNetObjective(variant, 0.7, RANGE)
    soft = box_masks() * 0.5
    with pytest.raises(ValueError, match="binary"):
        obj(model, x, soft, LABELS)
    with pytest.raises(ValueError, match="binary.*127"):
        obj(model, x, box_masks() * 255, LABELS)
    with pytest.raises(ValueError, match=r"\(1, 16, 16\).*\(3, 8, 8\)"):
        obj(model, x, box_masks(size=16), LABELS)
    with pytest.raises(ValueError, match="unsqueeze"):
        obj(model, x, box_masks()[:, 0], LABELS)
    with pytest.raises(ValueError, match="masks"):
        obj(model, x, None, LABELS)
    with pytest.raises(ValueError, match="labels"):
        obj(model, x, box_masks(), torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match="labels"):
        ISNetObjective("none")(model, x, None, torch.tensor([0, -1, 2]))


# ------------------------------------------------------------------------- the shortcut goes away


def _shortcut_task(n: int, seed: int):
    """1-channel 12x12 images: a noisy bar in the central 6x6 foreground (horizontal = class 0,
    vertical = class 1) and, on the black background, a bright 2x2 patch whose corner encodes the class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.zeros(n, 1, 12, 12)
    bar = torch.zeros(n, 6, 6)
    bar[y == 0, 2:4, :] = 0.5
    bar[y == 1, :, 2:4] = 0.5
    x[:, 0, 3:9, 3:9] = bar + 0.2 * torch.randn(n, 6, 6, generator=g)
    x[y == 0, 0, 0:2, 0:2] = 3.0  # the shortcut: top-left for class 0, top-right for class 1
    x[y == 1, 0, 0:2, 10:12] = 3.0
    masks = torch.zeros(n, 1, 12, 12)
    masks[:, :, 3:9, 3:9] = 1
    return x, masks, y


def test_isnet_steps_remove_a_background_shortcut():
    torch.manual_seed(0)
    model = tiny(classes=2, in_ch=1, ch=8, dtype=torch.float32, seed=3)
    model.train()
    x, masks, y = _shortcut_task(64, seed=1)
    standard = ISNetObjective("none")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(15):  # a standard classifier first: it takes the shortcut
        opt.zero_grad()
        standard(model, x, masks, y).loss.backward()
        opt.step()
    probe = ISNetObjective("selective", 0.9, RANGE)

    def evaluate() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            out = probe(model, x, masks, y)
        model.train()
        return out.background_fraction.item(), (out.logits.argmax(1) == y).float().mean().item()

    start, acc = evaluate()
    assert start > 0.5 and acc == 1.0, (start, acc)  # most relevance on the 2x2 patch
    # the paper's calibration (section II-E) on the standard classifier
    model.eval()
    totals = probe.calibration_maps(model, x)["input"].abs().flatten(1).sum(1)
    model.train()
    isnet = ISNetObjective("selective", 0.9, relevance_range(totals.mean().item(), totals.std().item()))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        opt.zero_grad()
        isnet(model, x, masks, y).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    end, acc = evaluate()
    assert end < 0.5 * start and end < 0.2, (start, end)  # measured: 0.80 -> 0.02
    assert acc >= 0.9, acc  # still accurate: the bar in the foreground carries the class


# ------------------------------------------------------------------------------- no graph outlives a step


@pytest.mark.parametrize("variant", ["dual", "selective"])
def test_memory_is_flat_over_training_steps(variant):
    model = tiny(dtype=torch.float32).train()
    x, masks = images(b=4, dtype=torch.float32), box_masks(b=4, dtype=torch.float32)
    labels = torch.tensor([0, 1, 2, 3])
    obj = ISNetObjective(variant, 0.7, RANGE, lds_layers="auto")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    probes: list[list[weakref.ref]] = []
    activation: list[weakref.ref] = []
    # a weak reference to an activation inside the step's graph (saved by the next layers' backward)
    hook = model.layer1.register_forward_hook(lambda mod, args, out: activation.append(weakref.ref(out)))
    counts = {}
    gc.collect()
    gc.disable()  # a cycle would now survive: only reference counting frees the graphs
    try:
        for step in range(30):
            opt.zero_grad()
            out = obj(model, x, masks, labels)
            out.loss.backward()
            opt.step()
            probes.append([weakref.ref(out.logits), weakref.ref(out.loss), activation[-1]]
                          + [weakref.ref(h) for h in out.heatmaps.values()])
            del out
            alive = [i for i, refs in enumerate(probes) if any(r() is not None for r in refs)]
            assert alive == [], f"step {step}: graphs of steps {alive} are still alive"
            if step in (10, 29):
                counts[step] = len(gc.get_objects())
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        garbage_tensors = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        hook.remove()
    assert garbage_tensors == []
    assert abs(counts[29] - counts[10]) < 200, counts
