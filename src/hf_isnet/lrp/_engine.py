"""The LRP-Flex forward pass: one traced forward whose graph serves both the true gradient and the
LRP heatmap backward.

How it works (method.md, "LRP-Flex: rules as modified gradients"):

* During the forward, a :class:`torch.overrides.TorchFunctionMode` sees every torch call the model
  makes (modules, ``F.relu``, ``Tensor.relu_``, a reused ``nn.ReLU``, timm's fused ``BatchNormAct2d``
  ...), so no rectifier is missed or counted twice, whatever the module structure.
* Each rectifier call is replaced by :class:`_RectifierFn`, an autograd function whose backward is the
  true derivative normally, and the LRP-epsilon factor ``f(z) / (z + eps sign z)`` only while a heatmap
  is being differentiated (``Session.active``). The factor is computed with differentiable ops, so a
  heatmap obtained with ``create_graph=True`` is differentiable w.r.t. the parameters (double
  backward), and the outer ``loss.backward()`` sees the model's true gradients.
* Train-mode BatchNorm is recomputed from explicit batch statistics; in the heatmap backward those
  statistics are constants (:class:`_RouteFn`), so the heatmap of a sample only depends on that
  sample's explained quantity. The classification gradient still flows through them.
* ``first_layer="zb"``: the first block (conv/linear, optionally followed by BatchNorm, which is folded
  in) gets the deep-Taylor z^B rule, expressed as gradients w.r.t. two extra leaves holding the bounds.
* ``rule="zplus"``: a *shadow* graph is built next to the true one: every conv/linear is re-applied with
  positive weights and biases (BatchNorm folded in before clamping) to the true activations, and each
  rectifier output is a :class:`_GateFn` whose heatmap backward divides by the positive pre-activation.

Nothing is registered on the model except forward pre-hooks for ``layers`` while the forward runs;
everything the pass holds is dropped by :meth:`LRPForward.close`, so no graph outlives a step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .rules import RECTIFIERS, UNSUPPORTED, Rectifier, UnsupportedOperationError, safe_divide, stabilize

#: Stabiliser of the z^B denominator (as zennit's ZBox).
ZB_STABILIZER = 1e-6


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The precision of rectifier factors and BatchNorm statistics: float32 for 16-bit inputs, else as is."""
    return torch.promote_types(dtype, torch.float32)


class Session:
    """State shared by the autograd functions of one LRP forward pass."""

    def __init__(self, eps: float, zplus_eps: float | None = None) -> None:
        self.active = False  # True only while a heatmap is being differentiated
        self.eps = float(eps)
        self.zplus_eps = float(eps if zplus_eps is None else zplus_eps)


# --------------------------------------------------------------------------------------------------
# autograd functions


class _RectifierFn(torch.autograd.Function):
    """A rectifier with a switchable backward: true derivative, or the LRP-epsilon factor."""

    @staticmethod
    def forward(ctx, z, pre, den, rect: Rectifier, session: Session, inplace: bool):  # noqa: D417
        if inplace:
            out = rect.apply_(z)
            ctx.mark_dirty(z)
        else:
            out = rect.apply(z)
        ctx.rect, ctx.session = rect, session
        ctx.has_pre, ctx.has_den = pre is not None, den is not None
        ctx.set_materialize_grads(False)  # a branch that gets no gradient is not back-propagated on zeros
        ctx.save_for_backward(out, pre, den)
        return out

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None, None, None, None
        out, pre, den = ctx.saved_tensors
        rect = ctx.rect
        if not ctx.has_pre:
            pre = rect.pre_from_output(out)
        if ctx.session.active:
            if ctx.has_den:  # first block under z^B: divide by the z^B denominator
                factor = safe_divide(out, stabilize(den, ZB_STABILIZER))
            else:
                wide = _wide(out.dtype)  # at least float32, float64 stays float64
                factor = rect.lrp_factor(pre.to(wide), out.to(wide), ctx.session.eps).to(out.dtype)
            g = grad * factor
        else:
            g = grad * rect.derivative(pre)
        return g, None, None, None, None, None


class _RouteFn(torch.autograd.Function):
    """Identity in the forward; the backward passes the gradient only in one of the two phases.

    ``when_active=False``: a quantity that is a constant for the heatmap (BatchNorm batch statistics).
    ``when_active=True``: a term that exists only for the heatmap (the z^B bound terms).
    """

    @staticmethod
    def forward(ctx, x, session: Session, when_active: bool):
        ctx.session, ctx.when_active = session, when_active
        ctx.set_materialize_grads(False)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if grad is not None and ctx.session.active == ctx.when_active:
            return grad, None, None
        return None, None, None


class _GateFn(torch.autograd.Function):
    """z+ shadow of a rectifier output: its value is the true activation ``a``.

    Heatmap backward: the gradient goes to the positive pre-activation ``zp`` scaled by
    ``a / (zp + eps)`` (the z+ rule). True backward: the value is ``a``, so the gradient goes to ``a``.
    """

    @staticmethod
    def forward(ctx, zp, a, session: Session, eps: float):
        ctx.session, ctx.eps = session, eps
        ctx.save_for_backward(zp, a)
        ctx.set_materialize_grads(False)
        return a.view_as(a)

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None, None
        zp, a = ctx.saved_tensors
        if ctx.session.active:
            return grad * safe_divide(a, stabilize(zp, ctx.eps)), None, None, None
        return None, grad, None, None


# --------------------------------------------------------------------------------------------------
# shadow (z+) and first-block (z^B) bookkeeping


@dataclass
class _Affine:
    """A conv/linear not yet materialised, so that a following BatchNorm can be folded into it."""

    func: Callable
    inp: torch.Tensor  # the input the op acts on (shadow value, or the model input)
    weight: torch.Tensor
    bias: torch.Tensor | None
    extra: tuple = ()  # stride, padding, ... for convs
    value: torch.Tensor | None = None  # materialised positive output (cached)

    def fold(self, scale: torch.Tensor, shift: torch.Tensor) -> _Affine:
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        w = self.weight * scale.reshape(shape).to(self.weight.dtype)
        b = shift if self.bias is None else self.bias * scale + shift
        return _Affine(self.func, self.inp, w, b.to(self.weight.dtype), self.extra)

    def run(self, inp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.func(inp, weight, bias, *self.extra)

    def positive(self) -> torch.Tensor:
        if self.value is None:
            bias = None if self.bias is None else self.bias.clamp(min=0)
            self.value = self.run(self.inp, self.weight.clamp(min=0), bias)
        return self.value


@dataclass
class _FirstBlock:
    """The affine map from the model input to the first rectifier (for z^B)."""

    affine: _Affine
    low: torch.Tensor  # leaf, same shape as what the affine op consumes
    high: torch.Tensor


@dataclass
class _Tracked:
    tensor: torch.Tensor  # keeps the id valid while tracked
    shadow: torch.Tensor | _Affine | None = None  # z+ shadow
    first: _FirstBlock | None = None  # output of the first block (z^B)
    zb_input: tuple[torch.Tensor, torch.Tensor] | None = None  # the input (or a reshape of it) and its bounds


def _arg(args: tuple, kwargs: dict, i: int, name: str, default):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _affine_of(func, inp: torch.Tensor, args: tuple, kwargs: dict) -> _Affine:
    """The :class:`_Affine` of one conv/linear call, acting on ``inp``."""
    names = ("weight", "bias", "stride", "padding", "dilation", "groups")
    params = [_arg(args, kwargs, i + 1, n, None) for i, n in enumerate(names)]
    if func in _LINEAR:
        params = params[:2]
    while len(params) > 2 and params[-1] is None:
        params.pop()
    return _Affine(func, inp, params[0], params[1], tuple(p for p in params[2:]))


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _replace(obj, table: dict[int, torch.Tensor]):
    if isinstance(obj, torch.Tensor):
        return table.get(id(obj), obj)
    if isinstance(obj, list):
        return [_replace(o, table) for o in obj]
    if isinstance(obj, tuple):
        return tuple(_replace(o, table) for o in obj)
    if isinstance(obj, dict):
        return {k: _replace(o, table) for k, o in obj.items()}
    return obj


_CONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_LINEAR = {F.linear, torch._C._nn.linear}
_ADD = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.add_,
        torch.Tensor.__iadd__}
_INPLACE_ADD = {torch.Tensor.add_, torch.Tensor.__iadd__}
_MAXPOOL = {F.max_pool1d: F.max_pool1d_with_indices, F.max_pool2d: F.max_pool2d_with_indices,
            F.max_pool3d: F.max_pool3d_with_indices, torch.max_pool1d: F.max_pool1d_with_indices,
            torch.max_pool2d: F.max_pool2d_with_indices, torch.max_pool3d: F.max_pool3d_with_indices,
            F.adaptive_max_pool1d: F.adaptive_max_pool1d_with_indices,
            F.adaptive_max_pool2d: F.adaptive_max_pool2d_with_indices,
            F.adaptive_max_pool3d: F.adaptive_max_pool3d_with_indices}
# linear in the first argument, applied to the shadow as they are
_LINEAR_UNARY = {
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, torch.avg_pool1d, torch._C._nn.avg_pool2d, torch._C._nn.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, torch.adaptive_avg_pool1d,
    torch._C._nn.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool3d,
    torch.mean, torch.Tensor.mean, torch.sum, torch.Tensor.sum,
    torch.flatten, torch.Tensor.flatten, torch.Tensor.view, torch.Tensor.view_as, torch.reshape,
    torch.Tensor.reshape, torch.Tensor.permute, torch.permute, torch.transpose, torch.Tensor.transpose,
    torch.Tensor.contiguous, torch.squeeze, torch.Tensor.squeeze, torch.unsqueeze, torch.Tensor.unsqueeze,
    torch.Tensor.__getitem__, torch.Tensor.clone, torch.clone, torch.Tensor.to, torch.Tensor.float,
    torch.Tensor.double, torch.Tensor.half, torch.Tensor.bfloat16, torch.Tensor.type_as, torch.Tensor.expand,
    torch.Tensor.expand_as, torch.narrow, torch.Tensor.narrow, torch.Tensor.mul, torch.Tensor.__mul__,
    torch.Tensor.__rmul__, torch.mul, torch.Tensor.div, torch.Tensor.__truediv__, torch.div,
    F.pad, torch.Tensor.flip, torch.flip, F.pixel_shuffle, F.pixel_unshuffle, torch.Tensor.unflatten,
}
_MULDIV = {torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.mul, torch.Tensor.div,
           torch.Tensor.__truediv__, torch.div}
_RESHAPES = {torch.flatten, torch.Tensor.flatten, torch.Tensor.view, torch.reshape, torch.Tensor.reshape,
             torch.Tensor.contiguous, torch.Tensor.permute, torch.permute, torch.unsqueeze, torch.Tensor.unsqueeze,
             torch.squeeze, torch.Tensor.squeeze, torch.Tensor.float, torch.Tensor.to, torch.Tensor.clone}
_SPLIT = {torch.split, torch.Tensor.split, torch.chunk, torch.Tensor.chunk, torch.unbind, torch.Tensor.unbind}
_CAT = {torch.cat, torch.concat, torch.concatenate, torch.stack}
_DROPOUT = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
# calls that never carry relevance (metadata, asserts, detach)
_IGNORED = {torch.Tensor.detach, torch.Tensor.requires_grad_, torch._assert, torch.Tensor.dim,
            torch.Tensor.size, torch.Tensor.numel, torch.Tensor.__format__, torch.Tensor.__repr__,
            torch.Tensor.__len__, torch.Tensor.is_contiguous}


class _Tracer(TorchFunctionMode):
    def __init__(self, fwd: LRPForward) -> None:
        super().__init__()
        self.fwd = fwd

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        fwd = self.fwd
        if func in UNSUPPORTED:
            raise UnsupportedOperationError(
                f"the model calls {UNSUPPORTED[func]} ({getattr(func, '__qualname__', func)}), a non-linearity "
                "LRP-Flex cannot explain: it supports ReLU, LeakyReLU, ReLU6/Hardtanh and clamp-style "
                "piecewise-linear activations (with BatchNorm, convolutions, pooling, residual sums and "
                "concatenations in between). Replace the activation (e.g. timm.create_model(..., "
                "act_layer='relu')) or use another backbone."
            )
        if func in RECTIFIERS:
            return fwd._rectifier(func, args, kwargs)
        if func in _CONVS and args and args[0] is fwd.x and fwd.x.dim() == args[1].dim() - 1:
            raise ValueError(
                f"inputs of shape {tuple(fwd.x.shape)} reach a {fwd.x.dim() - 1}-d convolution without a batch "
                "dimension; explain needs [batch, channels, ...]: use inputs.unsqueeze(0) for a single image"
            )
        if func is F.batch_norm:
            return fwd._batch_norm(args, kwargs)
        if fwd.tracking:
            return fwd._tracked_call(func, args, kwargs)
        return func(*args, **kwargs)


@dataclass
class LRPForward:
    """One traced forward pass of ``model`` on ``inputs``, ready to produce heatmaps.

    Use :func:`hf_isnet.lrp.explain` for the common case; this class lets one forward serve several
    heatmaps (the Dual ISNet's epsilon and z+ maps). Always :meth:`close` it (or use ``with``).
    """

    model: nn.Module
    inputs: torch.Tensor
    eps: float = 0.01
    zplus: bool = False
    zb_bounds: tuple[torch.Tensor, torch.Tensor] | None = None
    layers: Sequence[str] = ()
    session: Session = field(init=False)
    x: torch.Tensor = field(init=False)
    logits: torch.Tensor = field(init=False)
    shadow_logits: torch.Tensor | None = field(init=False, default=None)
    layer_inputs: dict[str, torch.Tensor] = field(init=False, default_factory=dict)
    layer_shadows: dict[str, torch.Tensor] = field(init=False, default_factory=dict)
    zb_leaves: tuple[torch.Tensor, torch.Tensor] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.session = Session(self.eps)
        self._table: dict[int, _Tracked] = {}
        self._zb_done = False
        self.tracking = self.zplus or self.zb_bounds is not None
        self.x = self.inputs.detach().requires_grad_(True)
        if self.tracking:
            if self.zb_bounds is not None:
                self.zb_leaves = tuple(b.detach().to(self.x.dtype).expand_as(self.x).clone().requires_grad_(True)
                                       for b in self.zb_bounds)
            self._table[id(self.x)] = _Tracked(self.x, shadow=self.x if self.zplus else None,
                                               zb_input=self.zb_leaves)
        self._run()

    # ---------------------------------------------------------------- forward
    def _run(self) -> None:
        modules = dict(self.model.named_modules())
        missing = [n for n in self.layers if n not in modules]
        if missing:
            names = [n for n in modules if n][:30]
            raise ValueError(f"layers {missing} are not module names of the model; some valid names: {names}")
        handles = []
        for name in self.layers:
            def pre_hook(module, args, name=name):
                self.layer_inputs[name] = args[0]
            handles.append(modules[name].register_forward_pre_hook(pre_hook))
        try:
            with torch.enable_grad(), _Tracer(self):
                out = self.model(self.x)
        finally:
            for h in handles:
                h.remove()
        self.logits = _logits_of(out)
        if self.logits.dim() != 2 or self.logits.shape[0] != self.x.shape[0]:
            raise ValueError(
                f"the model returned logits of shape {tuple(self.logits.shape)}; LRP needs [batch, classes] "
                f"with batch = inputs.shape[0] = {self.x.shape[0]}. If inputs is a single example, add a "
                "batch dimension (inputs.unsqueeze(0))."
            )
        if self.zb_bounds is not None and not self._zb_done:
            raise ValueError(
                "first_layer='zb' found no rectifier fed by the first block: z^B needs the input to go "
                "through conv/linear (optionally BatchNorm) into a rectifier"
            )
        if self.zplus:
            entry = self._table.get(id(self.logits))
            if entry is None or entry.shadow is None:
                raise UnsupportedOperationError("rule='zplus' could not follow the model to its logits")
            self.shadow_logits = self._materialize(entry.shadow)
            self.layer_shadows = {n: self._materialize(self._shadow_of(t)) for n, t in self.layer_inputs.items()}

    def _rectifier(self, func, args, kwargs):
        rect, inplace = RECTIFIERS[func](func, args, kwargs)
        z = args[0]
        den = None
        first = self._first_of(z)
        if first is not None:
            # z^B: the rectifier acts on the denominator (same value as z) so that the heatmap backward
            # reaches the bound leaves; an in-place call writes the result back into z
            zin, den = self._zb_denominator(first, z)
            out = _RectifierFn.apply(zin, zin, den, rect, self.session, False)
            if inplace:
                out = z.copy_(out)
        else:
            pre = z.clone() if (rect.needs_pre and inplace) else (z if rect.needs_pre else None)
            out = _RectifierFn.apply(z, pre, den, rect, self.session, inplace)
        if self.tracking:
            if self.zplus:
                if den is not None:  # z^B first block: divide by its denominator
                    shadow = _GateFn.apply(den, out, self.session, ZB_STABILIZER)
                else:
                    shadow = _GateFn.apply(self._materialize(self._shadow_of(z)), out, self.session,
                                           self.session.zplus_eps)
                self._track(out, shadow)
            elif first is not None:
                self._table.pop(id(z), None)
            if first is not None:
                self._table.pop(id(self.x), None)  # the first block is done: the input is no longer special
        return out

    def _batch_norm(self, args, kwargs):
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        p = dict(zip(names, (None, None, None, None, None, False, 0.1, 1e-5)))
        p.update(zip(names, args))
        p.update(kwargs)
        x, rm, rv, weight, bias = p["input"], p["running_mean"], p["running_var"], p["weight"], p["bias"]
        use_batch_stats = p["training"] or rm is None
        entry = self._entry(x) if self.tracking else None
        if not use_batch_stats and entry is None:
            return F.batch_norm(*args, **kwargs)  # an affine map with running statistics: nothing to do
        if use_batch_stats:
            var, mean = torch.var_mean(x.to(_wide(x.dtype)), dim=[0] + list(range(2, x.dim())), unbiased=False)
            if p["training"] and rm is not None:
                n = x.numel() // x.shape[1]
                m = 0.1 if p["momentum"] is None else p["momentum"]
                with torch.no_grad():
                    rm.mul_(1 - m).add_(mean.to(rm.dtype), alpha=m)
                    rv.mul_(1 - m).add_((var * (n / max(n - 1, 1))).to(rv.dtype), alpha=m)
            # constants in the heatmap backward, live for the classification gradient
            mean = _RouteFn.apply(mean, self.session, False)
            var = _RouteFn.apply(var, self.session, False)
        else:
            mean, var = rm.to(_wide(rm.dtype)), rv.to(_wide(rv.dtype))
        scale = torch.rsqrt(var + p["eps"])
        if weight is not None:
            scale = scale * weight.to(scale.dtype)
        shift = -mean * scale if bias is None else bias.to(scale.dtype) - mean * scale
        shape = [1, -1] + [1] * (x.dim() - 2)
        if use_batch_stats:
            out = x * scale.reshape(shape).to(x.dtype) + shift.reshape(shape).to(x.dtype)
        else:
            out = F.batch_norm(*args, **kwargs)
        if entry is not None:
            first = None
            if entry.first is not None:
                first = _FirstBlock(entry.first.affine.fold(scale, shift), entry.first.low, entry.first.high)
            shadow = None
            if self.zplus and entry.shadow is not None:
                shadow = self._bn_shadow(x, entry.shadow, scale, shift, shape)
            self._table[id(out)] = _Tracked(out, shadow=shadow, first=first)
        return out

    def _bn_shadow(self, x, shadow, scale, shift, shape):
        if isinstance(shadow, _Affine):
            return shadow.fold(scale, shift)
        # BatchNorm not preceded by a conv/linear: its own z+ layer (LRP-0 gate at its input)
        gated = _GateFn.apply(shadow, x, self.session, 0.0)
        return gated * scale.clamp(min=0).reshape(shape).to(x.dtype) + shift.clamp(min=0).reshape(shape).to(x.dtype)

    # ---------------------------------------------------------------- tracking helpers
    def _track(self, t: torch.Tensor, shadow) -> None:
        self._table[id(t)] = _Tracked(t, shadow=shadow)

    def _entry(self, t) -> _Tracked | None:
        if not isinstance(t, torch.Tensor):
            return None
        e = self._table.get(id(t))
        return e if e is not None and e.tensor is t else None

    def _first_of(self, t) -> _FirstBlock | None:
        e = self._entry(t)
        return None if e is None else e.first

    def _shadow_of(self, t: torch.Tensor):
        e = self._entry(t)
        if e is None or e.shadow is None:
            return t  # not derived from the input: a constant
        return e.shadow

    def _materialize(self, shadow) -> torch.Tensor:
        return shadow.positive() if isinstance(shadow, _Affine) else shadow

    def _zb_denominator(self, first: _FirstBlock, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z - (W+ l + b+) - (W- h + b-)`` as zennit's ZBox (the bias cancels: ``Wx - W+ l - W- h``).

        z is the first rectifier's pre-activation (bias included). Returns ``(rectifier input, denominator)``:
        the input has z's value and carries gradient to the bound leaves only in the heatmap backward, so
        the classification gradient is untouched; the denominator has the z^B value.
        """
        aff = first.affine
        b = aff.bias
        bounds = (aff.run(first.low, aff.weight.clamp(min=0), None if b is None else b.clamp(min=0))
                  + aff.run(first.high, aff.weight.clamp(max=0), None if b is None else b.clamp(max=0)))
        self._zb_done = True
        # the input routes the bound terms' gradient to the leaves only in the heatmap backward; the
        # denominator is plain, so the double backward sees its dependence on the parameters
        routed = _RouteFn.apply(bounds, self.session, True)
        return z - routed + bounds.detach(), z - bounds

    def _tracked_call(self, func, args, kwargs):
        flat = _tensors(args) + _tensors(kwargs)
        entries = [e for e in (self._entry(t) for t in flat) if e is not None]
        if not entries or func in _IGNORED:
            return func(*args, **kwargs)
        name = getattr(func, "__qualname__", getattr(func, "__name__", str(func)))
        if any(e.zb_input is not None or e.first is not None for e in entries):
            return self._first_block_call(func, name, args, kwargs, entries)
        if not self.zplus:
            return func(*args, **kwargs)
        return self._shadow_call(func, name, args, kwargs)

    def _shadow_call(self, func, name, args, kwargs):
        """Run ``func`` and extend the z+ shadow graph through it."""
        x = args[0] if args else None
        if func in _CONVS or func in _LINEAR:
            out = func(*args, **kwargs)
            self._track(out, _affine_of(func, self._materialize(self._shadow_of(x)), args, kwargs))
            return out
        if func in _ADD:
            out = func(*args, **kwargs)
            other = _arg(args, kwargs, 1, "other", None)
            alpha = kwargs.get("alpha", 1)
            a = self._materialize(self._shadow_of(x))
            if isinstance(other, torch.Tensor) and self._entry(other) is not None:
                b = self._materialize(self._shadow_of(other))
            else:  # a constant added inside a block is a bias: its positive part
                b = other.clamp(min=0) if isinstance(other, torch.Tensor) else max(other, 0)
            self._track(out, a + b if alpha == 1 else a + alpha * b)
            return out
        if func in _CAT:
            out = func(*args, **kwargs)
            seq = args[0] if args else kwargs["tensors"]
            rest = {k: v for k, v in kwargs.items() if k != "tensors"}
            self._track(out, func([self._materialize(self._shadow_of(t)) for t in seq], *args[1:], **rest))
            return out
        if func in _MAXPOOL:
            n_pos = 1 if "adaptive" in func.__name__ else 5
            kw = {k: v for k, v in kwargs.items() if k != "return_indices"}
            want_idx = bool(_arg(args, kwargs, n_pos + 1, "return_indices", False))
            out, idx = _MAXPOOL[func](x, *args[1:n_pos + 1], **kw)
            s = self._materialize(self._shadow_of(x))
            self._track(out, s.flatten(2).gather(2, idx.flatten(2)).view_as(out))
            return (out, idx) if want_idx else out
        if func in _DROPOUT:
            p, training = float(_arg(args, kwargs, 1, "p", 0.5)), bool(_arg(args, kwargs, 2, "training", True))
            if not training or p == 0:
                self._track(x, self._shadow_of(x))
                return x
            keep = torch.empty_like(x).bernoulli_(1 - p) / (1 - p)
            out = x * keep
            self._track(out, self._materialize(self._shadow_of(x)) * keep)
            return out
        if func in _SPLIT:
            outs = func(*args, **kwargs)
            shadows = func(self._materialize(self._shadow_of(x)), *args[1:], **kwargs)
            for o, s in zip(outs, shadows):
                self._track(o, s)
            return outs
        if func in _LINEAR_UNARY:
            if func in _MULDIV:
                other = _arg(args, kwargs, 1, "other", None)
                if isinstance(other, torch.Tensor) or (other is not None and other <= 0):
                    raise UnsupportedOperationError(
                        f"rule='zplus' cannot propagate through {name} by {other!r}; only scaling by a "
                        "positive python number keeps the z+ rule's positive weights")
            out = func(*args, **kwargs)
            table = {id(x): self._materialize(self._shadow_of(x))}
            if isinstance(out, torch.Tensor):
                self._track(out, func(*_replace(args, table), **_replace(kwargs, table)))
            return out
        out = func(*args, **kwargs)
        if not _tensors(out):
            return out
        raise UnsupportedOperationError(
            f"rule='zplus' does not know how to propagate relevance through {name}; supported between "
            "rectifiers: conv/linear, BatchNorm, residual sums, concatenation, pooling, reshaping, dropout"
        )

    def _first_block_call(self, func, name, args, kwargs, entries):
        """Follow the input through the first block for z^B (rectifiers and BatchNorm are handled apart)."""
        out = func(*args, **kwargs)
        if not _tensors(out):
            return out
        x = args[0] if args else None
        entry = self._entry(x)
        if entry is not None and entry.zb_input is not None and len(entries) == 1:
            low, high = entry.zb_input
            if func in _CONVS or func in _LINEAR:
                aff = _affine_of(func, x, args, kwargs)
                self._table[id(out)] = _Tracked(out, shadow=aff if self.zplus else None,
                                                first=_FirstBlock(aff, low, high))
                return out
            if func in _RESHAPES:
                bounds = tuple(func(b, *args[1:], **kwargs) for b in (low, high))
                self._table[id(out)] = _Tracked(out, shadow=out if self.zplus else None, zb_input=bounds)
                return out
        raise UnsupportedOperationError(
            f"first_layer='zb' needs the first block to be conv/linear (optionally followed by BatchNorm) "
            f"feeding a rectifier, but the model applies {name} there. Use first_layer=None for this model."
        )

    # ---------------------------------------------------------------- backward
    def relevance(
        self,
        outputs: torch.Tensor,
        grad_outputs: torch.Tensor | None = None,
        *,
        create_graph: bool = False,
        batched: bool = False,
        rule: str = "epsilon",
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Differentiate ``outputs`` with the LRP backward; returns (input heatmap, {layer: relevance}).

        ``outputs`` is (a function of) :attr:`logits` for ``rule="epsilon"`` and of :attr:`shadow_logits`
        for ``rule="zplus"``; ``grad_outputs`` as in :func:`torch.autograd.grad` (``batched``: a leading
        dimension of several maps, ``is_grads_batched``).
        """
        wrt = [self.x]
        if self.zb_leaves is not None:
            wrt += list(self.zb_leaves)
        layer_tensors = self.layer_shadows if rule == "zplus" else self.layer_inputs
        names = list(layer_tensors)
        wrt += [layer_tensors[n] for n in names]
        self.session.active = True
        try:
            grads = torch.autograd.grad(
                outputs, wrt, grad_outputs=grad_outputs, retain_graph=True, create_graph=create_graph,
                allow_unused=True, is_grads_batched=batched,
            )
        finally:
            self.session.active = False
        grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]
        heat = grads[0] * self.x
        k = 1
        if self.zb_leaves is not None:
            heat = heat + grads[1] * self.zb_leaves[0] + grads[2] * self.zb_leaves[1]
            k = 3
        layers = {n: g * layer_tensors[n] for n, g in zip(names, grads[k:])}
        return heat, layers

    def close(self) -> None:
        """Drop every reference the pass holds (breaks the tensor <-> graph cycles)."""
        self._table.clear()
        self.layer_inputs, self.layer_shadows = {}, {}

    def __enter__(self) -> LRPForward:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _logits_of(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in the model output of type {type(out).__name__}")


__all__ = ["LRPForward", "Session", "ZB_STABILIZER"]
