"""Products through normalisation statistics (LayerNormalization, GroupNormalization,
BatchNormalization on batch statistics, a layer of one's own calling tf.nn.moments)
against central differences of the exact gradient, in float64.

tf.nn.moments stops the gradient at the mean inside the variance, which keeps the
gradient exact but not its derivative (hessian_tf/operators/moments.py); these products
were wrong by 0.7-23% before the products' traces replaced it."""

import numpy as np
import pytest
import tensorflow as tf
import keras

from hessian_tf import operators
from hessian_tf.io.export import export_for_spectrum
from hessian_tf.io.models import load_model_function
from hessian_tf.operators import moments as moments_lib

DTYPE = "float64"


class OwnNormalization(keras.layers.Layer):
    """Standardises each example over its features with tf.nn.moments itself."""

    def call(self, inputs):
        mean, variance = tf.nn.moments(inputs, axes=[-1], keepdims=True)
        return (inputs - mean) * tf.math.rsqrt(variance + 1e-3)


NORMALISATIONS = {
    "layer_norm": lambda: keras.layers.LayerNormalization(dtype=DTYPE),
    "group_norm": lambda: keras.layers.GroupNormalization(2, dtype=DTYPE),
    "batch_norm_train": lambda: keras.layers.BatchNormalization(dtype=DTYPE),
    "own_tf_nn_moments": lambda: OwnNormalization(dtype=DTYPE),
}


def net(normalisation: str) -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,), dtype=DTYPE)
    x = keras.layers.Dense(6, dtype=DTYPE)(inputs)
    x = NORMALISATIONS[normalisation]()(x)
    x = keras.layers.Activation("tanh", dtype=DTYPE)(x)
    outputs = keras.layers.Dense(3, dtype=DTYPE)(x)
    return keras.Model(inputs, outputs)


def data():
    rng = np.random.default_rng(1)
    return rng.normal(size=(10, 5)), rng.integers(0, 3, 10)


def finite_difference_product(operator, model_function, vector, step=1e-5):
    """(∇L(θ + h v) − ∇L(θ − h v)) / 2h from the operator's own (exact) gradient."""
    variables = model_function.variables
    values = [v.numpy() for v in variables]
    parts = np.split(vector, np.cumsum([v.size for v in values])[:-1])
    gradients = []
    for sign in (1.0, -1.0):
        for variable, value, part in zip(variables, values, parts):
            variable.assign(value + sign * step * part.reshape(value.shape))
        gradients.append(operator.loss_and_gradient()[1])
    for variable, value in zip(variables, values):
        variable.assign(value)
    return (gradients[0] - gradients[1]) / (2 * step)


@pytest.mark.parametrize("method", ["reverse_over_reverse", "forward_over_backward"])
@pytest.mark.parametrize("normalisation", sorted(NORMALISATIONS))
def test_products_through_statistics_equal_differences_of_the_gradient(normalisation, method):
    bn_mode = "train" if normalisation == "batch_norm_train" else "inference"
    # Keras's own GroupNormalization (its statistics by tf.nn.moments), not group_norm.py's.
    model_function = operators.KerasModelFunction(net(normalisation), per_channel_group_norm=False)
    x, y = data()
    operator = operators.HessianOperator(model_function, x, y, batch_size=5, bn_mode=bn_mode,
                                         method=method)
    vector = np.random.default_rng(2).normal(size=operator.dim)
    product = operator.matvec(vector)
    expected = finite_difference_product(operator, model_function, vector)
    assert np.max(np.abs(product - expected)) < 1e-7 * np.max(np.abs(expected))


def test_the_stop_gradient_is_what_breaks_them(monkeypatch):
    """With tf.nn.moments as TensorFlow writes it, the same comparison fails: the
    test above measures the fix, not a tolerance."""
    model_function = operators.KerasModelFunction(net("group_norm"), per_channel_group_norm=False)
    x, y = data()
    operator = operators.HessianOperator(model_function, x, y, batch_size=5)
    vector = np.random.default_rng(2).normal(size=operator.dim)
    expected = finite_difference_product(operator, model_function, vector)
    monkeypatch.setattr(moments_lib, "_PATCHES", ())  # exact_moments() patches nothing
    product = operators.HessianOperator(model_function, x, y, batch_size=5).matvec(vector)
    assert np.max(np.abs(product - expected)) > 1e-3 * np.max(np.abs(expected))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_same_values_bit_for_bit(dtype):
    x = tf.constant(np.random.default_rng(3).normal(size=(4, 3, 6)).astype(dtype))
    original = tf.nn.moments
    with moments_lib.exact_moments():
        assert tf.nn.moments is moments_lib.moments
        for keepdims in (False, True):
            ours = tf.nn.moments(x, axes=[1, 2], keepdims=keepdims)
            theirs = original(x, axes=[1, 2], keepdims=keepdims)
            for a, b in zip(ours, theirs):
                assert a.dtype == b.dtype and a.shape == b.shape
                assert np.array_equal(a.numpy(), b.numpy())


def test_patches_stay_while_any_entry_is_open_and_go_after_the_last():
    """Entries nest and overlap (MirroredStrategy traces in threads); an exception
    inside one still removes the patches once the last entry exits."""
    import threading

    original = tf.nn.moments
    outer = moments_lib.exact_moments()
    outer.__enter__()
    entered, release = threading.Event(), threading.Event()

    def other_thread():
        with moments_lib.exact_moments():
            entered.set()
            release.wait(30)

    thread = threading.Thread(target=other_thread)
    thread.start()
    entered.wait(30)
    outer.__exit__(None, None, None)  # the first entry leaves while the other is open
    assert tf.nn.moments is moments_lib.moments
    release.set()
    thread.join(30)
    assert tf.nn.moments is original and tf.compat.v2.nn.moments is original
    with pytest.raises(RuntimeError):
        with moments_lib.exact_moments():
            raise RuntimeError("inside")
    assert tf.nn.moments is original


def test_exported_functions_carry_the_exact_statistics(tmp_path):
    model = net("layer_norm")
    x, y = data()
    keras_operator = operators.HessianOperator(operators.KerasModelFunction(model), x, y,
                                               batch_size=5)
    path = export_for_spectrum(model, str(tmp_path / "saved"))
    saved_function = load_model_function(path, tf.distribute.get_strategy())
    assert [saved_function.stop_gradients(mode) for mode in ("inference", "train")] == [0, 0]
    saved_operator = operators.HessianOperator(saved_function, x, y, batch_size=5)
    vector = np.random.default_rng(2).normal(size=keras_operator.dim)
    expected = keras_operator.matvec(vector)
    assert np.max(np.abs(saved_operator.matvec(vector) - expected)) < 1e-10 * np.max(np.abs(expected))


def test_a_keras_export_with_statistics_is_flagged(tmp_path, caplog):
    """Keras's own model.export() traces tf.nn.moments as TensorFlow writes it; a saved
    graph cannot be traced again, so its stop_gradient is reported when it is used."""
    path = str(tmp_path / "keras_export")
    net("layer_norm").export(path, verbose=False)
    saved_function = load_model_function(path, tf.distribute.get_strategy())
    assert saved_function.stop_gradients("inference") >= 1
    x, y = data()
    with caplog.at_level("WARNING"):
        operators.HessianOperator(saved_function, x, y, batch_size=5)
    warnings = [r.getMessage() for r in caplog.records if "stops the gradient" in r.getMessage()]
    assert len(warnings) == 1 and "--bn_mode=inference" in warnings[0]
