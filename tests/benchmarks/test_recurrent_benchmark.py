"""benchmarks/recurrent.py compares what it claims to: the same products, looped and
unrolled, and refuses bad arguments in one line."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import recurrent  # noqa: E402  (benchmarks/recurrent.py)
from hessian_tf import operators  # noqa: E402


def test_a_row_times_the_loop_against_the_unrolled_layer(monkeypatch, capsys):
    unroll_steps = []
    original = operators.KerasModelFunction.__init__

    def recording(self, model, **options):
        unroll_steps.append(options.get("unroll_steps"))
        original(self, model, **options)

    monkeypatch.setattr(operators.KerasModelFunction, "__init__", recording)
    monkeypatch.setattr(recurrent, "EXAMPLES", 16)
    assert recurrent.main(["--cells", "simple", "--steps", "3", "--rounds", "1"]) == 0
    assert unroll_steps == [0, 3, 3]  # loop RoR, unrolled RoR, unrolled FoB
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| simple")]
    cells = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert cells[:2] == ["simple", "3"] and len(cells) == len(recurrent.HEADER)
    assert float(cells[5]) > 0  # unrolled ÷ loop
    assert float(cells[-1]) <= 1e-5  # the products agree (else measure raises)


def test_bad_arguments_exit_2(capsys):
    assert recurrent.main(["--cells", "lstm,tree"]) == 2
    assert recurrent.main(["--steps", "0"]) == 2
    assert recurrent.main(["--steps", "a"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 3 and all(e.startswith("recurrent.py: error: ") for e in errors)
