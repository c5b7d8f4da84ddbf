"""benchmarks/lockstep_vectorized.py times what it claims to: the same block of
products, by the operator's loop and by a pfor-vectorised backward pass."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import lockstep_vectorized  # noqa: E402
from tests.operators.test_hessian import reference_hessian, tiny_data, tiny_model  # noqa: E402


def test_vectorized_block_equals_the_dense_hessian():
    model = tiny_model()
    x, y = tiny_data()
    built = lockstep_vectorized.operators_for(model, x, y, "train", 4)
    block = np.random.default_rng(0).standard_normal((3, built["pfor"].dim))
    expected = block @ reference_hessian(model, x, y, bn_mode="train", regularization=False)
    for operator in built.values():
        np.testing.assert_allclose(operator.matmat(block), expected, atol=1e-11, rtol=1e-9)


def test_measure_reports_both_blocks():
    result = lockstep_vectorized.measure("mlp-digits", 1, num_examples=256, block=2)
    assert sorted(result["seconds"]) == ["loop", "pfor", "single"]
    assert all(ratio > 0 for ratio in result["ratios"].values())
    assert result["difference"] < 1e-5
