"""Independent LRP-epsilon oracle built on zennit, for timm ResNet / DenseNet.

This is a test helper, not part of the package. It computes the LRP-epsilon heatmap with the
convention pinned in ``reference/method.md`` ("LRP-Flex: rules as modified gradients") using
zennit's layer-wise rule machinery, i.e. without sharing any code or idea of implementation with
``hf_isnet.lrp`` (which works with modified gradients through one autograd graph).

The convention, in LRP terms
----------------------------
Everything between two rectifiers is ONE affine block, and LRP-epsilon is applied to the block
as a whole, with the stabiliser on the rectifier's pre-activation ``z``::

    R_in = x * J^T (R_z / (z + eps * sign(z)))          (J: Jacobian of the affine block)

Layer by layer this is (and that is how the oracle is built):

* every affine module (Conv2d, Linear, BatchNorm2d, AvgPool2d, AdaptiveAvgPool2d and the
  residual Sum) gets LRP-0, ``R_in = x * W^T (R_out / z_out)``: a chain of LRP-0 rules is
  exactly gradient x input of the chain, so the block's epsilon lives only at its end;
* every ReLU gets LRP-epsilon on its own input-output relation, ``R_in = z * 1[z>0] * R_out /
  (a + eps)`` (zennit's ``Epsilon`` hook on the ReLU module: the gradient of ReLU is the mask,
  the stabiliser is applied to ``a = relu(z) >= 0``, so ``a + eps*sign0(a) = a + eps``).
  For an active unit ``a = z`` so this is the block's ``z / (z + eps)`` factor, applied once;
* the initial relevance is the explained logit (one-hot * logits), or all logits for "joint";
  the classifier block (last ReLU -> global pool -> fc) therefore is LRP-0 (no epsilon at the
  logits: the epsilon belongs to rectifiers only);
* MaxPool2d, Flatten, Dropout (eval), Identity, ``torch.cat`` and tensor slicing have no rule:
  zennit passes relevance through them as a gradient, which is exact (winner-take-all, and
  copying/splitting is relevance-preserving).

LRP-0 uses a *zero-only* stabiliser (``z`` where ``z != 0``, 1 where ``z == 0``) instead of a
tiny epsilon: a tiny epsilon such as 1e-12 gives a relative error ``1e-12/|z|`` per unit, and
over millions of units with ``|z|`` down to ~1e-7 that sums to ~1e-5 relative error, far above
the 1e-8 the comparison asks for. Where ``z == 0`` exactly (a dead channel after global
pooling) the incoming relevance is ``0 * (...) = 0``, so dividing by 1 is exact.

Structural fixes (canonizers, all reverted after each call):

* ``TimmBasicBlockCanonizer`` re-routes timm's ``BasicBlock`` residual sum (``x += shortcut``,
  not a module) through a ``zennit.layer.Sum`` module that gets LRP-0 (otherwise zennit
  would pass relevance through the sum as a gradient, i.e. copy it to both branches);
* ``BatchNormActCanonizer`` splits timm's fused ``BatchNormAct2d`` (a BatchNorm2d subclass
  whose forward is batch_norm -> drop -> act) into a plain ``nn.BatchNorm2d`` sharing the
  parameters and buffers (LRP-0) followed by the module's own ``drop`` and ``act`` (the ReLU
  rule), so the BN part and the rectifier part each get their rule exactly once; the fused
  module itself gets no rule;
* ``ReLUNotInplace`` turns ``inplace`` off on every ``nn.ReLU`` (zennit's hook recomputes the
  module forward on a leaf tensor, which an in-place ReLU would refuse, and its forward hook
  would otherwise store the post-activation in place of the input).

BatchNorm is NOT folded into the convolutions: LRP-0 through a separate BN is exactly the same
as folding for this convention (both are gradient x input inside the block).

Anything the oracle does not know (any other leaf module type, a module called twice in one
forward) raises, so a silent mis-configuration cannot pass as agreement.
"""
from __future__ import annotations

from collections import Counter

import torch
from timm.layers import BatchNormAct2d
from timm.layers.adaptive_avgmax_pool import SelectAdaptivePool2d
from timm.models.resnet import BasicBlock
from torch import nn
from zennit.attribution import Gradient
from zennit.canonizers import AttributeCanonizer, Canonizer
from zennit.core import BasicHook, Composite
from zennit.layer import Sum
from zennit.rules import Epsilon, NoMod, Norm

__all__ = [
    "zennit_lrp_epsilon",
    "gradient_times_input",
    "oracle_composite",
    "randomize_batchnorm_",
]


# --------------------------------------------------------------------------------------------
# stabilisers and rules
# --------------------------------------------------------------------------------------------
def zero_only_stabilizer(z: torch.Tensor) -> torch.Tensor:
    """Denominator for LRP-0: ``z`` itself, 1 where ``z`` is exactly 0 (relevance there is 0)."""
    return torch.where(z == 0, torch.ones_like(z), z)


def _relu_denominator(eps: float):
    """Stabilised denominator for a ReLU output ``a >= 0``: ``a + eps`` (eps = 0: zero-only)."""
    if eps == 0:
        return zero_only_stabilizer

    def stab(a: torch.Tensor) -> torch.Tensor:
        # zennit's sign convention (sign(0) = +1); for a >= 0 this is a + eps everywhere.
        return a + eps * ((a == 0).to(a) + a.sign())

    return stab


class RectifierEpsilon(BasicHook):
    """LRP-epsilon on a ReLU module, epsilon at the pre-activation.

    ``R_in = z * relu'(z) * R_out / (relu(z) + eps)``: the gradient through the recomputed ReLU
    is the mask, the reducer multiplies by the module input z.
    """

    def __init__(self, epsilon: float = 0.01):
        self.epsilon = epsilon
        stab = _relu_denominator(epsilon)
        super().__init__(
            input_modifiers=[lambda input: input],
            param_modifiers=[NoMod(param_keys=[])],
            output_modifiers=[lambda output: output],
            gradient_mapper=(lambda out_grad, outputs: [out_grad / stab(outputs[0])]),
            reducer=(lambda inputs, gradients: inputs[0] * gradients[0]),
        )

    def copy(self):
        return RectifierEpsilon(self.epsilon)


def lrp0_param() -> Epsilon:
    """LRP-0 for modules with parameters (Conv2d, Linear, BatchNorm2d): exact, zero-only stabiliser."""
    return Epsilon(epsilon=zero_only_stabilizer)


def lrp0_noparam() -> Norm:
    """LRP-0 for parameter-free affine modules (Sum, AvgPool2d, AdaptiveAvgPool2d)."""
    return Norm(stabilizer=zero_only_stabilizer)


# --------------------------------------------------------------------------------------------
# canonizers
# --------------------------------------------------------------------------------------------
class TimmBasicBlockCanonizer(AttributeCanonizer):
    """Route timm ``BasicBlock``'s residual addition through a ``zennit.layer.Sum`` module."""

    def __init__(self):
        super().__init__(self._attribute_map)

    def copy(self):
        return TimmBasicBlockCanonizer()

    @classmethod
    def _attribute_map(cls, name, module):
        if isinstance(module, BasicBlock):
            return {"forward": cls.forward.__get__(module), "canonizer_sum": Sum()}
        return None

    @staticmethod
    def forward(self, x):
        """Copy of timm 1.0 ``BasicBlock.forward`` with ``x += shortcut`` replaced by a Sum module."""
        shortcut = x

        x = self.conv1(x)
        x = self.bn1(x)
        x = self.drop_block(x)
        x = self.act1(x)
        x = self.aa(x)

        x = self.conv2(x)
        x = self.bn2(x)

        if self.se is not None:
            x = self.se(x)

        if self.drop_path is not None:
            x = self.drop_path(x)

        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x = self.canonizer_sum(torch.stack([x, shortcut], dim=-1))
        x = self.act2(x)

        return x


class BatchNormActCanonizer(AttributeCanonizer):
    """Split timm ``BatchNormAct2d`` into a plain BatchNorm2d (shared state) -> drop -> act."""

    def __init__(self):
        super().__init__(self._attribute_map)

    def copy(self):
        return BatchNormActCanonizer()

    @classmethod
    def _attribute_map(cls, name, module):
        if not isinstance(module, BatchNormAct2d):
            return None
        if type(module) is not BatchNormAct2d:
            raise NotImplementedError(f"oracle: unsupported BatchNormAct2d subclass at {name!r}")
        if not isinstance(getattr(module, "drop", nn.Identity()), (nn.Identity, nn.Dropout)):
            raise NotImplementedError(f"oracle: unsupported drop {module.drop!r} at {name!r}")
        bn = nn.BatchNorm2d(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            device=module.weight.device if module.weight is not None else None,
            dtype=module.weight.dtype if module.weight is not None else None,
        )
        # share parameters and buffers (no copies: the oracle sees exactly the model's state)
        bn.weight = module.weight
        bn.bias = module.bias
        bn.running_mean = module.running_mean
        bn.running_var = module.running_var
        bn.num_batches_tracked = module.num_batches_tracked
        bn.train(module.training)
        return {"forward": cls.forward.__get__(module), "oracle_bn": bn}

    @staticmethod
    def forward(self, x):
        x = self.oracle_bn(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


class ReLUNotInplace(Canonizer):
    """Temporarily set ``inplace=False`` on every ``nn.ReLU`` (restored on removal)."""

    def __init__(self):
        self.module = None
        self.saved = None

    def apply(self, root_module):
        instances = []
        for module in root_module.modules():
            if isinstance(module, nn.ReLU):
                instance = ReLUNotInplace()
                instance.register(module)
                instances.append(instance)
        return instances

    def register(self, module):
        self.module = module
        self.saved = module.inplace
        module.inplace = False

    def remove(self):
        self.module.inplace = self.saved

    def copy(self):
        return ReLUNotInplace()


# --------------------------------------------------------------------------------------------
# module map / composite
# --------------------------------------------------------------------------------------------
# leaf modules that need no rule (relevance passes as gradient, which is exact for them)
_PASS_THROUGH = (nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)
_AFFINE_PARAM = (nn.Conv2d, nn.Linear)


def _make_module_map(eps: float):
    def module_map(ctx, name, module):
        if isinstance(module, BatchNormAct2d):
            return None  # split by BatchNormActCanonizer; its parts get the rules
        if isinstance(module, nn.ReLU):
            return RectifierEpsilon(eps)
        if isinstance(module, _AFFINE_PARAM) or type(module) is nn.BatchNorm2d:
            return lrp0_param()
        if isinstance(module, (Sum, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            return lrp0_noparam()
        if isinstance(module, SelectAdaptivePool2d):
            if module.pool_type != "avg" or not isinstance(module.pool, nn.AdaptiveAvgPool2d):
                raise NotImplementedError(f"oracle: unsupported global pool {module!r} at {name!r}")
            return None  # its .pool child gets LRP-0, its .flatten child passes
        if isinstance(module, _PASS_THROUGH):
            if isinstance(module, nn.Dropout) and module.training:
                raise NotImplementedError(f"oracle: dropout in training mode at {name!r}")
            return None
        if len(list(module.children())) == 0:
            raise NotImplementedError(f"oracle: no rule for leaf module {name!r} ({type(module).__name__})")
        return None  # containers: their children carry the rules

    return module_map


def oracle_composite(eps: float) -> Composite:
    """The zennit composite implementing the LRP-Flex epsilon convention (see module docstring)."""
    return Composite(
        module_map=_make_module_map(eps),
        canonizers=[ReLUNotInplace(), BatchNormActCanonizer(), TimmBasicBlockCanonizer()],
    )


def _output_relevance(target, num_classes: int):
    if isinstance(target, str):
        if target == "joint":
            return lambda out: out
        if target == "predicted":
            return lambda out: nn.functional.one_hot(out.argmax(1), num_classes).to(out) * out
        raise ValueError(f"unknown target {target!r}")
    target = torch.as_tensor(target)

    def fn(out):
        onehot = nn.functional.one_hot(target.to(out.device).long(), num_classes).to(out)
        return onehot * out

    return fn


def _check_single_call(model: nn.Module, inputs: torch.Tensor) -> None:
    """Per-module hooks are only exact if every leaf module runs once per forward."""
    calls: Counter = Counter()
    handles = [
        m.register_forward_hook(lambda mod, i, o: calls.update([id(mod)]))
        for m in model.modules()
        if len(list(m.children())) == 0
    ]
    try:
        with torch.no_grad():
            model(inputs[:1])
    finally:
        for h in handles:
            h.remove()
    reused = [n for n, m in model.named_modules() if calls.get(id(m), 0) > 1]
    if reused:
        raise NotImplementedError(f"oracle: modules called more than once per forward: {reused}")


def zennit_lrp_epsilon(model: nn.Module, inputs: torch.Tensor, target="joint", eps: float = 0.01):
    """LRP-epsilon heatmap of ``model`` at ``inputs`` computed with zennit.

    target: LongTensor of class indices (one per sample), "predicted" or "joint" (all logits).
    Returns ``(heatmap, logits)``; heatmap has the shape of ``inputs``. The model must be in eval
    mode (BatchNorm with running statistics); it is left unchanged.
    """
    if model.training:
        raise ValueError("oracle: put the model in eval mode")
    _check_single_call(model, inputs)
    x = inputs.detach().clone()
    with torch.no_grad():
        num_classes = model(x[:1]).shape[1]
    attributor = Gradient(model=model, composite=oracle_composite(eps),
                          attr_output=_output_relevance(target, num_classes))
    with attributor:
        logits, heatmap = attributor(x)
    return heatmap.detach(), logits.detach()


def gradient_times_input(model: nn.Module, inputs: torch.Tensor, target="joint"):
    """Plain autograd gradient x input of the explained quantity (eps -> 0 limit of LRP-Flex)."""
    x = inputs.detach().clone().requires_grad_(True)
    logits = model(x)
    if isinstance(target, str) and target == "predicted":
        target = logits.detach().argmax(1)
    weights = _output_relevance(target, logits.shape[1])(torch.ones_like(logits))
    (grad,) = torch.autograd.grad(logits, x, grad_outputs=weights)
    return (grad * x).detach(), logits.detach()


# --------------------------------------------------------------------------------------------
# model preparation
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def randomize_batchnorm_(model: nn.Module, inputs: torch.Tensor, generator: torch.Generator) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics.

    Affine: weight ~ U(0.5, 1.5) with random sign on 20 % of channels, bias ~ N(0, 0.3^2).
    Statistics: first calibrated on ``inputs`` in train mode (momentum 1: running = batch stats,
    so activations keep a sane scale through deep nets), then perturbed: mean += 0.3*std*N(0,1),
    var *= U(0.5, 2). Returns the model in eval mode.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def rnd(*shape, like):
        return torch.rand(*shape, generator=generator, dtype=like.dtype).to(like.device)

    def rndn(*shape, like):
        return torch.randn(*shape, generator=generator, dtype=like.dtype).to(like.device)

    for bn in bns:
        c = bn.num_features
        sign = torch.where(rnd(c, like=bn.weight) < 0.2, -1.0, 1.0).to(bn.weight)
        bn.weight.copy_(sign * (0.5 + rnd(c, like=bn.weight)))
        bn.bias.copy_(0.3 * rndn(c, like=bn.bias))
    saved_momentum = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 1.0
    model.train()
    model(inputs)
    model.eval()
    for bn, mom in zip(bns, saved_momentum):
        bn.momentum = mom
        c = bn.num_features
        std = bn.running_var.sqrt()
        bn.running_mean.add_(0.3 * std * rndn(c, like=bn.running_mean))
        bn.running_var.mul_(0.5 + 1.5 * rnd(c, like=bn.running_var))
    return model
