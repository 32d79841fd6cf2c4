"""LRP-Flex (hf_isnet.lrp.explain) against the hand-written layer-by-layer oracle in lrp_reference.py.

Part 1 validates the oracle on its own: identities that hold for ReLU nets (LRP-0 = gradient x input,
conservation, z+ >= 0, zB conservation/degenerate box), method.md's modified-gradient formulation of
LRP-epsilon, and zennit's layer-wise rules (Epsilon / ZPlus / ZBox, BN merged) at ~1e-15. Part 2 compares
the engine with the oracle at relative error <= 1e-10 (``max|a - b| / max|b|``), float64; it is skipped
while ``hf_isnet.lrp.explain`` cannot be imported. The conventions are listed in the docstring of
``lrp_reference``. Intermediate relevance is compared at the inputs of pooling, conv, Flatten and Linear
modules, not at a ReLU's input (there the layer-wise convention R_z = R_a and G * z differ by z/(z+eps)).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from lrp_reference import EpsReLU, lrp_reference, make_net, rel_err
from torch import nn

try:
    from hf_isnet.lrp import bounds_from_normalization, explain
except Exception as exc:  # engine not written yet (or broken mid-edit): part 2 is skipped
    explain = bounds_from_normalization = None
    _ENGINE_ERROR = f"hf_isnet.lrp.explain not importable: {exc!r}"
else:
    _ENGINE_ERROR = ""

needs_engine = pytest.mark.skipif(explain is None, reason=_ENGINE_ERROR)

TOL = float(os.environ.get("LRP_REFERENCE_TOL", "1e-10"))  # the spec is 1e-10; raise it only to triage
B, C_IN, N_CLASSES = 3, 2, 5
NETS = {  # name -> make_net kwargs
    "bn": dict(bn=True, bias=True),
    "bn_nobias": dict(bn=True, bias=False),
    "plain": dict(bn=False, bias=True),
    "nobias": dict(bn=False, bias=False),
    "pool_before_relu": dict(bn=True, bias=True, pool_before_relu=True),
}
POOL_AFTER_RELU = ["bn", "bn_nobias", "plain", "nobias"]  # z+ and zB nets (one affine step per block start)
LABELS = torch.tensor([0, 3, 4])
# bounds of inputs normalised from [0, 1] pixels with mean/std per channel
MEAN, STD = torch.tensor([0.4, 0.6], dtype=torch.float64), torch.tensor([0.2, 0.3], dtype=torch.float64)
LOW, HIGH = -MEAN / STD, (1 - MEAN) / STD


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny float64 matmuls: one thread is much faster (and immune to a busy machine); restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def net(name: str, kind: str = "normal", seed: int = 0) -> nn.Sequential:
    """Test net; its BN statistics are calibrated on a batch of ``kind`` inputs other than the test batch."""
    calib = torch.cat([inputs(kind, seed=100 + seed + i) for i in range(3)])
    return make_net(**NETS[name], seed=seed, in_channels=C_IN, n_classes=N_CLASSES, calibrate=calib)


def inputs(kind: str = "normal", seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(B, C_IN, 8, 8, generator=g, dtype=torch.float64) * 1.5
    u = torch.rand(B, C_IN, 8, 8, generator=g, dtype=torch.float64)
    if kind == "nonneg":
        return u
    assert kind == "boxed"  # normalised pixels: inside [LOW, HIGH] per channel
    return LOW.view(1, -1, 1, 1) + u * (HIGH - LOW).view(1, -1, 1, 1)


def grad_times_input(model, x, target) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    z = model(x)
    q = z.sum() if isinstance(target, str) else z.gather(1, target.view(-1, 1)).sum()
    (g,) = torch.autograd.grad(q, x)
    return (g * x).detach()





def modified_gradient_map(model, x, target, eps) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    h = x
    for m in model:
        h = EpsReLU.apply(h, eps) if isinstance(m, nn.ReLU) else m(h)
    q = h.sum() if isinstance(target, str) else h.gather(1, target.view(-1, 1)).sum()
    (g,) = torch.autograd.grad(q, x)
    return (g * x).detach()


# ====================================================================================================
# Part 1: the oracle on its own
# ====================================================================================================


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("train", [False, True])
def test_reference_forward_matches_model(name, train):
    model, x = net(name), inputs()
    if train:
        model.train()
    ref = lrp_reference(model, x, LABELS)
    with torch.no_grad():
        logits = copy.deepcopy(model)(x)
    assert rel_err(ref.logits, logits) < 1e-13


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("target", ["labels", "joint"])
def test_reference_eps0_is_gradient_times_input(name, target):
    """LRP-0 on a ReLU net (biases, BN, max/avg pooling included) equals gradient x input."""
    model, x = net(name), inputs()
    t = LABELS if target == "labels" else "joint"
    ref = lrp_reference(model, x, t, eps=0.0)
    assert rel_err(ref.heatmap, grad_times_input(model, x, t)) < 1e-12


def test_reference_eps0_conservation_bias_free():
    """Without biases (and BN) LRP-0 conserves: every layer's relevance sums to the explained logit."""
    model, x = net("nobias"), inputs()
    ref = lrp_reference(model, x, LABELS, eps=0.0)
    logit = ref.logits[torch.arange(B), LABELS]
    for r in ref.step_relevance:
        assert torch.allclose(r.flatten(1).sum(1), logit, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("eps", [0.01, 0.1])
def test_reference_eps_matches_modified_gradient(name, eps):
    """The layer-wise epsilon rule equals method.md's formulation: ReLU backward a / (a + eps)."""
    model, x = net(name), inputs()
    for t in (LABELS, "joint"):
        ref = lrp_reference(model, x, t, eps=eps)
        assert rel_err(ref.heatmap, modified_gradient_map(model, x, t, eps)) < 1e-12
    # and eps really matters (guards against a no-op stabiliser)
    assert rel_err(lrp_reference(model, x, LABELS, eps=0.0).heatmap, ref.heatmap) > 1e-4


@pytest.mark.parametrize("name", POOL_AFTER_RELU)
@pytest.mark.parametrize("eps", [0.0, 0.01])
def test_reference_zplus_nonnegative(name, eps):
    model, x = net(name, "nonneg"), inputs("nonneg")
    ref = lrp_reference(model, x, "joint", rule="zplus", eps=eps)
    for r in ref.step_relevance:
        assert (r >= 0).all()
    assert (ref.heatmap > 0).any()


def test_reference_zplus_conservation_bias_free():
    """z+ with eps = 0 and no biases conserves sum_k z+_k (the joint positive-weight logits)."""
    model, x = net("nobias", "nonneg"), inputs("nonneg")
    ref = lrp_reference(model, x, "joint", rule="zplus", eps=0.0)
    total = ref.out_relevance.sum(1)
    assert (ref.out_relevance >= 0).all() and (ref.out_relevance > ref.logits.clamp_min(0) - 1e-12).all()
    for r in ref.step_relevance:
        assert torch.allclose(r.flatten(1).sum(1), total, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["nobias", "bn"])
@pytest.mark.parametrize("rule", ["epsilon", "zplus"])
def test_reference_zb_conservation(name, rule):
    """zB's denominator is the sum of its numerators (zennit: the bias cancels), so the first block
    conserves the relevance at the first ReLU up to the 1e-6 stabiliser, biases and BN included; its
    terms are >= 0 inside the box."""
    model, x = net(name, "boxed"), inputs("boxed")
    ref = lrp_reference(model, x, LABELS if rule == "epsilon" else "joint", rule=rule, first_layer="zb",
                        input_bounds=(LOW, HIGH))
    i_relu = next(i for i, st in enumerate(ref.steps) if st.kind == "relu")
    at_relu = ref.step_relevance[i_relu]  # relevance at the first ReLU (input = output, by convention)
    s_in, s_relu = ref.heatmap.flatten(1).sum(1), at_relu.flatten(1).sum(1)
    assert ((s_in - s_relu).abs() <= 1e-5 * at_relu.flatten(1).abs().sum(1)).all()
    assert (s_in - s_relu).abs().max() > 0  # the stabiliser is there
    if rule == "zplus":  # z+ relevance >= 0 upstream, zB numerators and denominators >= 0 in the box
        assert (ref.heatmap >= 0).all() and (ref.heatmap > 0).any()


def test_reference_zb_degenerate_box_is_epsilon():
    """With l = h = 0 the zB step is LRP-epsilon with eps = 1e-6 on W x (+ b if the bias is in den)."""
    x = inputs()
    ep = lrp_reference(net("nobias"), x, LABELS, eps=1e-6)
    zb = lrp_reference(net("nobias"), x, LABELS, eps=1e-6, first_layer="zb", input_bounds=(0.0, 0.0))
    assert rel_err(zb.heatmap, ep.heatmap) < 1e-12
    ep = lrp_reference(net("bn"), x, LABELS, eps=1e-6)
    zb = lrp_reference(net("bn"), x, LABELS, eps=1e-6, first_layer="zb", input_bounds=(0.0, 0.0),
                       zb_bias_in_den=True)
    assert rel_err(zb.heatmap, ep.heatmap) < 1e-12
    other = lrp_reference(net("bn"), x, LABELS, eps=1e-6, first_layer="zb", input_bounds=(LOW, HIGH))
    assert rel_err(other.heatmap, ep.heatmap) > 1e-3


def zennit_lrp(model, x, target, *, rule, eps, bounds=None):
    """The same conventions with zennit's rules (BN merged by its canonizer): ZBox / Epsilon / ZPlus on
    conv and linear, Norm (LRP-0) on avg pooling, gradient (winner-take-all, mask) elsewhere."""
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.core import Composite
    from zennit.rules import Epsilon, Norm, ZBox, ZPlus

    model = copy.deepcopy(model)
    mods = list(model)
    for m in mods:  # same model, but zennit's merged BN (var := 1) must be an exact identity: eps -> 0
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_var += m.eps
            m.eps = 0.0

    def lrp0(d):  # exact LRP-0: no tiny epsilon (0/0 := 0 since the numerator is 0 there)
        return torch.where(d == 0, torch.ones_like(d), d)

    def feeds_relu(i):
        rest = [m for m in mods[i + 1:] if not isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.Flatten))]
        return bool(rest) and isinstance(rest[0], nn.ReLU)

    def module_map(ctx, name, module):
        if not name.isdigit() or not isinstance(module, (nn.Conv2d, nn.Linear, nn.AvgPool2d)):
            return None
        stab = eps if feeds_relu(int(name)) else lrp0
        if bounds is not None and name == "0":
            return ZBox(bounds[0].view(1, -1, 1, 1), bounds[1].view(1, -1, 1, 1))
        if isinstance(module, nn.AvgPool2d):
            return Norm(stabilizer=stab)
        return ZPlus(stabilizer=stab) if rule == "zplus" else Epsilon(epsilon=stab)

    with torch.no_grad():
        logits = model(x)
        last = mods[-1]
        zplus = model[:-1](x) @ last.weight.clamp_min(0).T
        zplus = zplus + (last.bias.clamp_min(0) if last.bias is not None else 0.0)
    z_out = zplus if rule == "zplus" else logits
    if isinstance(target, str):
        r_out = z_out
    else:
        r_out = torch.zeros_like(z_out).scatter(1, target.view(-1, 1), z_out.gather(1, target.view(-1, 1)))
    composite = Composite(module_map=module_map, canonizers=[SequentialMergeBatchNorm()])
    with Gradient(model=model, composite=composite) as attributor:
        _, relevance = attributor(x.clone(), r_out)
    return relevance


@pytest.mark.parametrize("name", POOL_AFTER_RELU)
@pytest.mark.parametrize("rule,target,kind,zb", [
    ("epsilon", "labels", "normal", False), ("epsilon", "joint", "normal", False),
    ("zplus", "joint", "nonneg", False), ("epsilon", "labels", "boxed", True), ("zplus", "joint", "boxed", True),
])
def test_reference_matches_zennit(name, rule, target, kind, zb):
    """Cross-check of the oracle with zennit's layer-wise rules (zB, epsilon, z+, BN folding, pooling)."""
    pytest.importorskip("zennit")
    model, x = net(name, kind), inputs(kind)
    t = LABELS if target == "labels" else target
    ref = lrp_reference(model, x, t, rule=rule, eps=0.05, first_layer="zb" if zb else None,
                        input_bounds=(LOW, HIGH) if zb else None)
    zen = zennit_lrp(model, x, t, rule=rule, eps=0.05, bounds=(LOW, HIGH) if zb else None)
    assert rel_err(ref.heatmap, zen) < 1e-12


def test_reference_samples_independent_in_train_mode():
    model, x = net("bn").train(), inputs()
    a = lrp_reference(model, x, torch.tensor([0, 1, 2]))
    b = lrp_reference(model, x, torch.tensor([0, 3, 4]))
    assert torch.equal(a.heatmap[0], b.heatmap[0]) and not torch.equal(a.heatmap[1], b.heatmap[1])


# ====================================================================================================
# Part 2: the engine against the oracle
# ====================================================================================================

LAYERS = ("3", "4", "7", "8", "11", "12", "15")  # inputs of max-pool, conv, avg-pool, conv, flatten, linears


def run_engine(model, x, target, **kw):
    return explain(model, x, target, **kw)


def check(e, ref, *, layers=()):
    """Heatmap, logits and the requested layers' relevance; all errors are reported together."""
    assert tuple(e.heatmap.shape) == tuple(ref.heatmap.shape)
    errs = {"heatmap": rel_err(e.heatmap, ref.heatmap), "logits": rel_err(e.logits, ref.logits)}
    errs.update({f"layer {n!r}": rel_err(e.layers[n], ref.layers[n]) for n in layers})
    bad = {k: v for k, v in errs.items() if v > (1e-12 if k == "logits" else TOL)}
    assert not bad, "rel err " + ", ".join(f"{k} {v:.3e}" for k, v in errs.items())


@needs_engine
@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("eps", [0.01, 0.1])
@pytest.mark.parametrize("target", ["labels", "predicted", "joint"])
def test_engine_epsilon(name, eps, target):
    model, x = net(name), inputs()
    t = LABELS if target == "labels" else target
    e = run_engine(model, x, t, rule="epsilon", eps=eps)
    ref = lrp_reference(model, x, t, rule="epsilon", eps=eps)
    check(e, ref)
    if target == "joint":
        assert e.targets is None
    else:
        assert torch.equal(e.targets.cpu(), ref.targets)


@needs_engine
@pytest.mark.parametrize("name", POOL_AFTER_RELU)
@pytest.mark.parametrize("eps", [0.01, 0.1])
def test_engine_zplus_joint(name, eps):
    model, x = net(name, "nonneg"), inputs("nonneg")
    e = run_engine(model, x, "joint", rule="zplus", eps=eps)
    ref = lrp_reference(model, x, "joint", rule="zplus", eps=eps)
    h = e.heatmap.detach()
    assert h.min() >= -1e-12 * h.abs().max(), f"negative z+ relevance {h.min().item():.3e}"
    check(e, ref)


@needs_engine
@pytest.mark.parametrize("name", POOL_AFTER_RELU)
@pytest.mark.parametrize("rule,target", [("epsilon", "labels"), ("epsilon", "joint"), ("zplus", "joint")])
def test_engine_zb_per_channel(name, rule, target):
    model, x = net(name, "boxed"), inputs("boxed")
    t = LABELS if target == "labels" else target
    kw = dict(rule=rule, eps=0.01, first_layer="zb")
    e = run_engine(model, x, t, input_bounds=(LOW, HIGH), **kw)
    ref = lrp_reference(model, x, t, input_bounds=(LOW, HIGH), **kw)
    check(e, ref)


@needs_engine
def test_engine_zb_scalar_bounds():
    model, x = net("bn", "nonneg"), inputs("nonneg")
    e = run_engine(model, x, LABELS, first_layer="zb", input_bounds=(0.0, 1.0))
    ref = lrp_reference(model, x, LABELS, first_layer="zb", input_bounds=(0.0, 1.0))
    check(e, ref)


@needs_engine
def test_engine_bounds_from_normalization():
    low, high = bounds_from_normalization(MEAN, STD)  # float64 in: float64 precision out
    assert rel_err(torch.as_tensor(low), LOW) < 1e-15 and rel_err(torch.as_tensor(high), HIGH) < 1e-15


@needs_engine
def test_engine_zb_with_bounds_from_normalization():
    model, x = net("bn", "boxed"), inputs("boxed")
    e = run_engine(model, x, LABELS, first_layer="zb", input_bounds=bounds_from_normalization(MEAN, STD))
    check(e, lrp_reference(model, x, LABELS, first_layer="zb", input_bounds=(LOW, HIGH)))


@needs_engine
@pytest.mark.parametrize("rule,target,kind,zb", [
    ("epsilon", "labels", "normal", False), ("epsilon", "joint", "normal", False),
    ("zplus", "joint", "nonneg", False), ("epsilon", "labels", "boxed", True), ("zplus", "joint", "boxed", True),
])
def test_engine_intermediate_layers(rule, target, kind, zb):
    model, x = net("bn", kind), inputs(kind)
    t = LABELS if target == "labels" else target
    kw = dict(rule=rule, eps=0.01, first_layer="zb" if zb else None, input_bounds=(LOW, HIGH) if zb else None)
    e = run_engine(model, x, t, layers=LAYERS, **kw)
    ref = lrp_reference(model, x, t, layers=LAYERS, **kw)
    check(e, ref, layers=LAYERS)


@needs_engine
def test_engine_target_all():
    model, x = net("bn"), inputs()
    e = run_engine(model, x, "all", eps=0.01)
    assert tuple(e.heatmap.shape) == (B, N_CLASSES, C_IN, 8, 8)
    for c in range(N_CLASSES):
        ref = lrp_reference(model, x, torch.full((B,), c), eps=0.01)
        err = rel_err(e.heatmap[:, c], ref.heatmap)
        assert err <= TOL, f"class {c}: rel err {err:.3e}"


@needs_engine
@pytest.mark.parametrize("rule,target,kind,zb", [
    ("epsilon", "labels", "normal", False), ("epsilon", "joint", "normal", False),
    ("zplus", "joint", "nonneg", False), ("epsilon", "labels", "boxed", True),
])
def test_engine_train_mode_batchnorm(rule, target, kind, zb):
    """Train mode: BN uses batch statistics, which the heatmap treats as constants."""
    model, x = net("bn", kind).train(), inputs(kind)
    t = LABELS if target == "labels" else target
    kw = dict(rule=rule, eps=0.01, first_layer="zb" if zb else None, input_bounds=(LOW, HIGH) if zb else None)
    e = run_engine(copy.deepcopy(model), x, t, layers=LAYERS, **kw)
    ref = lrp_reference(model, x, t, layers=LAYERS, **kw)
    check(e, ref, layers=LAYERS)


@needs_engine
def test_engine_train_mode_samples_independent():
    model, x = net("bn").train(), inputs()
    a = run_engine(copy.deepcopy(model), x, torch.tensor([0, 1, 2])).heatmap.detach()
    b = run_engine(copy.deepcopy(model), x, torch.tensor([0, 3, 4])).heatmap.detach()
    err = rel_err(a[0], b[0])
    assert err <= TOL, f"sample 0 changed by {err:.3e} when the other samples' targets changed"
    assert rel_err(a[1], b[1]) > 1e-3


@needs_engine
def test_engine_eps0_conserves_logit():
    model, x = net("nobias"), inputs()
    e = run_engine(model, x, LABELS, eps=0.0)
    h = e.heatmap.detach()
    assert torch.isfinite(h).all()
    logit = model(x).detach()[torch.arange(B), LABELS]
    assert torch.allclose(h.flatten(1).sum(1), logit, rtol=1e-10, atol=1e-12)
    check(e, lrp_reference(model, x, LABELS, eps=0.0))


@needs_engine
@pytest.mark.parametrize("name", ["bn", "pool_before_relu"])
def test_engine_eps0_is_gradient_times_input(name):
    model, x = net(name), inputs()
    e = run_engine(model, x, LABELS, eps=0.0)
    assert torch.isfinite(e.heatmap).all()
    assert rel_err(e.heatmap, grad_times_input(model, x, LABELS)) <= TOL
