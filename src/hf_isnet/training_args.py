"""``ISNetTrainingArguments``: every ISNet hyper-parameter as a ``TrainingArguments`` field (TRL style).

Each field's help names the paper's symbol, so ``HfArgumentParser((ISNetTrainingArguments,))`` turns them
into command-line flags (``--variant dual --heatmap_loss_weight 0.8 --lds_layers auto``). Defaults are the
paper's (P = 0.7, d = 0.9, E = 1, w1 = w2 = 1, LRP-epsilon 0.01, mu = 0.01, d_LDS = 0.8, gradient clipping at
norm 1). Settings that silently break the double backward the heatmap loss needs are refused at
construction, with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

__all__ = ["ISNetTrainingArguments", "VARIANTS"]

_logger = logging.getLogger(__name__)

VARIANTS = ("none", "original", "dual", "selective", "stochastic")


@dataclass
class ISNetTrainingArguments(TrainingArguments):
    """``transformers.TrainingArguments`` plus the Faster ISNet's hyper-parameters.

    The loss is ``L_IS = (1 - P) L_C + P L_LRP`` with ``L_LRP = w1 L1 + w2 L2``: ``L1`` penalises background
    relevance (GWRP with decay d, then ``x / (x + E)``), ``L2`` keeps the foreground relevance inside
    ``[C1, C2]``. ``variant="none"`` trains a standard classifier (the ISNet fields are then ignored).

    Changed ``TrainingArguments`` defaults: ``remove_unused_columns=False`` (the mask column must reach
    ``compute_loss``) and ``label_names=["labels"]``; ``max_grad_norm`` stays 1.0 (the paper's clipping).
    """

    variant: str = field(
        default="stochastic",
        metadata={
            "help": "Which heatmaps are optimised (default 'stochastic': the best on the biased-MNIST benchmark, "
            "see the README): 'original' (ISNet, one LRP-epsilon map per class), 'dual' "
            "(joint LRP-epsilon map of all logits + joint LRP-z+ map), 'selective' (one map of "
            "eta_c = ln(P_c + mu) - ln(1 - P_c + mu) for the lowest-logit class c), 'stochastic' (one map of "
            "the top logit with probability 1/2, else of a random other class), or 'none' (standard "
            "classifier, no heatmap loss).",
            "choices": list(VARIANTS),
        },
    )
    heatmap_loss_weight: float = field(
        default=0.7,
        metadata={"help": "P in L_IS = (1 - P) L_C + P L_LRP; in [0, 1)."},
    )
    gwrp_decay: float = field(
        default=0.9,
        metadata={
            "help": "d, the decay of the Global Weighted Ranked Pooling of background relevance (weights d^i "
            "over positions sorted descending); 0 = max pooling, 1 = mean. In [0, 1]."
        },
    )
    E: float = field(
        default=1.0,
        metadata={"help": "E in the background-loss squashing x / (x + E) (L1 = ln(1 + x / E)); > 0."},
    )
    w1: float = field(
        default=1.0,
        metadata={"help": "w1, the weight of the background loss L1 in L_LRP = w1 L1 + w2 L2; >= 0."},
    )
    w2: float = field(
        default=1.0,
        metadata={"help": "w2, the weight of the foreground loss L2 in L_LRP = w1 L1 + w2 L2; >= 0."},
    )
    lrp_eps: float = field(
        default=0.01,
        metadata={"help": "epsilon of the LRP-epsilon rule (a / (a + epsilon) at each rectifier); >= 0."},
    )
    selective_mu: float = field(
        default=0.01,
        metadata={"help": "mu in the Selective ISNet's eta_c = ln(P_c + mu) - ln(1 - P_c + mu); > 0."},
    )
    first_layer_zb: bool = field(
        default=False,
        metadata={
            "help": "Apply the LRP-zB (deep Taylor z^B) rule to the affine layers before the first rectifier."
        },
    )
    zb_bounds: str | None = field(
        default=None,
        metadata={
            "help": "Input bounds (low, high) of the LRP-zB rule in the model's input space: 'auto' (from the "
            "model's normalisation mean/std for pixels in [0, 1]: low = -mu/sigma, high = (1 - mu)/sigma) or "
            "'low,high'. Unset means 'auto' when first_layer_zb is on."
        },
    )
    lds_layers: str | None = field(
        default=None,
        metadata={
            "help": "LRP Deep Supervision: unset = off; 'auto' = the inputs of the stages no skip connection "
            "bypasses (ResNet stages, DenseNet transitions); or comma-separated module names."
        },
    )
    lds_decay: float = field(
        default=0.8,
        metadata={
            "help": "d_LDS, the GWRP decay aggregating the per-layer losses of LRP Deep Supervision; in [0, 1]."
        },
    )
    relevance_range: str = field(
        default="auto",
        metadata={
            "help": "[C1, C2], the foreground relevance range of L2: 'auto' (calibrate from a short standard "
            "classifier run: C1 = max(M/5, M - 3S), C2 = min(25 C1, M + 3S)), 'C1,C2', or the path to a saved "
            "calibration JSON."
        },
    )
    calibration_epochs: int = field(
        default=4,
        metadata={
            "help": "Epochs of the standard-classifier run that precedes the relevance-range calibration "
            "(relevance_range='auto'); >= 1."
        },
    )
    background_attenuation: bool = field(
        default=True,
        metadata={
            "help": "Compute the forward pass that feeds both losses on images whose background is dimmed "
            "toward an empty (black) background by a random factor alpha ~ U(0, 1) per sample (beyond the "
            "paper). On by default: on biased MNIST it raised deceiving accuracy from 0.51 to 0.91 "
            "(Stochastic) and 0.43 to 0.84 (Dual); --no_background_attenuation for the paper's method."
        },
    )
    max_maps_per_pass: int | None = field(
        default=None,
        metadata={
            "help": "Original ISNet: at most this many class heatmaps per batched backward pass (bounds "
            "memory); unset = all classes at once. >= 1."
        },
    )
    explain_eval: bool = field(
        default=False,
        metadata={
            "help": "Also compute the heatmap losses and metrics during evaluation (costs a backward pass)."
        },
    )
    image_column: str = field(default="image", metadata={"help": "Dataset column holding the images."})
    mask_column: str = field(
        default="mask", metadata={"help": "Dataset column holding the segmentation masks (foreground = 1)."}
    )
    label_column: str = field(default="label", metadata={"help": "Dataset column holding the class labels."})

    # TrainingArguments defaults that the ISNet needs changed.
    remove_unused_columns: bool = field(
        default=False,
        metadata={
            "help": "Keep dataset columns the model's forward does not name: False, so masks reach compute_loss."
        },
    )
    label_names: list[str] | None = field(
        default_factory=lambda: ["labels"],
        metadata={
            "help": "Input keys holding labels; masks must not be listed (they would be kept in memory)."
        },
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Gradient clipping norm (the paper clips at 1)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_isnet_values()
        self._check_double_backward()

    def _check_double_backward(self) -> None:
        """Refuse settings under which the heatmap loss's double backward breaks silently or loudly."""
        if self.variant == "none":
            return
        if self.torch_compile:
            raise ValueError(
                "torch_compile=True cannot train an ISNet: AOTAutograd refuses the double backward through "
                "the differentiable heatmap. Leave torch_compile off (or use variant='none')."
            )
        if self.ddp_static_graph:
            raise ValueError(
                "ddp_static_graph=True cannot train an ISNet: with the heatmap's input double backward, DDP's "
                "static graph silently skips the gradient all-reduce and the replicas drift apart. Leave it unset."
            )
        if self.activation_checkpointing:
            kwargs = dict(self.activation_checkpointing_kwargs or {})
            if kwargs.get("use_reentrant", False):
                raise ValueError(
                    "gradient/activation checkpointing with use_reentrant=True cannot train an ISNet: reentrant "
                    "checkpointing does not support the double backward of the heatmap loss. Use "
                    "activation_checkpointing_kwargs={'use_reentrant': False} (the default here)."
                )
            # Spell the safe choice out, so no other default can switch to reentrant checkpointing.
            kwargs["use_reentrant"] = False
            self.activation_checkpointing_kwargs = self.gradient_checkpointing_kwargs = kwargs
        if self.fp16:
            _logger.warning(
                "fp16 with a loss scaler: the heatmap's inner input gradient is not loss-scaled and may underflow; "
                "bf16 is the safe mixed precision for an ISNet."
            )

    def _check_isnet_values(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(
                f"variant={self.variant!r} is not one of {', '.join(repr(v) for v in VARIANTS)}."
            )
        checks = [
            ("gwrp_decay (d)", self.gwrp_decay, 0.0 <= self.gwrp_decay <= 1.0, "in [0, 1]"),
            ("lds_decay (d_LDS)", self.lds_decay, 0.0 <= self.lds_decay <= 1.0, "in [0, 1]"),
            ("E", self.E, self.E > 0.0, "> 0"),
            ("w1", self.w1, self.w1 >= 0.0, ">= 0"),
            ("w2", self.w2, self.w2 >= 0.0, ">= 0"),
            ("lrp_eps", self.lrp_eps, self.lrp_eps >= 0.0, ">= 0"),
            ("selective_mu (mu)", self.selective_mu, self.selective_mu > 0.0, "> 0"),
            ("calibration_epochs", self.calibration_epochs, self.calibration_epochs >= 1, ">= 1"),
        ]
        if self.variant != "none":  # a standard classifier ignores P
            P = self.heatmap_loss_weight
            checks.append(
                (
                    "heatmap_loss_weight (P)",
                    P,
                    0.0 <= P < 1.0,
                    "in [0, 1) (P = 1 would not train the classifier)",
                )
            )
        if self.max_maps_per_pass is not None:
            checks.append(("max_maps_per_pass", self.max_maps_per_pass, self.max_maps_per_pass >= 1, ">= 1"))
        for name, value, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name}={value} is out of range: it must be {expected}.")
        if self.w1 == 0.0 and self.w2 == 0.0 and self.variant != "none":
            raise ValueError(
                "w1 = w2 = 0 switches the heatmap loss off; use variant='none' for a standard classifier."
            )
        # Parse the string-valued settings now, so a typo fails at start-up, not after calibration.
        self.parsed_zb_bounds()
        self.parsed_lds_layers()
        self.parsed_relevance_range()

    def parsed_relevance_range(self) -> str | tuple[float, float] | Path:
        """``relevance_range`` as ``"auto"``, ``(C1, C2)`` floats with ``0 <= C1 < C2``, or the ``Path`` of a
        saved calibration JSON (which must exist)."""
        value = self.relevance_range.strip()
        if value == "auto":
            return "auto"
        pair = _float_pair(value)
        if pair is not None:
            c1, c2 = pair
            if not 0.0 <= c1 < c2:
                raise ValueError(f"relevance_range={value!r}: need 0 <= C1 < C2.")
            return pair
        path = Path(value)
        if path.suffix.lower() != ".json" or not path.is_file():
            raise ValueError(
                f"relevance_range={value!r} is neither 'auto', 'C1,C2' (two numbers) nor an existing calibration "
                ".json file."
            )
        return path

    def parsed_zb_bounds(self) -> str | tuple[float, float] | None:
        """``None`` (zB off), ``"auto"`` or ``(low, high)`` with ``low < high``."""
        if not self.first_layer_zb:
            if self.zb_bounds is not None:
                raise ValueError(
                    f"zb_bounds={self.zb_bounds!r} is set but first_layer_zb is off: set --first_layer_zb."
                )
            return None
        if self.zb_bounds is None or self.zb_bounds.strip() == "auto":
            return "auto"
        pair = _float_pair(self.zb_bounds)
        if pair is None or not pair[0] < pair[1]:
            raise ValueError(f"zb_bounds={self.zb_bounds!r} must be 'auto' or 'low,high' with low < high.")
        return pair

    def parsed_lds_layers(self) -> str | list[str] | None:
        """``None`` (no LRP Deep Supervision), ``"auto"``, or the list of module names."""
        if self.lds_layers is None or not self.lds_layers.strip():
            return None
        if self.lds_layers.strip() == "auto":
            return "auto"
        names = [name.strip() for name in self.lds_layers.split(",")]
        if not all(names):
            raise ValueError(f"lds_layers={self.lds_layers!r} has an empty module name.")
        return names

    @classmethod
    def isnet_field_names(cls) -> tuple[str, ...]:
        """Names of the fields this class adds to ``TrainingArguments`` (in declaration order)."""
        base = {f.name for f in fields(TrainingArguments)}
        return tuple(f.name for f in fields(cls) if f.name not in base)

    def isnet_config(self) -> dict[str, Any]:
        """All ISNet settings as a JSON-serialisable dict (the ``isnet`` block of a saved model's config)."""
        return {name: getattr(self, name) for name in self.isnet_field_names()}


def _float_pair(text: str) -> tuple[float, float] | None:
    parts = text.split(",")
    if len(parts) != 2:
        return None
    try:
        return float(parts[0]), float(parts[1])
    except ValueError:
        return None
