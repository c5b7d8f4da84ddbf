"""job.run in-process on each model and dataset format: SavedModel vs .keras, tfds.

strategy 'default' with num_cpu_devices 0 leaves the devices alone, so these run in
the test process (conftest.py has already split the CPU).
"""

import json
import signal

import keras
import numpy as np
import pytest
import tensorflow_datasets as tfds

from hessian_tf import config as config_lib
from hessian_tf import job
from hessian_tf.io.datasets import load_dataset
from tests.io.test_datasets import indexed_mock_data
from tests.io.test_models import small_bn_model

RESULT_FILES = ("spectrum.npz", "summary.json", "density.png")


def small_config(output_dir, **overrides):
    config = config_lib.default_config()
    config.lanczos_steps = 5
    config.batch_size = 16
    config.seed = 7
    config.output_dir = str(output_dir)
    for name, value in overrides.items():
        config[name] = value
    return config


def _without_nan(value):
    """NaN != NaN; one draw makes trace_stderr NaN."""
    if isinstance(value, dict):
        return {key: _without_nan(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_nan(item) for item in value]
    if isinstance(value, float) and value != value:
        return "NaN"
    return value


def check_results(output_dir, summary, *, lanczos_steps=5):
    """The three files are whole and agree with the returned summary."""
    for name in RESULT_FILES:
        assert (output_dir / name).is_file(), name
    written = json.loads((output_dir / "summary.json").read_text())
    assert _without_nan(written) == _without_nan(json.loads(json.dumps(summary)))
    with np.load(output_dir / "spectrum.npz") as spectrum:
        assert spectrum["alphas"].shape == (1, lanczos_steps)
        assert spectrum["betas"].shape == (1, lanczos_steps - 1)
        np.testing.assert_allclose(spectrum["weights"].sum(axis=1), 1.0, atol=1e-12)
        assert spectrum["nodes"].max() == pytest.approx(summary["lambda_max"])
    assert (output_dir / "density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bn_files(tmp_path_factory):
    """The same BN model as .keras and as a `model.export()` SavedModel, and npz data."""
    directory = tmp_path_factory.mktemp("formats")
    model = small_bn_model()
    model.save(str(directory / "model.keras"))
    model.export(str(directory / "exported"), verbose=False)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((40, 4)).astype(np.float32)
    y = rng.integers(0, 3, 40).astype(np.int64)
    np.savez(directory / "data.npz", x=x, y=y)
    return directory


def recorded_titles(monkeypatch):
    """The titles of the density plots the job draws from now on."""
    titles = []
    plot = job.plotting.plot_densities

    def recording(*args, title=None, **kwargs):
        titles.append(title)
        return plot(*args, title=title, **kwargs)

    monkeypatch.setattr(job.plotting, "plot_densities", recording)
    return titles


def test_saved_model_and_keras_file_give_the_same_spectrum(bn_files, tmp_path, monkeypatch):
    data = f"npz:{bn_files / 'data.npz'}"
    titles = recorded_titles(monkeypatch)
    handler = signal.getsignal(signal.SIGTERM)
    saved = job.run(small_config(tmp_path / "saved", model=str(bn_files / "exported"),
                                 dataset=data))
    # SIGTERM is a preemption notice only while the job computes; then the caller's.
    assert signal.getsignal(signal.SIGTERM) is handler
    check_results(tmp_path / "saved", saved)
    assert saved["method"] == "reverse_over_reverse"
    assert saved["method_seconds"] is None  # a SavedModel: only reverse over reverse runs
    assert saved["num_params"] == 53 and saved["num_examples"] == 40
    assert saved["bn_mode"] == "inference"
    assert saved["config"]["model"] == str(bn_files / "exported")
    # 5 Lanczos products and one repeat for the determinism check.
    assert saved["num_hvps"] == 6

    # The .keras file with the other product method: same numbers.
    keras_file = job.run(small_config(tmp_path / "keras", model=str(bn_files / "model.keras"),
                                      dataset=data, method="forward_over_backward"))
    check_results(tmp_path / "keras", keras_file)
    assert keras_file["method"] == "forward_over_backward"
    assert keras_file["method_seconds"] is None  # asked for: not timed
    assert keras_file["num_params"] == 53
    # Same parameters in the same flattened order and the same starting vector: the
    # same Krylov space, so five steps agree although they are far from converged.
    assert saved["lambda_max"] == pytest.approx(keras_file["lambda_max"], rel=1e-5)
    assert saved["lambda_min"] == pytest.approx(keras_file["lambda_min"], rel=1e-4)
    # The BN mode in the plot's title: a SavedModel's layers are not known, the .keras
    # file's hold BN.
    assert [title.endswith("1 draw(s), BN inference") for title in titles] == [True, True]
    assert saved["loss"] == pytest.approx(keras_file["loss"], rel=1e-6)
    with np.load(tmp_path / "saved" / "spectrum.npz") as a, \
            np.load(tmp_path / "keras" / "spectrum.npz") as b:
        np.testing.assert_allclose(a["alphas"], b["alphas"], rtol=1e-5, atol=1e-7)


def test_saved_model_from_export_refuses_bn_train_mode(bn_files, tmp_path):
    config = small_config(tmp_path / "out", model=str(bn_files / "exported"),
                          dataset=f"npz:{bn_files / 'data.npz'}", bn_mode="train")
    with pytest.raises(ValueError, match="--bn_mode=train"):
        job.run(config)
    for name in RESULT_FILES:
        assert not (tmp_path / "out" / name).exists()


@pytest.fixture(scope="module")
def mnist_model(tmp_path_factory):
    """Flatten → Dense(10) for 28×28×1 images: 7,850 parameters."""
    path = tmp_path_factory.mktemp("mnist") / "linear.keras"
    keras.utils.set_random_seed(11)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10)])
    model.save(str(path))
    return path


def test_tfds_split_slice_sets_the_number_of_examples(mnist_model, tmp_path):
    # The indexed mock resolves `train[:64]` as tfds would (the stock mock_data
    # ignores slices); the split has 100 examples.
    with indexed_mock_data({"train": 100, "test": 10}):
        summary = job.run(small_config(tmp_path / "tfds", model=str(mnist_model),
                                       dataset="tfds:mnist", split="train[:64]"))
        x, y = load_dataset("tfds:mnist", split="train[:64]")
    check_results(tmp_path / "tfds", summary)
    assert summary["num_examples"] == 64 and summary["num_params"] == 7850
    assert summary["config"]["split"] == "train[:64]"
    assert summary["lambda_max"] > 0

    # The same examples from an npz file give the same Hessian.
    np.savez(tmp_path / "same.npz", x=x, y=y)
    from_npz = job.run(small_config(tmp_path / "npz", model=str(mnist_model),
                                    dataset=f"npz:{tmp_path / 'same.npz'}"))
    assert from_npz["num_examples"] == 64
    assert from_npz["lambda_max"] == pytest.approx(summary["lambda_max"], rel=1e-6)


def test_tfds_under_stock_mock_data(mnist_model, tmp_path):
    with tfds.testing.mock_data(num_examples=24):
        summary = job.run(small_config(tmp_path, model=str(mnist_model),
                                       dataset="tfds:mnist", split="test"))
    check_results(tmp_path, summary)
    assert summary["num_examples"] == 24


def test_the_models_regularizers_are_told_where_they_are_left_out(tmp_path, monkeypatch):
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(3, activation="tanh", kernel_regularizer="l2",
                                bias_regularizer="l1", activity_regularizer="l2")(inputs)
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(
        2, activity_regularizer="l1")])  # a nested model's layer counts too
    keras.Model(inputs, inner(hidden)).save(str(tmp_path / "regularized.keras"))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((32, 4)).astype("float32"),
             y=rng.integers(0, 2, 32))
    lines = []
    monkeypatch.setattr(job.logging, "info", lambda form, *args: lines.append(form % args))
    titles = recorded_titles(monkeypatch)
    common = dict(model=str(tmp_path / "regularized.keras"),
                  dataset=f"npz:{tmp_path / 'data.npz'}", method="reverse_over_reverse")
    without = job.run(small_config(tmp_path / "without", **common))
    told = [line for line in lines if "regularizer(s)" in line]
    assert told == [
        "The model has 4 regularizer(s) (of weights or activity), whose losses are left "
        "out; --regularization adds them"], told
    assert any(line.startswith("Hessian of the mean sparse_categorical_crossentropy over")
               for line in lines)
    lines.clear()
    added = job.run(small_config(tmp_path / "with", regularization=True, **common))
    assert not [line for line in lines if "regularizer(s)" in line]
    assert "sparse_categorical_crossentropy + the model's own losses (regularizers) over" in \
        " ".join(lines)
    assert added["lambda_max"] != without["lambda_max"]
    assert titles[0].endswith("m=5, 1 draw(s)"), titles  # no BN: no BN mode


def test_fewer_eigenpairs_than_asked_are_warned_of(bn_files, tmp_path, monkeypatch):
    warnings = []
    monkeypatch.setattr(job.logging, "warning", lambda form, *args: warnings.append(form % args))
    summary = job.run(small_config(tmp_path / "out", model=str(bn_files / "model.keras"),
                                   dataset=f"npz:{bn_files / 'data.npz'}", num_eigenpairs=9,
                                   method="reverse_over_reverse"))
    assert len(summary["top_eigenvalues"]) == 5  # one Ritz value per step
    assert warnings == [
        "--num_eigenpairs=9: 5 reported, as many Ritz values as the Lanczos steps taken (at "
        "most --lanczos_steps=5, and the 53 parameters) give"]


def test_a_kernel_narrower_than_the_grid_is_warned_of(bn_files, tmp_path, monkeypatch):
    warnings = []
    monkeypatch.setattr(job.logging, "warning", lambda form, *args: warnings.append(form % args))
    options = dict(model=str(bn_files / "model.keras"), dataset=f"npz:{bn_files / 'data.npz'}",
                   method="reverse_over_reverse")
    job.run(small_config(tmp_path / "default", **options))
    assert warnings == []
    job.run(small_config(tmp_path / "narrow", kernel_width=1e-12, **options))
    assert len(warnings) == 1 and warnings[0].startswith(
        "--kernel_width=1e-12 is below the density grid's spacing"), warnings
    # The default width (0.002 of the range) on a coarse grid: the grid is what to change.
    job.run(small_config(tmp_path / "coarse", num_grid_points=64, **options))
    assert len(warnings) == 2 and warnings[1].startswith("the default kernel width (")
    assert warnings[1].endswith("pass more --num_grid_points (the default 4096 resolves it).")


def test_the_output_lock_refuses_a_second_holder_and_relocks_a_replaced_file(
        tmp_path, monkeypatch):
    import os

    path = tmp_path / job.LOCK_FILE
    with job._output_lock(str(tmp_path)):
        assert path.read_text() == f"{os.getpid()}\n"
        # flock is per open file: a second open, even in this process, is refused.
        with pytest.raises(ValueError, match=f"another hessian-spectrum job is running "
                                             rf"there \(process {os.getpid()}\)"):
            with job._output_lock(str(tmp_path)):
                pass
    assert not path.exists()  # removed at the end
    # Its holder removes the file between this job's open and its flock: the lock taken
    # is on a file no other job can find, so the job locks the file of that name anew.
    stat, replaced = os.stat, []

    def stat_after_a_holder_left(name, *args, **kwargs):
        if str(name) == str(path) and not replaced:
            os.remove(name)
            replaced.append(True)
        return stat(name, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat_after_a_holder_left)
    with job._output_lock(str(tmp_path)):
        monkeypatch.setattr(os, "stat", stat)
        assert replaced and path.read_text() == f"{os.getpid()}\n"
        with pytest.raises(ValueError, match="another hessian-spectrum job"):
            with job._output_lock(str(tmp_path)):
                pass


def test_a_sigterm_deferred_before_the_steps_handler_stops_at_the_first_step(
        tmp_path, monkeypatch):
    # SIGTERM between the start-up's handler and the steps' is noted ("deferred"): the
    # first step's hook checkpoints and stops, as if it had come during that step.
    import types

    saved = []
    checkpointer = types.SimpleNamespace(
        directory=str(tmp_path), save=lambda state: saved.append(state) or "ckpt-2")
    config = config_lib.default_config()
    config.num_draws = 2
    state = types.SimpleNamespace(draw=1, num_products=2, lanczos=None)
    monkeypatch.setitem(job._PHASE, "name", "steps")  # restored after the test
    monkeypatch.setitem(job._PHASE, "deferred", True)
    with job._checkpointing(config, checkpointer, chief=True) as after_step:
        with pytest.raises(job.Preempted, match="after 1 finished draw"):
            after_step(state)
    assert saved == [state] and not job._PHASE["deferred"]  # taken once
    # Without it, a step's hook neither saves (not due) nor stops.
    config.checkpoint_every = 0
    with job._checkpointing(config, checkpointer, chief=True) as after_step:
        after_step(state)
    assert saved == [state]
