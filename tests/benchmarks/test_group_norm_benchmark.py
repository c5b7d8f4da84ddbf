"""benchmarks/group_norm.py: its network has a GroupNormalization after each
convolution, and bad arguments are refused in one line."""

import os
import sys

import keras

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import group_norm  # noqa: E402  (benchmarks/group_norm.py)


def test_the_network_normalises_every_convolution():
    model = group_norm.residual_gn_cnn(4)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("Conv2D") == kinds.count("GroupNormalization") == 5
    assert model.count_params() == 9770
    assert all(layer.groups == 4 for layer in model.layers
               if isinstance(layer, keras.layers.GroupNormalization))


def test_bad_arguments_exit_2(capsys):
    assert group_norm.main(["--groups", "3"]) == 2
    assert group_norm.main(["--rounds", "0"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and all(e.startswith("group_norm.py: error: ") for e in errors)


def test_a_row_times_keras_layer_against_per_channel_statistics(monkeypatch):
    from hessian_tf import operators
    from hessian_tf.io import datasets

    options = []
    original = operators.KerasModelFunction.__init__

    def recording(self, model, **kwargs):
        options.append(kwargs.get("per_channel_group_norm"))
        original(self, model, **kwargs)

    monkeypatch.setattr(operators.KerasModelFunction, "__init__", recording)
    x, y = datasets.load_digits()
    monkeypatch.setattr(datasets, "load_digits", lambda: (x[:20], y[:20]))
    row = group_norm.measure("reverse_over_reverse", 4, 1)
    assert options == [False, True]
    assert row[:2] == ["reverse_over_reverse", "4"] and len(row) == len(group_norm.HEADER)
    assert float(row[4]) > 0 and float(row[5]) <= 1e-4
