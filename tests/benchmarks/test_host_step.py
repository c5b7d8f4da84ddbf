"""benchmarks/host_step.py: one row per width, of the model it says, with the columns
it says, and bad flags refused in one line."""

import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
sys.path.insert(0, BENCHMARKS)

import host_step  # noqa: E402


def test_prints_one_row_per_width(capsys):
    assert host_step.main(["--outputs", "3,5", "--lanczos_steps", "3"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:-1]]
    assert [int(row[0]) for row in rows] == [64 * 2048 + 2048 + 2049 * 3,
                                             64 * 2048 + 2048 + 2049 * 5]
    for row in rows:
        product, step, beside = (float(value) for value in row[1:4])
        assert product > 0 and step > 0
        assert beside == pytest.approx(step - product, abs=0.11)  # the column it says
        assert float(row[4]) > 0  # λmax of a cross-entropy's Hessian at a tanh layer


def test_times_the_product_as_the_driver_calls_it(monkeypatch):
    calls = []
    matmat = host_step.operator_of(3).matmat.__func__

    def recorded(self, vectors, out=None):
        calls.append(out)
        return matmat(self, vectors, out=out)

    from hessian_tf import operators
    monkeypatch.setattr(operators.HessianOperator, "matmat", recorded)
    host_step.measure(3, 3)
    # The trace, the 8 timed products (a warm-up and 7) and the 2 SLQ runs' 3 steps each
    # all write into arrays they are given.
    assert len(calls) == 1 + 8 + 2 * 3
    assert all(out is not None for out in calls)


@pytest.mark.parametrize("argv", [["--outputs", "3x"], ["--outputs", "0"],
                                  ["--lanczos_steps", "1"]])
def test_bad_flags_get_one_line_and_exit_2(argv, capsys):
    assert host_step.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--" in err
