"""Train an ISNet for chest X-ray classification with lung masks, and test it out of distribution.

Layout of ``--train_dir`` (and of each ``--test_dirs`` folder), see ``hf_isnet.data.load_xray_folder``::

    <dir>/<label>/images/<name>.png
    <dir>/<label>/masks/<name>.png        the lung segmentation, same file name

or a ``metadata.csv`` with ``file_name, mask_file_name, label``. Test folders from hospitals that did not
contribute to training measure what shortcut learning costs (the paper's COVID-19 experiment).

    python examples/train_xray.py --train_dir /data/xray/train --test_dirs /data/xray/ood_hospital \\
        --output_dir outputs/xray --variant dual --model_name densenet121 --input_size 224
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from hf_isnet import ISNetTrainer, ISNetTrainingArguments, create_model
from hf_isnet.data import load_xray_folder
from hf_isnet.evaluation import heatmap_figure


@dataclass
class ScriptArguments:
    train_dir: str = field(metadata={"help": "Training folder (images, lung masks, labels)."})
    test_dirs: list[str] = field(default_factory=list, metadata={"help": "Test folders (e.g. other hospitals)."})
    model_name: str = field(default="densenet121", metadata={"help": "timm architecture (ReLU-based)."})
    pretrained: str | None = field(default=None, metadata={"help": "Local weights file or folder (never downloaded)."})
    input_size: int = field(default=224, metadata={"help": "Side the X-rays are resized to."})


def main(argv: list[str] | None = None) -> dict:
    script, args = HfArgumentParser((ScriptArguments, ISNetTrainingArguments)).parse_args_into_dataclasses(argv)
    train = load_xray_folder(script.train_dir)
    labels = train.features["label"].names
    tests = {Path(d).name: load_xray_folder(d, label_names=labels) for d in script.test_dirs}
    model = create_model(script.model_name, labels=labels, pretrained=script.pretrained, input_size=script.input_size)
    trainer = ISNetTrainer(model=model, args=args, train_dataset=train,
                           eval_dataset=next(iter(tests.values()), None))
    trainer.train()
    results = {name: trainer.evaluate(ds, metric_key_prefix=f"test_{name}") for name, ds in tests.items()}
    for name, metrics in results.items():
        print(name, {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
    out = Path(args.output_dir)
    if trainer.is_world_process_zero():
        out.mkdir(parents=True, exist_ok=True)
        heatmap_figure(trainer, next(iter(tests.values()), train), out / "heatmaps.png")
        trainer.model_card.update(
            dataset_name=Path(script.train_dir).name, heatmap=str(out / "heatmaps.png"),
            results={name: {k: v for k, v in (("accuracy", m[f"test_{name}_accuracy"]),
                                              ("roc_auc", m[f"test_{name}_roc_auc_ovo"])) if math.isfinite(v)}
                     for name, m in results.items()},  # a one-class test folder has no AUC
        )
    trainer.save_model()
    return results


if __name__ == "__main__":
    main()
