"""benchmarks/streaming.py refuses a bad flag in one line, before TensorFlow starts work."""

import os
import sys

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
sys.path.insert(0, BENCHMARKS)

import streaming  # noqa: E402


def test_bad_repeats_is_one_line_and_exit_2(capsys):
    assert streaming.main(["--repeats", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "--repeats=0: pass at least 1."
