"""Embedding layers: their gradient is a tf.IndexedSlices (a gather's), which forward
mode could not differentiate (an AttributeError, and --method=auto's timing crashed on
it). Products by both methods, from the residual cache, and the GGN equal dense float64
references of Keras's own call."""

import keras
import numpy as np
import pytest

from hessian_tf import operators
from hessian_tf.operators import gauss_newton
from tests.operators import test_gauss_newton
from tests.operators.test_folding import reference_hessian

VOCABULARY, LENGTH = 6, 5


def embedding_net():
    """Tokens → Embedding(mask_zero) → masked mean → Dense: 3 classes, 30 + 12 parameters."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((LENGTH,), dtype="int32")
    x = keras.layers.Embedding(VOCABULARY, 3, mask_zero=True, dtype="float64")(inputs)
    x = keras.layers.GlobalAveragePooling1D(dtype="float64")(x)
    model = keras.Model(inputs, keras.layers.Dense(test_gauss_newton.NUM_CLASSES,
                                                   dtype="float64")(x))
    return model


def tokens():
    rng = np.random.default_rng(3)
    # Token 5 never occurs: its row's gradient and products are zero.
    x = rng.integers(0, VOCABULARY - 1, (test_gauss_newton.NUM_EXAMPLES, LENGTH)).astype(np.int32)
    x[:, 0] = np.maximum(x[:, 0], 1)  # no sequence wholly masked
    return x, rng.integers(0, test_gauss_newton.NUM_CLASSES, len(x)).astype(np.int32)


@pytest.mark.parametrize("method, cache", [("forward_over_backward", False),
                                           ("reverse_over_reverse", False),
                                           ("forward_over_backward", True)])
def test_products_through_an_embedding_are_the_hessian(method, cache):
    model = embedding_net()
    x, y = tokens()
    expected = reference_hessian(model, x, y)
    assert np.abs(expected[:3 * VOCABULARY]).max() > 1e-3  # the embedding's rows take part
    operator = operators.HessianOperator(
        operators.KerasModelFunction(model), x, y, batch_size=test_gauss_newton.BATCH_SIZE,
        method=method, cache_residuals=cache)
    vectors = np.random.default_rng(4).standard_normal((2, operator.dim))
    np.testing.assert_allclose(operator.matmat(vectors), vectors @ expected.T,
                               rtol=1e-10, atol=1e-12)


def test_auto_times_forward_mode_through_an_embedding():
    x, y = tokens()
    operator = operators.HessianOperator(
        operators.KerasModelFunction(embedding_net()), x, y,
        batch_size=test_gauss_newton.BATCH_SIZE, method="auto")
    operator.choose_method()
    assert operator.method_seconds["forward_over_backward"] > 0
    assert operator.forward_mode_failure == ""


@pytest.mark.parametrize("method", ["forward_over_backward", "reverse_over_reverse"])
def test_ggn_through_an_embedding(method):
    model = embedding_net()
    x, y = tokens()
    expected = test_gauss_newton.reference_ggn(model, x, y)
    operator = gauss_newton.GaussNewtonOperator(
        operators.KerasModelFunction(model), x, y, batch_size=test_gauss_newton.BATCH_SIZE,
        method=method)
    np.testing.assert_allclose(operators.dense_matrix(operator.matvec, operator.dim), expected,
                               rtol=1e-10, atol=1e-12)
