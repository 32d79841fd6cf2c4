"""ISNetTrainer: training of every variant, the loss, evaluation, calibration, saving, pushing, resuming,
input checks, gradient accumulation and bf16 (tiny resnet18s on CPU, a few steps each)."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import LABELS
from PIL import Image

from hf_isnet import hub
from hf_isnet.calibration import CalibrationEntry, RelevanceCalibration
from hf_isnet.losses import background_loss, foreground_loss
from hf_isnet.trainer import CALIBRATION_NAME, ISNetTrainer
from hf_isnet.training_args import ISNetTrainingArguments
from hf_isnet.variants import ISNetObjective

HEATMAP_KEYS = ("heatmap_loss", "background_fraction")

pytestmark = pytest.mark.usefixtures("single_thread")


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _max_change(before, model):
    after = model.state_dict()
    nonfinite = [k for k, v in after.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not nonfinite, f"non-finite weights after training: {nonfinite}"
    return max(float((after[k].float() - v.float()).abs().max()) for k, v in before.items() if v.is_floating_point())


def _step_logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def _check_logs(trainer, variant, steps):
    logs = _step_logs(trainer)
    assert len(logs) == steps
    for entry in logs:
        assert math.isfinite(entry["loss"]) and math.isfinite(entry["classification_loss"])
        if variant == "none":
            assert not set(HEATMAP_KEYS) & set(entry)
            assert entry["loss"] == pytest.approx(entry["classification_loss"], rel=1e-5)
        else:
            assert math.isfinite(entry["heatmap_loss"]) and entry["heatmap_loss"] >= 0
            assert 0.0 <= entry["background_fraction"] <= 1.0
            # one logged step is one batch: loss = (1 - P) CE + P L_LRP
            p = trainer.args.heatmap_loss_weight
            expected = (1 - p) * entry["classification_loss"] + p * entry["heatmap_loss"]
            assert entry["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-5)


def _calibration(keys=("input",)):
    entries = {k: CalibrationEntry(c1=1.0, c2=10.0, mean=5.0, std=1.0, count=8) for k in keys}
    return RelevanceCalibration(entries=entries, metadata={"variant": "selective"})


# ----------------------------------------------------------------------------------------- training runs
@pytest.mark.parametrize("variant", ["none", "original", "dual", "selective", "stochastic"])
def test_train_each_variant(variant, make_image_dataset, make_tiny_model, make_isnet_args):
    model = make_tiny_model()
    before = _params(model)
    trainer = ISNetTrainer(model=model, args=make_isnet_args(variant=variant), train_dataset=make_image_dataset())
    trainer.train()
    assert trainer.state.global_step == 3
    assert _max_change(before, model) > 0
    _check_logs(trainer, variant, steps=3)
    assert trainer.calibration is None  # relevance_range "1,10": no calibration
    assert not (Path(trainer.args.output_dir) / CALIBRATION_NAME).exists()


def test_train_lds_auto_and_first_layer_zb(make_image_dataset, make_tiny_model, make_isnet_args):
    model = make_tiny_model()
    before = _params(model)
    args = make_isnet_args(variant="selective", lds_layers="auto", first_layer_zb=True, max_steps=2)
    trainer = ISNetTrainer(model=model, args=args, train_dataset=make_image_dataset())
    assert trainer.objective.map_keys(model) == ["input", "layer1", "layer2", "layer3", "layer4"]
    assert trainer.objective.first_layer == "zb" and trainer.objective.input_bounds is not None
    trainer.train()
    assert _max_change(before, model) > 0
    logs = _step_logs(trainer)
    assert len(logs) == 2
    for entry in logs:
        assert all(math.isfinite(entry[k]) for k in ("loss", "grad_norm", "classification_loss", *HEATMAP_KEYS))


def test_train_with_auto_relevance_range_then_reuse(make_image_dataset, make_tiny_model, make_isnet_args, monkeypatch):
    ds = make_image_dataset()
    model = make_tiny_model()
    before = _params(model)
    args = make_isnet_args(variant="selective", relevance_range="auto", calibration_epochs=1, max_steps=2)
    trainer = ISNetTrainer(model=model, args=args, train_dataset=ds)
    assert trainer.needs_calibration
    trainer.train()
    saved = Path(args.output_dir) / CALIBRATION_NAME
    assert saved.is_file()
    calibration = RelevanceCalibration.from_json(saved)
    assert calibration.keys() == ["input"]
    assert trainer.objective.relevance_range is trainer.calibration
    assert trainer.calibration.ranges() == calibration.ranges()
    assert _max_change(before, model) > 0
    _check_logs(trainer, "selective", steps=2)

    # A second run in the same output_dir reuses the file: no calibration.
    def refuse(self):
        raise AssertionError("calibrate() must not run when output_dir holds a calibration")

    monkeypatch.setattr(ISNetTrainer, "calibrate", refuse)
    again = ISNetTrainer(model=make_tiny_model(), args=make_isnet_args(
        variant="selective", relevance_range="auto", calibration_epochs=1, max_steps=1), train_dataset=ds)
    assert not again.needs_calibration
    assert again.calibration.ranges() == calibration.ranges()
    again.train()
    assert again.state.global_step == 1


def test_calibrate_keys_and_restores_initial_weights(make_image_dataset, make_tiny_model, make_isnet_args):
    """Dual + LDS: one range per map and rule; the ISNet starts from the original initialisation."""
    model = make_tiny_model()
    args = make_isnet_args(variant="dual", lds_layers="layer3,layer4", relevance_range="auto",
                           calibration_epochs=1)
    trainer = ISNetTrainer(model=model, args=args, train_dataset=make_image_dataset())
    initial = _params(model)
    calibration = trainer.calibrate()

    expected = {f"{k}/{r}" for k in ("input", "layer3", "layer4") for r in ("epsilon", "zplus")}
    assert set(calibration.keys()) == expected == set(trainer.objective.map_keys(model))
    for key in expected:
        c1, c2 = calibration[key]
        entry = calibration.entries[key]
        assert 0 < c1 <= c2 and entry.count == 8
        assert c1 == pytest.approx(max(entry.mean / 5, entry.mean - 3 * entry.std))
        assert c2 == pytest.approx(min(25 * c1, entry.mean + 3 * entry.std))
    data = json.loads((Path(args.output_dir) / CALIBRATION_NAME).read_text())
    assert set(data["entries"]) == expected
    # the weights right after calibration are the initial ones (parameters and BatchNorm statistics)
    after = model.state_dict()
    assert set(after) == set(initial)
    for key, value in initial.items():
        assert torch.equal(after[key], value), key


# ----------------------------------------------------------------------------------------- the loss
def test_compute_loss_is_the_isnet_objective(make_image_dataset, make_tiny_model, make_isnet_args):
    p, c1, c2 = 0.6, 2.0, 20.0
    model = make_tiny_model()
    # attenuation off: the loss is compared with the paper's objective on the very same images
    args = make_isnet_args(variant="selective", heatmap_loss_weight=p, relevance_range=f"{c1},{c2}",
                           gwrp_decay=0.8, E=2.0, w1=1.5, w2=0.5, background_attenuation=False)
    trainer = ISNetTrainer(model=model, args=args, train_dataset=make_image_dataset())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 16, 16, generator=g)
    masks = torch.zeros(4, 1, 16, 16)
    masks[:, :, 3:12, 4:13] = 1
    labels = torch.tensor([0, 1, 2, 1])
    model.train()
    torch.manual_seed(0)
    loss = trainer.compute_loss(model, {"pixel_values": x, "masks": masks, "labels": labels})

    # By hand: the same heatmaps, the losses of hf_isnet.losses and the CE of the model's logits.
    torch.manual_seed(0)
    objective = ISNetObjective("selective", heatmap_loss_weight=p, relevance_range=(c1, c2))
    logits, maps = objective.heatmaps(model, x, create_graph=True)
    heat = maps["input"]
    l_lrp = 1.5 * background_loss(heat, masks, d=0.8, E=2.0) + 0.5 * foreground_loss(heat, masks, c1, c2)
    ce = F.cross_entropy(model(x), labels)
    assert torch.allclose(logits, model(x), atol=1e-5)
    expected = (1 - p) * ce + p * l_lrp
    assert loss.requires_grad
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    # the logged parts are the same numbers
    parts = {k: float(total) / count for k, (total, count) in trainer._sums.items()}
    assert parts["classification_loss"] == pytest.approx(float(ce.detach()), rel=1e-5)
    assert parts["heatmap_loss"] == pytest.approx(float(l_lrp.detach()), rel=1e-5)


# ----------------------------------------------------------------------------------------- evaluation
@pytest.mark.parametrize("explain_eval", [False, True])
def test_evaluate(explain_eval, make_image_dataset, make_tiny_model, make_isnet_args):
    ds = make_image_dataset()
    args = make_isnet_args(variant="selective", explain_eval=explain_eval)
    trainer = ISNetTrainer(model=make_tiny_model(), args=args, train_dataset=ds, eval_dataset=ds)
    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_accuracy", "eval_macro_f1", "eval_roc_auc_ovo"):
        assert key in metrics, metrics
    assert math.isfinite(metrics["eval_loss"]) and 0.0 <= metrics["eval_accuracy"] <= 1.0
    heat = {"eval_heatmap_loss", "eval_background_fraction"}
    if explain_eval:
        assert heat <= set(metrics)
        assert math.isfinite(metrics["eval_heatmap_loss"]) and 0 <= metrics["eval_background_fraction"] <= 1
        assert "eval_classification_loss" not in metrics
    else:
        assert not heat & set(metrics)
        assert not any("heatmap" in k or "background" in k for k in metrics)


def test_explain_eval_under_no_grad(make_image_dataset, make_tiny_model, make_isnet_args):
    model = make_tiny_model()
    args = make_isnet_args(variant="dual", explain_eval=True)
    trainer = ISNetTrainer(model=model, args=args, train_dataset=make_image_dataset())
    batch = trainer._eval_collator([make_image_dataset()[i] for i in range(2)])
    model.eval()
    with torch.no_grad():
        loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    assert not loss.requires_grad and math.isfinite(float(loss))
    assert outputs["logits"].shape == (2, len(LABELS))
    assert set(trainer._eval_sums) == {"classification_loss", "heatmap_loss", "background_fraction"}
    assert all(p.grad is None for p in model.parameters())


def test_eval_without_masks_in_plain_mode(make_image_dataset, make_tiny_model, make_isnet_args):
    """Evaluation needs no masks unless explain_eval (a test set of images and labels only)."""
    args = make_isnet_args(variant="selective")
    trainer = ISNetTrainer(model=make_tiny_model(), args=args, train_dataset=make_image_dataset())
    metrics = trainer.evaluate(make_image_dataset(n=6, with_mask=False))
    assert "eval_accuracy" in metrics


# ----------------------------------------------------------------------------------------- saving
SUBPROCESS_LOAD = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForImageClassification
    folder, work = sys.argv[1], sys.argv[2]
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(pixel_values=torch.load(work + "/x.pt")).logits
    torch.save({"logits": logits, "hf_isnet": any(n.split(".")[0] == "hf_isnet" for n in sys.modules),
                "labels": [model.config.id2label[i] for i in range(model.config.num_labels)]}, work + "/out.pt")
    """
)


def test_save_model_hub_layout_loads_without_hf_isnet(make_image_dataset, make_tiny_model, make_isnet_args,
                                                      tmp_path):
    model = make_tiny_model()
    args = make_isnet_args(variant="selective", relevance_range="auto", max_steps=2)
    calibration = _calibration()
    trainer = ISNetTrainer(model=model, args=args, train_dataset=make_image_dataset(), calibration=calibration)
    assert not trainer.needs_calibration
    trainer.train()
    trainer.save_model()
    out = Path(args.output_dir)
    for name in ("config.json", "model.safetensors", "README.md", CALIBRATION_NAME):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["num_classes"] == len(LABELS)
    assert config["label_names"] == LABELS
    block = hub.load_isnet_config(out)
    assert block == config["isnet"]
    assert block["variant"] == "selective" and block["relevance_range"] == "auto"
    assert RelevanceCalibration.from_dict(block["calibration"]).ranges() == calibration.ranges()
    assert RelevanceCalibration.from_json(out / CALIBRATION_NAME).ranges() == calibration.ranges()

    model.eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    torch.save(x, tmp_path / "x.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", SUBPROCESS_LOAD, str(out), str(tmp_path)], check=True, env=env,
                   timeout=300)
    result = torch.load(tmp_path / "out.pt")
    assert result["hf_isnet"] is False
    assert result["labels"] == LABELS
    torch.testing.assert_close(result["logits"], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("with_heatmap", [False, True])
def test_push_to_hub_offline(with_heatmap, make_image_dataset, make_tiny_model, make_isnet_args, monkeypatch,
                             tmp_path):
    from huggingface_hub import HfApi

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = repo_id
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["upload"] = (repo_id, sorted(os.listdir(folder_path)))
        calls["card"] = (Path(folder_path) / "README.md").read_text()
        calls["config"] = json.loads((Path(folder_path) / "config.json").read_text())
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    args = make_isnet_args(variant="selective", hub_model_id="someone/isnet-tiny")
    trainer = ISNetTrainer(model=make_tiny_model(), args=args, train_dataset=make_image_dataset(),
                           calibration=_calibration())
    expected = ["README.md", "config.json", "model.safetensors"]
    if with_heatmap:
        figure = tmp_path / "figure.png"
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(figure)
        trainer.model_card = {"heatmap": str(figure)}
        expected = sorted([*expected, "heatmaps.png"])
    assert trainer.push_to_hub() == "commit-info"
    assert calls["create_repo"] == "someone/isnet-tiny"
    assert calls["upload"] == ("someone/isnet-tiny", expected)
    assert "someone/isnet-tiny" in calls["card"]
    assert calls["config"]["isnet"]["variant"] == "selective" and "calibration" in calls["config"]["isnet"]
    assert ("heatmaps.png" in calls["card"]) == with_heatmap


def test_resume_from_checkpoint_restores_calibration(make_image_dataset, make_tiny_model, make_isnet_args,
                                                     monkeypatch):
    ds = make_image_dataset()
    args = make_isnet_args(variant="selective", relevance_range="auto", calibration_epochs=1, max_steps=2,
                           save_strategy="steps", save_steps=2)
    first = ISNetTrainer(model=make_tiny_model(), args=args, train_dataset=ds)
    first.train()
    out = Path(args.output_dir)
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / CALIBRATION_NAME).is_file()
    assert (checkpoint / "model.safetensors").is_file()
    calibrated = first.calibration.ranges()
    # Only the checkpoint folder holds the calibration now: the resumed run must read it from there.
    (out / CALIBRATION_NAME).unlink()

    def refuse(self):
        raise AssertionError("calibrate() must not run again when resuming")

    monkeypatch.setattr(ISNetTrainer, "calibrate", refuse)
    resumed_args = make_isnet_args(variant="selective", relevance_range="auto", calibration_epochs=1,
                                   max_steps=4, save_strategy="no")
    resumed = ISNetTrainer(model=make_tiny_model(seed=1), args=resumed_args, train_dataset=ds)
    assert resumed.needs_calibration  # no file in output_dir: only the checkpoint can provide it
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    assert resumed.calibration.ranges() == calibrated
    assert resumed.objective.relevance_range is resumed.calibration
    assert [e["step"] for e in _step_logs(resumed)][-2:] == [3, 4]


def test_resume_from_last_checkpoint_with_true(make_image_dataset, make_tiny_model, make_isnet_args,
                                               monkeypatch):
    ds = make_image_dataset()
    args = make_isnet_args(variant="selective", relevance_range="auto", calibration_epochs=1, max_steps=1,
                           save_strategy="steps", save_steps=1)
    first = ISNetTrainer(model=make_tiny_model(), args=args, train_dataset=ds, calibration=_calibration())
    first.train()
    monkeypatch.setattr(ISNetTrainer, "calibrate", lambda self: pytest.fail("calibrate() ran on resume"))
    resumed = ISNetTrainer(model=make_tiny_model(), args=make_isnet_args(
        variant="selective", relevance_range="auto", max_steps=2), train_dataset=ds)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 2
    assert resumed.calibration.ranges() == _calibration().ranges()


# ----------------------------------------------------------------------------------------- input checks
def test_missing_mask_column_fails_at_construction(make_image_dataset, make_tiny_model, make_isnet_args):
    ds = make_image_dataset(with_mask=False)
    with pytest.raises(ValueError, match="'mask'") as err:
        ISNetTrainer(model=make_tiny_model(), args=make_isnet_args(variant="selective"), train_dataset=ds)
    message = str(err.value)
    assert "mask_column" in message and all(c in message for c in ds.column_names)
    # a standard classifier needs no masks
    ISNetTrainer(model=make_tiny_model(), args=make_isnet_args(variant="none"), train_dataset=ds)


def test_renamed_mask_column(make_image_dataset, make_tiny_model, make_isnet_args):
    ds = make_image_dataset(n=4).rename_column("mask", "segmentation")
    args = make_isnet_args(variant="selective", mask_column="segmentation", max_steps=1)
    trainer = ISNetTrainer(model=make_tiny_model(), args=args, train_dataset=ds)
    trainer.train()
    assert "heatmap_loss" in _step_logs(trainer)[0]


def test_mask_size_mismatch_fails_at_construction(make_image_dataset, make_tiny_model, make_isnet_args):
    ds = make_image_dataset(size=32, mask_size=16)
    with pytest.raises(ValueError, match=r"\(16, 16\).*\(32, 32\)"):
        ISNetTrainer(model=make_tiny_model(input_size=32), args=make_isnet_args(), train_dataset=ds)


def test_soft_masks_fail_at_construction(make_image_dataset, make_tiny_model, make_isnet_args):
    with pytest.raises(ValueError, match="not binary"):
        ISNetTrainer(model=make_tiny_model(), args=make_isnet_args(), train_dataset=make_image_dataset(soft=True))


def test_labels_out_of_range_fail_at_construction(make_image_dataset, make_tiny_model, make_isnet_args):
    ds = make_image_dataset(n=4, labels=[0, 1, 5, 2])
    with pytest.raises(ValueError, match=r"\[5\].*3 classes"):
        ISNetTrainer(model=make_tiny_model(), args=make_isnet_args(), train_dataset=ds)


def test_gelu_backbone_fails_at_construction(make_image_dataset, make_tiny_model, make_isnet_args):
    model = make_tiny_model(act_layer="gelu")
    with pytest.raises(TypeError, match="GELU"):
        ISNetTrainer(model=model, args=make_isnet_args(), train_dataset=make_image_dataset(n=4))
    # a standard classifier may use any activation
    ISNetTrainer(model=model, args=make_isnet_args(variant="none"), train_dataset=make_image_dataset(n=4))


def test_unknown_lds_layer_fails_at_construction(make_image_dataset, make_tiny_model, make_isnet_args):
    with pytest.raises(ValueError, match="layer9"):
        ISNetTrainer(model=make_tiny_model(), args=make_isnet_args(lds_layers="layer1,layer9"),
                     train_dataset=make_image_dataset(n=4))


def test_stale_calibration_file_fails_at_construction(make_image_dataset, make_tiny_model, make_isnet_args):
    """A calibration made for the Selective ISNet cannot serve the Dual ISNet (other map keys)."""
    args = make_isnet_args(variant="dual", relevance_range="auto")
    Path(args.output_dir).mkdir(parents=True)
    _calibration().to_json(Path(args.output_dir) / CALIBRATION_NAME)
    with pytest.raises(ValueError, match=r"input/epsilon.*another variant or lds_layers"):
        ISNetTrainer(model=make_tiny_model(), args=args, train_dataset=make_image_dataset(n=4))


@pytest.mark.parametrize("setting", [{"torch_compile": True}, {"ddp_static_graph": True}])
def test_double_backward_breaking_settings_are_refused(setting, tmp_path):
    name = next(iter(setting))
    with pytest.raises(ValueError, match=name):
        ISNetTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **setting)


def test_plain_training_arguments_are_refused(make_tiny_model, tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="ISNetTrainingArguments"):
        ISNetTrainer(model=make_tiny_model(), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True))


# ----------------------------------------------------------------------------------------- data pipelines
def test_streaming_dataset(make_image_dataset, make_tiny_model, make_isnet_args):
    """An IterableDataset (streaming) is checked on its first row and trains (with max_steps)."""
    ds = make_image_dataset(n=4).to_iterable_dataset()
    args = make_isnet_args(variant="selective", max_steps=1)
    trainer = ISNetTrainer(model=make_tiny_model(), args=args, train_dataset=ds)
    trainer.train()
    assert trainer.state.global_step == 1 and "heatmap_loss" in _step_logs(trainer)[0]


def test_calibration_uses_the_trainers_collator(make_image_dataset, make_tiny_model, make_isnet_args):
    """Soft masks with a thresholding collator: the calibration run reads the data the same way."""
    from hf_isnet.modeling import ImageMaskTransform, data_config
    from hf_isnet.trainer import ISNetCollator

    model = make_tiny_model()
    collator = ISNetCollator(ImageMaskTransform(data_config(model), train=True, mask_threshold=0.25))
    args = make_isnet_args(variant="selective", relevance_range="auto", calibration_epochs=1)
    trainer = ISNetTrainer(model=model, args=args, train_dataset=make_image_dataset(soft=True),
                           data_collator=collator)
    calibration = trainer.calibrate()
    assert calibration.keys() == ["input"] and calibration.entries["input"].count == 8


# ----------------------------------------------------------------------------------------- accumulation, bf16
@pytest.mark.parametrize("variant", ["none", "selective"])
def test_gradient_accumulation_matches_full_batch(variant, make_tensor_dataset, make_tiny_model,
                                                  make_isnet_args):
    """2 x batch 2 with accumulation == 1 x batch 4: the loss is divided by the accumulation steps.

    A BatchNorm-free model (batch statistics would differ), SGD (Adam's update is scale-free) and no
    clipping (it would hide a doubled gradient), so a wrong loss scale shows up in the parameters.
    """
    ds = make_tensor_dataset(n=4)
    results = []
    for batch, accumulation in ((4, 1), (2, 2)):
        model = make_tiny_model(batchnorm=False)
        before = _params(model)
        args = make_isnet_args(variant=variant, per_device_train_batch_size=batch,
                               gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd",
                               learning_rate=0.1, max_grad_norm=0.0, lr_scheduler_type="constant")
        ISNetTrainer(model=model, args=args, train_dataset=ds).train()
        results.append(_params(model))
    assert _max_change(before, model) > 1e-3  # the step is large enough to see a factor of 2
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, atol=1e-5, rtol=0, msg=key)


def test_bf16_on_cpu(make_image_dataset, make_tiny_model, make_isnet_args):
    # 32x32, not 16x16: at 16x16 resnet18's layer4.0.conv1 is a stride-2 conv on a 1x1 map, and oneDNN's
    # bf16 kernels then return sporadic garbage weight gradients (~1e32) in the double backward (torch
    # 2.14.1 CPU; deterministic with torch.backends.mkldnn.enabled = False).
    model = make_tiny_model(input_size=32)
    before = _params(model)
    args = make_isnet_args(variant="selective", bf16=True, max_steps=2)
    trainer = ISNetTrainer(model=model, args=args, train_dataset=make_image_dataset(size=32))
    trainer.train()
    assert _max_change(before, model) > 0
    logs = _step_logs(trainer)
    assert len(logs) == 2
    for entry in logs:
        assert all(math.isfinite(entry[k]) for k in ("loss", "grad_norm", "classification_loss", *HEATMAP_KEYS))
