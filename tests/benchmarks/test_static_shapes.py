"""benchmarks/static_shapes.py compares what it claims to: the same product, with
and without static batch shapes (and XLA), on the digits MLP."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import static_shapes  # noqa: E402
from hessian_tf import operators  # noqa: E402
from hessian_tf.operators import hessian as hessian_lib  # noqa: E402


def test_variants_compute_the_same_product(monkeypatch):
    traced = []  # the batch dimension of each trace of a batch's objective
    objective = operators.HessianOperator._batch_objective

    def recording(self, primals, state, x, y):
        traced.append(x.shape[0])
        return objective(self, primals, state, x, y)

    monkeypatch.setattr(operators.HessianOperator, "_batch_objective", recording)
    result = static_shapes.measure("mlp-digits", "inference", 128, repeats=1)
    # 1797 = 14 x 128 + 5: static traces of 128 and 5, then the dynamic one, then XLA's.
    assert traced == [128, 5, None, 128, 5]
    assert sorted(result["seconds"]) == ["dynamic", "static", "static + XLA"]
    assert all(len(seconds) == 1 for seconds in result["seconds"].values())
    # Equal products (XLA rounds differently in float32), and the module is restored.
    assert result["differences"]["dynamic"] < 1e-6
    assert result["differences"]["static + XLA"] < 1e-5
    assert hessian_lib.batch_value is static_shapes._BATCH_VALUE
