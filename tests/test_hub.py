"""hf_isnet.hub: timm's native Hub layout, loadable without hf_isnet; model card; push (offline, patched)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from PIL import Image
from safetensors.torch import load_file

from hf_isnet.hub import load_isnet_config, make_model_card, push_to_hub, save_pretrained
from hf_isnet.modeling import ImageMaskTransform, create_model

LABELS = ["normal", "pneumonia", "covid"]
ISNET = {
    "variant": "dual",
    "heatmap_loss_weight": 0.7,
    "gwrp_decay": 0.9,
    "lds_layers": None,
    "zb_bounds": (-2.1, 2.6),
    "relevance_range": {"input": {"epsilon": [1.5, 30.0], "z+": [0.8, 12.0]}},
}
RESULTS = {"iid": {"accuracy": 0.979}, "ood": {"accuracy": 0.97}, "deceiving": {"accuracy": 0.96, "f1": 0.95}}

# Runs in a fresh interpreter that never imports hf_isnet: what a Hub user without it would do.
FRESH_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import timm
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    folder, work = sys.argv[1], sys.argv[2]
    x = torch.load(work + "/x.pt")
    image = Image.open(work + "/image.png")
    out = {}
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        out["transformers"] = model(pixel_values=x).logits
    out["id2label"] = [model.config.id2label[i] for i in range(model.config.num_labels)]
    out["processor"] = AutoImageProcessor.from_pretrained(folder)(image, return_tensors="pt")["pixel_values"]
    out["pipeline"] = pipeline("image-classification", model=folder, top_k=3)(image)
    timm_model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
    with torch.no_grad():
        out["timm"] = timm_model(x)
    out["timm_labels"] = timm_model.pretrained_cfg["label_names"]
    out["imported_hf_isnet"] = any(name.split(".")[0] == "hf_isnet" for name in sys.modules)
    torch.save(out, work + "/out.pt")
    """
)


def _trained_looking_model():
    """A resnet18 whose logits differ clearly between classes (BN statistics and a scaled classifier)."""
    torch.manual_seed(0)
    model = create_model("resnet18", labels=LABELS, input_size=32)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
        model.fc.weight.mul_(20)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    work = tmp_path_factory.mktemp("hub")
    model = _trained_looking_model()
    heatmap = work / "figure.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(heatmap)
    folder = save_pretrained(
        model,
        work / "model",
        isnet_config=ISNET,
        card={
            "repo_id": "someone/isnet-resnet18",
            "datasets": ["biased-mnist"],
            "results": RESULTS,
            "heatmap": heatmap,
            "description": "A test model.",
        },
    )
    return SimpleNamespace(model=model, folder=folder, work=work)


@pytest.fixture(scope="module")
def fresh(saved):
    """Outputs of the three loaders, computed in a fresh offline process on fixed inputs."""
    torch.manual_seed(1)
    x = torch.randn(4, 3, 32, 32)
    torch.save(x, saved.work / "x.pt")
    rng = np.random.RandomState(0)
    image = Image.fromarray(rng.randint(0, 256, (40, 48, 3), dtype=np.uint8))
    image.save(saved.work / "image.png")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(saved.work / "hf_home"),
    }
    script = saved.work / "fresh.py"
    script.write_text(FRESH_SCRIPT)
    run = subprocess.run(
        [sys.executable, str(script), str(saved.folder), str(saved.work)],
        cwd=saved.work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    out = torch.load(saved.work / "out.pt", weights_only=False)
    return SimpleNamespace(x=x, image=Image.open(saved.work / "image.png"), **out)


def test_fresh_process_never_imported_hf_isnet(fresh):
    assert fresh.imported_hf_isnet is False


def test_transformers_logits_equal(saved, fresh):
    with torch.no_grad():
        expected = saved.model(fresh.x)
    torch.testing.assert_close(fresh.transformers, expected, atol=1e-6, rtol=0)
    assert fresh.id2label == LABELS


def test_timm_local_dir_logits_equal(saved, fresh):
    with torch.no_grad():
        expected = saved.model(fresh.x)
    torch.testing.assert_close(fresh.timm, expected, atol=1e-6, rtol=0)
    assert fresh.timm_labels == LABELS


def test_pipeline_matches_the_model_on_the_same_image(saved, fresh):
    pixels, _ = ImageMaskTransform(saved.model)(fresh.image)
    assert torch.equal(fresh.processor[0], pixels)  # transformers preprocesses exactly as hf_isnet evaluates
    with torch.no_grad():
        probs = saved.model(pixels[None]).softmax(-1)[0]
    order = probs.argsort(descending=True).tolist()
    assert [r["label"] for r in fresh.pipeline] == [LABELS[i] for i in order]
    assert probs.max() > 0.5  # the check is not between near-uniform scores
    for result, index in zip(fresh.pipeline, order, strict=True):
        assert result["score"] == pytest.approx(probs[index].item(), abs=1e-6)


def test_config_layout(saved):
    config = json.loads((saved.folder / "config.json").read_text())
    assert config["architecture"] == "resnet18"
    assert config["num_classes"] == 3 and config["num_features"] == 512
    assert config["label_names"] == LABELS
    assert "num_classes" not in config.get("model_args", {})  # transformers 5.24 refuses a second one
    assert config["model_args"]["in_chans"] == 3
    pretrained_cfg = config["pretrained_cfg"]
    assert pretrained_cfg["input_size"] == [3, 32, 32]
    assert pretrained_cfg["mean"] == list(saved.model.pretrained_cfg["mean"])
    assert pretrained_cfg["label_names"] == LABELS
    assert config["isnet"]["zb_bounds"] == [-2.1, 2.6]  # tuples become lists
    assert load_isnet_config(saved.folder) == json.loads(json.dumps(ISNET))


def test_weights_are_unprefixed_timm_keys(saved):
    state = load_file(saved.folder / "model.safetensors")
    assert set(state) == set(saved.model.state_dict())
    assert torch.equal(state["fc.weight"], saved.model.fc.weight)


def test_model_card_metadata_parses_back(saved):
    card = ModelCard.load(saved.folder / "README.md")
    data = card.data
    assert data.library_name == "timm" and data.pipeline_tag == "image-classification"
    assert {"isnet", "lrp", "timm", "image-classification", "isnet-dual"} <= set(data.tags)
    assert data.datasets == ["biased-mnist"] and data.license == "apache-2.0"
    results = {(r.dataset_config, r.metric_type): r.metric_value for r in data.eval_results}
    assert results == {
        ("iid", "accuracy"): 0.979,
        ("ood", "accuracy"): 0.97,
        ("deceiving", "accuracy"): 0.96,
        ("deceiving", "f1"): 0.95,
    }
    assert data.model_name == "isnet-resnet18"
    text = card.text
    assert "| `heatmap_loss_weight` | 0.7 |" in text
    assert "| o.o.d. (no bias) | accuracy | 0.97 |" in text
    assert (
        "![LRP heatmaps of test images](heatmaps.png)" in text and (saved.folder / "heatmaps.png").is_file()
    )
    assert 'pipeline("image-classification", model="someone/isnet-resnet18")' in text
    assert 'timm.create_model("hf-hub:someone/isnet-resnet18", pretrained=True)' in text
    assert "A test model." in text


def test_card_without_results_has_no_model_index():
    card = make_model_card({"variant": "selective"}, architecture="resnet18", label_names=["a", "b"])
    assert card.data.eval_results is None
    assert "## Results" not in card.text and "local-dir:path/to/this/folder" in card.text
    with pytest.raises(ValueError, match="finite number"):
        make_model_card(architecture="resnet18", results={"iid": {"accuracy": float("nan")}})


def test_save_refuses_what_config_json_cannot_hold(tmp_path):
    model = create_model("resnet18", labels=LABELS, input_size=32)
    with pytest.raises(TypeError, match=r"isnet_config\['calibration'\] is a object"):
        save_pretrained(model, tmp_path, isnet_config={"calibration": object()})
    model.pretrained_cfg.pop("label_names")
    with pytest.raises(ValueError, match="label_names"):
        save_pretrained(model, tmp_path)


@pytest.fixture
def fake_hub(monkeypatch):
    """HfApi.create_repo / upload_folder replaced: records what would be sent."""
    sent = {}

    def create_repo(self, repo_id, **kwargs):
        sent["create_repo"] = (repo_id, kwargs)
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        sent["upload"] = {
            "repo_id": repo_id,
            "files": sorted(p.name for p in folder.iterdir()),
            "config": json.loads((folder / "config.json").read_text()),
            "readme": (folder / "README.md").read_text(),
            **kwargs,
        }
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return sent


def test_push_model(fake_hub):
    model = create_model("resnet18", labels=LABELS, input_size=32)
    result = push_to_hub(
        model, "me/isnet", private=True, isnet_config={"variant": "stochastic"}, commit_message="hi"
    )
    assert result == "commit-info"
    assert fake_hub["create_repo"] == ("me/isnet", {"private": True, "exist_ok": True, "repo_type": "model"})
    upload = fake_hub["upload"]
    assert upload["files"] == ["README.md", "config.json", "model.safetensors"]
    assert upload["repo_id"] == "me/isnet" and upload["commit_message"] == "hi"
    assert upload["config"]["isnet"] == {"variant": "stochastic"}
    assert 'model="me/isnet"' in upload["readme"]


def test_push_saved_folder(saved, fake_hub):
    push_to_hub(saved.folder, "me/isnet-folder")
    assert fake_hub["upload"]["files"] == ["README.md", "config.json", "heatmaps.png", "model.safetensors"]
    with pytest.raises(TypeError, match="save_pretrained"):
        push_to_hub(saved.folder, "me/x", card={"license": "mit"})
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        push_to_hub(saved.work / "nothing-here", "me/x")
