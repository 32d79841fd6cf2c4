"""Train an ISNet on Stanford Dogs, or by default on the embedded photo composites.

Default (no ``--dogs_dir``): Fashion-MNIST objects pasted on natural photos, with the class number written
in the background as a shortcut (as the paper does for Stanford Dogs); evaluated on three test versions
(i.i.d., o.o.d. without the number, deceiving with another class's number).

With ``--dogs_dir``: the real Stanford Dogs (``Images/`` and ``Annotation/`` as the archives unpack; masks
from ``--masks_dir`` or, without it, the bounding boxes as rectangular masks), split by the official
``train_list.mat`` / ``test_list.mat`` when present.

    accelerate launch examples/train_dogs.py --output_dir outputs/dogs --variant selective
    accelerate launch examples/train_dogs.py --dogs_dir /data/stanford_dogs --model_name resnet50 \\
        --input_size 224 --output_dir outputs/dogs --variant dual --bf16

Every ISNetTrainingArguments field is a flag (``--help``). Multi-GPU and mixed precision come from
``accelerate launch`` / ``--bf16``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from hf_isnet import ISNetTrainer, ISNetTrainingArguments, create_model
from hf_isnet.data import load_photo_composites, load_stanford_dogs
from hf_isnet.evaluation import heatmap_figure, shortcut_report


@dataclass
class ScriptArguments:
    dogs_dir: str | None = field(default=None, metadata={"help": "Stanford Dogs root (Images/, Annotation/). "
                                                                 "Unset: the embedded photo composites."})
    masks_dir: str | None = field(default=None, metadata={"help": "Segmentation masks mirroring Images/ (.png); "
                                                                  "unset: bounding-box masks."})
    model_name: str = field(default="resnet18", metadata={"help": "timm architecture (ReLU-based; the paper: resnet50)."})
    pretrained: str | None = field(default=None, metadata={"help": "Local weights file or folder (never downloaded)."})
    input_size: int = field(default=64, metadata={"help": "Side the images are resized to."})
    train_size: int = field(default=4000, metadata={"help": "Composites: training images."})
    test_size: int = field(default=1000, metadata={"help": "Composites: images behind each test version."})
    dataset_seed: int = field(default=0, metadata={"help": "Composites: data seed."})
    heatmap_samples: int = field(default=64, metadata={"help": "Test images whose heatmaps give the background fraction."})


def main(argv: list[str] | None = None) -> dict:
    script, args = HfArgumentParser((ScriptArguments, ISNetTrainingArguments)).parse_args_into_dataclasses(argv)
    if script.dogs_dir is None:
        ds = load_photo_composites(seed=script.dataset_seed, train_size=script.train_size, test_size=script.test_size)
        train, tests = ds["train"], {v: ds[f"test_{v}"] for v in ("iid", "ood", "deceiving")}
        dataset_name = "Photo composites (hf_isnet.data.load_photo_composites)"
    else:
        root = Path(script.dogs_dir)
        has_split = (root / "train_list.mat").is_file() and (root / "test_list.mat").is_file()
        if has_split:
            train = load_stanford_dogs(root, script.masks_dir, split="train")
            tests = {"test": load_stanford_dogs(root, script.masks_dir, split="test")}
        else:
            split = load_stanford_dogs(root, script.masks_dir).train_test_split(test_size=0.2, seed=script.dataset_seed,
                                                                                  stratify_by_column="label")
            train, tests = split["train"], {"test": split["test"]}
        dataset_name = "Stanford Dogs"
    labels = train.features["label"].names
    model = create_model(script.model_name, labels=labels, pretrained=script.pretrained, input_size=script.input_size)
    trainer = ISNetTrainer(model=model, args=args, train_dataset=train, eval_dataset=next(iter(tests.values())))
    trainer.train()

    out = Path(args.output_dir)
    result: dict = {}
    if set(tests) == {"iid", "ood", "deceiving"}:
        report = shortcut_report(trainer, tests, model_name=args.variant, heatmap_samples=script.heatmap_samples)
        print(report.to_table())
        result = report.to_dict()
        results = {e.version: {"accuracy": e.metrics["accuracy"], "roc_auc": e.metrics["roc_auc_ovo"]}
                   for e in report.entries}
    else:
        metrics = trainer.evaluate(tests["test"], metric_key_prefix="test")
        print(metrics)
        result = metrics
        results = {"test": {"accuracy": metrics["test_accuracy"], "roc_auc": metrics["test_roc_auc_ovo"]}}
    if trainer.is_world_process_zero():
        out.mkdir(parents=True, exist_ok=True)
        if set(tests) == {"iid", "ood", "deceiving"}:
            report.to_json(out / "shortcut.json")
        heatmap_figure(trainer, next(reversed(tests.values())), out / "heatmaps.png")
        results = {k: {m: v for m, v in r.items() if math.isfinite(v)} for k, r in results.items()}  # no NaN AUC
        trainer.model_card.update(dataset_name=dataset_name, heatmap=str(out / "heatmaps.png"), results=results)
    trainer.save_model()
    return result


if __name__ == "__main__":
    main()
