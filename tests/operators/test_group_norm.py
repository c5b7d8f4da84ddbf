"""GroupNormalization by per-channel statistics while products are traced
(group_norm.py): the same Hessian as Keras's layer, only where it is the same function."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from hessian_tf import operators
from hessian_tf.operators import group_norm
from hessian_tf.operators.moments import exact_moments
from tests.operators.test_folding import reference_hessian

NUM_EXAMPLES, BATCH_SIZE = 6, 6  # one batch: one trace per graph


def gn_net(kind: str, dtype="float64"):
    keras.utils.set_random_seed(0)
    layers = keras.layers
    if kind == "images":  # conv, GN(2) with γ and β, conv, GN without β, pooling
        inputs = keras.Input((4, 4, 2), dtype=dtype)
        x = layers.Conv2D(4, 3, padding="same", dtype=dtype)(inputs)
        x = layers.GroupNormalization(2, dtype=dtype)(x)
        x = layers.Activation("tanh", dtype=dtype)(x)
        x = layers.Conv2D(6, 3, padding="same", dtype=dtype)(x)
        x = layers.GroupNormalization(3, center=False, dtype=dtype)(x)
        x = layers.GlobalAveragePooling2D(dtype=dtype)(x)
    elif kind == "sequences":  # instance normalisation (groups=-1), no γ
        inputs = keras.Input((5, 3), dtype=dtype)
        x = layers.Conv1D(4, 2, dtype=dtype)(inputs)
        x = layers.GroupNormalization(-1, scale=False, dtype=dtype)(x)
        x = layers.Flatten(dtype=dtype)(layers.Activation("tanh", dtype=dtype)(x))
    else:  # vectors: one group (a LayerNormalization)
        inputs = keras.Input((5,), dtype=dtype)
        x = layers.Dense(6, dtype=dtype)(inputs)
        x = layers.GroupNormalization(1, dtype=dtype)(x)
        x = layers.Activation("tanh", dtype=dtype)(x)
    model = keras.Model(inputs, layers.Dense(3, dtype=dtype)(x))
    rng = np.random.default_rng(1)
    for layer in model.layers:  # γ and β away from 1 and 0
        if isinstance(layer, layers.GroupNormalization):
            for variable in layer.trainable_variables:
                variable.assign(rng.uniform(0.5, 1.5, variable.shape))
    return model


def data(model):
    rng = np.random.default_rng(2)
    x = 2.0 + rng.standard_normal((NUM_EXAMPLES,) + tuple(model.input_shape[1:]))
    return x, rng.integers(0, 3, NUM_EXAMPLES)


@pytest.mark.parametrize("kind, matrix", [("images", True), ("images", False),
                                          ("sequences", True), ("vectors", True)])
def test_products_are_the_hessian_of_keras_group_norm(kind, matrix, monkeypatch):
    # matrix: the group average by a constant matrix; else by reshape and broadcast.
    monkeypatch.setattr(group_norm, "MAX_MATRIX_CHANNELS", 10**6 if matrix else 0)
    model = gn_net(kind)
    x, y = data(model)
    with exact_moments():  # Keras's own layers, statistics differentiated exactly
        expected = reference_hessian(model, x, y)
    vectors = np.random.default_rng(3).standard_normal((2, expected.shape[0]))
    layers = [l for l in model.layers if isinstance(l, keras.layers.GroupNormalization)]
    calls = []
    original = group_norm.group_norm_call

    def counting(layer):
        call = original(layer)

        def counted(inputs):
            calls.append(layer.name)
            return call(inputs)

        return counted

    monkeypatch.setattr(group_norm, "group_norm_call", counting)
    for method in ("forward_over_backward", "reverse_over_reverse"):
        for per_channel in (True, False) if matrix else (True,):
            operator = operators.HessianOperator(
                operators.KerasModelFunction(model, per_channel_group_norm=per_channel),
                x, y, batch_size=BATCH_SIZE, method=method)
            calls[:] = []
            products = operator.matmat(vectors)
            np.testing.assert_allclose(products, vectors @ expected.T, rtol=1e-9, atol=1e-11)
            # Rewritten when asked, every time a product is traced; restored after.
            assert sorted(set(calls)) == (sorted(l.name for l in layers) if per_channel else [])
            assert not any("call" in vars(layer) for layer in layers)


def test_only_where_it_is_the_same_function():
    model = gn_net("images")
    layers = [l for l in model.layers if isinstance(l, keras.layers.GroupNormalization)]
    assert all(group_norm._rewritable(layer) for layer in layers)

    class Standardised(keras.layers.GroupNormalization):
        def call(self, inputs):
            return super().call(inputs) * 2.0

    class Centred(keras.layers.GroupNormalization):  # Keras's call, another helper
        def _apply_normalization(self, reshaped_inputs, input_shape):
            return reshaped_inputs - keras.ops.mean(reshaped_inputs, axis=1, keepdims=True)

    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 2))
    custom, centred = Standardised(2), Centred(2)
    first_axis = keras.layers.GroupNormalization(2, axis=1)
    mixed = keras.layers.GroupNormalization(2, dtype="mixed_float16")
    keras.Model(inputs, [custom(inputs), centred(inputs), first_axis(inputs), mixed(inputs)])
    assert not any(group_norm._rewritable(layer)
                   for layer in (custom, centred, first_axis, mixed))
    # Inputs in another dtype than the layer's: Keras's own call.
    layer = layers[0]
    call = group_norm.group_norm_call(layer)
    x = tf.constant(np.random.default_rng(4).standard_normal((2, 4, 4, 4)), tf.float32)
    np.testing.assert_allclose(call(x).numpy(), layer.call(x).numpy(), rtol=1e-6, atol=1e-6)
    assert call(x).dtype == layer.call(x).dtype
