"""benchmarks/tile_gradient.py: a row traces one operator with TensorFlow's Tile gradient
and one with static axes (the benchmark's contrast), their products agree, and bad
arguments are refused in one line."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import tile_gradient  # noqa: E402  (benchmarks/tile_gradient.py)
from hessian_tf.operators import second_order  # noqa: E402
from tests.benchmarks.contrast import MendingRecorder  # noqa: E402


def test_a_row_contrasts_the_two_gradients(monkeypatch):
    recorder = MendingRecorder(monkeypatch, "second_order_gradients",
                               second_order.second_order_gradients)
    row = tile_gradient.measure("unet_pixels", "inference", "reverse_over_reverse", 1, examples=8)
    recorder.check_contrast()  # TensorFlow's gradient first, then the static axes
    assert row[:3] == ["unet_pixels", "inference", "reverse_over_reverse"]
    assert len(row) == len(tile_gradient.HEADER)
    assert float(row[5]) > 0


def test_the_workloads_are_the_documented_shapes():
    model, x, y = tile_gradient.workload("unet_pixels", 4)
    assert x.shape == (4, 32, 32, 1) and y.shape == (4, 32, 32) and model.output_shape[-1] == 11
    assert set(np.unique(y)) <= set(range(11))
    _, x, y = tile_gradient.workload("resnet32", 4)
    assert x.shape == (4, 32, 32, 3) and y.shape == (4,)


def test_bad_rounds_exit_2(capsys):
    assert tile_gradient.main(["--rounds", "0"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("tile_gradient.py: error: --rounds=0")
