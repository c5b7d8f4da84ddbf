"""--loss=binary_crossentropy: one logit per output (binary classifiers, multi-label
models). The loss equals Keras's from logits, its gradient is right at z = 0, products
and the GGN equal dense float64 references, and misuse is refused in one line."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from hessian_tf import operators
from hessian_tf.operators import gauss_newton, losses
from hessian_tf.operators.subset import SubsetModelFunction
from tests.operators.test_gauss_newton import flat_jacobian

NUM_EXAMPLES, BATCH_SIZE = 9, 4


def binary_net(outputs: int = 1, activation=None):
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((4,), dtype="float64"),
        keras.layers.Dense(3, activation="tanh", dtype="float64"),
        keras.layers.Dense(outputs, activation=activation, dtype="float64"),
    ])


def binary_data(outputs: int = 1):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((NUM_EXAMPLES, 4))
    y = rng.integers(0, 2, (NUM_EXAMPLES, outputs)).astype(np.float64)
    y[0] = 0.3  # a soft target
    return x, (y[:, 0] if outputs == 1 else y)


def keras_loss(model, x, y):
    """The mean loss as Keras computes it in training."""
    logits = model(x, training=False)
    targets = tf.reshape(tf.cast(y, logits.dtype), tf.shape(logits))
    return tf.reduce_mean(keras.losses.binary_crossentropy(targets, logits, from_logits=True))


def test_the_loss_is_keras_and_its_gradient_is_right_at_zero():
    rng = np.random.default_rng(0)
    logits = tf.constant(rng.standard_normal((6, 3)) * 4)
    targets = tf.constant(np.r_[rng.integers(0, 2, (5, 3)), [[0.2, 0.5, 1.0]]])
    np.testing.assert_allclose(
        losses.binary_crossentropy(targets, logits).numpy(),
        keras.losses.binary_crossentropy(targets, logits, from_logits=True).numpy(), rtol=1e-6)
    zero = tf.zeros((3, 1), tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(zero)
        loss = tf.reduce_sum(losses.binary_crossentropy(tf.constant([0.0, 1.0, 0.5]), zero))
    np.testing.assert_allclose(tape.gradient(loss, zero).numpy().ravel(), [0.5, -0.5, 0.0])


@pytest.mark.parametrize("outputs", [1, 2])
def test_products_are_the_hessian_of_keras_loss(outputs):
    model = binary_net(outputs)
    x, y = binary_data(outputs)
    variables = [v.value for v in model.trainable_variables]
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            loss = keras_loss(model, x, y)
        gradient = tf.concat([tf.reshape(g, [-1]) for g in inner.gradient(loss, variables)], 0)
    expected = tf.concat([tf.reshape(j, [gradient.shape[0], -1])
                          for j in outer.jacobian(gradient, variables)], 1).numpy()
    for method in ("forward_over_backward", "reverse_over_reverse"):
        operator = operators.HessianOperator(
            operators.KerasModelFunction(model), x, y, batch_size=BATCH_SIZE,
            loss="binary_crossentropy", method=method)
        np.testing.assert_allclose(operators.dense_matrix(operator.matvec, operator.dim),
                                   expected, rtol=1e-10, atol=1e-12)


def test_ggn_is_the_jacobians_around_the_sigmoid_curvature():
    model = binary_net(2)
    x, y = binary_data(2)
    variables = [v.value for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        logits = model(x, training=False)
    jacobian = flat_jacobian(tape, logits, variables)  # [N·2, dim], example-major
    p = tf.sigmoid(logits).numpy().ravel()
    expected = jacobian.T @ np.diag(p * (1 - p) / 2) @ jacobian / NUM_EXAMPLES
    operator = gauss_newton.GaussNewtonOperator(
        operators.KerasModelFunction(model), x, y, batch_size=BATCH_SIZE,
        loss="binary_crossentropy")
    np.testing.assert_allclose(operators.dense_matrix(operator.matvec, operator.dim), expected,
                               rtol=1e-10, atol=1e-12)


def test_boolean_labels_are_zero_and_one():
    model_function = operators.KerasModelFunction(binary_net())
    x, _ = binary_data()
    labels = np.arange(NUM_EXAMPLES) % 3 == 0
    products = [operators.HessianOperator(model_function, x, y, batch_size=BATCH_SIZE,
                                          loss="binary_crossentropy").matvec(np.ones(19))
                for y in (labels, labels.astype(np.float64))]
    np.testing.assert_array_equal(products[0], products[1])


@pytest.mark.parametrize("activation, y, loss, subset, message", [
    ("sigmoid", None, "binary_crossentropy", False,
     "applies a sigmoid, but --loss=binary_crossentropy takes logits"),
    ("sigmoid", None, "binary_crossentropy", True,  # --variables: the subset's model
     "applies a sigmoid, but --loss=binary_crossentropy takes logits"),
    (None, np.arange(NUM_EXAMPLES) % 3, "binary_crossentropy", False,
     "targets range over [0, 2], outside [0, 1]"),
    (None, np.array(["a"] * NUM_EXAMPLES), "binary_crossentropy", False,
     "targets of dtype <U1, but --loss=binary_crossentropy takes 0/1 labels"),
    (None, np.arange(NUM_EXAMPLES) % 2, "sparse_categorical_crossentropy", False,
     "pass --loss=binary_crossentropy for one logit"),
    # Negative soft targets had mirrored the spectrum without a word.
    (None, np.full((NUM_EXAMPLES, 1), -0.1), "categorical_crossentropy", False,
     "targets range over [-0.1, -0.1], outside [0, 1], but --loss=categorical_crossentropy"),
])
def test_misuse_is_refused_with_the_fix(activation, y, loss, subset, message):
    x, labels = binary_data()
    model_function = operators.KerasModelFunction(binary_net(activation=activation))
    if subset:
        model_function = SubsetModelFunction(model_function, "kernel")
    with pytest.raises(ValueError, match=re.escape(message)):
        operators.HessianOperator(model_function, x, labels if y is None else y,
                                  batch_size=BATCH_SIZE, loss=loss)
