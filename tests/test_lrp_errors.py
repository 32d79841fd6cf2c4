"""Clear errors from ``hf_isnet.lrp.explain``: each names the offending thing (and the fix)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_isnet.lrp import UnsupportedOperationError, explain


def conv_net(act: nn.Module | None = None, classes: int = 5) -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), act or nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(4, classes)).eval()


class _SigmoidInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(torch.sigmoid(self.conv(x)).mean((2, 3)))


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model,name", [
    (conv_net(nn.GELU()), "GELU"), (conv_net(nn.SiLU()), "SiLU"), (_SigmoidInside(), "sigmoid"),
    (conv_net(nn.Tanh()), "tanh"), (conv_net(nn.ELU()), "ELU"),
])
@pytest.mark.parametrize("rule", ["epsilon", "zplus"])
def test_unsupported_non_linearity_is_named(model, name, rule):
    with pytest.raises(UnsupportedOperationError, match=name):
        explain(model, X, "joint", rule=rule)


def test_unsupported_error_says_what_to_do():
    with pytest.raises(UnsupportedOperationError, match="act_layer='relu'"):
        explain(conv_net(nn.GELU()), X)


@pytest.mark.parametrize("target", [torch.tensor([0, 5]), torch.tensor([-1, 0])])
def test_target_class_out_of_range(target):
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 4\]"):
        explain(conv_net(), X, target)


def test_float_target():
    with pytest.raises(ValueError, match="integer class ids"):
        explain(conv_net(), X, torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("target", [torch.tensor([0, 1, 2]), torch.tensor([[0], [1]]), torch.tensor(1)])
def test_target_of_wrong_shape(target):
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        explain(conv_net(), X, target)


def test_one_dimensional_input():
    with pytest.raises(ValueError, match="batch dimension"):
        explain(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)), torch.randn(6))


def test_unbatched_image_to_a_net_that_reduces_it_to_a_vector():
    """[3, H, W] through conv and a global mean: the model returns a 1-D output; the error says why."""

    class MeanHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 5)

        def forward(self, x):
            return self.fc(F.relu(self.conv(x)).mean((-2, -1)))

    with pytest.raises(ValueError, match="batch dimension"):
        explain(MeanHead(), torch.randn(3, 8, 8))


def test_unbatched_image_to_a_conv_net():
    with pytest.raises(ValueError, match="batch dimension"):
        explain(conv_net(), torch.randn(3, 8, 8))


@pytest.mark.parametrize("bounds", [
    (torch.zeros(2), torch.ones(2)),  # 2 values for 3 channels
    (0.0, torch.ones(3, 1)),  # not 1-D
])
def test_input_bounds_of_wrong_shape(bounds):
    with pytest.raises(ValueError, match="input_bounds"):
        explain(conv_net(), X, first_layer="zb", input_bounds=bounds)


def test_input_bounds_not_a_pair():
    with pytest.raises(ValueError, match=r"pair \(low, high\)"):
        explain(conv_net(), X, first_layer="zb", input_bounds=(0.0, 1.0, 2.0))


def test_input_bounds_low_above_high():
    with pytest.raises(ValueError, match="exceeds high"):
        explain(conv_net(), X, first_layer="zb", input_bounds=(1.0, 0.0))


def test_zb_without_input_bounds():
    with pytest.raises(ValueError, match="needs input_bounds"):
        explain(conv_net(), X, first_layer="zb")


def test_zb_when_the_first_block_is_not_affine():
    model = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
    model(X)  # materialise the lazy layer
    with pytest.raises(UnsupportedOperationError, match="first_layer=None"):
        explain(model, X, first_layer="zb", input_bounds=(-5.0, 5.0))


@pytest.mark.parametrize("kwargs,match", [
    (dict(rule="lrp"), "rule must be one of"),
    (dict(target="max"), "target must be one of"),
    (dict(target="selective", rule="zplus"), "selective"),
    (dict(first_layer="zplus"), "first_layer must be None or 'zb'"),
    (dict(eps=-0.1), "eps must be >= 0"),
    (dict(target="all", max_maps_per_pass=0), "max_maps_per_pass must be >= 1"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        explain(conv_net(), X, **kwargs)


def test_unknown_layer_name():
    with pytest.raises(ValueError, match=r"\['7'\] are not module names.*'0'"):
        explain(conv_net(), X, layers=["7"])


def test_logits_of_wrong_shape():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())  # returns a feature map, not [B, classes]
    with pytest.raises(ValueError, match=r"logits of shape \(2, 4, 6, 6\)"):
        explain(model, X)
