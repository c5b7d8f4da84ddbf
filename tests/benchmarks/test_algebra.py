"""benchmarks/algebra.py: it times the step it says it times (one reorthogonalisation
pass, nothing written past the basis) and refuses bad flags in one line."""

import os
import sys

import numpy as np
import pytest

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
sys.path.insert(0, BENCHMARKS)

import algebra  # noqa: E402
from hessian_tf import linalg  # noqa: E402


def test_the_timed_step_runs_one_pass(monkeypatch):
    module = sys.modules[linalg.lanczos_step.__module__]
    calls = []
    project = module._project
    monkeypatch.setattr(module, "_project", lambda a, w: calls.append(a.shape) or project(a, w))
    step_seconds, floor_seconds = algebra.measure(5000, 12, np.float32, 2, np.random.default_rng(0))
    assert step_seconds > 0 and floor_seconds > 0
    # warm-up + 2 repeats, each one pass against the 13 active vectors
    assert calls == [(13, 5000)] * 3


def test_prints_one_row_per_size_and_type(capsys):
    assert algebra.main(["--dims", "300,400", "--step", "4", "--repeats", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(row[0], row[1]) for row in rows] == [
        ("300", "float64"), ("300", "float32"), ("400", "float64"), ("400", "float32")]


@pytest.mark.parametrize("argv", [["--dims", "1e5"], ["--dims", "0"], ["--step", "0"]])
def test_bad_flags_get_one_line_and_exit_2(argv, capsys):
    assert algebra.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--" in err
