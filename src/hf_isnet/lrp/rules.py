"""Which torch functions LRP-Flex treats as rectifiers, and which it refuses.

A rule is data: each rectifier is described by a :class:`Rectifier` (how to evaluate it, its true
derivative, and how to recover its pre-activation), looked up by the function object that the model
calls. Everything between two rectifiers is an affine block whose backward is the ordinary gradient.

LRP-epsilon at a piecewise-linear rectifier ``a = f(z)`` (method.md): the heatmap backward replaces the
derivative ``f'(z)`` by ``f(z) / (z + eps * sign(z))`` (with ``sign(0) = +1`` and ``0 / 0 := 0``). For
ReLU this is ``a / (a + eps)`` on active units and 0 elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Rectifier", "RECTIFIERS", "UNSUPPORTED", "UnsupportedOperationError", "stabilize", "safe_divide"]


class UnsupportedOperationError(TypeError):
    """The model calls a function that the chosen LRP rule cannot propagate relevance through."""


def stabilize(den: torch.Tensor, eps: float) -> torch.Tensor:
    """``den + eps * sign(den)`` with ``sign(0) = +1`` (the LRP-epsilon stabiliser)."""
    if eps == 0:
        return den
    return den + eps * torch.where(den >= 0, 1.0, -1.0).to(den.dtype)


def safe_divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with ``x / 0 := 0``; NaN-free in value and in every derivative order.

    The denominator is replaced by 1 where it is 0 *before* dividing, so no branch of the
    computation graph ever holds an inf (``torch.where`` over an inf branch gives NaN gradients).
    """
    zero = den == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, torch.ones_like(den), den))


@dataclass(frozen=True)
class Rectifier:
    """A piecewise-linear activation ``f`` with ``f(0) = 0``.

    ``lower``/``upper`` are the saturation bounds (``-inf``/``+inf`` when absent) and ``slope`` the
    slope below 0 for leaky units. ``needs_pre`` says whether the pre-activation can be recovered
    from the output alone (ReLU, LeakyReLU) or must be kept (saturating units such as ReLU6).
    """

    name: str
    lower: float = 0.0
    upper: float = math.inf
    slope: float = 0.0

    @property
    def needs_pre(self) -> bool:
        return math.isfinite(self.upper) or (self.lower != 0.0 and math.isfinite(self.lower))

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        if self.slope:
            return F.leaky_relu(z, self.slope)
        if self.lower == 0.0 and not math.isfinite(self.upper):
            return torch.relu(z)
        lo = None if not math.isfinite(self.lower) else self.lower
        hi = None if not math.isfinite(self.upper) else self.upper
        return torch.clamp(z, lo, hi)

    def apply_(self, z: torch.Tensor) -> torch.Tensor:
        if self.slope:
            return F.leaky_relu_(z, self.slope)
        if self.lower == 0.0 and not math.isfinite(self.upper):
            return z.relu_()
        lo = None if not math.isfinite(self.lower) else self.lower
        hi = None if not math.isfinite(self.upper) else self.upper
        return z.clamp_(lo, hi)

    def pre_from_output(self, out: torch.Tensor) -> torch.Tensor:
        """The pre-activation where it is recoverable from the output (non-saturating units)."""
        if self.slope:
            return torch.where(out >= 0, out, out / self.slope)
        return out

    def derivative(self, pre: torch.Tensor) -> torch.Tensor:
        """The true derivative ``f'(z)`` (torch's conventions at the kinks)."""
        if self.slope:
            return torch.where(pre > 0, 1.0, self.slope).to(pre.dtype)
        inside = pre > self.lower
        if math.isfinite(self.upper):
            inside = inside & (pre < self.upper)
        return inside.to(pre.dtype)

    def lrp_factor(self, pre: torch.Tensor, out: torch.Tensor, eps: float) -> torch.Tensor:
        """``f(z) / (z + eps * sign(z))``, 0 where both are 0."""
        return safe_divide(out, stabilize(pre, eps))


def _parse(func: Callable, args: tuple, kwargs: dict) -> tuple[Rectifier, bool]:
    """Map one call of a rectifier function to its :class:`Rectifier` and whether it is in place."""
    kw = dict(kwargs)

    def arg(i: int, name: str, default):
        if len(args) > i:
            return args[i]
        return kw.get(name, default)

    if func in (F.relu, torch.relu, torch.Tensor.relu):
        return RELU, bool(arg(1, "inplace", False)) if func is F.relu else False
    if func in (torch.relu_, torch.Tensor.relu_, F.relu_):
        return RELU, True
    if func is F.relu6:
        return RELU6, bool(arg(1, "inplace", False))
    if func in (F.leaky_relu, F.leaky_relu_):
        slope = float(arg(1, "negative_slope", 0.01))
        rect = RELU if slope == 0 else Rectifier("leaky_relu", slope=slope)
        return rect, func is F.leaky_relu_ or bool(arg(2, "inplace", False))
    if func in (F.hardtanh, F.hardtanh_):
        lo, hi = float(arg(1, "min_val", -1.0)), float(arg(2, "max_val", 1.0))
        return Rectifier("hardtanh", lower=lo, upper=hi), func is F.hardtanh_ or bool(arg(3, "inplace", False))
    if func in (torch.clamp, torch.Tensor.clamp, torch.clip, torch.Tensor.clip, torch.clamp_, torch.Tensor.clamp_,
                torch.clamp_min, torch.Tensor.clamp_min, torch.clamp_min_, torch.Tensor.clamp_min_):
        lo = arg(1, "min", None)
        hi = None if "min" in func.__name__ else arg(2, "max", None)
        if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):
            raise UnsupportedOperationError(
                f"{func.__name__} with tensor bounds is not a rectifier LRP-Flex can handle; use scalar bounds"
            )
        lo = -math.inf if lo is None else float(lo)
        hi = math.inf if hi is None else float(hi)
        if lo > 0 or hi < 0:
            raise UnsupportedOperationError(
                f"{func.__name__}(min={lo}, max={hi}) does not map 0 to 0, so it is not a rectifier; "
                "LRP-Flex only handles piecewise-linear activations with f(0) = 0"
            )
        rect = RELU if (lo == 0 and hi == math.inf) else Rectifier("clamp", lower=lo, upper=hi)
        return rect, func.__name__.endswith("_")
    raise KeyError(func)  # pragma: no cover - only called for registered functions


RELU = Rectifier("relu")
RELU6 = Rectifier("relu6", upper=6.0)

#: Functions intercepted as rectifiers (the value is the parser for one call).
RECTIFIERS: dict[Callable, Callable[[Callable, tuple, dict], tuple[Rectifier, bool]]] = {
    f: _parse
    for f in (
        F.relu, torch.relu, torch.Tensor.relu, torch.relu_, torch.Tensor.relu_, F.relu_, F.relu6,
        F.leaky_relu, F.leaky_relu_, F.hardtanh, F.hardtanh_,
        torch.clamp, torch.Tensor.clamp, torch.clip, torch.Tensor.clip, torch.clamp_, torch.Tensor.clamp_,
        torch.clamp_min, torch.Tensor.clamp_min, torch.clamp_min_, torch.Tensor.clamp_min_,
    )
}

#: Non-linearities LRP-Flex refuses (function -> human name). Anything here inside the model raises.
UNSUPPORTED: dict[Callable, str] = {}
for _name, _funcs in {
    "GELU": (F.gelu,),
    "SiLU/Swish": (F.silu,),
    "Mish": (F.mish,),
    "ELU": (F.elu, F.elu_),
    "SELU": (F.selu, torch.selu, torch.selu_),
    "CELU": (F.celu, F.celu_),
    "Softplus": (F.softplus,),
    "Hardswish": (F.hardswish,),
    "Hardsigmoid": (F.hardsigmoid,),
    "PReLU": (F.prelu, torch.prelu),
    "RReLU": (F.rrelu, F.rrelu_),
    "sigmoid": (torch.sigmoid, torch.Tensor.sigmoid, torch.sigmoid_, torch.Tensor.sigmoid_, F.sigmoid),
    "tanh": (torch.tanh, torch.Tensor.tanh, torch.tanh_, torch.Tensor.tanh_, F.tanh),
    "softmax": (F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, torch.log_softmax,
                torch.Tensor.log_softmax, F.softmin),
    "GLU": (F.glu,),
    "LogSigmoid": (F.logsigmoid,),
    "threshold": (F.threshold, F.threshold_),
    "LayerNorm": (F.layer_norm,),
    "GroupNorm": (F.group_norm,),
    "InstanceNorm": (F.instance_norm,),
    "LocalResponseNorm": (F.local_response_norm,),
}.items():
    for _f in _funcs:
        UNSUPPORTED[_f] = _name
