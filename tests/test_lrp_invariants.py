"""Invariants of LRP-Flex (``hf_isnet.lrp.explain``) that hold whatever the network: numbers, not smoke.

Conventions (method.md, "LRP-Flex"): linearity in the explained quantity (joint map = sum of class maps,
batched "all" = per-class loop), LRP-0 = gradient x input, conservation without biases, z+ maps are
non-negative, samples are independent (in train mode too: BatchNorm statistics are constants in the
heatmap backward), every rectifier is caught however the model calls it, the heatmap is differentiable
(checked against finite differences), the classification gradient is untouched, and the model and
process are left as they were (no hooks, no function mode, no graph kept alive).

Float64 is used where exactness matters (tolerances ``max|a - b| / max|b|``).
"""

from __future__ import annotations

import copy
import gc
import math
import os
import weakref

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from lrp_reference import EpsReLU, randomize_bn, rel_err
from torch import nn

from hf_isnet.losses import heatmap_loss
from hf_isnet.lrp import UnsupportedOperationError, explain, explained_quantity, select_targets

EXACT = 1e-10


# ----------------------------------------------------------------------------------------------- nets





def small_cnn(*, bn: bool = True, bias: bool = True, classes: int = 5, in_ch: int = 3, seed: int = 0,
              act=nn.ReLU, dtype=torch.float64) -> nn.Sequential:
    """conv-[BN]-act-maxpool-conv-[BN]-act-avgpool-flatten-linear."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Conv2d(in_ch, 6, 3, padding=1, bias=bias)]
        layers += [nn.BatchNorm2d(6)] if bn else []
        layers += [act(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1, bias=bias)]
        layers += [nn.BatchNorm2d(8)] if bn else []
        layers += [act(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, classes, bias=bias)]
        model = nn.Sequential(*layers)
    randomize_bn(model, seed)
    return model.to(dtype).eval()


def images(b: int = 3, c: int = 3, size: int = 8, *, seed: int = 1, nonneg: bool = False,
           dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if nonneg:
        return torch.rand(b, c, size, size, generator=g, dtype=dtype)
    return torch.randn(b, c, size, size, generator=g, dtype=dtype)


def timm_resnet18(dtype=torch.float64, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    randomize_bn(model, seed)
    return model.to(dtype).eval()


def grad_times_input(model: nn.Module, x: torch.Tensor, quantity) -> torch.Tensor:
    """Plain autograd gradient x input of ``quantity(logits)``."""
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(quantity(model(x)), x)
    return (g * x).detach()


def picked(targets: torch.Tensor):
    return lambda z: z.gather(1, targets[:, None]).sum()


LABELS = torch.tensor([0, 3, 4])





class ThreeReLU(nn.Module):
    """conv-act-conv(+skip)-act-conv-act-mean-linear with the three activations called in different ways."""

    def __init__(self, how: str, eps: float = 0.01) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(3)
            self.c1, self.c2, self.c3 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), \
                nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4, 5)
        self.how, self.eps = how, eps
        if how in ("reused", "reused_inplace"):
            self.relu = nn.ReLU(inplace=how == "reused_inplace")
        elif how == "distinct":
            self.acts = nn.ModuleList([nn.ReLU(), nn.ReLU(), nn.ReLU()])
        self.double()

    def act(self, i: int, h: torch.Tensor) -> torch.Tensor:
        if self.how in ("reused", "reused_inplace"):
            return self.relu(h)
        if self.how == "distinct":
            return self.acts[i](h)
        if self.how == "functional":  # three spellings, the last one in place
            return (F.relu, torch.relu, torch.Tensor.relu_)[i](h)
        assert self.how == "oracle"
        return EpsReLU.apply(h, self.eps)

    def forward(self, x):
        h = self.act(0, self.c1(x))
        h = self.act(1, self.c2(h) + h)
        h = self.act(2, self.c3(h))
        return self.fc(h.mean((2, 3)))


# ------------------------------------------------------------------------------------ linearity


@pytest.mark.parametrize("rule", ["epsilon", "zplus"])
def test_joint_map_is_sum_of_class_maps(rule):
    model, x = small_cnn(), images(nonneg=rule == "zplus")
    per_class = explain(model, x, "all", rule=rule).heatmap
    joint = explain(model, x, "joint", rule=rule).heatmap
    assert per_class.shape == (3, 5, *x.shape[1:])
    assert rel_err(per_class.sum(1), joint) <= EXACT


@pytest.mark.parametrize("rule", ["epsilon", "zplus"])
@pytest.mark.parametrize("max_maps", [16, 3, 1])
@pytest.mark.parametrize("train", [False, True])
def test_all_classes_equals_per_class_loop(rule, max_maps, train):
    model, x = small_cnn(), images(nonneg=rule == "zplus")
    model.train(train)
    e = explain(model, x, "all", rule=rule, layers=["4"], max_maps_per_pass=max_maps)
    assert e.targets is None and e.layers["4"].shape == (3, 5, 6, 4, 4)
    for c in range(5):
        ec = explain(model, x, torch.full((3,), c), rule=rule, layers=["4"])
        assert rel_err(e.heatmap[:, c], ec.heatmap) <= EXACT, c
        assert rel_err(e.layers["4"][:, c], ec.layers["4"]) <= EXACT, c


# ------------------------------------------------------------------------- LRP-0 and conservation


@pytest.mark.parametrize("target", ["labels", "joint", "predicted"])
def test_eps0_conserves_and_is_gradient_times_input(target):
    """Bias-free, BN-free ReLU net (with max and average pooling): LRP-0 sums to the explained logit."""
    model, x = small_cnn(bn=False, bias=False), images()
    t = LABELS if target == "labels" else target
    e = explain(model, x, t, eps=0.0)
    assert torch.isfinite(e.heatmap).all()
    if target == "joint":
        explained = e.logits.sum(1)
        quantity = torch.sum
    else:
        idx = LABELS if target == "labels" else e.logits.argmax(1)
        explained = e.logits.gather(1, idx[:, None])[:, 0]
        quantity = picked(idx)
    sums = e.heatmap.flatten(1).sum(1)
    assert torch.allclose(sums, explained.detach(), rtol=EXACT, atol=0)
    assert rel_err(e.heatmap, grad_times_input(model, x, quantity)) <= EXACT


def test_eps0_is_gradient_times_input_with_bias_and_bn():
    model, x = small_cnn(), images()
    e = explain(model, x, LABELS, eps=0.0)
    assert rel_err(e.heatmap, grad_times_input(model, x, picked(LABELS))) <= EXACT


def test_eps0_no_nan_at_dead_units():
    """eps = 0 with every unit of a layer dead (0/0 in the factor) gives zeros, not NaN, in every order."""
    model = small_cnn(bn=False)
    with torch.no_grad():
        model[3].bias.fill_(-100.0)  # second conv: all pre-activations negative
    x = images()
    e = explain(model, x, LABELS, eps=0.0, create_graph=True)
    assert torch.equal(e.heatmap, torch.zeros_like(e.heatmap))
    e.heatmap.pow(2).sum().add(e.logits.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# --------------------------------------------------------------------------------------------- z+


@pytest.mark.parametrize("net", ["small_bn", "timm_resnet18"])
def test_zplus_maps_are_non_negative(net):
    if net == "small_bn":
        model, x = small_cnn(), images(nonneg=True)
    else:
        model, x = timm_resnet18(), images(2, 3, 32, nonneg=True)
    e = explain(model, x, "joint", rule="zplus")
    assert (e.heatmap >= 0).all()
    assert (e.heatmap.flatten(1).sum(1) > 0).all()  # not trivially zero
    # and the epsilon map of the same inputs does have negative evidence, so the check means something
    assert (explain(model, x, "joint").heatmap < 0).any()


# ------------------------------------------------------------------------ samples are independent


@pytest.mark.parametrize("net,rule", [("timm_resnet18", "epsilon"), ("timm_resnet18", "zplus"),
                                      ("torchvision_resnet18", "epsilon")])
def test_sample_alone_equals_sample_in_batch(net, rule):
    """float32 (float64 ResNets are slow on CPU): a leak between samples would be O(1), not 1e-5."""
    if net == "timm_resnet18":
        model = timm_resnet18(torch.float32)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = torchvision.models.resnet18(num_classes=10)
        randomize_bn(model, 0)
        model = model.eval()
    x = images(3, 3, 32, nonneg=rule == "zplus", dtype=torch.float32)
    batch = explain(model, x, "predicted", rule=rule)
    for i in range(3):
        alone = explain(model, x[i:i + 1], "predicted", rule=rule)
        assert torch.equal(alone.targets, batch.targets[i:i + 1])
        assert rel_err(alone.heatmap[0], batch.heatmap[i]) <= 1e-5, i


@pytest.mark.parametrize("rule", ["epsilon", "zplus"])
def test_torchvision_resnet18_reused_relu_equals_timm_resnet18(rule):
    """torchvision's BasicBlock reuses one ``self.relu``; timm's has one module per use. Same weights,
    same heatmaps (per-module hooks get the torchvision one ~200 % off, method.md)."""
    tv = torchvision.models.resnet18(num_classes=10)
    randomize_bn(tv, 1)
    tv = tv.double().eval()
    tm = timm.create_model("resnet18", pretrained=False, num_classes=10).double().eval()
    tm.load_state_dict(tv.state_dict())
    x = images(2, 3, 32, nonneg=rule == "zplus")
    a, b = explain(tv, x, "joint", rule=rule), explain(tm, x, "joint", rule=rule)
    assert rel_err(a.logits, b.logits) <= 1e-12
    assert rel_err(a.heatmap, b.heatmap) <= EXACT


@pytest.mark.parametrize("how", ["distinct", "reused_inplace", "functional"])
def test_every_rectifier_call_is_caught(how):
    """One nn.ReLU reused 3x, 3 distinct ones, an in-place reused one and F.relu / torch.relu /
    Tensor.relu_: identical heatmaps, equal to the a / (a + eps) oracle."""
    x = images(2, 3, 6)
    oracle = grad_times_input(ThreeReLU("oracle"), x, picked(torch.tensor([1, 4])))
    reference = explain(ThreeReLU("reused"), x, torch.tensor([1, 4])).heatmap
    twin = explain(ThreeReLU(how), x, torch.tensor([1, 4])).heatmap
    assert torch.equal(twin, reference)
    assert rel_err(reference, oracle) <= EXACT
    plain = grad_times_input(ThreeReLU(how), x, picked(torch.tensor([1, 4])))
    assert rel_err(reference, plain) > 1e-4  # the rule was applied (the oracle differs from the gradient)


def _frozen_statistics_copy(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """An eval-mode copy whose BatchNorm running statistics are the batch statistics of ``x``."""
    frozen, stats = copy.deepcopy(model), {}

    def hook(module, args):
        var, mean = torch.var_mean(args[0], dim=(0, 2, 3), unbiased=False)
        stats[module] = (mean.detach(), var.detach())

    probe = copy.deepcopy(model).train()
    handles = [m.register_forward_pre_hook(hook) for m in probe.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        probe(x)
    for h in handles:
        h.remove()
    bns = [m for m in frozen.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn, (mean, var) in zip(bns, stats.values()):
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    return frozen.eval()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, EXACT)])
@pytest.mark.parametrize("rule", ["epsilon", "zplus"])
def test_train_mode_uses_batch_statistics_as_constants(dtype, tol, rule):
    """Train-mode heatmap == eval-mode heatmap of a copy whose running statistics are the batch's."""
    model, x = small_cnn(dtype=dtype).train(), images(4, nonneg=rule == "zplus", dtype=dtype)
    frozen = _frozen_statistics_copy(model, x)
    t = "joint" if rule == "zplus" else torch.tensor([0, 1, 2, 3])
    train_map = explain(copy.deepcopy(model), x, t, rule=rule).heatmap
    assert rel_err(train_map, explain(frozen, x, t, rule=rule).heatmap) <= tol


def test_train_mode_heatmap_ignores_other_samples_targets():
    model, x = small_cnn().train(), images()
    a = explain(copy.deepcopy(model), x, torch.tensor([0, 1, 2]))
    b = explain(copy.deepcopy(model), x, torch.tensor([0, 4, 3]))
    assert rel_err(a.heatmap[0], b.heatmap[0]) <= 1e-13
    assert rel_err(a.heatmap[1], b.heatmap[1]) > 1e-3  # the others did change


# ---------------------------------------------------------- second order: finite differences


def fd_net() -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(5)
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3),
        )
    randomize_bn(model, 5)
    with torch.no_grad():
        model[1].weight.abs_().add_(0.5)
    return model.double()


FD_LOW, FD_HIGH = torch.tensor([-1.0, -1.5], dtype=torch.float64), torch.tensor([2.0, 1.5], dtype=torch.float64)
FD_CONFIGS = {
    "eps0": dict(target="labels", eps=0.0),
    "epsilon": dict(target="labels", eps=0.01),
    "epsilon_layers": dict(target="labels", eps=0.01, layers=["3"]),
    "zplus_joint": dict(target="joint", rule="zplus"),
    "zb": dict(target="labels", first_layer="zb", input_bounds=(FD_LOW, FD_HIGH)),
    "selective": dict(target="selective"),
}


@pytest.mark.parametrize("config,train", [
    pytest.param(c, t, id=f"{c}-{'train' if t else 'eval'}") for c in FD_CONFIGS for t in (False, True)
])
def test_heatmap_loss_gradient_matches_finite_differences(config, train):
    cfg = dict(FD_CONFIGS[config])
    target = cfg.pop("target")
    model = fd_net().train(train)
    g = torch.Generator().manual_seed(11)
    x = FD_LOW.view(1, -1, 1, 1) + torch.rand(3, 2, 6, 6, generator=g, dtype=torch.float64) * \
        (FD_HIGH - FD_LOW).view(1, -1, 1, 1)
    y = torch.tensor([0, 2, 1])
    w = torch.rand(3, 2, 6, 6, generator=g, dtype=torch.float64)
    t = y if target == "labels" else target

    def loss_fn() -> torch.Tensor:
        e = explain(model, x, t, create_graph=True, **cfg)
        loss = (e.heatmap.pow(2) * w).sum() + F.cross_entropy(e.logits, y)
        for r in e.layers.values():
            loss = loss + r.pow(2).mean()
        return loss

    model.zero_grad()
    loss_fn().backward()
    h, checks = 1e-6, []
    for name, p in model.named_parameters():
        for k in torch.randperm(p.numel(), generator=g)[:1].tolist():
            flat = p.data.view(-1)  # .data: in-place edits outside autograd
            orig = flat[k].item()
            flat[k] = orig + h
            up = loss_fn().item()
            flat[k] = orig - h
            down = loss_fn().item()
            flat[k] = orig
            checks.append((f"{name}[{k}]", p.grad.view(-1)[k].item(), (up - down) / (2 * h)))
    scale = max(abs(fd) for _, _, fd in checks)
    bad = [(n, a, fd) for n, a, fd in checks if abs(a - fd) > 1e-5 * max(abs(fd), 1e-2 * scale)]
    assert not bad, bad


# ----------------------------------------------------------- classification gradient untouched


CLS_CONFIGS = {
    "epsilon": dict(target="labels"),
    "zplus": dict(target="joint", rule="zplus"),
    "zb_layers": dict(target="labels", first_layer="zb", input_bounds=(-3.0, 3.0), layers=["4"]),
    "all": dict(target="all", max_maps_per_pass=2),
}


def _cls_grads(model, x, y, cfg):
    cfg = dict(cfg)
    target = cfg.pop("target")
    e = explain(model, x, y if target == "labels" else target, create_graph=True, **cfg)
    model.zero_grad()
    F.cross_entropy(e.logits, y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, e


def _plain_grads(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("config", list(CLS_CONFIGS))
def test_classification_gradient_untouched_eval(config):
    model, x = small_cnn(), images(4)
    y = torch.tensor([0, 1, 2, 3])
    got, e = _cls_grads(model, x, y, CLS_CONFIGS[config])
    want = _plain_grads(model, x, y)
    assert e.heatmap.requires_grad
    for n in want:
        assert rel_err(got[n], want[n]) <= 1e-13, n


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, EXACT)])
@pytest.mark.parametrize("config", list(CLS_CONFIGS))
def test_classification_gradient_untouched_train(config, dtype, tol):
    """Train mode: the classification gradient flows through the batch statistics as in a plain step,
    and the running statistics are updated the same way."""
    model, x = small_cnn(dtype=dtype).train(), images(4, dtype=dtype)
    y = torch.tensor([0, 1, 2, 3])
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    got, _ = _cls_grads(a, x, y, CLS_CONFIGS[config])
    want = _plain_grads(b, x, y)
    # relative to the whole gradient: the conv biases before BatchNorm have a zero gradient up to rounding
    assert rel_err(torch.cat([g.flatten() for g in got.values()]),
                   torch.cat([g.flatten() for g in want.values()])) <= tol
    for (n, ba), bb in zip(a.named_buffers(), b.buffers()):
        if ba.is_floating_point():
            assert rel_err(ba, bb) <= tol, n
        else:
            assert torch.equal(ba, bb), n


# ---------------------------------------------------------------- the model is left as it was


def _no_hooks(model: nn.Module) -> None:
    for name, m in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            assert not getattr(m, attr), f"{name or 'model'}.{attr} = {getattr(m, attr)}"
    assert torch.overrides._get_current_function_mode_stack() == []


def _state(model: nn.Module):
    return (model.training, [m.training for m in model.modules()],
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: t.detach().clone() for n, t in model.state_dict().items()})


def _assert_same_state(model: nn.Module, before) -> None:
    after = _state(model)
    assert after[:3] == before[:3]
    for n, t in before[3].items():
        assert torch.equal(after[3][n], t), n
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("cfg", [
    dict(target="predicted"), dict(target="all", create_graph=True), dict(target="joint", rule="zplus"),
    dict(target="selective", create_graph=True, layers=["4", "8"]),
    dict(target="predicted", first_layer="zb", input_bounds=(-4.0, 4.0), layers=["4"]),
])
def test_model_left_as_it_was(cfg):
    model = small_cnn()
    model[0].bias.requires_grad_(False)  # a frozen parameter stays frozen
    model[4].train()  # a mixed-mode model keeps its per-module flags
    x = images()
    before = _state(model)
    cfg = dict(cfg)
    explain(model, x, cfg.pop("target"), **cfg)
    _no_hooks(model)
    _assert_same_state(model, before)
    assert not x.requires_grad


class _Boom(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.conv, self.kind = nn.Conv2d(3, 4, 3), kind
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        if self.kind == "raise":
            raise RuntimeError("boom inside forward")
        if self.kind == "gelu":
            h = F.gelu(h)
        out = self.head(h.mean((2, 3)))
        return out[:, :, None] if self.kind == "bad_logits" else out


@pytest.mark.parametrize("kind,target,error", [
    ("raise", "predicted", RuntimeError), ("gelu", "predicted", UnsupportedOperationError),
    ("bad_logits", "predicted", ValueError), ("ok", torch.tensor([9, 0]), ValueError),
    ("ok", "all", ValueError),  # max_maps_per_pass=0, raised after the forward
])
def test_model_left_as_it_was_after_an_exception(kind, target, error):
    good, x = small_cnn(), images(2)
    expected = explain(good, x, "predicted").heatmap
    model = _Boom(kind).double()
    before = _state(model)
    with pytest.raises(error):
        explain(model, x, target, layers=["conv", "head"], create_graph=True, max_maps_per_pass=0)
    _no_hooks(model)
    _assert_same_state(model, before)
    # nothing leaked: the next explain works and its plain forward/backward are unaffected
    assert torch.equal(explain(good, x, "predicted").heatmap, expected)
    assert torch.is_grad_enabled()


def test_explain_under_no_grad_restores_grad_mode():
    model, x = small_cnn(), images()
    want = explain(model, x, LABELS).heatmap
    with torch.no_grad():
        got = explain(model, x, LABELS).heatmap
        assert not torch.is_grad_enabled()
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------- memory stays flat


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_training_memory_stays_flat():
    """30 SGD steps with CE + heatmap loss (create_graph=True): no step's graph outlives the step,
    without relying on the cycle collector (gc disabled), and the resident memory does not grow
    (keeping each step's Explanation alive grows it by ~19 MiB over these 20 steps; no leak: ~0)."""
    model = small_cnn(dtype=torch.float32, classes=10).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    mask = torch.zeros(16, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1

    def step() -> list[weakref.ref]:
        e = explain(model, x, "stochastic", create_graph=True, layers=["4"], generator=g)
        loss = F.cross_entropy(e.logits, y) + heatmap_loss(e.heatmap[:, None], mask, 1.0, 25.0).total
        opt.zero_grad()
        loss.backward()
        opt.step()
        return [weakref.ref(t) for t in (e.heatmap, e.logits, e.layers["4"], loss)]

    refs: list[weakref.ref] = []
    rss = {}
    gc.collect()
    gc.disable()
    try:
        for i in range(30):
            refs += step()
            alive = sum(r() is not None for r in refs)
            assert alive == 0, f"step {i}: {alive} tensors of finished steps still alive (reference cycle)"
            if i in (9, 29):
                rss[i] = _rss_bytes()
    finally:
        gc.enable()
    assert rss[29] - rss[9] < 8 * 2**20, f"RSS grew by {(rss[29] - rss[9]) / 2**20:.1f} MiB over 20 steps"


# ------------------------------------------------------------------------------------------ autocast


@pytest.mark.parametrize("train", [False, True])
def test_autocast_bf16(train):
    """bf16 autocast: finite heatmaps close to the fp32 ones, and the heatmap loss backward works.

    Train mode is looser: at random init, BatchNorm batch statistics over few values (1x1 maps in the
    last stage) amplify bf16 rounding; there even plain autograd gradient x input agrees with fp32 only
    to a cosine of 0.7-0.85 per sample at batch 4, so the whole batch of 8 is compared at 0.85."""
    model = timm_resnet18(torch.float32).train(train)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 32, 32, generator=g)
    y = torch.arange(8)
    ref = explain(copy.deepcopy(model), x, y).heatmap
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e = explain(model, x, y, create_graph=True)
        loss = F.cross_entropy(e.logits.float(), y)
    assert e.heatmap.dtype == torch.float32 and torch.isfinite(e.heatmap).all()
    if train:
        cos = F.cosine_similarity(e.heatmap.flatten(), ref.flatten(), dim=0)
        assert cos > 0.85, cos
    else:
        cos = F.cosine_similarity(e.heatmap.flatten(1), ref.flatten(1), dim=1)
        assert (cos > 0.95).all(), cos
    mask = torch.zeros(8, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    (loss + heatmap_loss(e.heatmap[:, None], mask, 1.0, 25.0).total).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)


# ---------------------------------------------------------------------------------------- targets


@pytest.mark.parametrize("classes", [10, 2])
def test_stochastic_target_distribution(classes):
    n = 4000
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, classes, generator=g)
    t = select_targets(logits, "stochastic", generator=torch.Generator().manual_seed(1))
    assert t.dtype == torch.long and t.shape == (n,)
    assert ((t >= 0) & (t < classes)).all()
    top = logits.argmax(1)
    p_top = (t == top).double().mean().item()
    assert abs(p_top - 0.5) <= 3 * math.sqrt(0.25 / n), p_top
    # the others: uniform over the C - 1 non-top classes (checked by logit rank, 1 = second highest)
    rank = (logits.argsort(1, descending=True) == t[:, None]).double().argmax(1)[t != top]
    counts = torch.bincount(rank, minlength=classes)[1:].double()
    assert counts.sum() == (t != top).sum()
    expect, m = counts.sum() / (classes - 1), counts.sum()
    sigma = math.sqrt(m * (1 / (classes - 1)) * (1 - 1 / (classes - 1))) if classes > 2 else 0.0
    assert ((counts - expect).abs() <= 3.5 * sigma + 1e-9).all(), counts.tolist()


def test_stochastic_target_is_drawn_per_sample_and_reproducible():
    model, x = small_cnn(classes=5), images(16)
    a = explain(model, x, "stochastic", generator=torch.Generator().manual_seed(3))
    b = explain(model, x, "stochastic", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.targets, b.targets) and torch.equal(a.heatmap, b.heatmap)
    top = a.logits.argmax(1)
    assert (a.targets == top).any() and (a.targets != top).any()
    assert torch.equal(a.heatmap, explain(model, x, a.targets).heatmap)


def test_selective_quantity_on_hand_logits():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]])
    t = select_targets(logits, "selective")
    assert t.tolist() == [0, 1]
    mu, want = 0.01, 0.0
    for row, c in zip(logits.tolist(), t.tolist()):
        p = math.exp(row[c]) / sum(math.exp(v) for v in row)
        want += math.log(p + mu) - math.log(1 - p + mu)
    got = explained_quantity(logits, "selective", t, mu)
    assert abs(got.item() - want) <= 1e-6 * abs(want)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, EXACT)])
def test_selective_heatmap_is_gradient_of_eta(dtype, tol):
    """eps = 0: the Selective map is gradient x input of eta = ln(P_c + mu) - ln(1 - P_c + mu), c = argmin."""
    model, x = small_cnn(dtype=dtype), images(dtype=dtype)
    e = explain(model, x, "selective", eps=0.0)
    c = e.logits.argmin(1)
    assert torch.equal(e.targets, c)

    def eta(z):
        p = torch.softmax(z, 1).gather(1, c[:, None])
        return (torch.log(p + 0.01) - torch.log(1 - p + 0.01)).sum()

    assert rel_err(e.heatmap, grad_times_input(model, x, eta)) <= tol


# ----------------------------------------------------------------- other piecewise-linear units


@pytest.mark.parametrize("slope", [0.25, 0.01])
def test_leaky_relu_eps0_is_gradient_times_input(slope):
    model, x = small_cnn(act=lambda: nn.LeakyReLU(slope)), images()
    e = explain(model, x, LABELS, eps=0.0)
    assert rel_err(e.heatmap, grad_times_input(model, x, picked(LABELS))) <= EXACT


def _relu6_net():
    """x (1 feature) -> linear (6 units, some saturating above 6) -> ReLU6 -> linear (3 classes)."""
    lin1, lin2 = nn.Linear(1, 6, bias=False), nn.Linear(6, 3)
    with torch.no_grad():
        lin1.weight.copy_(torch.tensor([[8.0], [12.0], [3.0], [-2.0], [0.5], [2.5]]))
        lin2.weight.copy_(torch.randn(3, 6, generator=torch.Generator().manual_seed(0)))
        lin2.bias.zero_()
    x = torch.tensor([[0.7], [1.9]])
    return nn.Sequential(lin1, nn.ReLU6(), lin2).double(), x.double()


@pytest.mark.parametrize("eps", [0.0, 0.01])
def test_relu6_factor_by_hand(eps):
    """ReLU6 at a saturated unit: the LRP factor is f(z) / (z + eps sign z) = 6 / (z + eps), not 0."""
    model, x = _relu6_net()
    y = torch.tensor([2, 0])
    e = explain(model, x, y, eps=eps)
    z = x @ model[0].weight.T  # [2, 6]
    assert (z > 6).any() and (z < 0).any() and ((z > 0) & (z < 6)).any()
    factor = z.clamp(0, 6) / (z + eps * torch.where(z >= 0, 1.0, -1.0).double())
    factor = torch.where(z.clamp(0, 6) == 0, 0.0, factor)
    want = x * ((factor * model[2].weight[y]) @ model[0].weight).detach()
    assert rel_err(e.heatmap, want) <= EXACT
    assert rel_err(e.heatmap, grad_times_input(model, x, picked(y))) > 1e-2  # differs from the gradient
