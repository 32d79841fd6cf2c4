"""Independent oracle for LRP-Flex: hand-written, layer-by-layer LRP for small ``nn.Sequential`` nets.

Nothing here uses autograd or code from ``hf_isnet.lrp``. Every layer is turned into an explicit dense
matrix acting on the flattened activation of ONE sample (``z = W x + b``, ``W`` of shape
``[B, n_out, n_in]``), and relevance is pushed back through those matrices in float64.

Supported modules: ``Conv2d`` (zero padding, any stride/dilation/groups, with or without bias),
``BatchNorm2d``/``BatchNorm1d`` (right after a Conv2d/Linear), ``ReLU``, ``MaxPool2d``, ``AvgPool2d``,
``Flatten``, ``Linear``, ``Identity``/``Dropout`` (eval). The last module must be a ``Linear``.

Conventions implemented (they are the spec the engine is tested against):

* Layers as matrices. Conv2d and AvgPool2d: the dense matrix is obtained by applying the (bias-free)
  layer to the basis vectors of its input space. MaxPool2d: a per-sample 0/1 selection matrix that
  picks the argmax of each window (winner-take-all), found with ``unfold``. Flatten/Identity: reshape.
* BatchNorm is folded into the preceding Conv/Linear: ``s = gamma / sqrt(var + eps_bn)``,
  ``W' = W * s``, ``b' = (b - mean) * s + beta``. Statistics: running ones in eval mode; in train mode
  (or without running stats) the batch statistics of the BN input (mean and BIASED variance over batch
  and spatial positions), used as constants.
* Relevance at the logits: for class target c, ``R = z_c`` at logit c and 0 elsewhere; for "joint",
  ``R_k = z_k`` for every k. With rule "zplus" the logit is replaced by the positive-weight logit
  ``z+_k = sum_j x_j w+_jk + b+_k`` of the last Linear (its actual input x).
* ReLU: relevance passes unchanged from the output to the pre-activation (it is 0 where a = 0).
* Affine step (conv/linear with folded BN, pooling) with input x and output z:
  ``R_j = x_j * sum_k w_jk R_k / den_k``. The step is "stabilised" iff its output is directly the
  pre-activation of a ReLU (only Flatten/Identity may sit in between); otherwise ``den_k = z_k`` (LRP-0,
  e.g. the logits layer, or a pooling inside a block). ``0/0 := 0`` (any ``x/0 := 0``).
  - rule "epsilon": ``den_k = z_k + eps * sign(z_k)`` when stabilised (``sign(0) = +1``).
  - rule "zplus": ``w+ = max(W', 0)``, ``b+ = max(b', 0)`` (BN folded FIRST, then clamped),
    ``z+_k = sum_j x_j w+_jk + b+_k``, ``den_k = z+_k + eps`` when stabilised, else ``z+_k``.
    Pooling weights are non-negative already (max-pool selection, avg-pool averages).
  A max-pool that feeds a ReLU directly is treated like any affine step (selection matrix,
  stabilised denominator): this is where the rectifier's epsilon lands for ``conv-maxpool-relu``.
* ``first_layer="zb"``: the single affine step before the first ReLU (conv with BN folded) uses the
  deep-Taylor z^B rule (zennit's ZBox) with per-input-element bounds l <= x <= h:
  ``R_i = sum_k (x_i w_ik - l_i w+_ik - h_i w-_ik) / den_k * R_k``,
  ``den_k = stab(sum_i (x_i w_ik - l_i w+_ik - h_i w-_ik))``, ``stab(v) = v + 1e-6 * sign(v)``
  (``sign(0) = +1``), ``w- = min(W', 0)``. Bounds are scalars or per-input-channel tensors ``[C]``.
  It replaces the epsilon/z+ step of that layer for both rules.
  The bias: zennit's ZBox computes ``den = (W x + b) - (W+ l + b+) - (W- h + b-)`` (its ClampMod clamps
  the bias too), so the bias cancels and ``den`` is the sum of the numerators (the textbook rule,
  conservative without a stabiliser). That is the default here and is checked against zennit in the
  tests. ``zb_bias_in_den=True`` gives the other reading, ``den_k = stab(z_k - sum_i l_i w+_ik -
  sum_i h_i w-_ik)`` with ``z_k = W x + b`` including the bias (not zennit's behaviour).
* Intermediate relevance ``layers``: for a module name of ``model.named_modules()``, the relevance at
  that module's INPUT. For a ReLU this is the relevance at its pre-activation (= at its output, by the
  convention above). Names of BatchNorm modules are refused (their input lies inside a folded step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LRPResult", "lrp_reference", "make_net", "rel_err"]

ZB_STAB = 1e-6


def rel_err(a: Tensor, b: Tensor) -> float:
    """``max|a - b| / max|b|`` (b is the reference)."""
    a = torch.as_tensor(a).detach().to(torch.float64)
    b = torch.as_tensor(b).detach().to(torch.float64)
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _sign0(v: Tensor) -> Tensor:
    return torch.where(v >= 0, 1.0, -1.0).to(v.dtype)


def _mv(W: Tensor, x: Tensor) -> Tensor:
    """Per-sample ``W x``: [B, o, i] x [B, i] -> [B, o]."""
    return torch.matmul(W, x.unsqueeze(-1)).squeeze(-1)


def _mtv(W: Tensor, r: Tensor) -> Tensor:
    """Per-sample ``W^T r``: [B, o, i] x [B, o] -> [B, i]."""
    return torch.matmul(r.unsqueeze(1), W).squeeze(1)


def _div0(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den == 0, torch.zeros_like(num), num / torch.where(den == 0, 1.0, den))


# ----------------------------------------------------------------------------------------------------
# Layers as explicit matrices
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Step:
    kind: str  # "affine" | "relu" | "reshape"
    x: Tensor  # input activations, flattened [B, n_in]
    in_shape: tuple  # per-sample input shape
    out_shape: tuple
    W: Tensor | None = None  # [B, n_out, n_in]
    b: Tensor | None = None  # [n_out]
    module: str = ""  # name of the module that produced it (e.g. "0" or "0+1" when BN was folded)
    stabilised: bool = False


def _dense_from_basis(fn, in_shape: tuple) -> tuple[Tensor, tuple]:
    """Matrix [n_out, n_in] of the linear map ``fn`` (acting on [N, *in_shape]) from the basis vectors,
    and the per-sample output shape."""
    n = 1
    for s in in_shape:
        n *= s
    out = fn(torch.eye(n, dtype=torch.float64).reshape(n, *in_shape))
    return out.reshape(n, -1).T.contiguous(), tuple(out.shape[1:])


def _maxpool_selection(m: nn.MaxPool2d, x: Tensor) -> tuple[Tensor, tuple]:
    """Per-sample winner-take-all matrices [B, n_out, n_in] of a max-pool at input x [B, C, H, W]."""
    assert not m.ceil_mode and not m.return_indices
    pair = nn.modules.utils._pair
    k, st = pair(m.kernel_size), pair(m.stride if m.stride is not None else m.kernel_size)
    p, d = pair(m.padding), pair(m.dilation)
    B, C, H, Wd = x.shape
    xp = F.pad(x, (p[1], p[1], p[0], p[0]), value=float("-inf"))
    idx = torch.arange(C * H * Wd, dtype=torch.float64).reshape(1, C, H, Wd)
    idxp = F.pad(idx, (p[1], p[1], p[0], p[0]), value=-1.0)
    cols = F.unfold(xp, k, dilation=d, stride=st).reshape(B, C, k[0] * k[1], -1)  # [B, C, K, L]
    icols = F.unfold(idxp, k, dilation=d, stride=st).reshape(1, C, k[0] * k[1], -1).expand(B, -1, -1, -1)
    win = cols.argmax(dim=2, keepdim=True)  # first maximum of each window
    src = icols.gather(2, win).squeeze(2).long()  # [B, C, L] flat input index of each winner
    L = src.shape[-1]
    Ho = (H + 2 * p[0] - d[0] * (k[0] - 1) - 1) // st[0] + 1
    Wo = (Wd + 2 * p[1] - d[1] * (k[1] - 1) - 1) // st[1] + 1
    assert Ho * Wo == L
    S = torch.zeros(B, C * L, C * H * Wd, dtype=torch.float64)
    S.scatter_(2, src.reshape(B, C * L, 1), 1.0)
    return S, (C, Ho, Wo)


def _trace(model: nn.Sequential, x: Tensor) -> tuple[list[_Step], dict[str, int | None], Tensor]:
    """Forward pass with explicit matrices. Returns the steps, {module name: step index whose input is
    that module's input (None for BN)}, and the logits."""
    B = x.shape[0]
    a = x.reshape(B, -1).to(torch.float64)
    shape = tuple(x.shape[1:])
    steps: list[_Step] = []
    names: dict[str, int | None] = {}
    for name, m in model.named_children():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            prev = steps[-1]
            assert prev.kind == "affine" and prev.module.isdigit(), f"BN {name} must follow a Conv2d/Linear"
            names[name] = None
            C = m.num_features
            z = a.reshape(B, C, -1)  # BN input (= output of the previous conv/linear)
            if m.training or m.running_mean is None:
                mean, var = z.mean(dim=(0, 2)), z.var(dim=(0, 2), unbiased=False)
            else:
                mean, var = m.running_mean.double(), m.running_var.double()
            gamma = m.weight.detach().double() if m.weight is not None else torch.ones(C, dtype=torch.float64)
            beta = m.bias.detach().double() if m.bias is not None else torch.zeros(C, dtype=torch.float64)
            s = gamma / torch.sqrt(var + m.eps)
            rep = z.shape[-1]
            s_full, sh_full = s.repeat_interleave(rep), (beta - mean * s).repeat_interleave(rep)
            prev.W = prev.W * s_full[None, :, None]
            prev.b = prev.b * s_full + sh_full
            prev.module += "+" + name
            a = _mv(prev.W, prev.x) + prev.b
            continue
        names[name] = len(steps)
        if isinstance(m, nn.ReLU):
            steps.append(_Step("relu", a, shape, shape, module=name))
            a = a.clamp_min(0)
            continue
        if isinstance(m, (nn.Flatten, nn.Identity, nn.Dropout)):
            assert not (isinstance(m, nn.Dropout) and m.training and m.p > 0)
            out_shape = (a.shape[1],) if isinstance(m, nn.Flatten) else shape
            assert not isinstance(m, nn.Flatten) or (m.start_dim == 1 and m.end_dim == -1)
            steps.append(_Step("reshape", a, shape, out_shape, module=name))
            shape = out_shape
            continue
        if isinstance(m, nn.Conv2d):
            assert m.padding_mode == "zeros"
            conv = partial(F.conv2d, weight=m.weight.detach().double(), bias=None, stride=m.stride,
                           padding=m.padding, dilation=m.dilation, groups=m.groups)
            W, out_shape = _dense_from_basis(conv, shape)
            n_pos = out_shape[1] * out_shape[2]
            b = (m.bias.detach().double().repeat_interleave(n_pos) if m.bias is not None
                 else torch.zeros(W.shape[0], dtype=torch.float64))
            W = W.expand(B, -1, -1)
        elif isinstance(m, nn.Linear):
            W = m.weight.detach().double().expand(B, -1, -1)
            b = m.bias.detach().double() if m.bias is not None else torch.zeros(m.out_features, dtype=torch.float64)
            out_shape = (m.out_features,)
        elif isinstance(m, nn.AvgPool2d):
            Wm, out_shape = _dense_from_basis(m, shape)
            W, b = Wm.expand(B, -1, -1), torch.zeros(Wm.shape[0], dtype=torch.float64)
            name = name + ":pool"
        elif isinstance(m, nn.MaxPool2d):
            W, out_shape = _maxpool_selection(m, a.reshape(B, *shape))
            b = torch.zeros(W.shape[1], dtype=torch.float64)
            name = name + ":pool"
        else:
            raise NotImplementedError(f"lrp_reference: unsupported module {name}: {type(m).__name__}")
        steps.append(_Step("affine", a, shape, out_shape, W=W, b=b, module=name))
        a = _mv(W, a) + b
        shape = out_shape
    # stabilised = the step's output is directly a ReLU's pre-activation
    for i, st in enumerate(steps):
        if st.kind == "affine":
            nxt = next((s for s in steps[i + 1:] if s.kind != "reshape"), None)
            st.stabilised = nxt is not None and nxt.kind == "relu"
    assert steps[-1].kind == "affine" and not steps[-1].stabilised, "the net must end with a Linear"
    return steps, names, a


# ----------------------------------------------------------------------------------------------------
# LRP
# ----------------------------------------------------------------------------------------------------


@dataclass
class LRPResult:
    heatmap: Tensor  # [B, *input shape]
    logits: Tensor  # [B, n_classes]
    targets: Tensor | None  # [B] explained classes (None for "joint")
    layers: dict[str, Tensor] = field(default_factory=dict)  # relevance at each requested module's input
    step_relevance: list[Tensor] = field(default_factory=list)  # relevance at the input of every step
    out_relevance: Tensor | None = None  # relevance at the logits
    steps: list[_Step] = field(default_factory=list)


def _bounds_full(v, in_shape: tuple, B: int) -> Tensor:
    v = torch.as_tensor(v, dtype=torch.float64)
    if v.ndim == 0:
        v = v.expand(in_shape[0])
    assert v.shape == (in_shape[0],), "bounds: a scalar or one value per input channel"
    return v.reshape(-1, *([1] * (len(in_shape) - 1))).expand(in_shape).reshape(1, -1).expand(B, -1)


@torch.no_grad()
def lrp_reference(
    model: nn.Sequential,
    inputs: Tensor,
    target="predicted",
    *,
    rule: str = "epsilon",
    eps: float = 0.01,
    first_layer: str | None = None,
    input_bounds=None,
    layers=(),
    zb_bias_in_den: bool = False,
) -> LRPResult:
    """Layer-by-layer LRP of ``model`` at ``inputs`` (see the module docstring for the conventions).

    ``target``: "predicted", "joint" or a LongTensor [B] of class ids.
    """
    assert rule in ("epsilon", "zplus") and first_layer in (None, "zb")
    steps, names, logits = _trace(model, inputs.double())
    B = inputs.shape[0]
    last = steps[-1]

    # relevance at the logits
    if rule == "zplus":
        z_out = _mv(last.W.clamp_min(0), last.x) + last.b.clamp_min(0)
    else:
        z_out = logits
    if isinstance(target, str) and target == "joint":
        targets, R = None, z_out.clone()
    else:
        targets = logits.argmax(dim=1) if isinstance(target, str) and target == "predicted" else target.long()
        assert targets.shape == (B,)
        R = torch.zeros_like(z_out)
        R[torch.arange(B), targets] = z_out[torch.arange(B), targets]
    out_relevance = R

    zb_step = None
    if first_layer == "zb":
        first_relu = next(i for i, s in enumerate(steps) if s.kind == "relu")
        affine = [i for i in range(first_relu) if steps[i].kind == "affine"]
        assert len(affine) == 1, "zB: exactly one affine step (conv/linear, BN folded) before the first ReLU"
        zb_step = affine[0]
        low = _bounds_full(input_bounds[0], steps[zb_step].in_shape, B)
        high = _bounds_full(input_bounds[1], steps[zb_step].in_shape, B)

    rel: list[Tensor] = [None] * len(steps)  # type: ignore[list-item]
    for i in reversed(range(len(steps))):
        st = steps[i]
        if st.kind == "affine":
            x, W, b = st.x, st.W, st.b
            if i == zb_step:
                Wp, Wn = W.clamp_min(0), W.clamp_max(0)
                z = _mv(W, x) + (b if zb_bias_in_den else 0.0)
                den = z - _mv(Wp, low) - _mv(Wn, high)
                r = _div0(R, den + ZB_STAB * _sign0(den))
                R = (x * _mtv(W, r) - low * _mtv(Wp, r)
                     - high * _mtv(Wn, r))
            else:
                if rule == "zplus":
                    W, b = W.clamp_min(0), b.clamp_min(0)
                z = _mv(W, x) + b
                if st.stabilised and eps != 0:
                    den = z + eps if rule == "zplus" else z + eps * _sign0(z)
                else:
                    den = z
                R = x * _mtv(W, _div0(R, den))
        # relu: R_z = R_a ; reshape: identity (flattened storage)
        rel[i] = R

    def at(i: int) -> Tensor:
        return rel[i].reshape(B, *steps[i].in_shape)

    out_layers = {}
    for n in layers:
        if names.get(n, "missing") is None:
            raise ValueError(f"lrp_reference: relevance at the input of BatchNorm {n!r} is not defined (folded)")
        if n not in names:
            raise KeyError(n)
        out_layers[n] = at(names[n])
    return LRPResult(heatmap=at(0), logits=logits, targets=targets, layers=out_layers,
                     step_relevance=[at(i) for i in range(len(steps))], out_relevance=out_relevance, steps=steps)


# ----------------------------------------------------------------------------------------------------
# Test nets
# ----------------------------------------------------------------------------------------------------


def make_net(*, bn: bool = True, bias: bool = True, pool_before_relu: bool = False, seed: int = 0,
             in_channels: int = 2, n_classes: int = 5, calibrate: Tensor | None = None) -> nn.Sequential:
    """A small float64 CNN for inputs [B, in_channels, 8, 8] with random (non-trivial) parameters.

    block1: Conv(in,4,3,p1,bias) [BN2d] ReLU MaxPool(2)          -> 4x4x4
    block2: Conv(4,4,3,p1,no bias) [BN2d] ReLU AvgPool(3,s1,p1)  -> 4x4x4   (pool before ReLU if asked)
    block3: Conv(4,3,3,s2,p1,bias) [BN2d] ReLU                   -> 3x2x2
    head:   Flatten Linear(12,6,bias) [BN1d] ReLU Linear(6,n_classes,bias)
    The second conv never has a bias. BN affine parameters are random, gamma can be negative. BN running
    statistics are random, or, given a ``calibrate`` batch, its batch statistics randomly perturbed (so that
    every ReLU layer stays partly active on inputs like it).
    """
    g = torch.Generator().manual_seed(seed)

    def bnorm(c, two_d=True):
        return [nn.BatchNorm2d(c) if two_d else nn.BatchNorm1d(c)] if bn else []

    def pool_relu(pool):
        return [pool, nn.ReLU()] if pool_before_relu else [nn.ReLU(), pool]

    mods = [
        nn.Conv2d(in_channels, 4, 3, padding=1, bias=bias), *bnorm(4), *pool_relu(nn.MaxPool2d(2)),
        nn.Conv2d(4, 4, 3, padding=1, bias=False), *bnorm(4),
        *pool_relu(nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=True)),
        nn.Conv2d(4, 3, 3, stride=2, padding=1, bias=bias), *bnorm(3), nn.ReLU(),
        nn.Flatten(), nn.Linear(12, 6, bias=bias), *bnorm(6, two_d=False), nn.ReLU(), nn.Linear(6, n_classes, bias=bias),
    ]
    net = nn.Sequential(*mods).double()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=torch.float64) * 1.5 / fan_in**0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=torch.float64) * 0.3)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) * 1.5 + 0.5)
                m.weight.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 0.7 + 0.6)
                m.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 0.3)
        if calibrate is not None and bn:
            bns = [m for m in net.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
            for m in bns:
                m.momentum = 1.0
            net.train()(calibrate.double())
            for m in bns:
                c = m.num_features
                m.momentum = 0.1
                m.running_mean += torch.randn(c, generator=g, dtype=torch.float64) * 0.3 * m.running_var.sqrt()
                m.running_var *= torch.rand(c, generator=g, dtype=torch.float64) * 0.7 + 0.7
    return net.eval()


# ------------------------------------------------------------ shared test helpers


def randomize_bn(model: nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm affine parameters and running statistics (negative scales included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.empty(n).uniform_(-0.5, 1.5, generator=g))
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.empty(n).uniform_(0.5, 2.0, generator=g))


class EpsReLU(torch.autograd.Function):
    """A ReLU whose backward is a / (a + eps): method.md's modified-gradient form of LRP-epsilon, written
    out independently of the engine, for tests that build their own oracle nets."""

    @staticmethod
    def forward(ctx, z, eps):
        a = z.clamp_min(0)
        ctx.save_for_backward(a)
        ctx.eps = eps
        return a

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        return g * torch.where(a > 0, a / (a + ctx.eps), torch.zeros_like(a)), None
