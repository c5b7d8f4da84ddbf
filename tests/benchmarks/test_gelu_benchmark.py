"""benchmarks/gelu.py: a row traces one operator with Keras's gelu and one with its
derivatives written out (the benchmark's contrast), their products agree, and bad
arguments are refused in one line."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import gelu  # noqa: E402  (benchmarks/gelu.py)
from hessian_tf.operators import activations  # noqa: E402
from tests.benchmarks.contrast import MendingRecorder  # noqa: E402


def test_a_row_contrasts_the_two_gelus(monkeypatch):
    recorder = MendingRecorder(monkeypatch, "compact_gelu", activations.compact_gelu)
    row = gelu.measure("gelu_mlp", "forward_over_backward", 1, examples=16)
    recorder.check_contrast()  # Keras's gelu first, then the written-out one
    assert row[:2] == ["gelu_mlp", "forward_over_backward"]
    assert len(row) == len(gelu.HEADER)
    assert float(row[4]) > 0 and float(row[5]) < 1e-4


def test_the_workloads_are_the_documented_shapes():
    model, x, y = gelu.workload("gelu_mlp", 4)
    assert x.shape == (4, 64) and y.shape == (4,) and model.count_params() == 563_722
    assert sum(layer.activation.__name__ == "gelu" for layer in model.layers[:3]) == 3
    model, x, _ = gelu.workload("attention_seq", 4)
    assert x.shape == (4, 8, 8)
    _, x, y = gelu.workload("convnext_blocks", 4)
    assert x.shape == (4, 32, 32, 1) and y.shape == (4,)


def test_bad_rounds_exit_2(capsys):
    assert gelu.main(["--rounds", "0"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("gelu.py: error: --rounds=0")
