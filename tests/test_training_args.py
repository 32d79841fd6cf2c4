"""hf_isnet.training_args: ISNet hyper-parameters as TrainingArguments fields, parsed from the command line."""

import json
from pathlib import Path

import pytest
from transformers import HfArgumentParser

from hf_isnet.training_args import VARIANTS, ISNetTrainingArguments


def _args(tmp_path, **kwargs):
    return ISNetTrainingArguments(output_dir=str(tmp_path), use_cpu=True, **kwargs)


def _parse(tmp_path, *argv):
    parser = HfArgumentParser((ISNetTrainingArguments,))
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--use_cpu", *argv])
    return args


def test_defaults_are_the_papers(tmp_path):
    args = _args(tmp_path)
    assert args.variant == "stochastic" and args.background_attenuation  # measured defaults (README)
    assert (args.heatmap_loss_weight, args.gwrp_decay, args.E, args.w1, args.w2) == (0.7, 0.9, 1.0, 1.0, 1.0)
    assert (args.lrp_eps, args.selective_mu, args.lds_decay) == (0.01, 0.01, 0.8)
    assert args.max_grad_norm == 1.0
    assert args.remove_unused_columns is False and args.label_names == ["labels"]
    assert args.parsed_relevance_range() == "auto" and args.parsed_lds_layers() is None
    assert args.parsed_zb_bounds() is None
    assert (args.image_column, args.mask_column, args.label_column) == ("image", "mask", "label")


def test_command_line(tmp_path):
    args = _parse(
        tmp_path,
        "--variant",
        "dual",
        "--heatmap_loss_weight",
        "0.8",
        "--gwrp_decay",
        "0.5",
        "--E",
        "2",
        "--w1",
        "0.5",
        "--w2",
        "3",
        "--lrp_eps",
        "0",
        "--first_layer_zb",
        "--zb_bounds=-2.1,2.6",
        "--lds_layers",
        "layer2, layer3",
        "--lds_decay",
        "0.7",
        "--relevance_range",
        "1.5,30",
        "--calibration_epochs",
        "2",
        "--background_attenuation",
        "--explain_eval",
        "--mask_column",
        "segmentation",
    )
    assert args.variant == "dual" and args.heatmap_loss_weight == 0.8 and args.gwrp_decay == 0.5
    assert (args.E, args.w1, args.w2, args.lrp_eps) == (2.0, 0.5, 3.0, 0.0)
    assert args.first_layer_zb and args.parsed_zb_bounds() == (-2.1, 2.6)
    assert args.parsed_lds_layers() == ["layer2", "layer3"] and args.lds_decay == 0.7
    assert args.parsed_relevance_range() == (1.5, 30.0)
    assert args.calibration_epochs == 2 and args.background_attenuation and args.explain_eval
    assert args.mask_column == "segmentation"
    assert _parse(tmp_path, "--lds_layers", "auto").parsed_lds_layers() == "auto"
    assert _parse(tmp_path, "--first_layer_zb").parsed_zb_bounds() == "auto"


def test_every_isnet_field_has_help_and_a_flag():
    parser = HfArgumentParser((ISNetTrainingArguments,))
    flags = {option for action in parser._actions for option in action.option_strings}
    names = ISNetTrainingArguments.isnet_field_names()
    assert names[0] == "variant" and "label_column" in names and "output_dir" not in names
    for name in names:
        assert f"--{name}" in flags
        field = ISNetTrainingArguments.__dataclass_fields__[name]
        assert field.metadata.get("help"), name


def test_isnet_config_is_json(tmp_path):
    config = _args(tmp_path, variant="stochastic", lds_layers="auto").isnet_config()
    assert config["variant"] == "stochastic" and config["lds_layers"] == "auto"
    assert set(config) == set(ISNetTrainingArguments.isnet_field_names())
    assert json.loads(json.dumps(config)) == config


def test_relevance_range_from_a_calibration_file(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text("{}")
    assert _args(tmp_path, relevance_range=str(path)).parsed_relevance_range() == Path(path)
    with pytest.raises(ValueError, match="neither 'auto', 'C1,C2'"):
        _args(tmp_path, relevance_range=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="0 <= C1 < C2"):
        _args(tmp_path, relevance_range="30,1.5")


def test_bad_variant_lists_the_choices(tmp_path):
    with pytest.raises(ValueError, match="'none', 'original', 'dual', 'selective', 'stochastic'"):
        _args(tmp_path, variant="fast")
    with pytest.raises(SystemExit):
        _parse(tmp_path, "--variant", "fast")
    assert VARIANTS == ("none", "original", "dual", "selective", "stochastic")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"heatmap_loss_weight": 1.0}, r"heatmap_loss_weight \(P\)=1.0 .* in \[0, 1\)"),
        ({"gwrp_decay": 1.5}, r"gwrp_decay \(d\)=1.5 .* in \[0, 1\]"),
        ({"E": 0.0}, "E=0.0 .* > 0"),
        ({"w1": -1.0}, "w1=-1.0"),
        ({"w1": 0.0, "w2": 0.0}, "variant='none'"),
        ({"lrp_eps": -0.1}, "lrp_eps"),
        ({"selective_mu": 0.0}, "selective_mu"),
        ({"lds_decay": -0.1}, "lds_decay"),
        ({"calibration_epochs": 0}, "calibration_epochs"),
        ({"max_maps_per_pass": 0}, "max_maps_per_pass"),
        ({"zb_bounds": "auto"}, "first_layer_zb is off"),
        ({"first_layer_zb": True, "zb_bounds": "3,1"}, "low < high"),
        ({"lds_layers": "layer1,,layer2"}, "empty module name"),
    ],
)
def test_out_of_range_values(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **kwargs)


def test_standard_classifier_ignores_p(tmp_path):
    assert _args(tmp_path, variant="none", heatmap_loss_weight=1.0).variant == "none"


def test_torch_compile_is_refused(tmp_path):
    with pytest.raises(ValueError, match="torch_compile=True.*AOTAutograd refuses the double backward"):
        _args(tmp_path, torch_compile=True)
    with pytest.raises(ValueError, match="torch_compile"):
        _args(tmp_path, torch_compile_backend="inductor")  # which switches torch_compile on


def test_ddp_static_graph_is_refused(tmp_path):
    with pytest.raises(ValueError, match="ddp_static_graph=True.*silently skips the gradient all-reduce"):
        _args(tmp_path, ddp_static_graph=True)


def test_reentrant_checkpointing_is_refused_and_non_reentrant_is_the_default(tmp_path):
    with pytest.raises(ValueError, match="use_reentrant=True.*double backward"):
        _args(
            tmp_path, activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True}
        )
    with pytest.raises(ValueError, match="use_reentrant=True"):
        _parse(
            tmp_path,
            "--activation_checkpointing",
            "--activation_checkpointing_kwargs",
            '{"use_reentrant": true}',
        )
    args = _args(tmp_path, activation_checkpointing=True)
    assert args.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": False}


def test_refusals_do_not_apply_to_a_standard_classifier(tmp_path):
    assert _args(tmp_path, variant="none", ddp_static_graph=True).ddp_static_graph
