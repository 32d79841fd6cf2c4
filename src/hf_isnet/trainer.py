"""``ISNetTrainer``: a ``transformers.Trainer`` whose ``compute_loss`` is the ISNet objective.

    from hf_isnet import ISNetTrainer, ISNetTrainingArguments, create_model
    model = create_model("resnet18", labels=["normal", "pneumonia"])
    args = ISNetTrainingArguments(output_dir="out", variant="selective")
    trainer = ISNetTrainer(model=model, args=args, train_dataset=ds, eval_dataset=ds_eval)
    trainer.train(); trainer.save_model(); trainer.push_to_hub()

What it adds to the Trainer, and nothing else:

* data: rows with image, mask and label columns (PIL images from ``datasets.Image()``) are transformed
  with the model's data config (:class:`~hf_isnet.modeling.ImageMaskTransform`; aligned crop/flip for
  training); rows that already hold ``pixel_values`` / ``masks`` tensors are stacked as they are.
* ``compute_loss``: ``(1 - P) CE + P L_LRP`` in training; the plain CE in evaluation unless
  ``explain_eval`` (then also the heatmap loss and the background-relevance fraction).
* logs: ``classification_loss``, ``heatmap_loss`` and ``background_fraction`` next to ``loss``.
* ``relevance_range="auto"``: the paper's heuristic (a short standard-classifier run, then one measuring
  pass), saved to ``output_dir/isnet_calibration.json`` and reused when present; the ISNet then starts
  from the original initialisation.
* saving: timm's native Hub layout (loads with ``AutoModelForImageClassification``, ``pipeline`` and
  ``timm.create_model("local-dir:...")``) with an ``isnet`` config block and a model card.
* checks before training: mask/label columns, label range, mask size and values, activations.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import EvalLoopOutput

from . import hub
from .calibration import RelevanceCalibration, WelfordAccumulator
from .losses import check_masks
from .lrp import bounds_from_normalization
from .metrics import compute_metrics as default_compute_metrics
from .modeling import ImageMaskTransform, data_config
from .training_args import ISNetTrainingArguments
from .variants import ISNetObjective

logger = logging.getLogger(__name__)

CALIBRATION_NAME = "isnet_calibration.json"


class ISNetCollator:
    """Turns dataset rows into ``{"pixel_values", "masks", "labels"}`` batches.

    Rows with an image column are transformed by ``transform`` (image and mask together); rows that hold
    ``pixel_values`` (and ``masks``) tensors already are stacked as they are.
    """

    def __init__(self, transform: ImageMaskTransform | None, image_column: str = "image", mask_column: str = "mask",
                 label_column: str = "label", require_masks: bool = True) -> None:
        self.transform = transform
        self.image_column, self.mask_column, self.label_column = image_column, mask_column, label_column
        self.require_masks = require_masks

    def __call__(self, rows: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        pixels, masks, labels = [], [], []
        for row in rows:
            if "pixel_values" in row:
                p = torch.as_tensor(row["pixel_values"])
                m = row.get("masks", row.get(self.mask_column))
                m = None if m is None else torch.as_tensor(m)
            else:
                if self.image_column not in row:
                    raise KeyError(f"dataset rows have no image column {self.image_column!r} (keys: {sorted(row)}); "
                                   "set image_column")
                mask = row.get(self.mask_column)
                if mask is None and self.require_masks:
                    raise KeyError(f"dataset rows have no mask column {self.mask_column!r} (keys: {sorted(row)}); "
                                   "set mask_column, or use variant='none' for a classifier without masks")
                p, m = self.transform(row[self.image_column], mask)
            label = row.get("labels", row.get(self.label_column))
            if label is None:
                raise KeyError(f"dataset rows have no label column {self.label_column!r} (keys: {sorted(row)})")
            pixels.append(p)
            masks.append(m)
            labels.append(int(label))
        batch = {"pixel_values": torch.stack(pixels), "labels": torch.tensor(labels, dtype=torch.long)}
        if all(m is not None for m in masks):
            batch["masks"] = torch.stack([m if m.dim() == 3 else m.unsqueeze(0) for m in masks]).float()
        elif self.require_masks:
            raise ValueError("some rows have no mask; every training image needs a segmentation mask")
        return batch


class ISNetTrainer(Trainer):
    """A ``transformers.Trainer`` that trains an ISNet (see the module docstring).

    Extra keyword arguments: ``objective`` (an :class:`ISNetObjective` to use instead of the one built
    from ``args``), ``calibration`` (a :class:`RelevanceCalibration` to use as the relevance range).
    ``trainer.model_card`` (a dict of :func:`hf_isnet.hub.make_model_card` arguments: ``results``,
    ``datasets``, ``heatmap``, ...) is written with every save.
    """

    # compute_loss returns a per-batch mean: the Trainer divides it by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(self, model: nn.Module | None = None, args: ISNetTrainingArguments | None = None, *rest,
                 objective: ISNetObjective | None = None, calibration: RelevanceCalibration | None = None,
                 **kwargs) -> None:
        if not isinstance(args, ISNetTrainingArguments):
            raise TypeError("ISNetTrainer needs ISNetTrainingArguments (hf_isnet.ISNetTrainingArguments), got "
                            f"{type(args).__name__}")
        if model is None:
            raise ValueError("ISNetTrainer needs a model (hf_isnet.create_model(...))")
        self._data_config = data_config(_timm_model(model))
        if args.variant != "none" and args.ddp_find_unused_parameters is None:
            # The Trainer's DDP default for non-transformers models is find_unused_parameters=True, which
            # passes the logits through DDP's _DDPSink autograd Function: its forward runs without grad, so
            # the Dual ISNet's z+ shadow logits lose their graph ("element 0 of tensors does not require
            # grad"). The backbones here use every parameter; a model that does not must say so explicitly.
            args.ddp_find_unused_parameters = False
        user_collator = kwargs.get("data_collator")
        if user_collator is None:
            kwargs["data_collator"] = self._collator(args, train=True)
        # a custom collator serves evaluation too; an ISNetCollator gets the evaluation transforms
        custom = user_collator is not None and not isinstance(user_collator, ISNetCollator)
        self._eval_collator = user_collator if custom else self._collator(args, train=False)
        if kwargs.get("compute_metrics") is None:
            kwargs["compute_metrics"] = default_compute_metrics
        super().__init__(model, args, *rest, **kwargs)
        self.model_card: dict[str, Any] = {}
        self.calibration = calibration
        self.objective = objective or self._build_objective()
        self._sums: dict[str, list] = {}
        self._eval_sums: dict[str, list] = {}
        if self.calibration is None:
            self.calibration = self._initial_calibration()
        if self.calibration is not None:
            self.objective.relevance_range = self.calibration
        self._preflight()

    # ------------------------------------------------------------------ construction helpers
    def _collator(self, args: ISNetTrainingArguments, train: bool) -> ISNetCollator:
        transform = ImageMaskTransform(self._data_config, train=train, augment=train)
        return ISNetCollator(transform, args.image_column, args.mask_column, args.label_column,
                             require_masks=train and args.variant != "none")

    def _build_objective(self) -> ISNetObjective:
        a = self.args
        rr = a.parsed_relevance_range()
        pixel_range = bounds_from_normalization(self._data_config["mean"], self._data_config["std"])
        bounds = a.parsed_zb_bounds()
        if bounds == "auto":
            bounds = pixel_range
        baseline = pixel_range[0]  # the normalised black: an empty background
        return ISNetObjective(
            variant=a.variant,
            heatmap_loss_weight=a.heatmap_loss_weight,
            relevance_range=rr if isinstance(rr, tuple) else (1.0, 1.0),  # placeholder until calibrated
            gwrp_decay=a.gwrp_decay, E=a.E, w1=a.w1, w2=a.w2, lrp_eps=a.lrp_eps, selective_mu=a.selective_mu,
            first_layer="zb" if a.first_layer_zb else None, input_bounds=bounds,
            lds_layers=a.parsed_lds_layers(), lds_decay=a.lds_decay,
            background_attenuation=a.background_attenuation,
            attenuation_baseline=baseline,
            max_maps_per_pass=a.max_maps_per_pass or 10**6,
        )

    def _initial_calibration(self) -> RelevanceCalibration | None:
        rr = self.args.parsed_relevance_range()
        if isinstance(rr, Path):
            return RelevanceCalibration.from_json(rr)
        saved = Path(self.args.output_dir) / CALIBRATION_NAME
        if rr == "auto" and saved.is_file():
            logger.info("reusing the relevance-range calibration in %s", saved)
            return RelevanceCalibration.from_json(saved)
        return None

    @property
    def needs_calibration(self) -> bool:
        return self.args.variant != "none" and self.calibration is None and self.args.parsed_relevance_range() == "auto"

    def _preflight(self) -> None:
        """Fail before training on what would fail (or silently go wrong) during it."""
        ds = self.train_dataset
        if ds is None:
            return
        a = self.args
        columns = getattr(ds, "column_names", None)
        if columns is not None and "pixel_values" not in columns:
            need = [a.image_column, a.label_column] + ([a.mask_column] if a.variant != "none" else [])
            missing = [c for c in need if c not in columns]
            if missing:
                raise ValueError(
                    f"train_dataset lacks column(s) {missing} (it has {columns}); set image_column / mask_column / "
                    "label_column to the names your dataset uses"
                    + (", or use variant='none' to train without masks" if a.mask_column in missing else "")
                )
        num_classes = getattr(_timm_model(self.model), "num_classes", None)
        map_style = hasattr(ds, "__getitem__") and hasattr(ds, "__len__")  # not a streaming IterableDataset
        if columns is not None and num_classes is not None and map_style:
            label_col = "labels" if "labels" in columns else a.label_column
            if label_col in columns:
                labels = torch.as_tensor(ds[label_col])
                bad = labels[(labels < 0) | (labels >= num_classes)]
                if bad.numel():
                    raise ValueError(
                        f"labels {sorted(set(bad.tolist()))[:10]} are out of range for a model with {num_classes} "
                        f"classes (valid: 0..{num_classes - 1}); build the model with as many labels as the dataset has"
                    )
        batch = self.data_collator([ds[0] if map_style else next(iter(ds))])
        if a.variant != "none":
            check_masks(batch["masks"], batch["pixel_values"])
            model = _timm_model(self.model)
            was_training = model.training
            model.eval()
            try:
                # this run's heatmaps on one image: activations, LDS layer names, z+ and z^B all work
                self.objective.heatmaps(model, batch["pixel_values"].to(self.args.device))
            finally:
                model.train(was_training)
            if self.calibration is not None:
                missing = [k for k in self.objective.map_keys(model) if k not in self.calibration]
                if missing:
                    raise ValueError(
                        f"the relevance calibration has no range for map(s) {missing} (it has "
                        f"{self.calibration.keys()}): it was made for another variant or lds_layers. Recalibrate: "
                        f"with relevance_range='auto', delete {Path(a.output_dir) / CALIBRATION_NAME} or use "
                        "another output_dir."
                    )

    # ------------------------------------------------------------------ data loaders
    def get_eval_dataloader(self, eval_dataset=None):
        return self._with_collator(self._eval_collator, super().get_eval_dataloader, eval_dataset)

    def get_test_dataloader(self, test_dataset):
        return self._with_collator(self._eval_collator, super().get_test_dataloader, test_dataset)

    def _with_collator(self, collator, fn, *args):
        train_collator, self.data_collator = self.data_collator, collator
        try:
            return fn(*args)
        finally:
            self.data_collator = train_collator

    # ------------------------------------------------------------------ the loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = model.training
        explain = training or self.args.explain_eval
        out = self.objective(model, inputs["pixel_values"], inputs.get("masks"), inputs["labels"],
                             compute_heatmap_loss=explain and self.args.variant != "none", check_inputs=False)
        sums = self._sums if training else self._eval_sums
        _accumulate(sums, "classification_loss", out.classification_loss)
        if out.heatmap_loss is not None:
            _accumulate(sums, "heatmap_loss", out.heatmap_loss)
            _accumulate(sums, "background_fraction", out.background_fraction)
        return (out.loss, {"logits": out.logits}) if return_outputs else out.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._sums:
            logs.update(self._reduce(self._sums))
            self._sums = {}
        super().log(logs, start_time)

    def _reduce(self, sums: dict[str, list]) -> dict[str, float]:
        out = {}
        for name, (total, count) in sums.items():
            t = torch.stack([total.float().to(self.args.device), torch.tensor(float(count), device=self.args.device)])
            t = self.accelerator.reduce(t, reduction="sum")  # log() runs on every rank
            out[name] = round(float(t[0] / t[1]), 6)
        return out

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval") -> EvalLoopOutput:
        self._eval_sums = {}
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self._eval_sums:
            reduced = self._reduce(self._eval_sums)
            reduced.pop("classification_loss", None)
            output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in reduced.items()})
            self._eval_sums = {}
        return output

    # ------------------------------------------------------------------ calibration
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if resume_from_checkpoint and self.calibration is None:
            ckpt = resume_from_checkpoint
            if ckpt is True:
                from transformers.trainer_utils import get_last_checkpoint

                ckpt = get_last_checkpoint(self.args.output_dir)
            saved = Path(ckpt) / CALIBRATION_NAME if ckpt else None
            if saved is not None and saved.is_file():
                self.calibration = RelevanceCalibration.from_json(saved)
        if self.needs_calibration:
            self.calibration = self.calibrate()
        if self.calibration is not None:
            self.objective.relevance_range = self.calibration
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def calibrate(self) -> RelevanceCalibration:
        """The paper's relevance-range heuristic (section II-E).

        Trains a standard classifier (same model, data and recipe; ``calibration_epochs`` epochs) from the
        current weights, measures the total absolute relevance of every training image's supervised maps
        with this run's heatmap procedure (Welford: mean M, std S per map), sets
        ``C1 = max(M/5, M - 3S)``, ``C2 = min(25 C1, M + 3S)``, saves the result to
        ``output_dir/isnet_calibration.json`` and restores the original weights.
        """
        a = self.args
        unwrapped = _timm_model(self.model)
        initial = copy.deepcopy(unwrapped.state_dict())
        sub_args = dataclasses.replace(
            a, variant="none", output_dir=os.path.join(a.output_dir, "calibration_run"),
            num_train_epochs=a.calibration_epochs, max_steps=-1, save_strategy="no", eval_strategy="no",
            load_best_model_at_end=False, push_to_hub=False, report_to="none", relevance_range="auto",
            first_layer_zb=False, zb_bounds=None, lds_layers=None, background_attenuation=False,
        )
        logger.info("relevance-range calibration: %d epoch(s) of a standard classifier", a.calibration_epochs)
        sub = ISNetTrainer(model=self.model, args=sub_args, train_dataset=self.train_dataset,
                           data_collator=self.data_collator)  # the same data pipeline as the ISNet run
        sub.train()
        acc = WelfordAccumulator()
        model = sub.model_wrapped if sub.model_wrapped is not None else self.model
        model.train()
        for batch in sub.get_train_dataloader():
            maps = self.objective.calibration_maps(model, batch["pixel_values"].to(a.device))
            for key, heat in maps.items():
                acc.update(key, heat.abs().flatten(1).sum(1).double().cpu())
        if self.accelerator.num_processes > 1:  # every rank measured its shard: merge them all
            from accelerate.utils import gather_object

            merged = WelfordAccumulator()
            for part in gather_object([acc]):
                merged.merge(part)
            acc = merged
        calibration = acc.result(variant=a.variant, calibration_epochs=a.calibration_epochs,
                                 lds_layers=a.lds_layers, first_layer_zb=a.first_layer_zb)
        unwrapped.load_state_dict(initial)
        del sub
        if a.should_save:
            os.makedirs(a.output_dir, exist_ok=True)
            calibration.to_json(Path(a.output_dir) / CALIBRATION_NAME)
        logger.info("relevance ranges: %s", calibration.ranges())
        return calibration

    # ------------------------------------------------------------------ saving
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = _timm_model(self.model)
        block = {**self.args.isnet_config()}
        if self.calibration is not None:
            block["calibration"] = self.calibration.to_dict()
        hub.save_pretrained(model, output_dir, isnet_config=block, card=dict(self.model_card))
        if self.calibration is not None:
            self.calibration.to_json(Path(output_dir) / CALIBRATION_NAME)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, **kwargs):
        """Save the model (timm layout, ISNet block, card) and upload that folder to ``args.hub_model_id``."""
        if not self.is_world_process_zero():
            return None
        repo_id = self.args.hub_model_id or Path(self.args.output_dir).resolve().name
        with tempfile.TemporaryDirectory() as tmp:
            card = {"repo_id": repo_id, **self.model_card}
            model = _timm_model(self.model)
            block = {**self.args.isnet_config()}
            if self.calibration is not None:
                block["calibration"] = self.calibration.to_dict()
            hub.save_pretrained(model, tmp, isnet_config=block, card=card)
            return hub.push_to_hub(tmp, repo_id, token=token or self.args.hub_token,
                                   private=self.args.hub_private_repo, commit_message=commit_message or "Upload",
                                   revision=revision)


def _timm_model(model: nn.Module) -> nn.Module:
    """The bare timm model inside DDP / accelerate / transformers wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "timm_model") and isinstance(model.timm_model, nn.Module):
            model = model.timm_model
        else:
            return model


def _accumulate(sums: dict[str, list], name: str, value: torch.Tensor | None) -> None:
    if value is None:
        return
    total, count = sums.get(name, (torch.zeros(()), 0))
    sums[name] = [total + value.detach().float().cpu(), count + 1]
