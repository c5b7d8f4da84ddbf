"""load_dataset: digits, npz files (and every way they can be wrong), tfds under mock."""

import contextlib
import types
import zipfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from hessian_tf.io.datasets import load_dataset

# Split sizes of the indexed mock below: tfds resolves slices like `train[:10]` against them.
MOCK_SPLIT_SIZES = {"train": 100, "test": 12}


def _pixel(split: str, index: int) -> int:
    """The value every pixel of example `index` of `split` has in the indexed mock."""
    return (index * 2 + (1 if split == "test" else 0)) % 256


@contextlib.contextmanager
def indexed_mock_data(split_sizes=None, *, calls=None):
    """tfds.testing.mock_data whose examples know their split and index.

    The stock mock ignores the split (any `train[:10]` yields `num_examples` random
    examples), so slicing cannot be tested with it. Here example i of split s is an
    image of shape [28, 28, 1] (uint8) filled with `_pixel(s, i)`, labelled i % 10,
    and the split spec is resolved by tfds's own slicing rules. `calls` (a list)
    receives (builder name, config name, split) of every read.
    """
    sizes = dict(split_sizes or MOCK_SPLIT_SIZES)
    split_infos = {name: types.SimpleNamespace(num_examples=n) for name, n in sizes.items()}

    def as_dataset(builder, split, decoders=None, read_config=None, **kwargs):
        del decoders, read_config, kwargs
        if calls is not None:
            config = builder.builder_config.name if builder.builder_config else None
            calls.append((builder.name, config, str(split)))
        images, labels = [], []
        for part in tfds.core.ReadInstruction.from_spec(split).to_absolute(split_infos):
            for index in range(sizes[part.splitname])[part.from_:part.to]:
                images.append(np.full((28, 28, 1), _pixel(part.splitname, index), np.uint8))
                labels.append(index % 10)
        images = np.stack(images) if images else np.zeros((0, 28, 28, 1), np.uint8)
        labels = np.asarray(labels, np.int64)
        return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        yield


# --- digits ---------------------------------------------------------------------------

def test_digits():
    x, y = load_dataset("digits")
    assert x.shape == (1797, 64) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    assert y.shape == (1797,) and y.dtype == np.int32
    assert set(np.unique(y)) == set(range(10))


# --- npz ------------------------------------------------------------------------------

def test_npz_round_trip_keeps_float64_and_casts_int64_labels(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 3, 2))  # float64
    y = rng.integers(0, 4, 7).astype(np.int64)
    path = tmp_path / "data.npz"
    np.savez(path, x=x, y=y)
    loaded_x, loaded_y = load_dataset(f"npz:{path}")
    assert loaded_x.dtype == np.float64 and loaded_y.dtype == np.int32
    np.testing.assert_array_equal(loaded_x, x)
    np.testing.assert_array_equal(loaded_y, y)


def test_npz_float16_becomes_float32_and_float_targets_stay(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, x=np.ones((4, 2), np.float16), y=np.linspace(0, 1, 4))
    x, y = load_dataset(f"npz:{path}")
    assert x.dtype == np.float32 and y.dtype == np.float64


def test_npz_uint8_images_are_used_as_given_with_a_warning(tmp_path, monkeypatch):
    # Unlike tfds images, not scaled (integers may be token ids), but 0-255 inputs to a
    # model trained on x/255 give another loss's spectrum without a word: warned of.
    from absl import logging

    warnings = []
    monkeypatch.setattr(logging, "warning", lambda text, *args: warnings.append(text % args))
    path = tmp_path / "images.npz"
    images = np.arange(24, dtype=np.uint8).reshape(4, 3, 2) * 10
    np.savez(path, x=images, y=np.arange(4))
    x, _ = load_dataset(f"npz:{path}")
    np.testing.assert_array_equal(x, images)
    assert len(warnings) == 1 and "x is uint8 with values up to 230" in warnings[0]
    np.savez(path, x=(images > 100).astype(np.uint8), y=np.arange(4))  # a 0/1 mask
    np.savez(tmp_path / "tokens.npz", x=images.astype(np.int32), y=np.arange(4))
    load_dataset(f"npz:{path}")
    load_dataset(f"npz:{tmp_path / 'tokens.npz'}")
    assert len(warnings) == 1


def _write_bad_npz(directory, case):
    """Writes the file of one bad case; returns its path."""
    path = directory / f"{case}.npz"
    rng = np.random.default_rng(1)
    if case == "missing y":
        np.savez(path, x=np.zeros((3, 2), np.float32))
    elif case == "object arrays":
        np.savez(path, x=np.array([[1.0], "a", None], dtype=object), y=np.arange(3))
    elif case == "npy file":
        with open(path, "wb") as file:
            np.save(file, np.zeros((3, 2)))
    elif case == "text file":
        path.write_text("x,y\n1,2\n")
    elif case == "truncated zip":
        np.savez(directory / "whole.npz", x=np.zeros((50, 2)), y=np.zeros(50, np.int32))
        path.write_bytes((directory / "whole.npz").read_bytes()[:200])
    elif case == "zip of non-arrays":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("x", "not an array")
            archive.writestr("y", "nor this")
    elif case == "length mismatch":
        np.savez(path, x=np.zeros((5, 2), np.float32), y=np.zeros(4, np.int32))
    elif case == "nan in x":
        x = rng.standard_normal((5, 2)).astype(np.float32)
        x[2, 1] = np.nan
        np.savez(path, x=x, y=np.zeros(5, np.int32))
    elif case == "inf in x":
        x = rng.standard_normal((5, 2))
        x[0, 0] = -np.inf
        np.savez(path, x=x, y=np.zeros(5, np.int32))
    elif case == "strings":
        np.savez(path, x=np.array(["a", "b"]), y=np.arange(2))
    elif case == "complex x":
        np.savez(path, x=np.ones((3, 2), np.complex64), y=np.zeros(3, np.int32))
    elif case == "complex y":
        np.savez(path, x=np.ones((3, 2), np.float32), y=np.ones(3, np.complex128))
    elif case == "labels beyond int32":
        np.savez(path, x=np.ones((3, 2), np.float32), y=np.arange(3, dtype=np.int64) + 2**32)
    elif case == "no examples":
        np.savez(path, x=np.zeros((0, 2), np.float32), y=np.zeros(0, np.int32))
    elif case == "scalars":
        np.savez(path, x=np.float32(1.0), y=np.int32(0))
    elif case == "keras model":
        import keras

        keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)]).save(
            path.with_suffix(".keras"))
        path = path.with_suffix(".keras")
    elif case == "missing file":
        pass
    elif case == "directory":
        path.mkdir()
    else:
        raise AssertionError(case)
    return path


@pytest.mark.parametrize("case, expected", [
    ("missing y", "lacks arrays ['y']"),
    ("object arrays", "without pickle"),
    ("npy file", "not an .npz file"),
    ("text file", "not an .npz file"),
    ("truncated zip", "not an .npz file"),
    ("zip of non-arrays", "not NumPy arrays"),
    ("length mismatch", "same number of examples"),
    ("nan in x", "NaN or infinite"),
    ("inf in x", "NaN or infinite"),
    ("strings", "numeric"),
    ("complex x", "x holds complex numbers (complex64)"),
    ("complex y", "y holds complex numbers (complex128)"),
    ("no examples", "no examples"),
    # They had wrapped around into the model's classes in the cast to int32.
    ("labels beyond int32", "labels range over [4294967296, 4294967298], beyond 32-bit"),
    ("scalars", "same number of examples"),
    ("missing file", "no such file"),
    ("directory", "no such file"),
    ("keras model", "this is a .keras model, not data; pass it as --model"),
])
def test_bad_npz_is_a_value_error_naming_the_flag(tmp_path, case, expected):
    path = _write_bad_npz(tmp_path, case)
    with pytest.raises(ValueError) as raised:
        load_dataset(f"npz:{path}")
    message = str(raised.value)
    assert message.startswith(f"--dataset=npz:{path}"), message
    assert expected in message, message


def test_object_arrays_are_never_unpickled(tmp_path, monkeypatch):
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("load_dataset unpickled data")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    path = _write_bad_npz(tmp_path, "object arrays")
    with pytest.raises(ValueError, match="--dataset"):
        load_dataset(f"npz:{path}")


@pytest.mark.parametrize("spec", ["cifar10", "", "npz", "tfds", "Digits", "csv:data.csv"])
def test_unknown_spec(spec):
    with pytest.raises(ValueError) as raised:
        load_dataset(spec)
    message = str(raised.value)
    assert message.startswith(f"--dataset={spec!r}"), message
    assert "npz:PATH" in message and "tfds:NAME" in message


# --- tfds -----------------------------------------------------------------------------

def test_tfds_mnist_under_stock_mock_data():
    with tfds.testing.mock_data(num_examples=13):
        x, y = load_dataset("tfds:mnist", split="test")
    assert x.shape == (13, 28, 28, 1) and x.dtype == np.float32
    assert y.shape == (13,) and y.dtype == np.int32
    assert 0.0 <= x.min() and x.max() <= 1.0
    # Scaled from uint8: every value is k/255 for an integer k, and not all are 0.
    np.testing.assert_allclose(x * 255.0, np.round(x * 255.0), atol=1e-4)
    assert x.max() > 0.5
    assert y.min() >= 0 and y.max() <= 9


def test_tfds_load_with_download_false_works_under_mock(tmp_path):
    # What load_dataset relies on: mock_data serves download=False reads.
    with tfds.testing.mock_data(num_examples=3):
        dataset = tfds.load("mnist", split="train", as_supervised=True, download=False,
                            data_dir=str(tmp_path))
        examples = list(tfds.as_numpy(dataset))
    assert len(examples) == 3
    assert examples[0][0].shape == (28, 28, 1) and examples[0][0].dtype == np.uint8


def test_tfds_config_form_under_mock():
    calls = []
    with indexed_mock_data(calls=calls):
        x, y = load_dataset("tfds:mnist_corrupted/shot_noise", split="test[:5]")
    assert calls == [("mnist_corrupted", "shot_noise", "test[:5]")]
    assert x.shape == (5, 28, 28, 1) and x.dtype == np.float32
    np.testing.assert_array_equal(y, np.arange(5) % 10)


def test_tfds_config_form_with_stock_mock_data():
    with tfds.testing.mock_data(num_examples=4):
        x, y = load_dataset("tfds:cifar10_corrupted/brightness_1", split="test")
    assert x.shape == (4, 32, 32, 3) and x.dtype == np.float32 and y.dtype == np.int32


@pytest.mark.parametrize("split, expected", [
    ("train", [("train", i) for i in range(100)]),
    ("train[:10]", [("train", i) for i in range(10)]),
    ("train[90:]", [("train", i) for i in range(90, 100)]),
    ("train[10%:20%]", [("train", i) for i in range(10, 20)]),
    ("test[-3:]", [("test", i) for i in range(9, 12)]),
    ("train[:2]+test[:2]", [("train", 0), ("train", 1), ("test", 0), ("test", 1)]),
])
def test_tfds_split_slicing_reads_exactly_those_examples_in_order(split, expected):
    calls = []
    with indexed_mock_data(calls=calls):
        x, y = load_dataset("tfds:mnist", split=split)
    assert calls == [("mnist", None, split)]
    assert x.shape == (len(expected), 28, 28, 1) and x.dtype == np.float32
    pixels = np.array([_pixel(s, i) for s, i in expected], np.float32) / 255.0
    np.testing.assert_array_equal(x[:, 0, 0, 0], pixels)
    np.testing.assert_array_equal(x.min(axis=(1, 2, 3)), x.max(axis=(1, 2, 3)))
    np.testing.assert_array_equal(y, [i % 10 for _, i in expected])
    assert y.dtype == np.int32


def test_tfds_split_larger_than_one_read_batch():
    from hessian_tf.io import datasets
    size = datasets._TFDS_READ_BATCH + 3  # exercises the concatenation of read batches
    with indexed_mock_data({"train": size}):
        x, y = load_dataset("tfds:mnist", split="train")
    assert x.shape[0] == size and y.shape == (size,)
    np.testing.assert_array_equal(y, np.arange(size) % 10)
    np.testing.assert_array_equal(x[-1, 0, 0, 0], _pixel("train", size - 1) / np.float32(255))


@pytest.mark.parametrize("name, split, expected", [
    ("no_such_dataset_xyz", "train", "DatasetNotFoundError"),
    ("mnist/no_such_config", "train", "no_such_config"),
    ("mnist", "train[:200]", "incompatible with 100 examples"),
    ("mnist", "validation", "Unknown split 'validation'"),
])
def test_tfds_errors_name_the_flags(name, split, expected):
    with indexed_mock_data():
        with pytest.raises(ValueError) as raised:
            load_dataset(f"tfds:{name}", split=split)
    message = str(raised.value)
    assert message.startswith(f"--dataset=tfds:{name} --split={split}"), message
    assert expected in message, message


def test_tfds_empty_split():
    with indexed_mock_data({"train": 5}):
        with pytest.raises(ValueError, match=r"--dataset=tfds:mnist --split=train\[5:\]: .*no examples"):
            load_dataset("tfds:mnist", split="train[5:]")


def test_tfds_not_prepared_in_data_dir(tmp_path):
    # No mock: a real read of an empty --data_dir fails with a ValueError, offline.
    with pytest.raises(ValueError) as raised:
        load_dataset("tfds:mnist", split="train", data_dir=str(tmp_path))
    message = str(raised.value)
    assert message.startswith(f"--dataset=tfds:mnist --split=train --data_dir={tmp_path}")
    assert "tfds build" in message


def test_tfds_without_data_dir_names_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))  # empty: nothing to read, offline
    with pytest.raises(ValueError) as raised:
        load_dataset("tfds:mnist", split="train", data_dir="")
    assert str(raised.value).startswith(
        "--dataset=tfds:mnist --split=train --data_dir=(tfds default): could not be read")
