"""benchmarks/pointwise_conv.py: a variant's process traces its product with TensorFlow's
convolutions or with hessian_tf's matrix products (the benchmark's contrast), a row
runs both in processes of their own and their products agree, and bad arguments are
refused in one line."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import pointwise_conv  # noqa: E402  (benchmarks/pointwise_conv.py)
from hessian_tf.operators import convolutions as ours  # noqa: E402
from hessian_tf.operators import model_function  # noqa: E402


def test_variants_trace_the_two_convolutions(monkeypatch, tmp_path):
    matrix_products = []
    at_each_position = ours._at_each_position
    monkeypatch.setattr(ours, "_at_each_position", lambda *args: matrix_products.append(
        args) or at_each_position(*args))
    saved, counts = {}, {}
    for variant in (pointwise_conv.TENSORFLOW, pointwise_conv.OURS):
        out = str(tmp_path / f"{len(saved)}.npz")
        pointwise_conv.time_variant("mobilenetv2_32", 4, variant, 2, 4, 32, out)
        counts[variant] = len(matrix_products)
        with np.load(out) as values:
            saved[variant] = {key: values[key] for key in values.files}
    # MobileNetV2's 1×1 convolutions: matrix products in our variant's traces only,
    # and the mending restored after TensorFlow's.
    assert counts[pointwise_conv.TENSORFLOW] == 0 < counts[pointwise_conv.OURS]
    assert model_function.pointwise_convolutions is ours.pointwise_convolutions
    for values in saved.values():
        assert len(values["seconds"]) == 2 and min(values["seconds"]) > 0
    np.testing.assert_allclose(saved[pointwise_conv.OURS]["product"],
                               saved[pointwise_conv.TENSORFLOW]["product"], rtol=0,
                               atol=1e-5 * np.abs(saved[pointwise_conv.OURS]["product"]).max())


def test_a_row_runs_both_in_processes_of_their_own():
    # The context-module CNN, whose dilated convolutions the two variants compute
    # differently, at 8×8: four layers trace in a few seconds where MobileNetV2's
    # hundred and fifty took most of a minute.
    row = pointwise_conv.measure("dilated_cnn_32", 4, 1, examples=4, size=8, alternations=1)
    assert row[0] == "dilated_cnn_32" and row[2] == "4"
    assert len(row) == len(pointwise_conv.HEADER)
    assert float(row[5]) > 0 and float(row[6]) <= 1e-3


def test_images_repeat_the_digits():
    x, y = pointwise_conv.images(20, 3)
    assert x.shape == (3, 20, 20, 3) and y.shape == (3,)
    assert (x[:, :3, :3] == x[:, :1, :1]).all() and (x[..., 0] == x[..., 2]).all()


def test_bad_rounds_exit_2(capsys):
    assert pointwise_conv.main(["--rounds", "0"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("pointwise_conv.py: error: --rounds=0")
