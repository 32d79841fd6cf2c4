"""End-to-end runs of the example scripts on small subsets and on folder fixtures written here."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FAST = ["--use_cpu", "--report_to", "none", "--save_strategy", "no", "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--relevance_range", "1,10",
        "--disable_tqdm", "true", "--dataloader_num_workers", "0"]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch, single_thread):
    monkeypatch.setenv("HF_ISNET_CACHE", str(tmp_path / "cache"))


def assert_saved_model(out: Path) -> None:
    config = json.loads((out / "config.json").read_text())
    assert config["isnet"]["variant"] and config["num_classes"] == len(config["label_names"])
    for name in ("model.safetensors", "README.md", "heatmaps.png"):
        assert (out / name).is_file(), name
    assert "model-index" in (out / "README.md").read_text()


def test_train_mnist_small_subset(tmp_path):
    out = tmp_path / "mnist"
    report = load_example("train_mnist").main(
        ["--output_dir", str(out), "--train_size", "48", "--test_size", "16", "--heatmap_samples", "8"] + FAST)
    versions = {e["version"] for e in report["entries"]}
    assert versions == {"iid", "ood", "deceiving"}
    for entry in report["entries"]:
        assert 0.0 <= entry["metrics"]["accuracy"] <= 1.0 and entry["metrics"]["num_samples"] == 16
    assert json.loads((out / "shortcut.json").read_text())["entries"]
    assert_saved_model(out)


def test_train_dogs_default_photo_composites(tmp_path):
    pytest.importorskip("skimage")
    from hf_isnet.data._sources import fashion_mnist_dir

    try:
        fashion_mnist_dir()
    except FileNotFoundError as err:  # make test installs it; say so rather than skip silently
        pytest.fail(f"Fashion-MNIST is missing: {err}")
    out = tmp_path / "dogs"
    report = load_example("train_dogs").main(
        ["--output_dir", str(out), "--train_size", "40", "--test_size", "12", "--input_size", "32",
         "--heatmap_samples", "8"] + FAST)
    assert {e["version"] for e in report["entries"]} == {"iid", "ood", "deceiving"}
    assert_saved_model(out)


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def test_train_dogs_on_a_stanford_dogs_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "stanford_dogs"
    for breed in ("n02085620-Chihuahua", "n02085782-Japanese_spaniel"):
        for i in range(6):
            _write(root / "Images" / breed / f"{breed[:9]}_{i}.jpg", rng.integers(0, 255, (24, 28, 3)))
            ann = root / "Annotation" / breed / f"{breed[:9]}_{i}"
            ann.parent.mkdir(parents=True, exist_ok=True)
            ann.write_text("<annotation><size><width>28</width><height>24</height></size><object><name>dog"
                           "</name><bndbox><xmin>4</xmin><ymin>3</ymin><xmax>20</xmax><ymax>18</ymax></bndbox>"
                           "</object></annotation>")
    out = tmp_path / "dogs"
    metrics = load_example("train_dogs").main(
        ["--output_dir", str(out), "--dogs_dir", str(root), "--input_size", "32"] + FAST)
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert_saved_model(out)
    config = json.loads((out / "config.json").read_text())
    assert config["label_names"] == ["Chihuahua", "Japanese_spaniel"]


def test_train_xray_on_a_folder_with_an_ood_test_folder(tmp_path):
    rng = np.random.default_rng(1)
    for split, n in (("train", 6), ("hospital_b", 3)):
        for label in ("normal", "pneumonia"):
            for i in range(n):
                _write(tmp_path / split / label / "images" / f"{i}.png", rng.integers(0, 255, (28, 28)))
                lungs = np.zeros((28, 28))
                lungs[4:24, 3:12] = 255
                lungs[4:24, 16:25] = 255
                _write(tmp_path / split / label / "masks" / f"{i}.png", lungs)
    out = tmp_path / "xray"
    results = load_example("train_xray").main(
        ["--output_dir", str(out), "--train_dir", str(tmp_path / "train"), "--test_dirs",
         str(tmp_path / "hospital_b"), "--model_name", "resnet18", "--input_size", "32"] + FAST)
    assert set(results) == {"hospital_b"}
    assert 0.0 <= results["hospital_b"]["test_hospital_b_accuracy"] <= 1.0
    assert_saved_model(out)
