"""Saving ISNet classifiers in timm's native Hub layout, with a model card, and pushing them to the Hub.

A saved folder holds:

- ``config.json``: timm's layout (``architecture``, ``num_classes``, ``num_features``, ``global_pool``,
  ``label_names``, ``model_args``, ``pretrained_cfg``) plus a top-level ``isnet`` block with the ISNet
  training settings and calibration (ignored by timm, kept by transformers);
- ``model.safetensors``: the timm state dict with unprefixed keys;
- ``README.md``: a model card with Hub metadata (``library_name: timm``, tags, datasets, license,
  ``model-index`` results), and ``heatmaps.png`` when a heatmap figure is given.

Such a folder (or a Hub repo made from it) loads with identical logits, without hf_isnet or custom code,
through ``transformers.AutoModelForImageClassification.from_pretrained``, ``pipeline("image-classification")``
and ``timm.create_model("local-dir:<dir>" or "hf-hub:<repo>", pretrained=True)``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, EvalResult, HfApi, ModelCard, ModelCardData
from timm.models import save_for_hf
from torch import nn

from hf_isnet import __version__

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "CARD_NAME",
    "HEATMAP_NAME",
    "save_pretrained",
    "push_to_hub",
    "make_model_card",
    "load_isnet_config",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
HEATMAP_NAME = "heatmaps.png"
ISNET_KEY = "isnet"
# The card template lives at the project root (model_cards/), beside src/.
DEFAULT_TEMPLATE = Path(__file__).resolve().parents[2] / "model_cards" / "template.md"
BASE_TAGS = ("isnet", "lrp", "timm", "image-classification", "explainability", "shortcut-learning")
# Test sets of the shortcut-learning protocol: the key in `results` -> how the card names it.
TEST_SET_NAMES = {
    "iid": "i.i.d. (bias as in training)",
    "ood": "o.o.d. (no bias)",
    "deceiving": "deceiving (bias of another class)",
}


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike[str],
    isnet_config: Mapping[str, Any] | None = None,
    card: Mapping[str, Any] | None = None,
) -> Path:
    """Save a timm classifier as ``config.json`` + ``model.safetensors`` + ``README.md``.

    Args:
        model: a timm model whose ``pretrained_cfg["label_names"]`` names its classes (as made by
            ``hf_isnet.modeling.create_model``).
        save_directory: created if needed; existing files of the same names are overwritten.
        isnet_config: ISNet settings and calibration (e.g. ``ISNetTrainingArguments.isnet_config()`` plus
            the relevance ranges), stored as the ``isnet`` block of ``config.json``. Must be JSON-serialisable
            (tuples and paths are converted to lists and strings).
        card: keyword arguments for :func:`make_model_card` (``model_name``, ``repo_id``, ``description``,
            ``license``, ``datasets``, ``results``, ``tags``, ...); ``heatmap`` may be a local PNG path, which
            is copied into the folder as ``heatmaps.png`` and shown in the card.

    Returns:
        The folder's path.
    """
    pretrained_cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(pretrained_cfg, Mapping) or not hasattr(model, "num_classes"):
        raise TypeError(
            f"save_pretrained expects a timm model (with pretrained_cfg and num_classes), got {type(model).__name__}; "
            "unwrap DDP/accelerate wrappers first (accelerator.unwrap_model(model))."
        )
    label_names = pretrained_cfg.get("label_names")
    if not label_names:
        raise ValueError(
            "model.pretrained_cfg has no 'label_names': build the model with "
            "hf_isnet.modeling.create_model(name, labels=[...]) or set model.pretrained_cfg['label_names']."
        )
    if len(label_names) != model.num_classes:
        raise ValueError(
            f"model.pretrained_cfg['label_names'] has {len(label_names)} names but the model has "
            f"{model.num_classes} classes."
        )
    block = _jsonable(dict(isnet_config or {}), "isnet_config")

    directory = Path(save_directory)
    save_for_hf(
        model,
        str(directory),
        model_config={"label_names": list(label_names), ISNET_KEY: block},
        safe_serialization=True,
    )
    # transformers passes num_classes itself next to model_args: a second one is refused
    # ("multiple values for keyword argument 'num_classes'").
    config_path = directory / CONFIG_NAME
    config = json.loads(config_path.read_text(encoding="utf-8"))
    model_args = config.get("model_args", {})
    model_args.pop("num_classes", None)
    if not model_args:
        config.pop("model_args", None)
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    card_kwargs = dict(card or {})
    heatmap = card_kwargs.pop("heatmap", None)
    if heatmap is not None:
        source = Path(heatmap)
        if not source.is_file():
            raise FileNotFoundError(
                f"card heatmap {str(source)!r} is not a file; give the path to a PNG figure."
            )
        if source.suffix.lower() != ".png":
            raise ValueError(f"card heatmap must be a PNG file, got {source.name!r}")
        target = directory / HEATMAP_NAME
        if source.resolve() != target.resolve():
            shutil.copyfile(source, target)
        card_kwargs["heatmap"] = HEATMAP_NAME
    model_card = make_model_card(
        isnet_config=block,
        architecture=config["architecture"],
        label_names=list(label_names),
        **card_kwargs,
    )
    model_card.save(directory / CARD_NAME)
    return directory


def load_isnet_config(save_directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the ``isnet`` block back from a folder written by :func:`save_pretrained`."""
    config_path = Path(save_directory) / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {str(save_directory)!r}: not a saved model folder.")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if ISNET_KEY not in config:
        raise KeyError(
            f"{config_path} has no {ISNET_KEY!r} block: the folder was not saved by hf_isnet.hub.save_pretrained."
        )
    return config[ISNET_KEY]


def push_to_hub(
    model_or_directory: nn.Module | str | os.PathLike[str],
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload ISNet classifier",
    revision: str | None = None,
    create_pr: bool = False,
    isnet_config: Mapping[str, Any] | None = None,
    card: Mapping[str, Any] | None = None,
) -> CommitInfo:
    """Create (or reuse) a Hub model repo and upload a saved ISNet folder to it.

    Args:
        model_or_directory: a timm model (saved first with :func:`save_pretrained` into a temporary folder,
            with ``isnet_config`` and ``card``; the card's ``repo_id`` defaults to ``repo_id``) or a folder
            already written by :func:`save_pretrained` (uploaded as it is).
        repo_id: ``"user/name"``.
        token: Hub token; ``None`` uses the locally stored login.
        private: visibility of a newly created repo (``None``: the Hub's default).
        commit_message, revision, create_pr: as in ``HfApi.upload_folder``.

    Returns:
        The ``CommitInfo`` of the upload.
    """
    api = HfApi(token=token, library_name="hf_isnet", library_version=__version__)
    if isinstance(model_or_directory, nn.Module):
        card_kwargs = {"repo_id": repo_id, **dict(card or {})}
        with tempfile.TemporaryDirectory() as tmp:
            save_pretrained(model_or_directory, tmp, isnet_config=isnet_config, card=card_kwargs)
            return _upload(api, tmp, repo_id, private, commit_message, revision, create_pr)
    if isnet_config is not None or card is not None:
        raise TypeError(
            "isnet_config and card apply when pushing a model; a folder is uploaded as saved. Pass them to "
            "save_pretrained(model, folder, isnet_config=..., card={'repo_id': ...}) instead."
        )
    folder = Path(model_or_directory)
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{str(folder)!r} lacks {', '.join(missing)}: save the model with hf_isnet.hub.save_pretrained first."
        )
    return _upload(api, str(folder), repo_id, private, commit_message, revision, create_pr)


def _upload(
    api: HfApi,
    folder: str,
    repo_id: str,
    private: bool | None,
    commit_message: str,
    revision: str | None,
    create_pr: bool,
) -> CommitInfo:
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(
        repo_id=repo_url.repo_id,  # the full "user/name" when the owner was implicit
        folder_path=folder,
        repo_type="model",
        commit_message=commit_message,
        revision=revision,
        create_pr=create_pr,
    )


def make_model_card(
    isnet_config: Mapping[str, Any] | None = None,
    *,
    architecture: str,
    label_names: Sequence[str] | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
    description: str | None = None,
    license: str = "apache-2.0",
    datasets: str | Sequence[str] | None = None,
    dataset_name: str | None = None,
    base_model: str | None = None,
    results: Mapping[str, Mapping[str, float]] | None = None,
    heatmap: str | None = None,
    tags: Sequence[str] = (),
    template_path: str | os.PathLike[str] | None = None,
) -> ModelCard:
    """Render the model card (``README.md``) of an ISNet classifier; nothing is sent to the network.

    Args:
        isnet_config: the ``isnet`` block, shown as a settings table (its ``variant`` also becomes a tag).
        architecture: the timm architecture (``"resnet18"``).
        label_names: class names in logit order.
        model_name: the card's title and ``model-index`` name; defaults to the repo name or
            ``"<architecture>-isnet"``.
        repo_id: the Hub repo, used in the loading snippets (a local folder placeholder otherwise).
        description: a paragraph under the title.
        license: a Hub license id.
        datasets: Hub dataset id(s) trained on (metadata ``datasets``; the first is the results' dataset type).
        dataset_name: how the results name the dataset (defaults to the first dataset id, or "test set").
        base_model: the Hub id of the weights training started from, if any.
        results: ``{test_set: {metric: value}}``; the test sets of the shortcut protocol are ``"iid"``,
            ``"ood"`` and ``"deceiving"`` (others are allowed). Written as ``model-index`` eval results and a
            table.
        heatmap: a path or URL of a heatmap figure, linked from the card as given.
        tags: extra Hub tags.
        template_path: a Jinja2 template; defaults to ``model_cards/template.md``.
    """
    isnet_config = dict(isnet_config or {})
    variant = isnet_config.get("variant")
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else f"{architecture}-isnet")
    dataset_ids = [datasets] if isinstance(datasets, str) else list(datasets or [])
    all_tags = list(dict.fromkeys([*BASE_TAGS, *([f"isnet-{variant}"] if variant else []), *tags]))

    eval_results = []
    rows = []
    for split, metrics in (results or {}).items():
        split_name = TEST_SET_NAMES.get(split, split)
        for metric, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"results[{split!r}][{metric!r}] must be a finite number, got {value!r}")
            eval_results.append(
                EvalResult(
                    task_type="image-classification",
                    task_name="Image Classification",
                    dataset_type=dataset_ids[0] if dataset_ids else "custom",
                    dataset_name=f"{dataset_name or (dataset_ids[0] if dataset_ids else 'test set')} - {split_name}",
                    dataset_config=split,
                    dataset_split="test",
                    metric_type=metric,
                    metric_name=metric,
                    metric_value=float(value),
                )
            )
            rows.append({"split": split_name, "metric": metric, "value": f"{float(value):.4g}"})

    card_data = ModelCardData(
        model_name=model_name,
        library_name="timm",
        pipeline_tag="image-classification",
        license=license,
        tags=all_tags,
        datasets=dataset_ids or None,
        base_model=base_model,
        metrics=list(dict.fromkeys(r.metric_type for r in eval_results)) or None,
        eval_results=eval_results or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path or DEFAULT_TEMPLATE),
        model_name=model_name,
        description=description or "",
        architecture=architecture,
        variant=variant,
        label_names=list(label_names or []),
        isnet_rows=[{"key": k, "value": _table_cell(v)} for k, v in isnet_config.items()],
        results_rows=rows,
        heatmap=heatmap,
        model_id=repo_id or "path/to/this/folder",
        timm_id=f"hf-hub:{repo_id}" if repo_id else "local-dir:path/to/this/folder",
    )


def _table_cell(value: Any) -> str:
    """A markdown-table-safe rendering of one setting."""
    if value is None:
        text = "-"
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, separators=(", ", ": "))
    return text.replace("|", "\\|").replace("\n", " ")


def _jsonable(value: Any, where: str) -> Any:
    """``value`` with tuples -> lists and paths -> str; a clear error for anything JSON cannot hold."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has a non-string key {key!r}: JSON object keys must be strings.")
            out[key] = _jsonable(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return value.item()
    raise TypeError(
        f"{where} is a {type(value).__name__}, which config.json cannot store: convert it to numbers, "
        "strings, lists or dicts."
    )
