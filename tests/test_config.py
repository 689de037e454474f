"""Config: YAML plus key=value overrides, validated, with messages that name the field and the range."""

import pytest

from tandem.config import TrainConfig, dump_config, load_config
from tandem.errors import UserError


def test_yaml_then_overrides_and_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 0.02\n  name: adamw\nepochs: 3\n")
    cfg = load_config(path, ["optim.lr=0.01", "augment.hflip=false", "data.source=photos/"])
    assert (cfg.optim.lr, cfg.optim.name, cfg.epochs, cfg.augment.hflip) == (0.01, "adamw", 3, False)
    assert cfg.data.source == "photos/" and cfg.model.name == "cnn"  # defaults fill the rest
    (tmp_path / "out.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "out.yaml") == cfg


@pytest.mark.parametrize("override, expected", [
    ("optim.lr=-1", "config: optim.lr: Input should be greater than 0 (got -1)"),
    ("batch_size=0", "config: batch_size: Input should be greater than or equal to 1 (got 0)"),
    ("data.val_fraction=0.7", "config: data.val_fraction: Input should be less than 0.5 (got 0.7)"),
    ("model.name=vit", "config: model.name: Input should be 'mlp', 'cnn', 'cnn-fpga' or 'resnet' (got 'vit')"),
    ("optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("epochs", "override 'epochs' is not key=value"),
    ("precision=fp16", "config: precision: Input should be 'auto', 'fp32' or 'bf16' (got 'fp16')"),
    ("batch_size=10", "config: batch_size=10 must be a multiple of optim.grad_accum=3"),
    ("data.mean=abc", "config: data.mean: Input should be a valid number"),
    ("data.std=0", "config: data.std must be greater than 0 (got 0.0)"),
])
def test_bad_values_name_the_field_and_the_range(override, expected):
    extra = ["optim.grad_accum=3"] if override.startswith("batch_size=10") else []
    with pytest.raises(UserError) as err:
        load_config(None, [override, *extra])
    assert str(err.value).startswith(expected)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override, guess", [("epoch=3", "epochs"), ("optim.lrr=1", "optim.lr"), ("optm.lr=1", "optim"),
                                             ("data.chanels=3", "data.channels")])
def test_a_mistyped_key_gets_a_did_you_mean(override, guess):
    with pytest.raises(UserError) as err:
        load_config(None, [override])
    assert f"(did you mean '{guess}'?)" in str(err.value) and "\n" not in str(err.value)


def test_a_key_like_no_other_gets_no_guess():
    with pytest.raises(UserError) as err:
        load_config(None, ["zzzz=1"])
    assert "did you mean" not in str(err.value) and "`tandem config`" in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("optim: [\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        load_config(tmp_path / "bad.yaml")


def test_defaults_are_the_documented_ones():
    cfg = TrainConfig()
    assert (cfg.data.source, cfg.model.name, cfg.precision, cfg.device) == ("animals", "cnn", "auto", "auto")


def test_a_mistyped_serve_key_gets_a_did_you_mean():
    from tandem.serve.config import load_serve_config

    with pytest.raises(UserError) as err:
        load_serve_config(overrides={"batching": {"max_batch": 3}})
    assert str(err.value).startswith("unknown serve config key 'batching.max_batch'")
    assert "(did you mean 'batching.max_batch_size'?)" in str(err.value) and "`tandem serve --help-config`" in str(err.value)
