"""hf_isnet.modeling: timm classifiers with labels, local weights only, aligned image + mask transforms."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform

from hf_isnet.modeling import ImageMaskTransform, build_transforms, create_model, data_config

LABELS = ["normal", "pneumonia", "covid"]


def _model(labels=LABELS, **kwargs):
    torch.manual_seed(0)
    return create_model("resnet18", labels=labels, input_size=32, **kwargs)


def _random_image(h=40, w=48, mode="RGB", seed=0):
    rng = np.random.RandomState(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rng.randint(0, 256, shape, dtype=np.uint8), mode=mode)


def test_create_model_attaches_labels_and_keeps_pretrained_cfg():
    model = _model()
    reference = create_model("resnet18", labels=["a"]).pretrained_cfg
    cfg = model.pretrained_cfg
    assert model.num_classes == 3
    assert cfg["label_names"] == LABELS and cfg["num_classes"] == 3
    assert model.default_cfg is cfg
    for key in (
        "mean",
        "std",
        "interpolation",
        "crop_pct",
        "crop_mode",
        "classifier",
        "first_conv",
        "architecture",
    ):
        assert cfg[key] == reference[key]
    assert cfg["input_size"] == (3, 32, 32)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    assert data_config(model)["input_size"] == (3, 32, 32)


def test_create_model_single_channel_adapts_mean_std():
    model = create_model("resnet18", labels=["a", "b"], in_chans=1, input_size=(28, 30))
    config = data_config(model)
    assert config["input_size"] == (1, 28, 30)
    assert len(config["mean"]) == 1 and len(config["std"]) == 1
    assert config["mean"][0] == pytest.approx(np.mean([0.485, 0.456, 0.406]))
    assert model.eval()(torch.zeros(1, 1, 28, 30)).shape == (1, 2)


def test_densenet_builds_with_its_classifier_name():
    model = create_model("densenet121", labels=["a", "b"], input_size=32)
    assert model.pretrained_cfg["classifier"] == "classifier"
    assert model.classifier.out_features == 2


@pytest.mark.parametrize("labels", [[], ["a", "a"], "ab", [1, 2]])
def test_bad_labels_are_refused(labels):
    with pytest.raises((TypeError, ValueError)):
        create_model("resnet18", labels=labels)


def test_no_downloads():
    with pytest.raises(ValueError, match="never downloads"):
        create_model("resnet18", labels=LABELS, pretrained=True)
    with pytest.raises(TypeError, match="num_classes"):
        create_model("resnet18", labels=LABELS, num_classes=3)
    with pytest.raises(FileNotFoundError, match="local"):
        create_model("resnet18", labels=LABELS, pretrained="timm/resnet18.a1_in1k")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_load_local_weight_file(tmp_path, suffix):
    source = _model()
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    loaded = create_model("resnet18", labels=LABELS, pretrained=path, input_size=32)
    for key, value in source.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_timm_wrapper_prefix_is_stripped(tmp_path):
    source = _model()
    save_file({f"timm_model.{k}": v for k, v in source.state_dict().items()}, tmp_path / "w.safetensors")
    loaded = create_model("resnet18", labels=LABELS, pretrained=tmp_path / "w.safetensors", input_size=32)
    assert torch.equal(loaded.conv1.weight, source.conv1.weight)


def test_other_classifier_size_is_dropped_with_a_log_line(tmp_path, caplog):
    source = create_model("resnet18", labels=[str(i) for i in range(10)], input_size=32)
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    with caplog.at_level(logging.WARNING, logger="hf_isnet.modeling"):
        torch.manual_seed(1)
        loaded = create_model("resnet18", labels=LABELS, pretrained=tmp_path / "w.safetensors")
    assert "fc.weight (10, 512) -> (3, 512)" in caplog.text and "fc.bias" in caplog.text
    assert torch.equal(loaded.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert loaded.fc.weight.shape == (3, 512)


def test_mismatched_backbone_keys_are_listed(tmp_path):
    source = create_model("resnet18", labels=LABELS, in_chans=3)
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match=r"conv1\.weight: \(64, 3, 7, 7\) in file, \(64, 1, 7, 7\) in model"):
        create_model("resnet18", labels=LABELS, in_chans=1, pretrained=tmp_path / "w.safetensors")
    missing = {k: v for k, v in source.state_dict().items() if not k.startswith("layer4.1.")}
    save_file(missing, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"missing in file .*layer4\.1\.conv1\.weight"):
        create_model("resnet18", labels=LABELS, pretrained=tmp_path / "m.safetensors")


def test_folder_weights_bring_their_preprocessing_and_architecture_check(tmp_path):
    from hf_isnet.hub import save_pretrained

    source = create_model("resnet18", labels=LABELS, input_size=48, pretrained_cfg_overlay={"crop_pct": 1.0})
    save_pretrained(source, tmp_path / "saved")
    loaded = create_model("resnet18", labels=["x", "y", "z"], pretrained=tmp_path / "saved")
    assert loaded.pretrained_cfg["input_size"] == (3, 48, 48)
    assert loaded.pretrained_cfg["crop_pct"] == 1.0
    assert loaded.pretrained_cfg["label_names"] == ["x", "y", "z"]
    assert torch.equal(loaded.fc.weight, source.fc.weight)
    with pytest.raises(ValueError, match="architecture 'resnet18'"):
        create_model("resnet34", labels=LABELS, pretrained=tmp_path / "saved")


def test_eval_transform_matches_timm_exactly():
    model = _model()
    image = _random_image()
    expected = create_transform(**data_config(model), is_training=False)(image)
    pixels, mask = ImageMaskTransform(model)(image)
    assert mask is None
    assert type(pixels) is torch.Tensor and pixels.dtype == torch.float32
    assert torch.equal(pixels, expected)


def test_train_transform_keeps_image_and_mask_aligned():
    model = _model()
    # A bright square on black: after any crop/flip, the mask must still cover exactly the bright pixels.
    array = np.zeros((64, 80), dtype=np.uint8)
    array[12:44, 30:70] = 255
    image, mask = Image.fromarray(array).convert("RGB"), Image.fromarray(array)
    transform = ImageMaskTransform(model, train=True, augment=True)
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(3, 1, 1)
    torch.manual_seed(0)
    flips = 0
    for _ in range(20):
        pixels, out_mask = transform(image, mask)
        assert pixels.shape == (3, 32, 32) and out_mask.shape == (1, 32, 32)
        assert out_mask.dtype == torch.float32 and set(out_mask.unique().tolist()) <= {0.0, 1.0}
        bright = ((pixels * std + mean).mean(0, keepdim=True) > 0.5).float()
        assert (bright == out_mask).float().mean() > 0.95  # only interpolated edges may differ
        flips += int(
            out_mask[0, :, :4].sum() > out_mask[0, :, -4:].sum()
        )  # the square sits right unless flipped
    assert 0 < flips < 20


def test_channels_follow_the_model():
    rgb = ImageMaskTransform(_model())
    pixels, _ = rgb(_random_image(mode="L"))
    assert pixels.shape == (3, 32, 32)
    grey = ImageMaskTransform(create_model("resnet18", labels=LABELS, in_chans=1, input_size=32))
    pixels, _ = grey(_random_image(mode="RGB"))
    assert pixels.shape == (1, 32, 32)


def test_masks_binary_soft_and_mismatched():
    transform = ImageMaskTransform(_model())
    image = _random_image(40, 48)
    for values, mode in (([0, 1], "L"), ([0, 255], "L")):
        array = np.full((40, 48), values[0], np.uint8)
        array[:, 24:] = values[1]
        _, mask = transform(image, Image.fromarray(array, mode=mode))
        assert mask.sum() > 0 and set(mask.unique().tolist()) == {0.0, 1.0}
    _, mask = transform(image, Image.fromarray(np.ones((40, 48), bool)))  # a mode '1' mask
    assert mask.min() == 1.0
    soft = np.tile(np.linspace(0, 255, 48).astype(np.uint8), (40, 1))
    with pytest.raises(ValueError, match="not binary.*mask_threshold"):
        transform(image, Image.fromarray(soft))
    _, mask = ImageMaskTransform(_model(), mask_threshold=0.5)(image, Image.fromarray(soft))
    assert 0 < mask.mean() < 1
    with pytest.raises(ValueError, match=r"mask has shape \(20, 48\).*\(40, 48\)"):
        transform(image, Image.fromarray(np.zeros((20, 48), np.uint8)))


def test_border_crop_mode_is_refused():
    model = _model(pretrained_cfg_overlay={"crop_mode": "border"})
    with pytest.raises(ValueError, match="crop_mode='border'"):
        build_transforms(model)
    assert build_transforms(model, train=True)  # training crops don't depend on crop_mode
