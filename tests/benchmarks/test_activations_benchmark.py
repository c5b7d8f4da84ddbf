"""benchmarks/activations.py: a row traces one operator with Keras's activations and one
with their derivatives written out (the benchmark's contrast), their products agree, and bad
arguments are refused in one line."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import activations as benchmark  # noqa: E402  (benchmarks/activations.py)
from hessian_tf.operators import activations  # noqa: E402
from tests.benchmarks.contrast import check_contrast_row  # noqa: E402


def test_a_row_contrasts_the_two_activations(monkeypatch):
    # Keras's activations first, then the written-out ones.
    check_contrast_row(monkeypatch, benchmark, "compact_activations",
                       activations.compact_activations, "gelu_mlp", "forward_over_backward", 16)


def test_the_workloads_are_the_documented_shapes():
    model, x, y = benchmark.workload("gelu_mlp", 4)
    assert x.shape == (4, 64) and y.shape == (4,) and model.count_params() == 563_722
    assert sum(layer.activation.__name__ == "gelu" for layer in model.layers[:3]) == 3
    model, _, _ = benchmark.workload("silu_mlp", 4)
    assert [layer.activation.__name__ for layer in model.layers] == ["silu"] * 3 + ["linear"]
    model, x, _ = benchmark.workload("attention_seq", 4)
    assert x.shape == (4, 8, 8)
    _, x, y = benchmark.workload("convnext_blocks", 4)
    assert x.shape == (4, 32, 32, 1) and y.shape == (4,)
    model, x, _ = benchmark.workload("efficientnet_b0", 4)
    assert x.shape == (4, 32, 32, 3) and model.output_shape == (None, 10)


def test_bad_rounds_exit_2(capsys):
    assert benchmark.main(["--rounds", "0"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("activations.py: error: --rounds=0")
