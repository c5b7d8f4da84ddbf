"""benchmarks/grouped_conv_formulations.py: the two formulations it contrasts with the
split are grouped convolutions, a row traces each variant its own way and their products
agree, and bad arguments are refused in one line."""

import os
import sys

import numpy as np
import pytest
import tensorflow as tf
from keras.src.backend.tensorflow import nn as keras_tensorflow_nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import grouped_conv_formulations as formulations  # noqa: E402
from hessian_tf.operators import convolutions  # noqa: E402


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("grouped", [formulations.depthwise_summed, formulations.block_diagonal])
@pytest.mark.parametrize("per_group,outputs_per_group", [(3, 2), (1, 3), (4, 4)])
def test_formulations_are_the_grouped_convolution(grouped, padding, per_group,
                                                  outputs_per_group):
    rng = np.random.default_rng(0)
    groups = 5
    inputs = tf.constant(rng.standard_normal((2, 7, 6, groups * per_group)))
    kernel = tf.constant(rng.standard_normal((3, 3, per_group, groups * outputs_per_group)))
    expected = tf.concat([
        tf.nn.conv2d(part, part_kernel, 1, padding)
        for part, part_kernel in zip(tf.split(inputs, groups, -1), tf.split(kernel, groups, -1))],
        -1)
    actual = grouped(inputs, kernel, groups, padding)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=0, atol=1e-12)


def test_a_row_traces_each_formulation(monkeypatch):
    calls = []
    for name in ("depthwise_summed", "block_diagonal"):
        function = getattr(formulations, name)
        monkeypatch.setattr(
            formulations, name,
            lambda *args, _name=name, _function=function: calls.append(_name) or _function(*args))
    keras_conv, split = keras_tensorflow_nn.conv, convolutions._grouped
    row = formulations.measure(16, 4, 8, 1, examples=8)
    assert len(row) == len(formulations.HEADER)
    assert row[0] == "16/4 at 8×8"
    assert all(float(value) > 0 for value in row[2:6])
    assert "depthwise_summed" in calls and "block_diagonal" in calls
    assert keras_tensorflow_nn.conv is keras_conv and convolutions._grouped is split  # restored


def test_bad_rounds_exit_2(capsys):
    assert formulations.main(["--rounds", "0"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith(
        "grouped_conv_formulations.py: error: --rounds=0")
