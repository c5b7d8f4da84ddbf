"""Second derivatives mended while products are traced (hessian_tf/operators/
second_order.py): Tile's gradient over static axes has the same first and second
derivatives as TensorFlow's, without tiles of twice the rank; resizes (bilinear,
bicubic, nearest) have exact second derivatives, where TensorFlow's were zero or
missing; so do max poolings whose outputs have their inputs' size, which TensorFlow's
kernel overwrote; 3-D max poolings' gradients at tied maxima are the first maximum's
where TensorFlow's kernel gave every one (without oneDNN); softsign has one; installed only inside the context; exact products through
UpSampling2D, Resizing and softsign; an op still without one is named in one line."""

import itertools
import os
import subprocess
import sys
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

from hessian_tf import operators
from hessian_tf.operators import second_order


def dense_hessian(loss, variables):
    """The Hessian of `loss()` in `variables`, by a jacobian of the gradient."""
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            value = loss()
        gradient = tf.concat([tf.reshape(g, [-1]) for g in inner.gradient(value, variables)], 0)
    return tf.concat([tf.reshape(j, [gradient.shape[0], -1])
                      for j in outer.jacobian(gradient, variables)], 1).numpy()


def first_and_second(x, multiples, weights):
    """d/dx Σ w·tile(x)² and its product with x, by reverse over reverse."""
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            loss = tf.reduce_sum(weights * tf.square(tf.tile(x, multiples)))
        gradient = inner.gradient(loss, x)
        projected = tf.reduce_sum(gradient * x)
    return gradient, outer.gradient(projected, x)


@pytest.mark.parametrize("shape, multiples", [
    ((2, 3, 1, 4), (1, 2, 3, 1)),  # tiled axes between untiled ones, an axis of 1
    ((3, 5), (4, 1)),
    ((1, 1), (2, 3)),
    ((4,), (1,)),  # nothing tiled
    ((2, 1, 3, 2, 2), (1, 1, 2, 1, 1)),  # ops.repeat's expanded axis
])
def test_same_derivatives_as_tensorflow(shape, multiples):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal(shape))
    weights = tf.constant(rng.standard_normal(np.multiply(shape, multiples)))
    function = tf.function(first_and_second)
    expected = function(x, multiples, weights)
    with second_order.second_order_gradients():
        function = tf.function(first_and_second)  # traced again, inside
        got = function(x, multiples, weights)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-12)


def test_second_derivative_of_a_repeat_tiles_at_its_own_rank():
    x = tf.TensorSpec([2, 3, 4, 5], tf.float32)

    def second(x):
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                loss = tf.reduce_sum(tf.square(tf.repeat(tf.repeat(x, 2, axis=1), 2, axis=2)))
            projected = tf.reduce_sum(inner.gradient(loss, x))
        return outer.gradient(projected, x)

    def ranks():
        graph = tf.function(second).get_concrete_function(x).graph
        return [op.outputs[0].shape.rank for op in graph.get_operations() if op.type == "Tile"]

    assert max(ranks()) == 10  # TensorFlow's: 2 × the 5-D tile of each repeat
    with second_order.second_order_gradients():
        assert max(ranks()) <= 5


def test_installed_only_inside_and_restored_after_nesting_and_threads():
    assert not second_order.installed()
    entered, release = threading.Event(), threading.Event()

    def hold():
        with second_order.second_order_gradients():
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    entered.wait(10)
    with second_order.second_order_gradients():
        with second_order.second_order_gradients():
            assert second_order.installed()
        assert second_order.installed()
    assert second_order.installed()  # the thread's context is still open
    release.set()
    thread.join()
    assert not second_order.installed()


def upsampling_model():
    keras.utils.set_random_seed(2)
    inputs = keras.Input((2, 2, 1), dtype="float64")
    h = keras.layers.Conv2D(2, 1, activation="tanh", dtype="float64")(inputs)
    h = keras.layers.UpSampling2D(dtype="float64")(h)
    return keras.Model(inputs, keras.layers.Conv2D(3, 2, dtype="float64")(h))


@pytest.mark.parametrize("method", ["reverse_over_reverse", "forward_over_backward"])
def test_products_through_upsampling_are_the_dense_hessian(method):
    model = upsampling_model()
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 2, 2, 1))
    y = rng.integers(0, 3, (5, 3, 3)).astype(np.int32)
    expected = dense_hessian(  # by TensorFlow's own Tile gradient
        lambda: tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            y, model(x), from_logits=True)),
        [v.value for v in model.trainable_variables])
    operator = operators.HessianOperator(operators.KerasModelFunction(model), x, y,
                                         batch_size=2, method=method)
    np.testing.assert_allclose(operators.dense_matrix(operator.matvec, operator.dim), expected,
                               rtol=1e-10, atol=1e-12)
    assert not second_order.installed()


def resizing_model(layer):
    """1×1 convolutions around a resize of 3×3 maps: logits per resized pixel."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((3, 3, 1), dtype="float64")
    h = keras.layers.Conv2D(2, 1, activation="tanh", dtype="float64")(inputs)
    return keras.Model(inputs, keras.layers.Conv2D(3, 1, dtype="float64")(layer(h)))


RESIZES = {  # name: (layer, output size)
    "upsampling_bilinear": (lambda: keras.layers.UpSampling2D(
        interpolation="bilinear", dtype="float64"), 6),
    "resizing_bilinear": (lambda: keras.layers.Resizing(5, 5, dtype="float64"), 5),
    "resizing_bicubic": (lambda: keras.layers.Resizing(
        5, 5, interpolation="bicubic", dtype="float64"), 5),
    "resizing_nearest": (lambda: keras.layers.Resizing(
        5, 5, interpolation="nearest", dtype="float64"), 5),
}


def resize_matrix(layer, size):
    """The resize as a [size², 9] matrix: its images of the 9 one-pixel maps."""
    basis = np.eye(9).reshape(9, 3, 3, 1)
    return np.asarray(layer(basis), np.float64).reshape(9, size * size).T


def reference_hessian_through(model, resize, x, y):
    """The Hessian of the mean cross-entropy of `model`, its resize applied as the
    matrix `resize` (linear, so differentiated exactly to any order)."""
    variables = [tf.Variable(v.numpy()) for v in model.trainable_variables]
    matrix = tf.constant(resize)
    size = int(np.sqrt(resize.shape[0]))

    def loss():
        k1, b1, k2, b2 = variables
        h = tf.tanh(tf.einsum("bhwc,cd->bhwd", x, k1[0, 0]) + b1)
        up = tf.einsum("pq,bqd->bpd", matrix, tf.reshape(h, [len(x), 9, 2]))
        logits = tf.reshape(tf.einsum("bpd,de->bpe", up, k2[0, 0]) + b2, [len(x), size, size, 3])
        return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            y, logits, from_logits=True))

    return dense_hessian(loss, variables)


@pytest.mark.parametrize("resize", sorted(RESIZES))
@pytest.mark.parametrize("method", ["reverse_over_reverse", "forward_over_backward"])
def test_products_through_resizes_are_exact(resize, method):
    make_layer, size = RESIZES[resize]
    layer = make_layer()
    model = resizing_model(layer)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3, 3, 1))
    y = rng.integers(0, 3, (4, size, size)).astype(np.int32)
    expected = reference_hessian_through(model, resize_matrix(layer, size), x, y)
    operator = operators.HessianOperator(operators.KerasModelFunction(model), x, y,
                                         batch_size=2, method=method)
    got = operators.dense_matrix(operator.matvec, operator.dim)
    # TensorFlow resizes in float32 whatever the input's dtype.
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("method", ["reverse_over_reverse", "forward_over_backward"])
def test_ggn_through_a_bilinear_resize(method):
    # J v by forward mode went through the resize's JVP, which TensorFlow gave as None.
    from hessian_tf.operators import gauss_newton
    from tests.operators.test_per_position import reference_ggn

    make_layer, size = RESIZES["upsampling_bilinear"]
    model = resizing_model(make_layer())
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 3, 3, 1))
    y = rng.integers(0, 3, (4, size, size)).astype(np.int32)
    operator = gauss_newton.GaussNewtonOperator(operators.KerasModelFunction(model), x, y,
                                                batch_size=2, method=method)
    expected = reference_ggn(model, x, y)
    np.testing.assert_allclose(operators.dense_matrix(operator.matvec, operator.dim), expected,
                               rtol=1e-5, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("method", ["reverse_over_reverse", "forward_over_backward"])
def test_products_through_softsign_are_exact(method):
    # TensorFlow has no gradient for SoftsignGrad: every product failed.
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((4,), dtype="float64"),
                              keras.layers.Dense(3, activation="softsign", dtype="float64"),
                              keras.layers.Dense(2, dtype="float64")])
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 4)) * 2
    y = rng.integers(0, 2, 6).astype(np.int32)
    variables = [tf.Variable(v.numpy()) for v in model.trainable_variables]

    def loss():
        k1, b1, k2, b2 = variables
        h = x @ k1 + b1
        logits = (h / (1 + tf.abs(h))) @ k2 + b2  # softsign in plain ops
        return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            y, logits, from_logits=True))

    expected = dense_hessian(loss, variables)
    operator = operators.HessianOperator(operators.KerasModelFunction(model), x, y,
                                         batch_size=4, method=method)
    np.testing.assert_allclose(operators.dense_matrix(operator.matvec, operator.dim), expected,
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["auto", "reverse_over_reverse"])
def test_an_op_without_second_derivative_is_named_in_one_line(method):
    keras.utils.set_random_seed(8)  # float32: TensorFlow's antialiased resize is float32
    inputs = keras.Input((3, 3, 1))
    h = keras.layers.Resizing(5, 5, antialias=True)(keras.layers.Conv2D(2, 1)(inputs))
    model = keras.Model(inputs, keras.layers.Conv2D(3, 1)(h))
    rng = np.random.default_rng(8)
    x = rng.standard_normal((4, 3, 3, 1)).astype(np.float32)
    y = rng.integers(0, 3, (4, 5, 5)).astype(np.int32)
    operator = operators.HessianOperator(operators.KerasModelFunction(model), x, y,
                                         batch_size=2, method=method)
    with pytest.raises(ValueError, match=r"^--model: TensorFlow has no gradient for the op "
                       r"ScaleAndTranslateGrad, which a Hessian product"):
        operator.choose_method()
        operator.matvec(np.ones(operator.dim))


def pooling_model(pooling):
    """1×1 convolutions around a max pooling of 3×3 maps: logits per pooled pixel."""
    keras.utils.set_random_seed(9)
    inputs = keras.Input((3, 3, 1), dtype="float64")
    h = keras.layers.Conv2D(2, 1, activation="tanh", dtype="float64")(inputs)
    return keras.Model(inputs, keras.layers.Conv2D(3, 1, dtype="float64")(pooling(h)))


def reference_hessian_pooled(model, pooling, x, y):
    """The Hessian of the mean cross-entropy of `model` at its parameters, its max
    pooling taken as the gather of each window's maximum there (linear in the pooled
    maps, so differentiated exactly to any order, without TensorFlow's pooling ops)."""
    variables = [tf.Variable(v.numpy()) for v in model.trainable_variables]

    def maps(k1, b1):
        return tf.tanh(tf.einsum("bhwc,cd->bhwd", x, k1[0, 0]) + b1)

    pooled, argmax = tf.nn.max_pool_with_argmax(
        maps(*variables[:2]), pooling.pool_size, pooling.strides, pooling.padding.upper(),
        include_batch_in_index=True)

    def loss():
        k1, b1, k2, b2 = variables
        h = tf.gather(tf.reshape(maps(k1, b1), [-1]), argmax)
        logits = tf.einsum("bhwd,de->bhwe", h, k2[0, 0]) + b2
        return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            y, logits, from_logits=True))

    return dense_hessian(loss, variables), pooled.shape[1:3]


@pytest.mark.parametrize("pool_size, strides", [(2, 1), (3, 1), (3, 2), (1, 1)])
@pytest.mark.parametrize("method", ["reverse_over_reverse", "forward_over_backward"])
def test_products_through_same_max_pooling_are_exact(pool_size, strides, method):
    # Stride 1: TensorFlow's MaxPoolGradGrad overwrote its input, products were off by
    # 63% of the largest entry, and not symmetric.
    pooling = keras.layers.MaxPooling2D(pool_size, strides=strides, padding="same",
                                        dtype="float64")
    model = pooling_model(pooling)
    rng = np.random.default_rng(10)
    x = rng.standard_normal((4, 3, 3, 1))
    y = rng.integers(0, 3, (4,) + tuple(model.output_shape[1:3])).astype(np.int32)
    expected, size = reference_hessian_pooled(model, pooling, x, y)
    assert tuple(size) == tuple(model.output_shape[1:3])
    operator = operators.HessianOperator(operators.KerasModelFunction(model), x, y,
                                         batch_size=2, method=method)
    np.testing.assert_allclose(operators.dense_matrix(operator.matvec, operator.dim), expected,
                               rtol=1e-10, atol=1e-12)


def traced_and_eager_second_derivatives(pooling, shape, dtype, signature=None, eager=True):
    """d²/dx² Σ w·pooling(tanh x)² times u, traced inside second_order_gradients()
    (with `signature`, for shapes unknown when traced) and eagerly (where Python
    holds every input, so TensorFlow's kernel overwrites none; None unless `eager`)."""
    rng = np.random.default_rng(11)
    x, u = (tf.constant(rng.standard_normal(shape), dtype) for _ in range(2))
    w = tf.constant(rng.standard_normal(pooling(x).shape), dtype)

    def second(x, u):
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                loss = tf.reduce_sum(w * tf.square(pooling(tf.tanh(x))))
            projected = tf.reduce_sum(inner.gradient(loss, x) * u)
        return outer.gradient(projected, x)

    with second_order.second_order_gradients():
        traced = tf.function(second, input_signature=signature)(x, u)
    return traced.numpy(), second(x, u).numpy() if eager else None


@pytest.mark.parametrize("name, pooling, shape", [
    ("3-D", lambda t: tf.nn.max_pool3d(t, 2, 1, "SAME"), (2, 3, 3, 3, 2)),
    ("v2", lambda t: tf.raw_ops.MaxPoolV2(input=t, ksize=[1, 3, 3, 1], strides=[1, 1, 1, 1],
                                          padding="SAME"), (2, 4, 3, 2)),
    ("1-D", lambda t: tf.nn.max_pool1d(t, 3, 1, "SAME"), (2, 5, 2)),
    ("valid", lambda t: tf.nn.max_pool2d(t, 2, 1, "VALID"), (2, 4, 3, 2)),
])
def test_traced_max_pooling_second_derivatives_equal_eager_ones(name, pooling, shape):
    dtype = tf.float32 if name == "3-D" else tf.float64  # MaxPool3D: float32
    traced, eager = traced_and_eager_second_derivatives(pooling, shape, dtype)
    np.testing.assert_allclose(traced, eager, rtol=1e-5, atol=1e-5 * np.abs(eager).max())


@pytest.mark.parametrize("window, stride", [(3, 1), (2, 1), (3, 2)])
def test_max_pooling_of_shapes_unknown_when_traced(window, stride):
    # Even windows and strides of 2 pad unevenly: the odd entry after.
    pooling = lambda t: tf.nn.max_pool2d(t, window, stride, "SAME")  # noqa: E731
    signature = [tf.TensorSpec([None] * 4, tf.float64)] * 2
    traced, eager = traced_and_eager_second_derivatives(pooling, (2, 5, 4, 3), tf.float64,
                                                        signature)
    np.testing.assert_allclose(traced, eager, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window, stride, paddings", [
    (3, 1, [[0, 0], [1, 1], [1, 1], [0, 0]]), (3, 2, [[0, 0], [1, 2], [0, 1], [0, 0]])])
def test_max_pooling_with_explicit_padding(window, stride, paddings):
    # TensorFlow's GradGrad ops take no explicit padding: every second derivative
    # through such a pooling was a ValueError. The reference: TensorFlow's own second
    # derivatives of the "valid" pooling of the image padded by −∞, eagerly.
    explicit = lambda t: tf.nn.max_pool2d(t, window, stride, padding=paddings)  # noqa: E731
    shape = (2, 5, 4, 3)
    traced, _ = traced_and_eager_second_derivatives(explicit, shape, tf.float64, eager=False)
    _, expected = traced_and_eager_second_derivatives(
        lambda t: tf.nn.max_pool2d(tf.pad(t, paddings, constant_values=-np.inf), window,
                                   stride, "VALID"), shape, tf.float64)
    np.testing.assert_allclose(traced, expected, rtol=1e-12, atol=1e-12)
    assert np.abs(expected).max() > 0


def test_max_pooling_of_a_window_computed_in_the_graph():
    # MaxPoolV2 whose window and strides are tensors: padded by tensors.
    def pooling(t):
        ones = tf.ones([4], tf.int32) + tf.cast(tf.reduce_sum(t) * 0, tf.int32)
        return tf.raw_ops.MaxPoolV2(input=t, ksize=ones + [0, 2, 1, 0], strides=ones,
                                    padding="SAME")

    traced, eager = traced_and_eager_second_derivatives(pooling, (2, 4, 5, 2), tf.float64)
    np.testing.assert_allclose(traced, eager, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["reverse_over_reverse", "forward_over_backward"])
def test_ggn_through_a_same_max_pooling(method):
    # J v by forward mode takes the pooling's JVP by the same GradGrad op: off by 55%.
    from hessian_tf.operators import gauss_newton
    from tests.operators.test_per_position import reference_ggn

    model = pooling_model(keras.layers.MaxPooling2D(3, strides=1, padding="same",
                                                    dtype="float64"))
    rng = np.random.default_rng(12)
    x = rng.standard_normal((4, 3, 3, 1))
    y = rng.integers(0, 3, (4, 3, 3)).astype(np.int32)
    operator = gauss_newton.GaussNewtonOperator(operators.KerasModelFunction(model), x, y,
                                                batch_size=2, method=method)
    np.testing.assert_allclose(operators.dense_matrix(operator.matvec, operator.dim),
                               reference_ggn(model, x, y), rtol=1e-10, atol=1e-12)


def test_products_of_an_exported_same_max_pooling_are_exact(tmp_path):
    # A SavedModel's functions are differentiated as graphs: off by 89% without the mending.
    from hessian_tf.io import export

    pooling = keras.layers.MaxPooling2D(3, strides=1, padding="same", dtype="float64")
    model = pooling_model(pooling)
    rng = np.random.default_rng(13)
    x = rng.standard_normal((4, 3, 3, 1))
    y = rng.integers(0, 3, (4, 3, 3)).astype(np.int32)
    expected, _ = reference_hessian_pooled(model, pooling, x, y)
    export.export_for_spectrum(model, str(tmp_path / "exported"))
    loaded = operators.SavedModelFunction(tf.saved_model.load(str(tmp_path / "exported")))
    operator = operators.HessianOperator(loaded, x, y, batch_size=2,
                                         method="reverse_over_reverse")
    np.testing.assert_allclose(operators.dense_matrix(operator.matvec, operator.dim), expected,
                               rtol=1e-10, atol=1e-12)


def first_maximum_gradient(x, gy, window, strides, padding):
    """A 3-D max pooling's gradient, each window's to its first maximum in (depth, row,
    column) order, as oneDNN's kernel gives it, windows padded as TensorFlow's."""
    _, *spatial, _ = x.shape
    if padding == "SAME":
        outputs = [-(-n // s) for n, s in zip(spatial, strides)]
        before = [max((o - 1) * s + k - n, 0) // 2
                  for o, s, k, n in zip(outputs, strides, window, spatial)]
    else:
        outputs, before = [(n - k) // s + 1 for n, k, s in zip(spatial, window, strides)], [0] * 3
    gx = np.zeros_like(x)
    for b, c in itertools.product(range(x.shape[0]), range(x.shape[-1])):
        for out in itertools.product(*map(range, outputs)):
            entries = [tuple(o * s + t - p for o, s, t, p in zip(out, strides, tap, before))
                       for tap in itertools.product(*map(range, window))]
            entries = [e for e in entries if all(0 <= i < n for i, n in zip(e, spatial))]
            first = max(entries, key=lambda e: (x[(b, *e, c)], -entries.index(e)))
            gx[(b, *first, c)] += gy[(b, *out, c)]
    return gx


def gradient_and_its_transpose(window, strides, padding, shape=(2, 5, 6, 4, 3),
                               dtype=tf.float32):
    """On 0/1 volumes (windows of tied maxima): a 3-D max pooling's gradient of gy traced
    within second_order_gradients(), the derivative of ⟨that gradient, t⟩ with respect
    to gy (the second derivative products take), the graph's op types and the
    reference (`first_maximum_gradient`), as float32 arrays."""
    rng = np.random.default_rng(5)
    x = rng.integers(0, 2, shape).astype(np.float32)
    gy = rng.standard_normal(tf.nn.max_pool3d(x, window, strides, padding).shape).astype(np.float32)
    t = rng.standard_normal(x.shape).astype(np.float32)
    if dtype != tf.float32:  # values exact in it: round the gradients to it
        gy, t = (tf.cast(tf.cast(v, dtype), tf.float32).numpy() for v in (gy, t))

    def both(x, gy):
        with tf.GradientTape() as outer:
            outer.watch(gy)
            with tf.GradientTape() as inner:
                inner.watch(x)
                pooled = tf.nn.max_pool3d(x, window, strides, padding)
            gx = inner.gradient(pooled, x, output_gradients=gy)
            projected = tf.reduce_sum(gx * t)
        return gx, outer.gradient(projected, gy)

    x_in, gy_in = tf.constant(x, dtype), tf.constant(gy, dtype)
    with second_order.second_order_gradients():
        traced = tf.function(both).get_concrete_function(x_in, gy_in)
    gx, transposed = (tf.cast(v, tf.float32).numpy() for v in traced(x_in, gy_in))
    types = {op.type for op in traced.graph.get_operations()}
    return x, gy, t, gx, transposed, types, first_maximum_gradient(x, gy, window, strides, padding)


@pytest.mark.parametrize("window, strides, padding, shape, dtype", [
    ((2, 2, 2), (2, 2, 2), "VALID", (2, 5, 6, 4, 3), tf.float32),
    ((3, 2, 2), (1, 1, 1), "SAME", (2, 5, 6, 4, 3), tf.float32),
    ((2, 3, 2), (2, 1, 2), "SAME", (2, 5, 6, 4, 3), tf.float32),
    ((1, 1, 1), (2, 2, 1), "VALID", (2, 5, 6, 4, 3), tf.float32),
    ((2, 2, 2), (2, 2, 2), "VALID", (2, 5, 6, 4, 3), tf.bfloat16),
    # 5,760 positions per example: both parts of a position (4,096 each) are read.
    ((2, 2, 2), (2, 2, 2), "SAME", (1, 12, 12, 10, 4), tf.float32),
])
def test_max_pool3d_gradient_at_ties_where_the_kernel_splits_them(monkeypatch, window, strides,
                                                                   padding, shape, dtype):
    # As where TensorFlow's kernel gives a window's gradient to every tied maximum: the
    # mended gradient gives it to the first, and its derivative is its transpose.
    monkeypatch.setattr(second_order, "_splits_ties", True)
    x, gy, t, gx, transposed, types, expected = gradient_and_its_transpose(
        window, strides, padding, shape, dtype)
    assert "UnsortedSegmentSum" in types and "MaxPool3DGrad" not in types
    np.testing.assert_array_equal(gx, expected)
    np.testing.assert_allclose(np.sum(transposed * gy), np.sum(gx * t), rtol=1e-2 if dtype ==
                               tf.bfloat16 else 1e-5)


def test_max_pool3d_gradient_of_windows_without_a_maximum_is_dropped(monkeypatch):
    # A "same" window of −∞ entries ties with its padding, which comes first: no entry of
    # the images is its maximum, and its gradient goes nowhere (none into another
    # channel or example).
    monkeypatch.setattr(second_order, "_splits_ties", True)
    x = np.full((2, 3, 1, 1, 2), -np.inf, np.float32)
    x[:, 2] = [[[[1.0, 2.0]]], [[[3.0, 4.0]]]]
    gy = np.arange(1.0, 13.0, dtype=np.float32).reshape(2, 3, 1, 1, 2)

    def gradient(x, gy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            pooled = tf.nn.max_pool3d(x, (3, 1, 1), 1, "SAME")
        return tape.gradient(pooled, x, output_gradients=gy)

    with second_order.second_order_gradients():
        gx = tf.function(gradient)(tf.constant(x), tf.constant(gy)).numpy()
    expected = np.zeros_like(x)
    expected[:, 2] = gy[:, 1] + gy[:, 2]  # the windows at depths 1 and 2
    np.testing.assert_array_equal(gx, expected)


def test_max_pool3d_gradient_is_tensorflows_where_the_kernel_takes_the_first():
    if second_order.max_pool3d_splits_ties():
        pytest.skip("this host's MaxPool3DGrad splits ties (no oneDNN)")
    *_, gx, _, types, expected = gradient_and_its_transpose((2, 2, 2), (2, 2, 2), "VALID")
    assert "UnsortedSegmentSum" not in types
    np.testing.assert_array_equal(gx, expected)


def test_max_pool3d_gradient_is_tensorflows_on_accelerator_hosts(monkeypatch):
    # Not measured there: GPUs and TPUs keep TensorFlow's gradient, as the convolutions.
    monkeypatch.setattr(second_order, "_splits_ties", True)
    monkeypatch.setattr(second_order.convolutions, "cpu_only", lambda: False)
    *_, types, _ = gradient_and_its_transpose((2, 2, 2), (2, 2, 2), "VALID")
    assert "MaxPool3DGrad" in types and "UnsortedSegmentSum" not in types


def test_max_pool3d_ties_are_probed_eagerly_while_graphs_are_built(monkeypatch):
    # Also from a v1-style graph and a tf.function's trace: the probe runs (its answer
    # cached) and says what it says eagerly.
    eager = second_order.max_pool3d_splits_ties()
    for building in (lambda: tf.Graph().as_default(),
                     lambda: tf.function(lambda: tf.constant(0.0)).get_concrete_function().graph.as_default()):
        monkeypatch.setattr(second_order, "_splits_ties", None)
        with building():
            assert second_order.max_pool3d_splits_ties() == eager
        assert second_order._splits_ties == eager


def test_max_pool3d_ties_are_probed_in_a_fresh_process():
    # With oneDNN off, TensorFlow's MaxPool3DGrad gives the gradient to every tied
    # maximum, and the probe finds it (from inside a trace too): the mended gradient is
    # the first maximum's, TensorFlow's not; with oneDNN on, both are.
    code = (
        "import numpy as np, tensorflow as tf\n"
        "from hessian_tf.operators import second_order\n"
        "from tests.operators.test_second_order import gradient_and_its_transpose\n"
        "x, gy, t, gx, transposed, types, expected = gradient_and_its_transpose(\n"
        "    (2, 2, 2), (2, 2, 2), 'VALID')\n"
        "symmetric = np.isclose(np.sum(transposed * gy), np.sum(gx * t), rtol=1e-5)\n"
        "own = tf.function(lambda x, gy: tf.gradients(tf.nn.max_pool3d(x, 2, 2, 'VALID'), x, gy)[0])\n"
        "print(second_order._splits_ties, np.array_equal(gx, expected), bool(symmetric),\n"
        "      np.array_equal(own(tf.constant(x), tf.constant(gy)).numpy(), expected))\n"
        "from tests.operators.test_second_order import pooled_volumes_hessian\n"
        "hessian = pooled_volumes_hessian()\n"
        "print(np.abs(hessian - hessian.T).max() <= 1e-5 * np.abs(hessian).max())\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # Whichever kernel a process has, the gradient is the first maximum's and symmetric,
    # and TensorFlow's own equals it exactly where the probe says the kernel does not
    # split ties (a probe saying so wrongly fails here); then a Hessian through a 3-D
    # max pooling of raw convolutions over a constant background is symmetric (without
    # the mending, 90% of its largest entry apart without oneDNN, ad hoc). TensorFlow
    # 2.21's Eigen kernel, without oneDNN, splits ties; its oneDNN kernel (this
    # process's, unless TensorFlow was built without oneDNN) does not.
    for onednn in ("0", "1"):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                cwd=root, env={**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn},
                                timeout=300)
        lines = result.stdout.strip().splitlines()[-2:]
        assert len(lines) == 2, result.stderr[-2000:]
        splits, first, symmetric, own = lines[0].split()
        assert (first, symmetric, lines[1]) == ("True", "True", "True"), result.stderr[-2000:]
        assert own == str(splits == "False"), lines
        assert "Traceback" not in result.stderr, result.stderr[-2000:]


def pooled_volumes_hessian():
    """The Hessian, column by column from products, of a Conv3D → MaxPooling3D network on
    volumes whose background is 0 (windows of tied maxima, not behind a ReLU)."""
    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential([keras.Input((4, 4, 4, 1)), layers.Conv3D(2, 2, padding="same"),
                              layers.MaxPooling3D(2), layers.Flatten(), layers.Dense(3)])
    rng = np.random.default_rng(0)
    x = np.zeros((8, 4, 4, 4, 1), np.float32)
    x[:, 1:3, 1:3, 1:3, 0] = rng.integers(0, 2, (8, 2, 2, 2))
    operator = operators.HessianOperator(
        operators.KerasModelFunction(model), x, rng.integers(0, 3, 8).astype(np.int32),
        batch_size=8, method="reverse_over_reverse", loss="sparse_categorical_crossentropy")
    return np.stack([operator.matvec(e) for e in np.eye(operator.dim)])
