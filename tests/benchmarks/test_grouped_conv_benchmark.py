"""benchmarks/grouped_conv.py: a row traces one operator with Keras's grouped
convolutions (XLA) and one with hessian_tf's (the benchmark's contrast), their products
agree, and bad arguments are refused in one line."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import grouped_conv  # noqa: E402  (benchmarks/grouped_conv.py)
from hessian_tf.operators import convolutions as ours  # noqa: E402
from tests.benchmarks.contrast import MendingRecorder  # noqa: E402


def test_a_row_contrasts_the_two_convolutions(monkeypatch):
    recorder = MendingRecorder(monkeypatch, "grouped_convolutions", ours.grouped_convolutions)
    row = grouped_conv.measure("convnext_blocks", "reverse_over_reverse", 1, examples=8)
    recorder.check_contrast()  # Keras's first, then ours
    assert row[0] == "convnext_blocks" and row[2] == "reverse_over_reverse"
    assert len(row) == len(grouped_conv.HEADER)
    assert float(row[5]) > 0


def test_bad_rounds_exit_2(capsys):
    assert grouped_conv.main(["--rounds", "0"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("grouped_conv.py: error: --rounds=0")
