"""Grouped convolutions without XLA (grouped_conv.py): the same values as Keras's own
(XLA-compiled) grouped convolutions, and no XLA-compiled function in the traces. Their
products against central differences are in test_layers.py."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from hessian_tf.operators import grouped_conv

CONVS = {1: keras.layers.Conv1D, 2: keras.layers.Conv2D, 3: keras.layers.Conv3D}
CASES = {  # name: (rank, input shape per example, Conv keyword arguments)
    "depthwise_2d_multiplier_2": (2, (7, 6, 3), dict(filters=6, kernel_size=3, groups=3,
                                                     padding="same")),
    "depthwise_2d_strided": (2, (7, 6, 3), dict(filters=3, kernel_size=(3, 2), groups=3,
                                                strides=2)),
    "depthwise_2d_dilated": (2, (7, 6, 3), dict(filters=3, kernel_size=3, groups=3,
                                                dilation_rate=2, padding="same")),
    "depthwise_1d_causal": (1, (9, 3), dict(filters=6, kernel_size=3, groups=3,
                                            padding="causal")),
    "depthwise_2d_channels_first": (2, (2, 7, 6), dict(filters=4, kernel_size=3, groups=2,
                                                       data_format="channels_first")),
    "split_2d_strided": (2, (7, 6, 4), dict(filters=6, kernel_size=3, groups=2, strides=2,
                                            padding="same")),
    "split_1d": (1, (9, 6), dict(filters=3, kernel_size=3, groups=3)),
    "split_3d": (3, (4, 5, 3, 4), dict(filters=4, kernel_size=2, groups=2)),
    # One channel per group in 3-D: split too (Keras's depthwise_conv is 1-D and 2-D).
    "one_channel_per_group_3d": (3, (4, 5, 3, 2), dict(filters=2, kernel_size=2, groups=2)),
    "split_2d_channels_first": (2, (4, 6, 5), dict(filters=6, kernel_size=3, groups=2,
                                                   data_format="channels_first")),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_values_equal_keras_grouped_convolution(name):
    rank, shape, kwargs = CASES[name]
    keras.utils.set_random_seed(0)
    layer = CONVS[rank](dtype="float64", **kwargs)
    x = np.random.default_rng(1).standard_normal((2,) + shape)
    expected = layer(x).numpy()  # Keras's XLA-compiled grouped convolution
    with grouped_conv.grouped_convolutions():
        got = layer(x).numpy()
    assert grouped_conv.groups_of(tf.constant(x), layer.kernel, kwargs.get("data_format"))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def _compiled_calls(function, *args) -> int:
    """Ops of the gradient graph of `function` that call a function compiled by XLA."""
    graph = tf.function(function).get_concrete_function(*args).graph
    return sum(1 for op in graph.get_operations()
               if "_XlaMustCompile" in op.node_def.attr
               and op.node_def.attr["_XlaMustCompile"].b)


@pytest.mark.parametrize("groups", [4, 2])  # depthwise, split
def test_traces_call_no_xla(groups):
    inputs = keras.Input((6, 6, 4))
    model = keras.Model(inputs, keras.layers.Conv2D(4, 3, groups=groups)(inputs))
    x = tf.random.normal((2, 6, 6, 4))

    def gradient(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x) ** 2)
        return tape.gradient(loss, model.trainable_variables)

    assert _compiled_calls(gradient, x) > 0  # Keras's own path: the test can fail
    with grouped_conv.grouped_convolutions():
        assert _compiled_calls(gradient, x) == 0
    assert _compiled_calls(gradient, x) > 0  # restored on exit


def test_ungrouped_and_dynamic_channels_keep_keras_path():
    x = tf.zeros((1, 5, 5, 3))
    assert grouped_conv.groups_of(x, tf.zeros((3, 3, 3, 4))) is None
    kernel = tf.zeros((3, 3, 1, 4))

    def convolve(x):
        return grouped_conv.conv(x, kernel)

    with grouped_conv.grouped_convolutions():  # channels unknown: Keras's XLA call
        assert _compiled_calls(convolve, tf.TensorSpec((None, 5, 5, None))) > 0
        assert _compiled_calls(convolve, tf.TensorSpec((None, 5, 5, 4))) == 0


def test_hosts_with_accelerators_keep_keras_path(monkeypatch):
    monkeypatch.setattr(grouped_conv, "_cpu_only", lambda: False)  # as on a GPU host
    x = tf.TensorSpec((2, 5, 5, 4))
    with grouped_conv.grouped_convolutions():
        assert _compiled_calls(lambda x: grouped_conv.conv(x, tf.zeros((3, 3, 1, 4))), x) > 0
