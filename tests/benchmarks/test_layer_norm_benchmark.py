"""benchmarks/layer_norm.py: a row traces one operator with Keras's LayerNormalization and
one with its derivatives written out (the benchmark's contrast), their products agree, and
bad arguments are refused in one line."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import layer_norm as benchmark  # noqa: E402  (benchmarks/layer_norm.py)
from hessian_tf.operators import layer_norm  # noqa: E402
from tests.benchmarks.contrast import check_contrast_row  # noqa: E402


def test_a_row_contrasts_the_two_layer_norms(monkeypatch):
    # Keras's LayerNorm first, then the written-out one.
    check_contrast_row(monkeypatch, benchmark, "compact_layer_normalization",
                       layer_norm.compact_layer_normalization, "causal_lm",
                       "reverse_over_reverse", 8)


def test_the_language_model_is_the_documented_one():
    model, x, y = benchmark.workload("causal_lm", 4)
    assert x.shape == y.shape == (4, 64) and model.count_params() == 128_412
    assert sum(type(layer).__name__ == "LayerNormalization" for layer in model.layers) == 5
    assert (x[:, 1:] == y[:, :-1]).all()  # each character's label is the next one
    _, x, _ = benchmark.workload("convnext_blocks", 4)
    assert x.shape == (4, 32, 32, 1)


def test_bad_rounds_exit_2(capsys):
    assert benchmark.main(["--rounds", "0"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("layer_norm.py: error: --rounds=0")
