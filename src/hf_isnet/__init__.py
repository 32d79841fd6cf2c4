"""hf_isnet: the Faster ISNet for the Hugging Face ecosystem.

Layers (a lower one never imports a higher one):

- ``hf_isnet.lrp``: LRP-Flex, differentiable LRP heatmaps for any ReLU network (pure torch).
- ``hf_isnet.losses`` / ``hf_isnet.variants`` / ``hf_isnet.calibration``: the ISNet objective (pure torch).
- ``hf_isnet.trainer`` / ``training_args`` / ``modeling`` / ``hub`` / ``data`` / ``metrics`` / ``viz``:
  the Hugging Face layer.

Top-level names are imported lazily so that ``import hf_isnet.lrp`` never pulls in transformers.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "explain": "hf_isnet.lrp",
    "ISNetObjective": "hf_isnet.variants",
    "ISNetOutput": "hf_isnet.variants",
    "ISNetTrainer": "hf_isnet.trainer",
    "ISNetTrainingArguments": "hf_isnet.training_args",
    "create_model": "hf_isnet.modeling",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_isnet' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = list(_LAZY)
