"""A TPU compiles every replica function with XLA. The product and gradient graphs of
float32 accumulation (what runs under a TPUStrategy) must compile under XLA, here on
the CPU, and give the products of the uncompiled graphs: no op XLA lacks (string
ops, py_function, data-dependent shapes) may enter them unnoticed."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from hessian_tf import operators
from tests.operators.test_hessian import BATCH_SIZE, tiny_data, tiny_model


def conv_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((4, 4, 1)),
        keras.layers.Conv2D(3, 3, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(3),
    ])


def make_operator(network, method, bn_mode):
    x, y = tiny_data(np.float32)
    if network == "conv":
        model = conv_model()
        x = np.random.default_rng(2).standard_normal((x.shape[0], 4, 4, 1)).astype(np.float32)
    else:
        model = tiny_model(dtype="float32")
    return operators.HessianOperator(
        operators.KerasModelFunction(model), x, y, batch_size=BATCH_SIZE, bn_mode=bn_mode,
        method=method, accumulation="float32")


@pytest.mark.parametrize("network, method, bn_mode", [
    ("dense", "reverse_over_reverse", "train"),
    ("dense", "forward_over_backward", "inference"),
    ("conv", "reverse_over_reverse", "inference"),
    ("conv", "reverse_over_reverse", "train"),
])
def test_float32_graphs_compile_under_xla(network, method, bn_mode):
    operator = make_operator(network, method, bn_mode)
    # The data end in an uneven batch: two static traces and the empty-batch branch.
    assert len(operator._batch_sizes) == 2
    block = np.random.default_rng(0).standard_normal((3, operator.dim))
    compiled_product = tf.function(operator._product_graph, jit_compile=True)
    for vectors in (block[:1], block):  # one vector, and a lockstep block
        expected = operator.matmat(vectors)
        accumulator = compiled_product(tf.constant(vectors, tf.float32), operator._all_batches)
        got = operator._combined(accumulator).reshape(vectors.shape) / operator.num_examples
        np.testing.assert_allclose(got, expected, rtol=1e-5,
                                   atol=1e-5 * np.max(np.abs(expected)))
    # The graph that ran was XLA's: its HLO exists (this raises for a plain trace).
    hlo = compiled_product.experimental_get_compiler_ir(
        tf.constant(block[:1], tf.float32), operator._all_batches)(stage="hlo")
    assert "while" in hlo

    loss, gradient = operator.loss_and_gradient()
    compiled_gradient = tf.function(operator._loss_gradient_graph, jit_compile=True)
    total = operator._combined(compiled_gradient()) / operator.num_examples
    assert total[0] == pytest.approx(loss, rel=1e-5)
    np.testing.assert_allclose(total[1:], gradient, rtol=1e-5,
                               atol=1e-5 * np.max(np.abs(gradient)))
