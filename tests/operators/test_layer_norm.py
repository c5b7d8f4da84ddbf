"""Keras's LayerNormalization with its derivatives written out (operators/layer_norm.py)."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.ops import nn as keras_ops_nn

from hessian_tf.operators import layer_norm
from hessian_tf.operators.moments import exact_moments
from tests.operators.test_attention import check_fewer_muls_same_products

DTYPES = [tf.float64, tf.float32, tf.float16, tf.bfloat16]

# (input shape, normalised axes): Keras's default (the last axis), two axes of an image
# with γ and β reshaped to broadcast, and one middle axis.
CASES = {"last": ((4, 5, 6), [2]), "image": ((3, 4, 5, 6), [1, 2]), "middle": ((3, 4, 5), [1])}
# (γ, β) present or not (scale=False, center=False).
AFFINE = {"both": (True, True), "no_scale": (False, True), "no_center": (True, False),
          "neither": (False, False)}


def arguments(case, affine="both", dtype=tf.float64, seed=0):
    """(x, γ, β, axes) of a case: x with a mean and spread of its own per row."""
    shape, axes = CASES[case]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * rng.uniform(0.5, 3.0, shape[:1] + (1,) * (len(shape) - 1))
    parameter_shape = [shape[a] for a in axes]
    gamma, beta = (tf.constant(rng.standard_normal(parameter_shape), dtype) if present else None
                   for present in AFFINE[affine])
    return tf.constant(x + 1.5, dtype), gamma, beta, axes


def both(x, gamma, beta, axes, epsilon=1e-3):
    """(ours, Keras's) layer normalisation of the arguments, under exact moments, as
    products run it."""
    with exact_moments():
        return tuple(function(x, gamma, beta, axes, epsilon) for function in (
            layer_norm.layer_normalization, layer_norm._keras_layer_normalization))


@pytest.mark.parametrize("affine", sorted(AFFINE))
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_values_are_keras_bit_for_bit(dtype, case, affine):
    ours, keras_values = both(*arguments(case, affine, dtype))
    assert ours.dtype == keras_values.dtype == dtype
    np.testing.assert_array_equal(ours.numpy(), keras_values.numpy())


def derivatives(function, primals, mode, seed=1):
    """(gradient, Hessian-vector product) of Σ w·sin(function(*primals)) with respect to
    every primal, the product by `mode`, for a seeded direction."""
    rng = np.random.default_rng(seed)
    tangents = [tf.constant(rng.standard_normal(p.shape), p.dtype) for p in primals]
    weights = tf.constant(rng.standard_normal(primals[0].shape), primals[0].dtype)

    def loss():
        with exact_moments():
            return tf.reduce_sum(weights * tf.sin(function(*primals)))

    if mode == "reverse_over_reverse":
        with tf.GradientTape() as outer:
            outer.watch(primals)
            with tf.GradientTape() as inner:
                inner.watch(primals)
                value = loss()
            gradient = inner.gradient(value, primals)
            inner_product = tf.add_n([tf.reduce_sum(g * t) for g, t in zip(gradient, tangents)])
        return gradient, outer.gradient(inner_product, primals)
    with tf.autodiff.ForwardAccumulator(primals, tangents) as accumulator:
        with tf.GradientTape() as tape:
            tape.watch(primals)
            value = loss()
        gradient = tape.gradient(value, primals)
    return gradient, [accumulator.jvp(g) for g in gradient]


@pytest.mark.parametrize("mode", ["forward_over_backward", "reverse_over_reverse"])
@pytest.mark.parametrize("affine", sorted(AFFINE))
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("traced", [False, True])
def test_gradients_and_products_are_keras(mode, case, affine, traced):
    x, gamma, beta, axes = arguments(case, affine)
    primals = [t for t in (x, gamma, beta) if t is not None]
    present = [t is not None for t in (gamma, beta)]

    def run(function):
        def normalised(x, *parameters):
            parameters = list(parameters)
            gamma, beta = (parameters.pop(0) if p else None for p in present)
            return function(x, gamma, beta, axes, 1e-3)

        compute = functools.partial(derivatives, normalised, primals, mode)
        return (tf.function(compute) if traced else compute)()

    got, expected = run(layer_norm.layer_normalization), run(layer_norm._keras_layer_normalization)
    for kind in range(2):
        for g, e in zip(got[kind], expected[kind]):
            scale = np.max(np.abs(e.numpy()))
            np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-12, atol=1e-13 * scale)
    # Not zero: a second derivative the tapes missed (x's, or γ's through n) would read 0.
    assert all(np.max(np.abs(p.numpy())) > 1e-2 for p in got[1])


@pytest.mark.parametrize("case", sorted(CASES))
def test_reverse_over_forward_is_keras(case):
    # A tape around an accumulator differentiates the JVP itself (not a product's
    # method; the written-out JVP is recorded all the same).
    x, gamma, beta, axes = arguments(case)
    primals = [x, gamma, beta]
    rng = np.random.default_rng(2)
    tangents = [tf.constant(rng.standard_normal(p.shape), p.dtype) for p in primals]
    weights = tf.constant(rng.standard_normal(x.shape), x.dtype)

    def run(function):
        with tf.GradientTape() as tape:
            tape.watch(primals)
            with tf.autodiff.ForwardAccumulator(primals, tangents) as accumulator:
                with exact_moments():
                    y = tf.sin(function(x, gamma, beta, axes, 1e-3))
            jvp = tf.reduce_sum(weights * accumulator.jvp(y))
        return tape.gradient(jvp, primals)

    got, expected = run(layer_norm.layer_normalization), run(layer_norm._keras_layer_normalization)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-12,
                                   atol=1e-13 * np.max(np.abs(e.numpy())))


def layer_norm_model(dtype="float64"):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 5), dtype=dtype)
    h = keras.layers.Dense(6, activation="tanh", dtype=dtype)(inputs)
    h = keras.layers.LayerNormalization(dtype=dtype)(h)
    h = keras.layers.Dense(6, activation="tanh", dtype=dtype)(h)
    h = keras.layers.LayerNormalization(axis=[1, 2], center=False, dtype=dtype)(h)
    h = keras.layers.LayerNormalization(axis=1, scale=False, dtype=dtype)(h)
    outputs = keras.layers.Dense(3, dtype=dtype)(keras.layers.Flatten(dtype=dtype)(h))
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("method", ["forward_over_backward", "reverse_over_reverse"])
def test_products_are_those_of_keras_layer_norm_with_fewer_ops(method):
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((16, 4, 5)), rng.integers(0, 3, 16).astype(np.int32)
    check_fewer_muls_same_products(layer_norm_model(), x, y, method,
                                   "compact_layer_normalization")


def test_the_context_nests_and_restores_keras_layer_norm(monkeypatch):
    calls = []
    compact = layer_norm.layer_normalization
    monkeypatch.setattr(layer_norm, "layer_normalization",
                        lambda *a, **k: calls.append(a) or compact(*a, **k))
    layer = keras.layers.LayerNormalization()
    with layer_norm.compact_layer_normalization(), layer_norm.compact_layer_normalization():
        assert keras_ops_nn._layer_normalization is layer_norm.layer_normalization
        # The layer reaches it: keras.ops looks _layer_normalization up at each call.
        tf.function(layer).get_concrete_function(tf.TensorSpec([None, 3], tf.float32))
        assert calls
    assert keras_ops_nn._layer_normalization is layer_norm._keras_layer_normalization
    reached = len(calls)
    layer(tf.ones([1, 3]))
    assert len(calls) == reached


def outcome(function, *arguments):
    """function(*arguments) as an array (nested lists if ragged), or the type of the
    exception it raised."""
    try:
        result = function(*arguments)
        return result.to_list() if isinstance(result, tf.RaggedTensor) else result.numpy()
    except Exception as error:  # noqa: BLE001 - the outcome compared is the error's type
        return type(error)


def test_rms_scaling_ragged_and_integer_inputs_take_keras_path(monkeypatch):
    x, gamma, _, axes = arguments("last", dtype=tf.float32)
    cases = [(x, gamma, None, axes, 1e-3, True),
             (tf.ragged.constant([[1.0, 2.0], [3.0]]),),
             (tf.constant([[1, 2, 4]]),)]
    expected = [outcome(layer_norm._keras_layer_normalization, *case) for case in cases]
    recorded = []
    monkeypatch.setattr(layer_norm, "_recorded", lambda *a: recorded.append(a))
    for case, keras_outcome in zip(cases, expected):
        got = outcome(layer_norm.layer_normalization, *case)
        if isinstance(keras_outcome, type):
            assert got is keras_outcome
        else:
            np.testing.assert_equal(got, keras_outcome)
    assert not recorded
