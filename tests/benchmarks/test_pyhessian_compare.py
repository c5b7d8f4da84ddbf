"""benchmarks/pyhessian_compare.py with a user's own network (--model, --data): the
parts that need neither torch nor PyHessian (CI installs neither): the files are
checked, and the layer chain the PyTorch twin mirrors is read from the Keras model,
before anything is installed. The twin itself is checked against the Keras logits at
every run of the script."""

import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
sys.path.insert(0, BENCHMARKS)

import example_networks  # noqa: E402
import pyhessian_compare as compare  # noqa: E402


def chain_model():
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, activation="elu", name="conv")(inputs)
    h = keras.layers.MaxPooling2D(2, name="pool")(h)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.LeakyReLU(0.2)(h)
    h = keras.layers.Dropout(0.5)(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(6, name="hidden")(h)
    h = keras.layers.Activation("gelu")(h)
    h = keras.layers.Dense(4, activation="leaky_relu", name="hidden2")(h)
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(h))


def test_chain_of_a_functional_model():
    assert compare.sequential_chain(chain_model()) == [
        ("module", "conv"), ("pool", ("max", (2, 2), (2, 2))), ("module", "bn"),
        ("leaky_relu", pytest.approx(0.2)), ("flatten", None), ("module", "hidden"),
        ("activation", "gelu"), ("module", "hidden2"), ("module", "logits")]


@pytest.mark.parametrize("layer, message", [
    (keras.layers.ZeroPadding2D(1), "ZeroPadding2D) is not supported"),
    (keras.layers.MaxPooling2D(2, padding="same"), "must use padding='valid'"),
    (keras.layers.Activation("softmax"), "activation 'softmax'"),
    (keras.layers.ReLU(max_value=6.0), "only the plain ReLU"),
    (keras.layers.Conv2D(2, 3, activation="relu6"), "activation 'relu6'"),
    (keras.layers.Conv2D(2, 3, dilation_rate=2), "without dilation"),
    (keras.layers.BatchNormalization(scale=False), "with both γ and β"),
    (keras.layers.Dense(2), "flatten or pool images before a Dense"),
    (keras.layers.Flatten(data_format="channels_first"), "Flatten flatten_cf must be"),
])
def test_layers_the_twin_cannot_mirror_are_named(layer, message):
    # Each is refused by name before anything is installed (no torch needed).
    if isinstance(layer, keras.layers.Flatten):
        layer.name = "flatten_cf"
    model = keras.Sequential([keras.Input((8, 8, 1)), layer, keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    with pytest.raises(compare.Failure, match=re.escape(message)):
        compare.sequential_chain(model)


def test_workload_from_files(tmp_path):
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    model.save(tmp_path / "net.keras")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 5))
    np.savez(tmp_path / "data.npz", x=x, y=rng.integers(0, 3, (10, 1)).astype(np.float64))
    workload = compare.workload_from_files(
        str(tmp_path / "net.keras"), str(tmp_path / "data.npz"), 128, None)
    assert (workload.name, workload.batch_size, workload.lanczos_steps) == ("net", 10, 90)
    assert workload.x.dtype == np.float32 and workload.y.dtype == np.int32
    assert workload.y.shape == (10,) and workload.architecture == "sequential"

    # A trailing axis of size 1 is dropped, or added, as Keras does for hessian-spectrum.
    np.savez(tmp_path / "column.npz", x=x[..., np.newaxis], y=rng.integers(0, 3, 10))
    assert compare.workload_from_files(
        str(tmp_path / "net.keras"), str(tmp_path / "column.npz"), 4, 5).x.shape == (10, 5)
    keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(3)]).save(
        tmp_path / "image.keras")
    np.savez(tmp_path / "gray.npz", x=rng.uniform(size=(10, 4, 4)), y=rng.integers(0, 3, 10))
    assert compare.workload_from_files(
        str(tmp_path / "image.keras"), str(tmp_path / "gray.npz"), 4, 5).x.shape == (10, 4, 4, 1)

    np.savez(tmp_path / "soft.npz", x=x, y=rng.uniform(size=10))
    with pytest.raises(compare.Failure, match="not integer class labels"):
        compare.workload_from_files(str(tmp_path / "net.keras"), str(tmp_path / "soft.npz"), 4, 5)
    labels = rng.integers(0, 3, 10)
    bad = {
        "no_y.npz": (dict(x=x), "cannot read arrays x and y"),
        "wide.npz": (dict(x=x[:, :4], y=labels), "inputs of shape (4,), but --model takes (5,)"),
        "classes.npz": (dict(x=x, y=labels + 1), "labels must lie in [0, 2]"),
        "text.npz": (dict(x=x.astype(str), y=labels), "must be numeric"),
    }
    for name, (arrays, message) in bad.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(compare.Failure, match=re.escape(message)):
            compare.workload_from_files(str(tmp_path / "net.keras"), str(tmp_path / name), 4, 5)
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(compare.Failure, match="it holds a single array"):
        compare.workload_from_files(str(tmp_path / "net.keras"), str(tmp_path / "x.npy"), 4, 5)
    with pytest.raises(compare.Failure, match="the npz: prefix is for hessian-spectrum"):
        compare.workload_from_files(str(tmp_path / "net.keras"), "npz:" + str(tmp_path / "x.npy"),
                                    4, 5)
    # A layer the twin cannot mirror: named, with the flag.
    keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, activation="softmax")]).save(
        tmp_path / "probabilities.keras")
    with pytest.raises(compare.Failure, match=r"^--model=.*remove the final softmax"):
        compare.workload_from_files(str(tmp_path / "probabilities.keras"),
                                    str(tmp_path / "data.npz"), 4, 5)


def run_script(*args):
    return subprocess.run([sys.executable, os.path.join(BENCHMARKS, "pyhessian_compare.py"),
                           *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--model=net.keras"], "--model and --data go together"),
    (["--model=net.keras", "--data=d.npz", "--workload=mlp-digits"], "pass one or the other"),
    (["--model=missing.keras", "--data=d.npz", "--no_install"], "--model=missing.keras: no such file"),
    (["--batch_size=64"], "--batch_size=64 goes with --model"),
])
def test_bad_input_is_one_line_before_any_install(args, message):
    result = run_script(*args)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith(("error", "pyhessian"))]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_example_networks_are_accepted(tmp_path):
    # The networks of PYHESSIAN.md's "Your own network" pass every check before install.
    assert example_networks.main([str(tmp_path)]) == 0
    for name, data in example_networks.NETWORKS.items():
        workload = compare.workload_from_files(
            str(tmp_path / f"{name}.keras"), str(tmp_path / f"{data}.npz"), 128, None)
        assert len(workload.x) == 1797 and workload.architecture == "sequential"
        assert len(compare.sequential_chain(workload.keras_model)) >= 4
