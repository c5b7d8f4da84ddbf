"""Cross-entropy per position: segmentation models (a class per pixel) and taggers (a
class per token). The per-example loss is the mean over the example's positions, as
Keras averages it, so the products are the Hessian (and GGN) of Keras's own training
loss; labels that fit neither a classifier nor the positions are refused in one line."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from hessian_tf import operators
from hessian_tf.operators import gauss_newton, losses
from tests.operators.test_gauss_newton import flat_jacobian

NUM_EXAMPLES, BATCH_SIZE, CLASSES = 7, 3, 3  # batches of 3, 3 and an uneven 1


def tagger():
    """Tokens [4 positions, 2 features] → a class per token."""
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((4, 2), dtype="float64"),
        keras.layers.Dense(3, activation="tanh", dtype="float64"),
        keras.layers.Dense(CLASSES, dtype="float64"),
    ])


def segmenter():
    """Images [3, 3, 1] → a class per pixel."""
    keras.utils.set_random_seed(1)
    return keras.Sequential([
        keras.Input((3, 3, 1), dtype="float64"),
        keras.layers.Conv2D(2, 2, padding="same", activation="tanh", dtype="float64"),
        keras.layers.Conv2D(CLASSES, 1, dtype="float64"),
    ])


def data(model, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((NUM_EXAMPLES, *model.input_shape[1:]))
    y = rng.integers(0, CLASSES, (NUM_EXAMPLES, *model.output_shape[1:-1])).astype(np.int32)
    return x, y


def keras_loss(model, x, y):
    """The mean loss as Keras computes it in training: over every position of every
    example (its loss objects reduce so, in float32)."""
    return mean_loss(y, model(x))


def mean_loss(y, logits):
    return tf.reduce_mean(
        keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))


def variables_of(model):
    return [v.value for v in model.trainable_variables]


def reference_hessian(model, x, y):
    variables = variables_of(model)
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            loss = keras_loss(model, x, y)
        gradient = tf.concat([tf.reshape(g, [-1]) for g in inner.gradient(loss, variables)], 0)
    return tf.concat([tf.reshape(j, [gradient.shape[0], -1])
                      for j in outer.jacobian(gradient, variables)], 1).numpy()


def reference_ggn(model, x, y):
    """Jᵀ (∂²L/∂z²) J of Keras's mean loss L over the whole data."""
    variables = variables_of(model)
    with tf.GradientTape(persistent=True) as tape:
        logits = model(x)
    jacobian = flat_jacobian(tape, logits, variables)
    flat = tf.Variable(tf.reshape(logits, [-1]))
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            z = tf.reshape(flat, logits.shape)
            loss = mean_loss(y, z)
        gradient = inner.gradient(loss, flat)
    output_hessian = outer.jacobian(gradient, flat).numpy()
    return jacobian.T @ output_hessian @ jacobian


def matrix(model, x, y, operator_class=operators.HessianOperator, **kwargs):
    operator = operator_class(operators.KerasModelFunction(model), x, y,
                              batch_size=BATCH_SIZE, **kwargs)
    return operators.dense_matrix(operator.matvec, operator.dim)


@pytest.mark.parametrize("network", [tagger, segmenter])
def test_loss_is_keras_mean_over_positions(network):
    model = network()
    x, y = data(model)
    logits = model(x)
    np.testing.assert_allclose(
        np.mean(losses.sparse_categorical_crossentropy(tf.constant(y), logits).numpy()),
        keras_loss(model, x, y).numpy(), rtol=1e-12)
    one_hot = tf.one_hot(y, CLASSES, dtype=tf.float64)
    np.testing.assert_allclose(
        losses.categorical_crossentropy(one_hot, logits).numpy(),
        losses.sparse_categorical_crossentropy(tf.constant(y), logits).numpy(), rtol=1e-12)


@pytest.mark.parametrize("network", [tagger, segmenter])
@pytest.mark.parametrize("method", ["forward_over_backward", "reverse_over_reverse"])
def test_products_are_the_hessian_of_keras_loss(network, method):
    model = network()
    x, y = data(model)
    expected = reference_hessian(model, x, y)
    np.testing.assert_allclose(matrix(model, x, y, method=method), expected,
                               rtol=1e-10, atol=1e-12)
    # A trailing label axis of 1, and one-hot targets with the categorical loss.
    np.testing.assert_allclose(matrix(model, x, y[..., None], method=method), expected,
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        matrix(model, x, np.eye(CLASSES)[y], method=method, loss="categorical_crossentropy"),
        expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("network", [tagger, segmenter])
def test_ggn_is_the_jacobians_around_keras_loss_curvature(network):
    model = network()
    x, y = data(model)
    np.testing.assert_allclose(matrix(model, x, y, gauss_newton.GaussNewtonOperator),
                               reference_ggn(model, x, y), rtol=1e-10, atol=1e-12)


def test_labels_that_fit_no_position_are_refused():
    model = tagger()
    x, y = data(model)
    with pytest.raises(ValueError, match=(
            r"labels have shape \(3,\) per example and the model's outputs are \(4, 3\), but "
            r"--loss=sparse_categorical_crossentropy takes one class index per position "
            r"\(4,\) of its outputs; for one-hot or soft labels pass "
            r"--loss=categorical_crossentropy, for a regression's real targets "
            r"--loss=mean_squared_error\.")):
        operators.HessianOperator(operators.KerasModelFunction(model), x, y[:, :3])
    with pytest.raises(ValueError, match=r"labels range over \[0, 5\] but the model has 3 outputs"):
        operators.HessianOperator(operators.KerasModelFunction(model), x, np.where(y == 2, 5, y))


def test_a_classifier_still_takes_one_label_per_example():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(CLASSES)])
    x = np.zeros((5, 3), np.float32)
    with pytest.raises(ValueError, match=r"labels have shape \(2,\) per example and the "
                       r"model's outputs are \(3,\), but .* takes one class index per example;"):
        operators.HessianOperator(operators.KerasModelFunction(model), x, np.zeros((5, 2), np.int32))
    # Labels shaped as the outputs (a regression's targets): not told as if they differed.
    with pytest.raises(ValueError, match=r"labels have shape \(3,\) per example, as the "
                       r"model's outputs do, but --loss=sparse_categorical_crossentropy takes "
                       r"one class index per example; .* --loss=mean_squared_error"):
        operators.HessianOperator(operators.KerasModelFunction(model), x,
                                  np.zeros((5, CLASSES), np.int32))


def test_a_softmax_per_pixel_is_refused():
    model = segmenter()
    model.layers[-1].activation = keras.activations.softmax
    x, y = data(model)
    with pytest.raises(ValueError, match="outputs are probabilities"):
        operators.HessianOperator(operators.KerasModelFunction(model), x, y)


def test_masked_positions_are_refused():
    # Keras averages a masked tagger's loss over the unmasked tokens only.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,), dtype="int32"),
                              keras.layers.Embedding(5, 2, mask_zero=True),
                              keras.layers.Dense(CLASSES)])
    x = np.array([[1, 2, 0, 0], [3, 1, 4, 0]], np.int32)
    with pytest.raises(ValueError, match=r"^--model: its outputs carry a Keras mask"):
        operators.HessianOperator(operators.KerasModelFunction(model), x,
                                  np.zeros((2, 4), np.int32))
