"""LRP-Flex: differentiable Layer-wise Relevance Propagation for any ReLU network (pure PyTorch).

    from hf_isnet.lrp import explain
    e = explain(model, images, target="predicted")           # LRP-epsilon, eps = 0.01
    e.heatmap, e.logits, e.layers, e.targets

See :func:`explain` for the rules (epsilon, z+, z^B on the first block) and the targets.
This package knows nothing of Hugging Face.
"""

from ._engine import LRPForward
from .explain import (
    RULES,
    TARGETS,
    Explanation,
    bounds_from_normalization,
    explain,
    explained_quantity,
    select_targets,
)
from .rules import UnsupportedOperationError

__all__ = [
    "LRPForward",
    "Explanation",
    "RULES",
    "TARGETS",
    "UnsupportedOperationError",
    "bounds_from_normalization",
    "explain",
    "explained_quantity",
    "select_targets",
]
