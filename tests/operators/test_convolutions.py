"""Convolutions by other ops (convolutions.py). Grouped ones without XLA: the same values
as Keras's own (XLA-compiled) grouped convolutions, and no XLA-compiled function in the
traces. Pointwise ones as matrix products: the same values as Keras's convolutions, and
no convolution op in the traces. Their products against central differences are in
test_layers.py."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from hessian_tf.operators import convolutions

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
    with convolutions.grouped_convolutions():
        got = layer(x).numpy()
    assert convolutions.groups_of(tf.constant(x), layer.kernel, kwargs.get("data_format"))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def _traced_ops(function, *args) -> list:
    """The ops of the graph of `function` traced for `args`."""
    return tf.function(function).get_concrete_function(*args).graph.get_operations()


def _compiled_calls(function, *args) -> int:
    """Ops of the gradient graph of `function` that call a function compiled by XLA."""
    return sum(1 for op in _traced_ops(function, *args)
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
    with convolutions.grouped_convolutions():
        assert _compiled_calls(gradient, x) == 0
    assert _compiled_calls(gradient, x) > 0  # restored on exit


def test_ungrouped_and_dynamic_channels_keep_keras_path():
    x = tf.zeros((1, 5, 5, 3))
    assert convolutions.groups_of(x, tf.zeros((3, 3, 3, 4))) is None
    kernel = tf.zeros((3, 3, 1, 4))

    def convolve(x):
        return convolutions.conv(x, kernel)

    with convolutions.grouped_convolutions():  # channels unknown: Keras's XLA call
        assert _compiled_calls(convolve, tf.TensorSpec((None, 5, 5, None))) > 0
        assert _compiled_calls(convolve, tf.TensorSpec((None, 5, 5, 4))) == 0


POINTWISE_CASES = {  # name: (rank, input shape per example, Conv keyword arguments)
    "1x1": (2, (5, 4, 3), dict(filters=4, kernel_size=1)),
    "1x1_dilated": (2, (5, 4, 3), dict(filters=4, kernel_size=1, dilation_rate=2)),
    "1d_1": (1, (7, 3), dict(filters=2, kernel_size=1)),
    "3d_1x1x1": (3, (3, 4, 5, 2), dict(filters=3, kernel_size=1, padding="same")),
    "3x3_same_on_1x1_map": (2, (1, 1, 3), dict(filters=4, kernel_size=3, padding="same")),
    "3x3_same_strided_on_1x1_map": (2, (1, 1, 3), dict(filters=4, kernel_size=3, strides=2,
                                                       padding="same")),
    "3x3_same_dilated_on_1x1_map": (2, (1, 1, 3), dict(filters=4, kernel_size=3,
                                                       dilation_rate=2, padding="same")),
    "4x2_same_on_1x1_map": (2, (1, 1, 3), dict(filters=4, kernel_size=(4, 2), padding="same")),
    "1d_5_same_on_1_position": (1, (1, 3), dict(filters=2, kernel_size=5, padding="same")),
    "1d_3_same_dilated_on_1_position": (1, (1, 3), dict(filters=2, kernel_size=3,
                                                        dilation_rate=3, padding="same")),
    "3d_3x3x3_same_on_1x1x1_map": (3, (1, 1, 1, 2), dict(filters=3, kernel_size=3,
                                                         padding="same")),
    "1x1_strided_on_1x1_map": (2, (1, 1, 3), dict(filters=4, kernel_size=1, strides=2)),
    # "valid" with one output position: one matrix product over the window.
    "3x3_valid_on_3x3_map": (2, (3, 3, 3), dict(filters=4, kernel_size=3)),
    "3x2_valid_strided_on_4x3_map": (2, (4, 3, 3), dict(filters=4, kernel_size=(3, 2),
                                                        strides=2)),
    "1d_3_valid_dilated_on_5_positions": (1, (5, 2), dict(filters=3, kernel_size=3,
                                                          dilation_rate=2)),
    "3d_2x2x2_valid_on_2x2x2_map": (3, (2, 2, 2, 2), dict(filters=3, kernel_size=2)),
    # Small maps: every output position reads every input position.
    "3x3_same_on_2x1_map": (2, (2, 1, 3), dict(filters=4, kernel_size=3, padding="same")),
    "3x3_same_on_2x2_map": (2, (2, 2, 3), dict(filters=4, kernel_size=3, padding="same")),
    "3x3_same_strided_on_2x2_map": (2, (2, 2, 3), dict(filters=4, kernel_size=3, strides=2,
                                                       padding="same")),
    "1d_5_same_on_2_positions": (1, (2, 2), dict(filters=3, kernel_size=5, padding="same")),
    "3d_3x3x3_same_on_2x1x2_map": (3, (2, 1, 2, 2), dict(filters=3, kernel_size=3,
                                                         padding="same")),
}
NOT_POINTWISE = {  # kept on Keras's path, the values as they were
    "1x1_strided": (2, (5, 4, 3), dict(filters=4, kernel_size=1, strides=(3, 2),
                                       padding="same")),
    "2x2_same_dilated_on_1x1_map": (2, (1, 1, 3), dict(filters=4, kernel_size=2,
                                                       dilation_rate=2, padding="same")),
    "3x3_same_on_4x3_map": (2, (4, 3, 3), dict(filters=4, kernel_size=3, padding="same")),
    "3x3": (2, (5, 4, 3), dict(filters=4, kernel_size=3)),
    # Some output position does not read some input position: TensorFlow's.
    "3x3_valid_on_4x3_map": (2, (4, 3, 3), dict(filters=4, kernel_size=3)),
    "3x3_same_on_3x3_map": (2, (3, 3, 3), dict(filters=4, kernel_size=3, padding="same")),
    "2x2_same_on_2x2_map": (2, (2, 2, 3), dict(filters=4, kernel_size=2, padding="same")),
    "3x3_same_strided_on_3x2_map": (2, (3, 2, 3), dict(filters=4, kernel_size=3, strides=2,
                                                       padding="same")),
    "1d_3_same_dilated_on_3_positions": (1, (3, 2), dict(filters=3, kernel_size=3,
                                                         dilation_rate=2, padding="same")),
}


def _conv_types(ops) -> list[str]:
    return [op.type for op in ops if "Conv" in op.type]


def _conv_ops(function, *args) -> list[str]:
    return _conv_types(_traced_ops(function, *args))


@pytest.mark.parametrize("name", sorted(POINTWISE_CASES) + sorted(NOT_POINTWISE))
def test_pointwise_values_and_graphs(name):
    rank, shape, kwargs = {**POINTWISE_CASES, **NOT_POINTWISE}[name]
    keras.utils.set_random_seed(0)
    layer = CONVS[rank](dtype="float64", **kwargs)
    x = np.random.default_rng(1).standard_normal((2,) + shape)
    expected = layer(x).numpy()  # Keras's convolution
    assert _conv_ops(layer, tf.constant(x))  # the test can fail
    with convolutions.pointwise_convolutions():
        got = layer(x).numpy()
        conv_ops = _conv_ops(layer, tf.constant(x))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert (conv_ops == []) == (name in POINTWISE_CASES), conv_ops
    assert _conv_ops(layer, tf.constant(x))  # restored on exit


# name: (input shape per example, paddings of the spatial axes, pad value, Conv keyword
# arguments, input positions read with the zero padding left out (None: TensorFlow's
# convolution)).
PADDED_CASES = {
    # ResNet50-V2 at 32×32: ZeroPadding2D(1) and a "valid" 3×3 on 1×1 and 2×2 maps.
    "3x3_on_padded_1x1_map": ((1, 1, 3), ((1, 1), (1, 1)), 0, dict(kernel_size=3), 1),
    "3x3_on_padded_2x2_map": ((2, 2, 3), ((1, 1), (1, 1)), 0, dict(kernel_size=3), 4),
    "3x3_strided_on_padded_2x2_map": ((2, 2, 3), ((1, 1), (1, 1)), 0,
                                      dict(kernel_size=3, strides=2), 4),
    "4x3_asymmetric_padding": ((2, 1, 3), ((0, 2), (1, 1)), 0, dict(kernel_size=(4, 3)), 2),
    "3x3_dilated_on_padded_1x2_map": ((1, 2, 3), ((2, 2), (2, 1)), 0,
                                      dict(kernel_size=3, dilation_rate=2), 1),
    "1d_3_on_padded_1_position": ((1, 3), ((1, 1),), 0, dict(kernel_size=3), 1),
    "3d_3x3x3_on_padded_1x1x1_map": ((1, 1, 1, 2), ((1, 1),) * 3, 0, dict(kernel_size=3), 1),
    # A padding by a non-zero value is read as the inputs are.
    "3x3_on_1x1_map_padded_by_ones": ((1, 1, 3), ((1, 1), (1, 1)), 1.0,
                                      dict(kernel_size=3), 9),
    # Every tap reads padding: TensorFlow's convolution.
    "1d_2_strided_reading_padding_only": ((1, 3), ((2, 0),), 0,
                                          dict(kernel_size=2, strides=2), None),
}


@pytest.mark.parametrize("name", sorted(PADDED_CASES))
def test_valid_convolutions_of_zero_padded_small_maps_leave_the_padding_out(name):
    shape, spatial_paddings, value, kwargs, read = PADDED_CASES[name]
    rank = len(shape) - 1
    keras.utils.set_random_seed(0)
    layer = CONVS[rank](filters=5, dtype="float64", **kwargs)
    paddings = [[0, 0], *map(list, spatial_paddings), [0, 0]]

    def convolve(x):
        return layer(tf.pad(x, paddings, constant_values=tf.constant(value, tf.float64)))

    x = tf.constant(np.random.default_rng(1).standard_normal((2,) + shape))
    expected = convolve(x).numpy()  # Keras's convolution (eagerly)
    with convolutions.pointwise_convolutions():
        got = tf.function(convolve)(x).numpy()
        ops = _traced_ops(convolve, x)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    conv_ops = _conv_types(ops)
    assert (conv_ops == []) == (read is not None), conv_ops
    if read is not None:
        depths = [op.inputs[1].shape[0] for op in ops if op.type == "MatMul"]
        assert depths == [read * shape[-1]]


@pytest.mark.parametrize("batch", [None, 2])
def test_pointwise_keeps_static_shapes_and_dtypes(batch):
    kernel = tf.constant(np.ones((1, 1, 3, 5), np.float32))

    def convolve(x):
        outputs = convolutions.conv(x, kernel)
        assert outputs.shape.as_list() == [batch, 5, None, 5]
        return outputs

    with convolutions.pointwise_convolutions():
        assert _conv_ops(convolve, tf.TensorSpec((batch, 5, None, 3))) == []
        # float16 and bfloat16 (mixed precision) keep TensorFlow's convolution.
        assert convolutions.pointwise_matrix(tf.zeros((1, 2, 2, 3), tf.float16),
                                             tf.zeros((1, 1, 3, 5), tf.float16)) is None


def test_pointwise_and_grouped_switch_independently():
    x = tf.TensorSpec((2, 5, 5, 4))
    grouped, pointwise = tf.zeros((3, 3, 1, 4)), tf.zeros((1, 1, 4, 4))
    with convolutions.pointwise_convolutions():
        assert _compiled_calls(lambda x: convolutions.conv(x, grouped), x) > 0
        assert _conv_ops(lambda x: convolutions.conv(x, pointwise), x) == []
        with convolutions.grouped_convolutions():
            assert _compiled_calls(lambda x: convolutions.conv(x, grouped), x) == 0
        assert _compiled_calls(lambda x: convolutions.conv(x, grouped), x) > 0
    with convolutions.grouped_convolutions():
        assert _conv_ops(lambda x: convolutions.conv(x, pointwise), x) != []


@pytest.mark.parametrize("patch", ["grouped", "pointwise"])
def test_hosts_with_accelerators_keep_keras_path(monkeypatch, patch):
    monkeypatch.setattr(convolutions, "cpu_only", lambda: False)  # as on a GPU host
    x = tf.TensorSpec((2, 5, 5, 4))
    with getattr(convolutions, f"{patch}_convolutions")():
        if patch == "grouped":  # Keras's XLA call
            assert _compiled_calls(lambda x: convolutions.conv(x, tf.zeros((3, 3, 1, 4))), x) > 0
        else:  # TensorFlow's convolution
            assert _conv_ops(lambda x: convolutions.conv(x, tf.zeros((1, 1, 4, 4))), x) != []


def test_exits_in_any_order_restore_keras_conv():
    from keras.src.backend.tensorflow import nn as keras_tensorflow_nn

    pointwise, grouped = convolutions.pointwise_convolutions(), convolutions.grouped_convolutions()
    pointwise.__enter__()
    grouped.__enter__()
    pointwise.__exit__(None, None, None)  # out of nesting order
    assert keras_tensorflow_nn.conv is convolutions.conv
    assert convolutions._active == {"grouped"}
    grouped.__exit__(None, None, None)
    assert keras_tensorflow_nn.conv is convolutions._keras_conv and not convolutions._active


def test_long_maps_are_refused_before_any_table_of_positions():
    # Without the first check, the table of 10^5 × 10^5 positions is 80 GB.
    long = tf.zeros((1, 100_000, 1))
    for padding in ("same", "valid"):
        assert convolutions.small_map_matrix(long, tf.zeros((3, 1, 1)), padding=padding) is None


# Dilated convolutions of float32 inputs by TensorFlow's dilated Conv2D kernel
# (dilated_native) where the host runs it (the oneDNN kernels; tests run there):
# name: (rank, input shape per example, Conv keyword arguments).
DILATED_CASES = {
    "2d_same": (2, (9, 8, 3), dict(filters=4, kernel_size=3, dilation_rate=2, padding="same")),
    "2d_valid_per_axis": (2, (9, 8, 3), dict(filters=4, kernel_size=(3, 2),
                                             dilation_rate=(1, 3))),
    "2d_same_rows": (2, (9, 8, 3), dict(filters=2, kernel_size=2, dilation_rate=(3, 1),
                                        padding="same")),
}


def _space_to_batch(function, *args) -> bool:
    return any(op.type == "SpaceToBatchND" for op in _traced_ops(function, *args))


def _needs_native_dilations():
    """Skips on a host whose TensorFlow refuses dilations (no oneDNN: not this
    project's CI, an x86 Linux host, where they run)."""
    if not convolutions._native_dilations_run():
        pytest.skip("TensorFlow's Conv2D does not run dilations here (no oneDNN)")


@pytest.mark.parametrize("name", sorted(DILATED_CASES))
def test_dilated_values_and_graphs(name):
    _needs_native_dilations()
    rank, shape, kwargs = DILATED_CASES[name]
    keras.utils.set_random_seed(0)
    layer = CONVS[rank](**kwargs)
    x = tf.constant(np.random.default_rng(1).standard_normal((2,) + shape), tf.float32)
    expected = layer(x).numpy()  # Keras's convolution: space-to-batch around it
    assert _space_to_batch(layer, x)  # the test can fail
    with convolutions.dilated_convolutions():
        got = layer(x).numpy()
        ops = _traced_ops(layer, x)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    [conv] = [op for op in ops if "Conv" in op.type]
    assert not any(op.type == "SpaceToBatchND" for op in ops)
    assert list(conv.get_attr("dilations"))[1:3] == list(
        convolutions._per_axis(kwargs["dilation_rate"], 2))
    assert _space_to_batch(layer, x)  # restored on exit


def test_dilated_kept_on_keras_path_where_not_float32_channels_last_2d_or_not_run(monkeypatch):
    _needs_native_dilations()
    x = tf.TensorSpec((2, 9, 8, 4))
    keras.utils.set_random_seed(0)
    with convolutions.dilated_convolutions():
        # 1-D: measured no faster as 2-D of height 1.
        assert _space_to_batch(keras.layers.Conv1D(2, 3, dilation_rate=2, padding="causal"),
                               tf.TensorSpec((2, 9, 4)))
        # float64 (TensorFlow's dilated kernels are oneDNN's, float32), channels first.
        assert _space_to_batch(keras.layers.Conv2D(2, 3, dilation_rate=2, dtype="float64"),
                               tf.TensorSpec((2, 9, 8, 4), tf.float64))
        assert _space_to_batch(keras.layers.Conv2D(2, 3, dilation_rate=2,
                                                   data_format="channels_first"),
                               tf.TensorSpec((2, 4, 9, 8)))
        assert not _space_to_batch(keras.layers.Conv2D(2, 3, dilation_rate=2), x)
        # A host whose kernels refuse dilations (TF_ENABLE_ONEDNN_OPTS=0), or with GPUs.
        monkeypatch.setattr(convolutions, "_native_dilations", False)
        assert _space_to_batch(keras.layers.Conv2D(2, 3, dilation_rate=2), x)
        monkeypatch.setattr(convolutions, "_native_dilations", True)
        monkeypatch.setattr(convolutions, "cpu_only", lambda: False)
        assert _space_to_batch(keras.layers.Conv2D(2, 3, dilation_rate=2), x)


def test_the_probe_refuses_a_kernel_whose_second_derivatives_differ(monkeypatch):
    # As TensorFlow's DepthwiseConv2dNative does with dilations (ad hoc): here a Conv2D
    # that drops them.
    _needs_native_dilations()
    real = tf.raw_ops.Conv2D
    monkeypatch.setattr(tf.raw_ops, "Conv2D",
                        lambda **kwargs: real(**{**kwargs, "dilations": [1, 1, 1, 1]}))
    monkeypatch.setattr(convolutions, "_native_dilations", None)
    assert not convolutions._native_dilations_run()
    monkeypatch.setattr(tf.raw_ops, "Conv2D", real)
    monkeypatch.setattr(convolutions, "_native_dilations", None)
    assert convolutions._native_dilations_run()


def test_refusing_kernels_are_probed_in_a_fresh_process():
    # With oneDNN off, TensorFlow's Eigen kernels refuse dilations: the probe says so
    # (once, from inside a trace too, without a traceback) and convolutions keep
    # Keras's path.
    _needs_native_dilations()
    code = (
        "import keras, tensorflow as tf\n"
        "from hessian_tf.operators import convolutions\n"
        "layer = keras.layers.Conv2D(2, 3, dilation_rate=2)\n"
        "with convolutions.dilated_convolutions():\n"
        "    graph = tf.function(layer).get_concrete_function(tf.TensorSpec((1, 7, 7, 3))).graph\n"
        "    print(convolutions._native_dilations,\n"
        "          any(op.type == 'SpaceToBatchND' for op in graph.get_operations()))\n"
    )
    for onednn, expected in (("0", "False True"), ("1", "True False")):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                env={**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn},
                                timeout=300)
        assert result.stdout.strip().splitlines()[-1] == expected, result.stderr[-2000:]
        assert "Traceback" not in result.stderr, result.stderr[-2000:]


def test_dilated_products_equal_float64_keras_path():
    # A float32 model's products through the dilated kernel against its float64 copy's,
    # whose convolutions keep Keras's path (space-to-batch), by both methods.
    from hessian_tf import operators

    _needs_native_dilations()

    def model(dtype):
        keras.utils.set_random_seed(0)
        L = keras.layers
        inputs = keras.Input((6, 5, 2), dtype=dtype)
        h = L.Conv2D(3, 2, dilation_rate=2, padding="same", activation="tanh", dtype=dtype)(inputs)
        h = L.Reshape((30, 3), dtype=dtype)(h)
        h = L.Conv1D(2, 3, dilation_rate=3, padding="causal", activation="tanh", dtype=dtype)(h)
        h = L.GlobalAveragePooling1D(dtype=dtype)(h)
        return keras.Model(inputs, L.Dense(3, dtype=dtype)(h))

    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 6, 5, 2))
    y = rng.integers(0, 3, 6).astype(np.int32)
    single, reference = model("float32"), model("float64")
    reference.set_weights([w.astype(np.float64) for w in single.get_weights()])
    # The products' traces (the model function's mode context) take the dilated kernel
    # for the 2-D convolution, Keras's space-to-batch for the 1-D one (and in float64).
    for keras_model, dtype, expected in ((single, tf.float32, 1), (reference, tf.float64, 2)):
        function = operators.KerasModelFunction(keras_model)
        with function.mode_context("inference"):
            ops = _traced_ops(lambda x: keras_model(x), tf.TensorSpec((3, 6, 5, 2), dtype))
        assert sum(op.type == "SpaceToBatchND" for op in ops) == expected
    operator = operators.HessianOperator(operators.KerasModelFunction(reference), x, y,
                                         batch_size=3)
    exact = operators.dense_matrix(operator.matvec, operator.dim)
    for method in ("reverse_over_reverse", "forward_over_backward"):
        operator = operators.HessianOperator(operators.KerasModelFunction(single),
                                             x.astype(np.float32), y, batch_size=3,
                                             method=method)
        got = operators.dense_matrix(operator.matvec, operator.dim)
        np.testing.assert_allclose(got, exact, rtol=0, atol=1e-5 * np.abs(exact).max(),
                                   err_msg=method)
