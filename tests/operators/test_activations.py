"""Keras's gelu, silu and mish with their derivatives written out
(operators/activations.py)."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.activations import activations as keras_activations
from keras.src.backend.tensorflow import nn as keras_tensorflow_nn

from hessian_tf.operators import activations
from tests.operators.test_attention import check_fewer_muls_same_products

DTYPES = [tf.float64, tf.float32, tf.float16, tf.bfloat16]


def points(dtype=tf.float64):
    # Both tails (where erfc and tanh saturate), zero, and the bend around ±1.
    grid = np.concatenate([np.linspace(-9.0, 9.0, 37), [-1e-3, 0.0, 1e-3, 0.7, -0.7]])
    return tf.constant(grid, dtype)


# (hessian_tf's function, TensorFlow's) of each activation and form.
FUNCTIONS = {
    "gelu": (lambda t: activations.gelu(t, False), lambda t: tf.nn.gelu(t, approximate=False)),
    "gelu_tanh": (lambda t: activations.gelu(t, True), lambda t: tf.nn.gelu(t, approximate=True)),
    "silu": (activations.silu, tf.nn.silu),
    "mish": (activations.mish, lambda t: t * tf.tanh(tf.math.softplus(t))),
}


@pytest.mark.parametrize("activation", sorted(FUNCTIONS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_values_are_tensorflows_bit_for_bit(activation, dtype):
    ours, tensorflows = FUNCTIONS[activation]
    x = points(dtype)
    got = ours(x)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got.numpy(), tensorflows(x).numpy())


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
@pytest.mark.parametrize("activation", sorted(FUNCTIONS))
@pytest.mark.parametrize("traced", [False, True])
def test_first_and_second_derivatives_are_tensorflows(mode, activation, traced):
    x = points()

    def both(function):
        run = functools.partial(derivatives, function, mode=mode)
        return (tf.function(run) if traced else run)(x)

    got = both(FUNCTIONS[activation][0])
    expected = both(FUNCTIONS[activation][1])
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
        keras.layers.Dense(6, activation="swish", dtype=dtype),
        keras.layers.Dense(6, activation="mish", dtype=dtype),
        keras.layers.Dense(3, dtype=dtype),
    ])


@pytest.mark.parametrize("method", ["forward_over_backward", "reverse_over_reverse"])
def test_products_are_those_of_keras_activations_with_fewer_ops(method):
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((16, 5)), rng.integers(0, 3, 16).astype(np.int32)
    check_fewer_muls_same_products(gelu_model(), x, y, method, "compact_activations")


def test_the_context_nests_and_restores_keras_activations(monkeypatch):
    calls = []
    for name in ("gelu", "silu", "mish"):
        compact = getattr(activations, name)
        monkeypatch.setattr(activations, name, functools.partial(
            lambda name, compact, *a: calls.append((name,) + a) or compact(*a), name, compact))
    with activations.compact_activations(), activations.compact_activations():
        assert keras_tensorflow_nn.gelu is activations.gelu
        assert keras_tensorflow_nn.silu is activations.silu
        # Keras's layers reach them: keras.ops looks the backend's functions up at each
        # call, keras.activations.mish its Mish.static_call.
        layers = [keras.layers.Dense(2, activation=name)
                  for name in ("gelu", "swish", "silu", "mish")]
        for layer in layers:
            tf.function(layer).get_concrete_function(tf.TensorSpec([None, 3], tf.float32))
        assert {call[0] for call in calls} == {"gelu", "silu", "mish"}
        assert all(call[2] is False for call in calls if call[0] == "gelu")  # the exact form
    assert keras_tensorflow_nn.gelu is activations._keras_gelu
    assert keras_tensorflow_nn.silu is activations._keras_silu
    assert keras_activations.Mish.__dict__["static_call"] is activations._keras_mish_method
    reached = len(calls)
    for layer in layers:
        layer(tf.ones([1, 3]))
    assert len(calls) == reached


def test_ragged_inputs_take_keras_path():
    x = tf.ragged.constant([[-1.0, 0.5], [2.0]])
    for ours, keras_function in ((lambda t: activations.gelu(t, False),
                                  lambda t: activations._keras_gelu(t, False)),
                                 (activations.silu, activations._keras_silu),
                                 (activations.mish, activations._keras_mish)):
        np.testing.assert_array_equal(ours(x).flat_values.numpy(),
                                      keras_function(x).flat_values.numpy())


def test_integer_inputs_get_tensorflows_error():
    with pytest.raises(ValueError, match="floating point"):
        activations.gelu(tf.constant([1, 2]), False)
    with pytest.raises((TypeError, tf.errors.InvalidArgumentError)):
        activations.silu(tf.constant([1, 2]))
    with pytest.raises((TypeError, tf.errors.InvalidArgumentError, tf.errors.NotFoundError)):
        activations.mish(tf.constant([1, 2]))
