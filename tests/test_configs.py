"""Every experiment config: its smoke variant trains end to end under TFDS mock data
(a few steps, spectra at steps 0 and 2, checkpoints the spectrum job can read),
and every variant resolves, validates and builds its model."""

import glob
import importlib.util
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from hessian_tf import config as spectrum_config
from hessian_tf import training
from hessian_tf.io.models import load_model_function
from hessian_tf.training import models as models_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    os.path.basename(path)[:-3]
    for path in glob.glob(os.path.join(REPO, "configs", "*.py"))
    if os.path.basename(path) != "mlp_digits.py"  # a spectrum-job config, no training
)


def load_config_module(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_experiments_are_all_there():
    assert {"resnet32_cifar10", "resnet18_imagenet", "mlp_mnist", "cnn_digits"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_docstring_gives_commands_and_run_time(name):
    doc = load_config_module(name).__doc__
    assert f"hessian-train --config=configs/{name}.py" in doc
    assert f"hessian-spectrum --config=configs/{name}.py" in doc
    assert "smoke" in doc and "Expected run time" in doc


def variants(name):
    module = load_config_module(name)
    return getattr(module, "VARIANTS", ("",))


@pytest.mark.parametrize("name, variant", [(n, v) for n in CONFIGS for v in variants(n)])
def test_every_variant_resolves_and_builds(name, variant, tmp_path):
    module = load_config_module(name)
    for arg in (variant, f"{variant},smoke" if variant else "smoke"):
        config = training.resolve(module.get_config(arg), str(tmp_path))
        assert set(config.spectrum.keys()) <= set(spectrum_config.default_config().keys())
        spectrum_config.validate(config.spectrum)
    # The smoke model (full-size ones take too long to build for every variant).
    train = config.train
    shape = tuple(train.input_shape) or (
        (train.image_size, train.image_size, 3) if train.image_size else (32, 32, 3)
    )
    model = models_lib.build_model(train, shape)
    assert model.count_params() > 0


def test_full_size_models_have_the_papers_sizes():
    module = load_config_module("resnet32_cifar10")
    train = training.resolve(module.get_config("bn")).train
    model = models_lib.build_model(train, (32, 32, 3))
    assert sum(int(np.prod(v.shape)) for v in model.trainable_variables) == 466_906


# Each config's default variant (the other variants differ only in the model, built
# above; the digits CNN trains every variant, population BN included, in
# tests/training). The ResNet-32 smoke run alone took 58 s on 2 CPU cores, most of it
# tracing its second-order graphs (one run, nothing else running).
END_TO_END = [(name, "") for name in CONFIGS]


@pytest.mark.parametrize("name, variant", END_TO_END)
def test_smoke_variant_runs_end_to_end(name, variant, tmp_path):
    module = load_config_module(name)
    config = module.get_config(f"{variant},smoke" if variant else "smoke")
    with tfds.testing.mock_data(num_examples=48):
        summary = training.train(config, str(tmp_path))
    assert summary["num_steps"] == 3
    assert summary["batch_norm"] == config.train.batch_norm
    assert [entry["step"] for entry in summary["spectra"]] == [0, 2]
    assert all(np.isfinite(entry["lambda_max"]) for entry in summary["spectra"])
    # The checkpoints are what `hessian-spectrum --model=...` loads.
    for path in summary["checkpoints"].values():
        model = load_model_function(path).model
        trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
        assert trainable == summary["num_params"]
    with np.load(tmp_path / "spectrum_data.npz") as arrays:
        assert arrays["x"].shape[1:] == tuple(summary["input_shape"])
