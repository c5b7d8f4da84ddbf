"""Tile's gradient over static axes (hessian_tf/operators/tile_gradient.py): the same
first and second derivatives as TensorFlow's, second derivatives without tiles of twice
the rank, installed only inside the context, and exact products through UpSampling2D."""

import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

from hessian_tf import operators
from hessian_tf.operators import tile_gradient


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
    with tile_gradient.static_tile_gradients():
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
    with tile_gradient.static_tile_gradients():
        assert max(ranks()) <= 5


def test_installed_only_inside_and_restored_after_nesting_and_threads():
    assert not tile_gradient.installed()
    entered, release = threading.Event(), threading.Event()

    def hold():
        with tile_gradient.static_tile_gradients():
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    entered.wait(10)
    with tile_gradient.static_tile_gradients():
        with tile_gradient.static_tile_gradients():
            assert tile_gradient.installed()
        assert tile_gradient.installed()
    assert tile_gradient.installed()  # the thread's context is still open
    release.set()
    thread.join()
    assert not tile_gradient.installed()


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
    variables = [v.value for v in model.trainable_variables]
    with tf.GradientTape(persistent=True) as outer:  # TensorFlow's own Tile gradient
        with tf.GradientTape() as inner:
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                y, model(x), from_logits=True))
        gradient = tf.concat([tf.reshape(g, [-1]) for g in inner.gradient(loss, variables)], 0)
    expected = tf.concat([tf.reshape(j, [gradient.shape[0], -1])
                          for j in outer.jacobian(gradient, variables)], 1).numpy()
    operator = operators.HessianOperator(operators.KerasModelFunction(model), x, y,
                                         batch_size=2, method=method)
    np.testing.assert_allclose(operators.dense_matrix(operator.matvec, operator.dim), expected,
                               rtol=1e-10, atol=1e-12)
    assert not tile_gradient.installed()
