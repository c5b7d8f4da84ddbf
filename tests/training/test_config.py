"""Experiment configs: variants, the spectrum section, and bad values."""

import re

import pytest

from hessian_tf import config as spectrum_config
from hessian_tf import training
from hessian_tf.training import config as config_lib


def test_variants_parse():
    parse = config_lib.parse_variants
    assert parse("", choices=("bn", "no_bn"), default="bn") == ("bn", False, False)
    assert parse("no_bn,smoke", choices=("bn", "no_bn"), default="bn") == ("no_bn", True, False)
    assert parse("smoke, mock", choices=("bn",), default="bn") == ("bn", True, True)


@pytest.mark.parametrize("arg, message", [
    ("bn,no_bn", "exclude each other"),
    ("tiny", "unknown variant 'tiny'"),
])
def test_bad_variants(arg, message):
    with pytest.raises(ValueError, match=message):
        config_lib.parse_variants(arg, choices=("bn", "no_bn"), default="bn")


def test_spectrum_section_follows_the_workdir():
    config = config_lib.base_config()
    config.workdir = "/tmp/somewhere"
    resolved = training.resolve(config)
    assert resolved.spectrum.model == "/tmp/somewhere/model.keras"
    assert resolved.spectrum.dataset == "npz:/tmp/somewhere/spectrum_data.npz"
    assert set(resolved.spectrum.keys()) <= set(spectrum_config.default_config().keys())
    moved = training.resolve(config, "/elsewhere")
    assert moved.spectrum.model == "/elsewhere/model.keras"
    assert config.spectrum.model == "/tmp/somewhere/model.keras"  # not changed


def test_spectrum_section_takes_the_callbacks_hessian_definition():
    config = config_lib.base_config()
    config.train.spectrum_callback.bn_mode = "train"
    config.train.spectrum_callback.batch_size = 64
    resolved = training.resolve(config)
    assert (resolved.spectrum.bn_mode, resolved.spectrum.batch_size) == ("train", 64)


BAD = [
    ("model", "vgg", "one of"),
    ("batch_norm", "yes", "one of"),
    ("batch_size", 0, "integer >= 1"),
    ("num_steps", -5, "integer >= 1"),
    ("learning_rate", 0.0, "positive, finite learning rate"),
    # Accepted, they had failed at the first steps (or never written a checkpoint).
    ("learning_rate", float("inf"), "positive, finite learning rate"),
    ("batch_size", 99999999999999999999, "below 2\\*\\*63"),
    ("checkpoint_steps", (5, 1), "strictly increasing"),
    ("momentum", 1.0, r"\[0, 1\)"),
    ("lr_drop_steps", (300, 100), "strictly increasing"),
    ("lr_drop_steps", (0,), "steps >= 1"),
    ("checkpoint_steps", (-1,), "steps >= 0"),
    ("dataset", "cifar10", "'tfds:NAME"),
    ("augment", "mixup", "one of"),
    ("input_shape", (8, 0), "positive sizes"),
]


@pytest.mark.parametrize("name, value, message", BAD)
def test_bad_train_values_name_the_option(name, value, message):
    config = config_lib.base_config()
    config.train[name] = value
    with pytest.raises(ValueError, match=rf"--config.train.{name}=.*{message}"):
        training.resolve(config)


@pytest.mark.parametrize("name, value", [
    ("every_n_steps", 0), ("every_n_steps", -3), ("lanczos_steps", 0), ("num_examples", 0),
])
def test_bad_spectrum_schedule(name, value):
    config = config_lib.base_config()
    config.train.spectrum_callback[name] = value
    with pytest.raises(ValueError, match=rf"spectrum_callback.{name}={value}: expected an integer >= 1"):
        training.resolve(config)


@pytest.mark.parametrize("name, value, message", [
    ("lanczos_steps", -1, "--lanczos_steps=-1: pass an integer >= 1"),
    ("loss", "hinge", "--loss='hinge' is not valid"),
    ("kernel_width", float("nan"), "--kernel_width=nan: pass a finite number"),
])
def test_the_spectrum_section_is_checked_before_training(name, value, message):
    # hessian-spectrum --config would refuse it after the training had run.
    config = config_lib.base_config()
    config.spectrum[name] = value
    with pytest.raises(ValueError, match="^--config.spectrum: " + re.escape(message)):
        training.resolve(config)


def test_a_spectrum_section_may_leave_values_for_hessian_spectrum():
    # A placeholder (None until hessian-spectrum --config.spectrum.model=... sets it)
    # keeps its default in the check; a value of the wrong type is one ValueError.
    import ml_collections

    config = config_lib.base_config()
    config.spectrum.model = ml_collections.config_dict.placeholder(str)
    training.resolve(config)
    config = config_lib.base_config()
    config.spectrum = ml_collections.ConfigDict({"lanczos_steps": 30.0})
    with pytest.raises(ValueError, match="^--config.spectrum: Could not override field "
                                         "'lanczos_steps'"):
        training.resolve(config)


def test_mlp_has_no_batch_norm():
    config = config_lib.base_config()
    config.train.model = "mlp"
    config.train.batch_norm = "on"
    with pytest.raises(ValueError, match="'off' for model='mlp'"):
        training.resolve(config)


def test_unknown_options_are_refused():
    config = config_lib.base_config()
    config.train.unlock()
    config.train.learning_rat = 0.1
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['learning_rat'\]"):
        training.resolve(config)


@pytest.mark.parametrize("workdir", [None, "elsewhere"])
def test_a_spectrum_config_is_told_apart_from_an_experiment_config(workdir):
    # configs/mlp_digits.py is hessian-spectrum's: hessian-train says so.
    with pytest.raises(ValueError, match="no experiment config .* goes to hessian-spectrum"):
        training.resolve(spectrum_config.default_config(), workdir)
