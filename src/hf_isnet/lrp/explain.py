"""``explain``: LRP heatmaps of any ReLU classifier, differentiable if asked."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ._engine import LRPForward

TARGETS = ("predicted", "joint", "selective", "stochastic", "all")
RULES = ("epsilon", "zplus")


@dataclass
class Explanation:
    """What :func:`explain` returns.

    Attributes:
        heatmap: relevance at the input, same shape as ``inputs``; with ``target="all"``
            ``[B, C, *inputs.shape[1:]]`` (one map per class).
        logits: the model output of the same forward pass ``[B, C]`` (use it for the classification
            loss: one graph serves both).
        layers: ``{module name: relevance at that module's input}`` for the names in ``layers``
            (with ``target="all"``: ``[B, C, ...]``).
        targets: the class explained per sample ``[B]`` (``None`` for ``"joint"`` and ``"all"``).
    """

    heatmap: torch.Tensor
    logits: torch.Tensor
    layers: dict[str, torch.Tensor] = field(default_factory=dict)
    targets: torch.Tensor | None = None


def bounds_from_normalization(
    mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The z^B bounds in model-input space for pixels in [0, 1] normalised as ``(x - mean) / std``.

    Returns per-channel ``(low, high)`` with ``low_c = -mean_c / std_c`` and ``high_c = (1 - mean_c) / std_c``.
    """
    mean_t = torch.as_tensor(mean, dtype=torch.float64)
    std_t = torch.as_tensor(std, dtype=torch.float64)
    if mean_t.shape != std_t.shape or mean_t.dim() > 1:
        raise ValueError(f"mean and std must be scalars or 1-D of equal length, got {tuple(mean_t.shape)} "
                         f"and {tuple(std_t.shape)}")
    if (std_t <= 0).any():
        raise ValueError(f"std must be positive, got {std_t.tolist()}")
    dtype = torch.promote_types(torch.as_tensor(mean).dtype if isinstance(mean, torch.Tensor) else torch.float32,
                                torch.float32)
    return (-mean_t / std_t).to(dtype), ((1 - mean_t) / std_t).to(dtype)


def _bounds_for(input_bounds, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if input_bounds is None:
        raise ValueError(
            "first_layer='zb' needs input_bounds=(low, high): the range of the model input, e.g. "
            "bounds_from_normalization(mean, std) for normalised images, or (0.0, 1.0) for raw pixels"
        )
    try:
        low, high = input_bounds
    except (TypeError, ValueError):
        raise ValueError(f"input_bounds must be a pair (low, high), got {input_bounds!r}") from None
    out = []
    channels = inputs.shape[1]
    for name, b in (("low", low), ("high", high)):
        t = torch.as_tensor(b, dtype=inputs.dtype, device=inputs.device)
        if t.dim() == 0:
            t = t.expand(channels)
        if t.dim() != 1 or t.shape[0] != channels:
            raise ValueError(
                f"input_bounds {name} has shape {tuple(t.shape)}; expected a scalar or one value per input "
                f"channel ({channels},)"
            )
        out.append(t.reshape((1, channels) + (1,) * (inputs.dim() - 2)))
    if (out[0] > out[1]).any():
        raise ValueError(f"input_bounds low {low} exceeds high {high}")
    return out[0], out[1]


def select_targets(logits: torch.Tensor, target, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """The class explained per sample for a target spec (``None`` for ``"joint"``/``"all"``)."""
    batch, classes = logits.shape
    if isinstance(target, torch.Tensor):
        if target.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) or target.dim() != 1 \
                or target.shape[0] != batch:
            raise ValueError(
                f"target tensor must be integer class ids of shape ({batch},), got {target.dtype} "
                f"{tuple(target.shape)}"
            )
        if ((target < 0) | (target >= classes)).any():
            raise ValueError(f"target class ids must lie in [0, {classes - 1}], got {target.tolist()}")
        return target.to(logits.device).long()
    if target == "predicted":
        return logits.argmax(1)
    if target == "selective":
        return logits.argmin(1)
    if target == "stochastic":
        # the highest logit with probability 1/2, otherwise uniform over the other C - 1 classes
        top = logits.argmax(1)
        if classes == 1:
            return top
        device = logits.device
        coin = torch.rand(batch, generator=generator, device=device if generator is None else generator.device)
        other = torch.randint(0, classes - 1, (batch,), generator=generator,
                              device=device if generator is None else generator.device)
        coin, other = coin.to(device), other.to(device)
        other = other + (other >= top).long()  # skip the top class
        return torch.where(coin < 0.5, top, other)
    if target in ("joint", "all"):
        return None
    raise ValueError(f"target must be one of {TARGETS} or a LongTensor of class ids, got {target!r}")


def explained_quantity(logits: torch.Tensor, target, targets: torch.Tensor | None, mu: float) -> torch.Tensor:
    """The scalar whose modified gradient is the heatmap (summed over the batch: samples are independent)."""
    if target == "joint":
        return logits.sum()
    if target == "selective":
        p = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=1).gather(1, targets[:, None])
        return (torch.log(p + mu) - torch.log(1 - p + mu)).sum()
    return logits.gather(1, targets[:, None]).sum()


def explain(
    model: nn.Module,
    inputs: torch.Tensor,
    target: str | torch.Tensor = "predicted",
    *,
    rule: str = "epsilon",
    eps: float = 0.01,
    first_layer: str | None = None,
    input_bounds=None,
    layers: Sequence[str] = (),
    create_graph: bool = False,
    mu: float = 0.01,
    max_maps_per_pass: int = 16,
    generator: torch.Generator | None = None,
) -> Explanation:
    """LRP heatmaps of ``model`` on ``inputs`` with LRP-Flex (rules as modified gradients).

    Args:
        model: any classifier built from ReLU-family activations (ReLU, LeakyReLU, ReLU6/Hardtanh,
            clamp), convolutions, linear layers, BatchNorm, pooling, residual sums and concatenations.
            Other non-linearities (GELU, SiLU, sigmoid, softmax inside the model, LayerNorm...) raise
            :class:`UnsupportedOperationError` naming the function. The model is left as it was (mode,
            hooks, parameters); a train-mode forward updates BatchNorm running statistics as usual.
        inputs: ``[B, ...]`` batch of inputs.
        target: ``"predicted"`` (highest logit), a LongTensor ``[B]`` of class ids, ``"joint"`` (all
            logits at once, R_k = z_k; with ``rule="zplus"`` the positive-weight logits), ``"selective"``
            (eta-tilde = ln(P_c + mu) - ln(1 - P_c + mu) of the lowest-logit class c), ``"stochastic"``
            (highest logit with probability 1/2, else uniform over the others, per sample, from torch's
            RNG or ``generator``), ``"all"`` (one map per class, ``max_maps_per_pass`` at a time).
        rule: ``"epsilon"`` (LRP-epsilon, once per block on the rectifier pre-activation) or ``"zplus"``
            (LRP-z+ with BatchNorm folded into the preceding conv/linear before clamping).
        eps: the epsilon of LRP-epsilon (and the z+ stabiliser). ``eps=0`` is gradient x input.
        first_layer: ``"zb"`` applies the deep-Taylor z^B rule to the first block (conv/linear and an
            optional BatchNorm before the first rectifier), with ``input_bounds``.
        input_bounds: ``(low, high)``, scalars or per-channel values: the input domain for z^B. For
            normalised images use :func:`bounds_from_normalization`.
        layers: module names whose input relevance ``R_l = G_l * a_l`` is returned in ``.layers``.
        create_graph: make the heatmap differentiable w.r.t. the parameters (for a heatmap loss).
        mu: the Selective ISNet's stabiliser.
        max_maps_per_pass: with ``target="all"``, how many class maps one batched backward produces.
        generator: RNG for ``target="stochastic"``.

    Precision: the heatmap backward runs in the precision of the forward (under ``torch.autocast`` its
    matrix products run in bf16/fp16 as the forward's did); the rectifier factors and BatchNorm
    statistics are computed in float32; the heatmap has the dtype of ``inputs``.

    The forward graph is retained so that ``explanation.logits`` can feed a classification loss.
    """
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ValueError(f"inputs must be a tensor with a batch dimension [B, ...], got {shape}; "
                         "for a single example use inputs.unsqueeze(0)")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if not (isinstance(target, torch.Tensor) or target in TARGETS):
        raise ValueError(f"target must be one of {TARGETS} or a LongTensor of class ids, got {target!r}")
    if rule == "zplus" and isinstance(target, str) and target == "selective":
        raise ValueError("target='selective' explains a softmax quantity with LRP-epsilon; use rule='epsilon'")
    if first_layer not in (None, "zb"):
        raise ValueError(f"first_layer must be None or 'zb', got {first_layer!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    bounds = _bounds_for(input_bounds, inputs) if first_layer == "zb" else None

    with torch.enable_grad(), LRPForward(model, inputs, eps=eps, zplus=rule == "zplus", zb_bounds=bounds,
                                         layers=tuple(layers)) as fwd:
        logits = fwd.logits
        explained = fwd.shadow_logits if rule == "zplus" else logits
        targets = select_targets(logits.detach(), target, generator)
        if isinstance(target, str) and target == "all":
            heatmap, layer_maps = _all_classes(fwd, explained, create_graph, max_maps_per_pass, rule)
        else:
            q = explained_quantity(explained, target if isinstance(target, str) else "index", targets, mu)
            heatmap, layer_maps = fwd.relevance(q, create_graph=create_graph, rule=rule)
        if not create_graph:
            heatmap = heatmap.detach()
            layer_maps = {k: v.detach() for k, v in layer_maps.items()}
    return Explanation(heatmap=heatmap, logits=logits, layers=layer_maps, targets=targets)


def _all_classes(fwd: LRPForward, explained: torch.Tensor, create_graph: bool, chunk: int, rule: str = "epsilon"):
    """One map per class, ``chunk`` classes per batched backward (``is_grads_batched``)."""
    if chunk < 1:
        raise ValueError(f"max_maps_per_pass must be >= 1, got {chunk}")
    classes = explained.shape[1]
    eye = torch.eye(classes, dtype=explained.dtype, device=explained.device)
    heat_parts, layer_parts = [], []
    for start in range(0, classes, chunk):
        basis = eye[start:start + chunk]  # [K, C]
        grad_outputs = basis[:, None, :].expand(-1, explained.shape[0], -1)  # [K, B, C]
        heat, layers = fwd.relevance(explained, grad_outputs, create_graph=create_graph, batched=True, rule=rule)
        heat_parts.append(heat)
        layer_parts.append(layers)
    heatmap = torch.cat(heat_parts).transpose(0, 1)  # [B, C, ...]
    layer_maps = {n: torch.cat([p[n] for p in layer_parts]).transpose(0, 1) for n in layer_parts[0]}
    return heatmap, layer_maps
