"""The ISNet objective: ``L_IS = (1 - P) * L_C + P * L_LRP`` for each ISNet variant (pure PyTorch).

Variants (paper section II-F; method.md "What is explained"):

========== ================ ==================================================================
variant    maps per image   explained quantity
========== ================ ==================================================================
none       0                a standard classifier (``loss = L_C``)
original   C                each logit, LRP-epsilon
dual       2                the joint LRP-epsilon map and the joint LRP-z+ map (own [C1, C2] each)
selective  1                eta-tilde of the lowest-logit class
stochastic 1                the top logit with probability 1/2, else a uniform other class
========== ================ ==================================================================

Each can add LRP Deep Supervision (``lds_layers``): the same loss on the relevance at the input of
chosen layers, masks resized conservatively, aggregated with a 1-D GWRP (decay ``lds_decay``).

Relevance-range keys (for :class:`~hf_isnet.calibration.RelevanceCalibration`): ``"input"`` and one
key per LDS layer name; the Dual ISNet suffixes each with ``"/epsilon"`` and ``"/zplus"``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import RelevanceCalibration
from .losses import background_loss, check_masks, foreground_loss, lds_aggregate, resize_mask
from .lrp import LRPForward, explained_quantity, select_targets
from .lrp.explain import _bounds_for

VARIANTS = ("none", "original", "dual", "selective", "stochastic")
_TARGET = {"selective": "selective", "stochastic": "stochastic"}


@dataclass
class ISNetOutput:
    """What :class:`ISNetObjective` returns for one batch.

    ``loss`` is what to back-propagate. ``heatmap_loss`` and ``background_fraction`` are ``None`` when no
    heatmap was computed (``variant="none"`` or ``compute_heatmap_loss=False``). ``background_fraction``
    is the fraction of absolute input relevance on the background (detached, mean over maps and batch).
    ``parts`` holds detached per-map / per-layer losses for logging.
    """

    loss: torch.Tensor
    classification_loss: torch.Tensor
    heatmap_loss: torch.Tensor | None
    logits: torch.Tensor
    background_fraction: torch.Tensor | None = None
    heatmaps: dict[str, torch.Tensor] = field(default_factory=dict)
    parts: dict[str, float] = field(default_factory=dict)


def default_lds_layers(model: nn.Module) -> list[str]:
    """LRP Deep Supervision layers for ``lds_layers="auto"``: inputs of the stages no skip bypasses.

    timm/torchvision ResNets: ``layer1`` ... ``layer4``. timm/torchvision DenseNets: the transitions and
    the final norm (``features.transition1..3``, ``features.norm5``). Wrapped models (e.g. a
    transformers ``TimmWrapper`` with a ``timm_model.`` prefix) are found by suffix.
    """
    names = [n for n, _ in model.named_modules()]
    for pattern in (r"(^|\.)layer[1-4]$", r"(^|\.)features\.(transition[1-3]|norm5)$"):
        found = [n for n in names if re.search(pattern, n)]
        if found:
            return found
    top = [n for n, _ in model.named_children()]
    raise ValueError(
        "lds_layers='auto' knows ResNets (layer1..layer4) and DenseNets (features.transition*, norm5); "
        f"for this model pass module names explicitly, e.g. lds_layers=[...] from {top}"
    )


def attenuate_background(
    pixel_values: torch.Tensor, masks: torch.Tensor, baseline: torch.Tensor | float, factor: torch.Tensor
) -> torch.Tensor:
    """Move the background toward ``baseline`` by a factor per sample (method.md, "Saturation").

    ``x_h = M * x + (1 - M) * (b + factor * (x - b))``: factor 1 leaves the image as it is, factor 0
    replaces the background by the baseline ``b`` (the value of an empty background in model-input
    space, scalar or per channel). The foreground is never changed. ``factor``: ``[B]`` (or a number).

    Computed with :func:`torch.lerp`, which is exact at both ends: factor 1 returns the background
    bit for bit, factor 0 the baseline bit for bit (``b + 1 * (x - b)`` is not ``x`` in floating point).
    """
    b = torch.as_tensor(baseline, dtype=pixel_values.dtype, device=pixel_values.device)
    if b.dim() == 1:
        b = b.reshape(1, -1, *([1] * (pixel_values.dim() - 2)))
    f = torch.as_tensor(factor, device=pixel_values.device).to(pixel_values.dtype)
    f = f.reshape(-1, *([1] * (pixel_values.dim() - 1)))
    m = masks.to(pixel_values.device)
    return torch.where(m > 0, pixel_values, torch.lerp(b.expand_as(pixel_values), pixel_values, f))


class ISNetObjective:
    """The ISNet training objective on top of LRP-Flex.

    Args:
        variant: one of ``"none"``, ``"original"``, ``"dual"``, ``"selective"``, ``"stochastic"``.
        heatmap_loss_weight: P in ``L_IS = (1 - P) L_C + P L_LRP``.
        relevance_range: [C1, C2] of the foreground loss: a pair for every map, a mapping key -> pair, or
            a :class:`RelevanceCalibration` (keys: ``"input"``, LDS layer names; ``"/epsilon"`` and
            ``"/zplus"`` suffixes for the Dual ISNet). Required unless ``variant="none"``.
        gwrp_decay: d of the background loss' GWRP. ``E``: E in ``x / (x + E)``. ``w1``, ``w2``: weights of
            the background (L1) and foreground (L2) losses.
        lrp_eps: epsilon of LRP-epsilon (and the z+ stabiliser). ``selective_mu``: mu of eta-tilde.
        first_layer: ``"zb"`` for LRP-z^B on the first block, with ``input_bounds`` (low, high).
        lds_layers: ``None`` (no LDS), ``"auto"`` (see :func:`default_lds_layers`) or module names.
        lds_decay: d of the GWRP that aggregates the per-layer losses (LDS).
        background_attenuation: dim the background of the image that feeds both losses by a random factor
            ``alpha ~ U(0, 1)`` per sample toward ``attenuation_baseline`` (beyond the paper: a network can
            hide a saturated shortcut from local explanations). Off here, the paper's objective;
            ``ISNetTrainingArguments`` turns it on by default because it removed most of the shortcut on
            biased MNIST (README). Evaluation always sees the real image.
        max_maps_per_pass: for ``"original"``, how many class maps one batched backward produces.
    """

    def __init__(
        self,
        variant: str = "stochastic",
        heatmap_loss_weight: float = 0.7,
        relevance_range: tuple[float, float] | Mapping[str, tuple[float, float]] | RelevanceCalibration | None = None,
        *,
        gwrp_decay: float = 0.9,
        E: float = 1.0,
        w1: float = 1.0,
        w2: float = 1.0,
        lrp_eps: float = 0.01,
        selective_mu: float = 0.01,
        first_layer: str | None = None,
        input_bounds=None,
        lds_layers: str | Sequence[str] | None = None,
        lds_decay: float = 0.8,
        background_attenuation: bool = False,
        attenuation_baseline: float | Sequence[float] | torch.Tensor = 0.0,
        max_maps_per_pass: int = 16,
        generator: torch.Generator | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if not 0.0 <= heatmap_loss_weight < 1.0:
            raise ValueError(f"heatmap_loss_weight (P) must lie in [0, 1), got {heatmap_loss_weight}")
        if not 0.0 <= lds_decay <= 1.0:
            raise ValueError(f"lds_decay must lie in [0, 1], got {lds_decay}")
        if first_layer not in (None, "zb"):
            raise ValueError(f"first_layer must be None or 'zb', got {first_layer!r}")
        if first_layer == "zb" and input_bounds is None:
            raise ValueError("first_layer='zb' needs input_bounds=(low, high) (see hf_isnet.lrp.bounds_from_normalization)")
        if variant != "none" and relevance_range is None:
            raise ValueError(
                "relevance_range [C1, C2] is required for the heatmap loss: pass (C1, C2), a mapping per map, or "
                "a RelevanceCalibration from hf_isnet.calibration (the paper's heuristic; the Trainer's "
                "relevance_range='auto' runs it)"
            )
        self.variant = variant
        self.heatmap_loss_weight = float(heatmap_loss_weight)
        self.relevance_range = relevance_range
        self.gwrp_decay, self.E, self.w1, self.w2 = float(gwrp_decay), float(E), float(w1), float(w2)
        self.lrp_eps, self.selective_mu = float(lrp_eps), float(selective_mu)
        self.first_layer, self.input_bounds = first_layer, input_bounds
        self.lds_layers = lds_layers
        self.lds_decay = float(lds_decay)
        self.background_attenuation = bool(background_attenuation)
        self.attenuation_baseline = attenuation_baseline
        self.max_maps_per_pass = int(max_maps_per_pass)
        self.generator = generator

    # ------------------------------------------------------------------ configuration helpers
    def layer_names(self, model: nn.Module) -> list[str]:
        """The LDS module names as the model names them (``module.``-prefixed under DDP)."""
        if self.lds_layers is None:
            return []
        if isinstance(self.lds_layers, str):
            if self.lds_layers == "auto":
                return default_lds_layers(model)
            return [n.strip() for n in self.lds_layers.split(",") if n.strip()]
        return list(self.lds_layers)

    def map_keys(self, model: nn.Module) -> list[str]:
        """The keys of every supervised map (what a calibration must provide)."""
        base = ["input"] + [_key(n) for n in self.layer_names(model)]
        if self.variant == "dual":
            return [f"{k}/{r}" for k in base for r in ("epsilon", "zplus")]
        return base

    def _range(self, key: str) -> tuple[float, float]:
        rr = self.relevance_range
        if isinstance(rr, (RelevanceCalibration, Mapping)):
            try:
                c1, c2 = rr[key]
            except KeyError:
                have = list(rr.keys())
                raise KeyError(f"relevance_range has no entry for map {key!r} (it has {have}); re-run the "
                               "calibration with the same variant and lds_layers") from None
        else:
            c1, c2 = rr
        return float(c1), float(c2)

    # ------------------------------------------------------------------ heatmaps
    def heatmaps(
        self, model: nn.Module, pixel_values: torch.Tensor, create_graph: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The variant's maps: ``(logits, {key: [B, K, C, H, W]})`` for the input and each LDS layer.

        Dual: keys ``"<name>/epsilon"`` and ``"<name>/zplus"`` with K = 1; original: K = C classes.
        """
        if self.variant == "none":
            raise ValueError("variant='none' computes no heatmaps")
        layers = self.layer_names(model)
        bounds = _bounds_for(self.input_bounds, pixel_values) if self.first_layer == "zb" else None
        dual = self.variant == "dual"
        maps: dict[str, torch.Tensor] = {}
        with torch.enable_grad(), LRPForward(model, pixel_values, eps=self.lrp_eps, zplus=dual, zb_bounds=bounds,
                                             layers=tuple(layers)) as fwd:
            logits = fwd.logits
            if self.variant == "original":
                from .lrp.explain import _all_classes

                heat, lmaps = _all_classes(fwd, logits, create_graph, self.max_maps_per_pass)
                maps["input"] = heat
                maps.update({_key(n): lmaps[n] for n in layers})
            elif dual:
                for rule, out in (("epsilon", logits), ("zplus", fwd.shadow_logits)):
                    heat, lmaps = fwd.relevance(out.sum(), create_graph=create_graph, rule=rule)
                    maps[f"input/{rule}"] = heat.unsqueeze(1)
                    maps.update({f"{_key(n)}/{rule}": lmaps[n].unsqueeze(1) for n in layers})
            else:
                target = _TARGET[self.variant]
                targets = select_targets(logits.detach(), target, self.generator)
                q = explained_quantity(logits, target, targets, self.selective_mu)
                heat, lmaps = fwd.relevance(q, create_graph=create_graph)
                maps["input"] = heat.unsqueeze(1)
                maps.update({_key(n): lmaps[n].unsqueeze(1) for n in layers})
        return logits, maps

    def calibration_maps(self, model: nn.Module, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Maps for :func:`hf_isnet.calibration.calibrate`: ``{key: [B*K, ...]}`` (one row per map)."""
        _, maps = self.heatmaps(model, pixel_values, create_graph=False)
        return {k: v.detach().flatten(0, 1) for k, v in maps.items()}

    # ------------------------------------------------------------------ the loss
    def __call__(
        self,
        model: nn.Module,
        pixel_values: torch.Tensor,
        masks: torch.Tensor | None,
        labels: torch.Tensor,
        *,
        compute_heatmap_loss: bool = True,
        check_inputs: bool = True,
    ) -> ISNetOutput:
        """The loss of one batch. Masks ``[B, 1, H, W]`` (1 = foreground); labels ``[B]`` class ids."""
        if self.variant == "none" or not compute_heatmap_loss:
            out = model(pixel_values)
            logits = out if isinstance(out, torch.Tensor) else out.logits
            if check_inputs:
                _check_labels(labels, logits)
            ce = F.cross_entropy(logits, labels)
            return ISNetOutput(loss=ce, classification_loss=ce, heatmap_loss=None, logits=logits)
        if masks is None:
            raise ValueError(f"variant={self.variant!r} needs segmentation masks (1 = foreground) for every image")
        if check_inputs:
            check_masks(masks, pixel_values)
        masks = masks.to(pixel_values.dtype)
        if self.background_attenuation and model.training:
            gen_device = pixel_values.device if self.generator is None else self.generator.device
            factor = torch.rand(pixel_values.shape[0], generator=self.generator, device=gen_device)
            pixel_values = attenuate_background(pixel_values, masks, self.attenuation_baseline, factor)
        create_graph = torch.is_grad_enabled()
        logits, maps = self.heatmaps(model, pixel_values, create_graph=create_graph)
        if check_inputs:
            _check_labels(labels, logits)
        ce = F.cross_entropy(logits, labels)

        parts: dict[str, float] = {}
        per_level: dict[str, torch.Tensor] = {}
        for level in ["input"] + [_key(n) for n in self.layer_names(model)]:
            keys = [f"{level}/epsilon", f"{level}/zplus"] if self.variant == "dual" else [level]
            heat = torch.cat([maps[k] for k in keys], dim=1)  # [B, K, C, h, w]
            m = masks if level == "input" else resize_mask(masks, heat.shape[-2:])
            ranges = [self._range(k) for k in keys]
            if self.variant == "dual":
                c1 = torch.tensor([r[0] for r in ranges], dtype=heat.dtype, device=heat.device)
                c2 = torch.tensor([r[1] for r in ranges], dtype=heat.dtype, device=heat.device)
            else:
                c1, c2 = ranges[0]
            l1 = background_loss(heat, m, d=self.gwrp_decay, E=self.E)
            l2 = foreground_loss(heat, m, c1, c2)
            per_level[level] = self.w1 * l1 + self.w2 * l2
            parts[f"background_loss/{level}"] = float(l1.detach())
            parts[f"foreground_loss/{level}"] = float(l2.detach())
        if len(per_level) == 1:
            heatmap_loss = per_level["input"]
        else:
            heatmap_loss = lds_aggregate(torch.stack(list(per_level.values())), d=self.lds_decay)
        input_maps = torch.cat([maps[k] for k in maps if k.split("/")[0] == "input"], dim=1)
        frac = _background_fraction(input_maps.detach(), masks)
        p = self.heatmap_loss_weight
        loss = (1 - p) * ce + p * heatmap_loss
        if not create_graph:
            heatmap_loss = heatmap_loss.detach()
        return ISNetOutput(
            loss=loss, classification_loss=ce, heatmap_loss=heatmap_loss, logits=logits,
            background_fraction=frac, heatmaps={k: v.detach() for k, v in maps.items()}, parts=parts,
        )


def _check_labels(labels: torch.Tensor, logits: torch.Tensor) -> None:
    """Class ids in ``[0, C)`` (checked before cross-entropy, which would raise an opaque IndexError)."""
    if ((labels < 0) | (labels >= logits.shape[1])).any():
        raise ValueError(f"labels must lie in [0, {logits.shape[1] - 1}], got {labels.unique().tolist()}")


def _key(name: str) -> str:
    """A layer's key for relevance ranges: independent of DDP's ``module.`` wrapper prefix."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def _background_fraction(heat: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Fraction of absolute relevance on the background per map, averaged over maps and batch."""
    a = heat.abs().sum(dim=2)  # [B, K, H, W]
    total = a.flatten(2).sum(-1)
    bg = (a * (1 - masks)).flatten(2).sum(-1)
    return (bg / total.clamp_min(torch.finfo(total.dtype).tiny)).mean()
