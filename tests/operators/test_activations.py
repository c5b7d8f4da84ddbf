"""Keras's gelu with its derivatives written out (operators/activations.py)."""

import contextlib
import functools

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.backend.tensorflow import nn as keras_tensorflow_nn

from hessian_tf import operators
from hessian_tf.operators import activations, model_function
from hessian_tf.operators.graphs import graph_nodes

DTYPES = [tf.float64, tf.float32, tf.float16, tf.bfloat16]


def points(dtype=tf.float64):
    # Both tails (where erfc and tanh saturate), zero, and the bend around ±1.
    grid = np.concatenate([np.linspace(-9.0, 9.0, 37), [-1e-3, 0.0, 1e-3, 0.7, -0.7]])
    return tf.constant(grid, dtype)


@pytest.mark.parametrize("approximate", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_values_are_tensorflows_bit_for_bit(approximate, dtype):
    x = points(dtype)
    got = activations.gelu(x, approximate)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got.numpy(), tf.nn.gelu(x, approximate=approximate).numpy())


def derivatives(function, x, mode):
    """gelu′(x) and gelu″(x) element-wise, the second by `mode`."""
    if mode == "reverse_over_reverse":
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                y = function(x)
            first = inner.gradient(y, x)
        return first, outer.gradient(first, x)
    with tf.autodiff.ForwardAccumulator(x, tf.ones_like(x)) as accumulator:
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = function(x)
        first = tape.gradient(y, x)
    return first, accumulator.jvp(first)


@pytest.mark.parametrize("mode", ["forward_over_backward", "reverse_over_reverse"])
@pytest.mark.parametrize("approximate", [False, True])
@pytest.mark.parametrize("traced", [False, True])
def test_first_and_second_derivatives_are_tensorflows(mode, approximate, traced):
    x = points()

    def both(function):
        run = functools.partial(derivatives, lambda t: function(t, approximate), mode=mode)
        return (tf.function(run) if traced else run)(x)

    got = both(activations.gelu)
    expected = both(lambda t, a: tf.nn.gelu(t, approximate=a))
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-13, atol=1e-14)
    # Not zero: a derivative the tapes missed would read 0.
    assert np.max(np.abs(got[1].numpy())) > 0.3


def gelu_model(dtype="float64"):
    keras.utils.set_random_seed(0)
    tanh_gelu = functools.partial(keras.activations.gelu, approximate=True)
    return keras.Sequential([
        keras.Input((5,), dtype=dtype),
        keras.layers.Dense(7, activation="gelu", dtype=dtype),
        keras.layers.Dense(6, dtype=dtype),
        keras.layers.Activation(tanh_gelu, dtype=dtype),
        keras.layers.Dense(3, dtype=dtype),
    ])


def product_and_muls(model, method, compact):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 5))
    y = rng.integers(0, 3, 16).astype(np.int32)
    with contextlib.ExitStack() as stack:
        if not compact:
            stack.enter_context(pytest.MonkeyPatch.context()).setattr(
                model_function, "compact_gelu", contextlib.nullcontext)
        operator = operators.HessianOperator(operators.KerasModelFunction(model), x, y,
                                             batch_size=8, method=method)
        product = operator.matvec(np.random.default_rng(2).standard_normal(operator.dim))
        graph = operator._product_trace(1).graph.as_graph_def()
    return product, sum(node.op == "Mul" for _, node in graph_nodes(graph))


@pytest.mark.parametrize("method", ["forward_over_backward", "reverse_over_reverse"])
def test_products_are_those_of_keras_gelu_with_fewer_ops(method):
    model = gelu_model()
    product, muls = product_and_muls(model, method, compact=True)
    expected, keras_muls = product_and_muls(model, method, compact=False)
    np.testing.assert_allclose(product, expected, rtol=1e-12,
                               atol=1e-12 * np.max(np.abs(expected)))
    assert muls < keras_muls


def test_the_context_nests_and_restores_keras_gelu(monkeypatch):
    calls = []
    compact = activations.gelu
    monkeypatch.setattr(activations, "gelu", lambda *a: calls.append(a) or compact(*a))
    with activations.compact_gelu(), activations.compact_gelu():
        assert keras_tensorflow_nn.gelu is activations.gelu
        # Keras's layers reach it: keras.ops looks the backend's function up at each call.
        layer = keras.layers.Dense(2, activation="gelu")
        tf.function(layer).get_concrete_function(tf.TensorSpec([None, 3], tf.float32))
        assert calls and all(call[1] is False for call in calls)  # the exact form
    assert keras_tensorflow_nn.gelu is activations._keras_gelu
    reached = len(calls)
    layer(tf.ones([1, 3]))
    assert len(calls) == reached


def test_integer_inputs_get_tensorflows_error():
    with pytest.raises(ValueError, match="floating point"):
        activations.gelu(tf.constant([1, 2]), False)
