"""hessian_tf.training.train and the hessian-train binary, on the digits CNN."""

import glob
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from hessian_tf import training
from hessian_tf.io.models import load_model_function
from hessian_tf.keras import IMAGE_TAG, SCALAR_TAGS
from hessian_tf.models import population_bn
from hessian_tf.training import callbacks as callbacks_lib
from hessian_tf.training import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def digits_config(batch_norm="on", **train):
    """The smoke-sized digits CNN: 3 steps, spectra at steps 0 and 2."""
    config = config_lib.base_config()
    config.train.model = "cnn"
    config.train.width = 4
    config.train.batch_norm = batch_norm
    config.train.dataset = "digits"
    config.train.input_shape = (8, 8, 1)
    config_lib.apply_flag_variants(config, config_lib.Variants("bn", True, False))
    for name, value in train.items():
        config.train[name] = value
    return config


def read_events(log_dir):
    """{tag: {step: (plugin, value)}} from every event file in log_dir."""
    found = {}
    for path in sorted(glob.glob(os.path.join(str(log_dir), "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                found.setdefault(value.tag, {})[event.step] = (
                    value.metadata.plugin_data.plugin_name, tf.make_ndarray(value.tensor)
                )
    return found


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("train"))
    summary = training.train(digits_config(), workdir)
    return workdir, summary


def test_writes_what_the_docstring_lists(trained):
    workdir, summary = trained
    for name in ("config.json", "spectrum_data.npz", "model.keras", "summary.json"):
        assert os.path.isfile(os.path.join(workdir, name)), name
    assert summary["num_steps"] == 3
    assert sorted(int(s) for s in summary["checkpoints"]) == [0, 3]
    for path in summary["checkpoints"].values():
        assert os.path.basename(path) in ("step-00000000.keras", "step-00000003.keras")
        assert os.path.isfile(path)
    assert [entry["step"] for entry in summary["spectra"]] == [0, 2]
    with open(os.path.join(workdir, "summary.json")) as handle:
        assert json.load(handle)["num_params"] == summary["num_params"]


def test_tensorboard_has_training_and_spectrum_scalars(trained):
    workdir, _ = trained
    train_events = read_events(os.path.join(workdir, "train"))
    for tag in callbacks_lib.TRAIN_SCALAR_TAGS:
        assert sorted(train_events[tag]) == [1, 2, 3], tag
        assert train_events[tag][1][0] == "scalars"
    rates = {step: float(value) for step, (_, value) in train_events["train/learning_rate"].items()}
    # smoke: 0.1 for the first 2 updates, then dropped 10x.
    assert rates == pytest.approx({1: 0.1, 2: 0.1, 3: 0.01})
    spectrum_events = read_events(os.path.join(workdir, "spectrum"))
    for tag in SCALAR_TAGS + (IMAGE_TAG,):
        assert sorted(spectrum_events[tag]) == [0, 2], tag


def test_checkpoints_feed_the_spectrum_job(trained, tmp_path):
    workdir, summary = trained
    first = load_model_function(summary["checkpoints"]["0"]).model
    last = load_model_function(os.path.join(workdir, "model.keras")).model
    assert first.count_params() == last.count_params()
    assert not np.array_equal(first.get_weights()[0], last.get_weights()[0])
    from hessian_tf import config as spectrum_config
    from hessian_tf import job

    spectrum = spectrum_config.default_config()
    spectrum.update(training.resolve(digits_config(), workdir).spectrum.to_dict())
    spectrum.output_dir = str(tmp_path / "spectrum")
    result = job.run(spectrum)
    # The callback's last evaluation (step 2) and the job (step 3) see similar models.
    assert result["num_examples"] == 32 and result["lambda_max"] > 0


def test_training_is_repeatable(tmp_path):
    weights = []
    for run in ("a", "b"):
        config = digits_config(deterministic=True)
        config.train.spectrum_callback.enabled = False
        training.train(config, str(tmp_path / run))
        model = keras.saving.load_model(str(tmp_path / run / "model.keras"), compile=False)
        weights.append(model.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


def test_population_bn_statistics_are_current_at_every_update(tmp_path):
    config = digits_config(batch_norm="population", num_steps=4)
    config.train.population_bn.update_every_steps = 2
    config.train.spectrum_callback.enabled = False
    summary = training.train(config, str(tmp_path))
    assert summary["population_bn_seconds"] > 0
    model = keras.saving.load_model(str(tmp_path / "model.keras"), compile=False)
    layers = population_bn.population_bn_layers(model)
    assert len(layers) == 3
    # Updated after the last step (4): the statistics are those of these weights.
    x, _ = training.data.fixed_examples(
        training.resolve(config).train, split="train", num_examples=32
    )
    saved = [layer.moving_mean.numpy().copy() for layer in layers]
    population_bn.PopulationStatistics(model, batch_size=32).update(x)
    for layer, mean in zip(layers, saved):
        np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("train, message", [
    ({"input_shape": (7, 7, 1)}, r"--config.train.input_shape=\(7, 7, 1\): the examples of "
                                 r"digits have shape \(64,\) \(64 values\)"),
    ({"augment": "crop_flip"}, r"--config.train.augment='crop_flip': resizing and "
                               r"augmentation take images"),
    ({"image_size": 32}, r"--config.train.image_size=32: resizing"),
    ({"num_classes": 5}, r"--config.train.num_classes=5: the labels of digits range"),
    # Without the callback's examples, the labels are checked where they are read.
    ({"num_classes": 5, "callback": False}, r"--config.train.num_classes=5: the labels"),
])
def test_a_refused_run_writes_nothing_and_keeps_the_earlier_one(tmp_path, train, message):
    # Refused before training (the preprocessing's shapes had been a traceback from
    # tf.data): no new directory, and an earlier run's files untouched.
    train = dict(train)
    config = digits_config(**{name: value for name, value in train.items()
                              if name != "callback"})
    config.train.spectrum_callback.enabled = train.get("callback", True)
    with pytest.raises(ValueError, match="^" + message):
        training.train(config, str(tmp_path / "new" / "run"))
    assert not (tmp_path / "new").exists()
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "config.json").write_text('{"earlier": true}')
    with pytest.raises(ValueError, match="^" + message):
        training.train(config, str(earlier))
    assert sorted(os.listdir(earlier)) == ["config.json"]
    assert (earlier / "config.json").read_text() == '{"earlier": true}'


def test_errors_name_the_training_programs_options(tmp_path):
    # The shared checks of the output directory and the data name hessian-train's
    # options, not the spectrum program's --output_dir and --dataset.
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="^--workdir=.*a_file: a file, not a directory"):
        training.train(digits_config(), str(tmp_path / "a_file"))
    data = tmp_path / "uneven.npz"
    np.savez(data, x=np.zeros((10, 64), np.float32), y=np.zeros(9, np.int64))
    with pytest.raises(ValueError, match=f"^--config.train.dataset=npz:{data}: x has shape"):
        training.train(digits_config(dataset=f"npz:{data}"), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    # Real labels with a fraction would be cut to class indices by the training loss.
    np.savez(data, x=np.zeros((10, 64), np.float32), y=np.full(10, 1.5))
    with pytest.raises(ValueError, match=f"^--config.train.dataset=npz:{data}: labels of "
                       r"dtype float64 are not class indices"):
        training.train(digits_config(dataset=f"npz:{data}"), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def run_binary(*args):
    return subprocess.run(
        [sys.executable, "-m", "hessian_tf.bin.train", *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize("args, message", [
    (["--config=configs/cnn_digits.py:bn,smoke", "--config.train.batch_size=-1"],
     "--config.train.batch_size=-1: expected an integer >= 1."),
    (["--config=configs/cnn_digits.py:huge"], "unknown variant 'huge'"),
    (["--config=configs/cnn_digits.py:bn,smoke,mock"],  # the digits are no tfds dataset
     "--config.train.mock_data=64: expected 0 (the `mock` variant) with "
     "train.dataset='digits': mock data stand in for tfds datasets only."),
    (["--config=configs/nosuch.py:bn"], "--config=configs/nosuch.py: no such file"),
    (["--config=configs/cnn_digits.py:bn,smoke", "--config.train.nosuch=1"],
     "names no option of the config"),
    # ml_collections's suggestion, as text (not a KeyError's repr with its \n).
    (["--config=configs/cnn_digits.py:bn,smoke", "--config.train.batch_sise=1"],
     "(KeyError: 'batch_sise' Did you mean \"batch_size\" instead of \"batch_sise\"?)"),
])
def test_binary_bad_input_is_one_line(tmp_path, args, message):
    result = run_binary(*args, f"--workdir={tmp_path}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hessian-train: error: "), result.stderr
    assert message in lines[0]


def test_binary_trains_a_smoke_config(tmp_path):
    result = run_binary(
        "--config=configs/cnn_digits.py:no_bn,smoke",
        f"--workdir={tmp_path}",
        "--config.train.spectrum_callback.enabled=False",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.path.isfile(tmp_path / "model.keras")
    assert os.path.isfile(tmp_path / "checkpoints" / "step-00000003.keras")


def test_the_training_logs_accuracy_stays_a_fraction(tmp_path, monkeypatch):
    # Per-window values are differences of Keras's float32 running means: a window of
    # no correct prediction could come out below 0 (-1.5e-8 was seen).
    from hessian_tf.training import callbacks

    steps = iter(range(1, 10))
    monkeypatch.setattr(callbacks, "global_step", lambda model: next(steps))
    monkeypatch.setattr(callbacks.models_lib, "learning_rate_at", lambda model, step: 0.1)
    log = callbacks.TrainingLog(str(tmp_path), every_n_steps=1)
    log.on_train_begin()
    log.on_epoch_begin(0)
    log.on_train_batch_end(0, {"loss": 1.0, "accuracy": 0.5})
    assert log.last["train/accuracy"] == 0.5
    # Running mean 0.2499999 after two batches: the second batch's own is -2e-7.
    log.on_train_batch_end(1, {"loss": 1.0, "accuracy": 0.2499999})
    assert log.last["train/accuracy"] == 0.0
    log.on_train_end()
