"""benchmarks/flops.py counts what a product must compute, so its ratios are floors.

Expected counts from the layers' shapes: a matrix product or convolution of a batch
costs U flops (2 × multiply-adds); the gradient of a layer adds U for the weight
gradient and U for the input gradient (none for the first layer, whose input is data);
a reverse-over-reverse product needs, per inner layer, 8 U (forward, input gradient,
and the 6 tangent terms) and, for the first layer, 3 U; the gradient's own weight
gradients feed only the inner product with the tangents and are pruned. Below a
piecewise-linear activation (ReLU) the input gradient's value is not needed either (the
activation has no second derivative to multiply it by): 7 U.
"""

import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from hessian_tf import operators

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "benchmarks"))
import flops  # noqa: E402  (benchmarks/flops.py)

BATCH = 16


def _graphs(model, x, y):
    model_function = operators.KerasModelFunction(model)
    operator = operators.HessianOperator(
        model_function, x, y, batch_size=BATCH, method="reverse_over_reverse")
    primals = model_function.primals()
    tangents = operators.unflatten(tf.constant(np.ones(operator.dim)), primals)
    x, y = tf.constant(x), tf.constant(y)

    @tf.function
    def gradient():
        with tf.GradientTape() as tape:
            tape.watch(primals)
            objective = operator._batch_objective(primals, model_function.state(), x, y)
        return tape.gradient(objective, primals)

    @tf.function
    def product(block):
        return operator._batch_products(primals, model_function.state(), block, x, y)

    return (
        flops.graph_flops(gradient.get_concrete_function()),
        flops.graph_flops(product.get_concrete_function([tangents])),
        flops.graph_flops(product.get_concrete_function([tangents] * 3)),
    )


def test_counts_of_a_dense_network_match_the_layer_arithmetic():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((12,)), keras.layers.Dense(20, activation="tanh"), keras.layers.Dense(5)])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, 12)).astype(np.float32)
    y = rng.integers(0, 5, BATCH).astype(np.int32)
    gradient, product, block = _graphs(model, x, y)
    first, second = 2 * BATCH * 12 * 20, 2 * BATCH * 20 * 5
    assert gradient["matrix product"] == 2 * first + 3 * second
    assert product["matrix product"] == 3 * first + 8 * second
    # Lockstep shares the forward pass and the input gradient of the second layer.
    assert block["matrix product"] == 3 * (2 * first + 6 * second) + first + 2 * second


def test_counts_of_a_convolutional_network_match_the_layer_arithmetic():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(3, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(5),
    ])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, 6, 6, 2)).astype(np.float32)
    y = rng.integers(0, 5, BATCH).astype(np.int32)
    gradient, product, _ = _graphs(model, x, y)
    first, second = 2 * BATCH * 36 * 9 * 2 * 3, 2 * BATCH * 36 * 9 * 3 * 4
    assert gradient["convolution"] == 2 * first + 3 * second
    assert product["convolution"] == 3 * first + 7 * second
    assert product["total"] == sum(product[k] for k in ("convolution", "matrix product", "other"))


def test_control_flow_is_refused_rather_than_miscounted():
    @tf.function
    def loop(x):
        return tf.while_loop(lambda i, v: i < 3, lambda i, v: (i + 1, tf.matmul(v, v)), (0, x))[1]

    with pytest.raises(ValueError, match="control flow"):
        flops.graph_flops(loop.get_concrete_function(tf.TensorSpec([4, 4], tf.float32)))
