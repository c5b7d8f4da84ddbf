"""Products through the Keras layers a user of this field builds with, each in a small
float64 network, by both methods, against central differences of the exact gradient
(the operator's own gradient, first derivatives only, so no second derivative of
TensorFlow's is trusted; test_moments.finite_difference_product): the sweep
that found the max pooling TensorFlow differentiated wrong (test_second_order.py).
Layers with tests of their own (Dense, Conv2D, BN, LN, GN, LSTM, GRU, Embedding,
resizes, max pooling, softsign) are not repeated here."""

import keras
import numpy as np
import pytest

from hessian_tf import operators
from tests.operators.test_moments import finite_difference_product

F = "float64"
L = keras.layers


def chain(input_shape, *layers, dtype=F):
    """A functional model of `layers` (factories) in a chain."""
    def build():
        inputs = keras.Input(input_shape, dtype=dtype)
        h = inputs
        for layer in layers:
            h = layer()(h)
        return keras.Model(inputs, h)
    return build


def layer(cls, *args, **kwargs):
    return lambda: cls(*args, dtype=F, **kwargs)


def dense(units, **kwargs):
    return layer(L.Dense, units, **kwargs)


def activation(name, **kwargs):
    function = getattr(keras.activations, name)
    return chain((3,), dense(4), layer(L.Activation, lambda t: function(t, **kwargs)),
                 dense(3))


def conv(rank, *layers):
    """Conv(2, 1, tanh) → layers → Conv(3, 1): logits per position of a rank-D map."""
    cls = {1: L.Conv1D, 2: L.Conv2D, 3: L.Conv3D}[rank]
    return lambda shape: chain(shape, layer(cls, 2, 1, activation="tanh"), *layers,
                               layer(cls, 3, 1))


def attention(cls, **kwargs):
    def build():
        inputs = keras.Input((4, 3), dtype=F)
        query = dense(3, activation="tanh")()(inputs)
        return keras.Model(inputs, dense(3)()(cls(dtype=F, **kwargs)([query, inputs])))
    return build


def merges():
    inputs = keras.Input((3,), dtype=F)
    a, b = dense(4, activation="tanh")()(inputs), dense(4)()(inputs)
    h = L.Concatenate(dtype=F)([
        L.Multiply(dtype=F)([a, b]), L.Dot(1, dtype=F)([a, b]), L.Subtract(dtype=F)([a, b]),
        L.Maximum(dtype=F)([a, b]), L.Average(dtype=F)([a, b])])
    return keras.Model(inputs, dense(3)()(h))


CASES = {  # name: (build, input shape per example, --regularization)
    **{name: (activation(name, **kwargs), (3,), False) for name, kwargs in [
        ("elu", {}), ("selu", {}), ("gelu", {"approximate": False}), ("mish", {}),
        ("sparsemax", {})]},
    "prelu": (chain((3,), dense(4), layer(L.PReLU), dense(3)), (3,), False),
    "conv2d_dilated": (chain((6, 6, 1), layer(L.Conv2D, 2, 2, dilation_rate=2,
                                              activation="tanh"), layer(L.Conv2D, 3, 1)),
                       (6, 6, 1), False),
    "conv3d": (chain((3, 3, 3, 1), layer(L.Conv3D, 2, 2, activation="tanh"),
                     layer(L.Conv3D, 3, 1)), (3, 3, 3, 1), False),
    "conv1d_transpose": (conv(1, layer(L.Conv1DTranspose, 2, 2, strides=2))((3, 1)),
                         (3, 1), False),
    "conv3d_transpose": (conv(3, layer(L.Conv3DTranspose, 2, 2, strides=2))((2, 2, 2, 1)),
                         (2, 2, 2, 1), False),
    # Grouped convolutions, computed without XLA while products are traced
    # (convolutions.py): one input channel per group (ConvNeXt's) and two.
    "conv2d_groups_depthwise": (conv(2, layer(L.Conv2D, 4, 2, groups=2, activation="tanh"))(
        (3, 3, 1)), (3, 3, 1), False),
    "conv2d_groups_split": (chain((3, 3, 1), layer(L.Conv2D, 4, 1, activation="tanh"),
                                  layer(L.Conv2D, 4, 2, groups=2, activation="tanh"),
                                  layer(L.Conv2D, 3, 1)), (3, 3, 1), False),
    # Pointwise convolutions, matrix products while products are traced
    # (convolutions.py): a 1×1, a "valid" 3×3 on a 3×3 map, a dilated 3×3 on a 1×1 map
    # and a "valid" 3×3 on a zero-padded 1×1 map (one tap).
    "conv2d_pointwise": (chain((3, 3, 1), layer(L.Conv2D, 3, 1, activation="tanh"),
                               layer(L.Conv2D, 2, 3, activation="tanh"),
                               layer(L.Conv2D, 3, 3, dilation_rate=2, padding="same",
                                     activation="tanh"),
                               layer(L.ZeroPadding2D, 1), layer(L.Conv2D, 2, 3)),
                         (3, 3, 1), False),
    # Small maps, one matrix product each: a "valid" 3×3 on a zero-padded 2×2 map and a
    # "same" 3×3 on a 2×2 map.
    "conv2d_small_maps": (chain((2, 2, 1), layer(L.ZeroPadding2D, 1),
                                layer(L.Conv2D, 3, 3, activation="tanh"),
                                layer(L.Conv2D, 2, 3, padding="same", activation="tanh"),
                                layer(L.Flatten), dense(3)), (2, 2, 1), False),
    "depthwise_conv2d_strided": (conv(2, layer(L.DepthwiseConv2D, 3, strides=2,
                                               padding="same", activation="tanh"))((5, 5, 2)),
                                 (5, 5, 2), False),
    "separable_conv1d": (conv(1, layer(L.SeparableConv1D, 2, 2, activation="tanh"))((5, 2)),
                         (5, 2), False),
    "average_pooling2d_same": (conv(2, layer(L.AveragePooling2D, 2, strides=1,
                                             padding="same"))((3, 3, 1)), (3, 3, 1), False),
    "global_max_pooling2d": (chain((3, 3, 1), layer(L.Conv2D, 2, 1, activation="tanh"),
                                   layer(L.GlobalMaxPooling2D), dense(3)), (3, 3, 1), False),
    "upsampling3d": (conv(3, layer(L.UpSampling3D, 2))((2, 2, 2, 1)), (2, 2, 2, 1), False),
    "zero_padding_cropping2d": (conv(2, layer(L.ZeroPadding2D, 1),
                                     layer(L.Conv2D, 2, 2, activation="tanh"),
                                     layer(L.Cropping2D, 1))((3, 3, 1)), (3, 3, 1), False),
    "unit_normalization": (chain((3,), dense(4), layer(L.UnitNormalization), dense(3)),
                           (3,), False),
    "rms_normalization": (chain((3,), dense(4), layer(L.RMSNormalization), dense(3)),
                          (3,), False),
    "spectral_normalization": (chain((3,), lambda: L.SpectralNormalization(
        L.Dense(4, dtype=F), dtype=F), dense(3)), (3,), False),
    "einsum_dense": (chain((3, 2), lambda: L.EinsumDense(
        "abc,cd->abd", (3, 4), bias_axes="d", activation="tanh", dtype=F), dense(3)),
        (3, 2), False),
    "simple_rnn": (chain((4, 2), layer(L.SimpleRNN, 3), dense(3)), (4, 2), False),
    "bidirectional_rnn": (chain((3, 2), lambda: L.Bidirectional(L.SimpleRNN(2, dtype=F),
                                                                  dtype=F), dense(3)),
                          (3, 2), False),
    "attention": (attention(L.Attention), (4, 3), False),
    "additive_attention": (attention(L.AdditiveAttention), (4, 3), False),
    "merges": (merges, (3,), False),
    "activity_penalty": (chain((3,), dense(4, activation="tanh",
                                           activity_regularizer=keras.regularizers.L2(0.1)),
                               dense(3)), (3,), True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_products_equal_central_differences(name):
    build, input_shape, regularization = CASES[name]
    keras.utils.set_random_seed(0)
    model = build()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4,) + input_shape)
    logits_shape = model(x).shape
    y = rng.integers(0, logits_shape[-1], (4,) + tuple(logits_shape[1:-1])).astype(np.int32)
    expected = None
    for method in ["reverse_over_reverse", "forward_over_backward"]:
        function = operators.KerasModelFunction(model)
        operator = operators.HessianOperator(function, x, y, batch_size=2, method=method,
                                             regularization=regularization)
        if expected is None:  # by the operator's exact gradient, first derivatives only
            expected = np.stack([finite_difference_product(operator, function, column)
                                 for column in np.eye(operator.dim)], 1)
        got = operators.dense_matrix(operator.matvec, operator.dim)
        # Central differences of a float64 gradient: ~1e-10 of the largest entry here.
        np.testing.assert_allclose(got, expected, rtol=0,
                                   atol=1e-7 * np.abs(expected).max(), err_msg=method)
