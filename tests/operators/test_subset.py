"""`--variables=REGEX`: operators on a subset of θ are principal sub-blocks of the full ones."""

import numpy as np
import pytest
import tensorflow as tf
import keras

from hessian_tf import operators
from hessian_tf.operators import gauss_newton
from hessian_tf.operators.subset import SubsetModelFunction, variable_paths

BATCH_SIZE = 4


def tiny_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((5,), dtype="float64"),
         keras.layers.Dense(4, activation="tanh", name="hidden", dtype="float64"),
         keras.layers.BatchNormalization(name="norm", dtype="float64"),
         keras.layers.Dense(3, name="logits", dtype="float64")],
        name="tiny")
    model.get_layer("norm").moving_mean.assign(np.full(4, 0.3))
    model.get_layer("norm").moving_variance.assign(np.full(4, 2.0))
    return model


def tiny_data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((11, 5)), rng.integers(0, 3, 11).astype(np.int32)


# Offsets in θ: hidden/kernel 0-19, hidden/bias 20-23, norm/gamma 24-27, norm/beta 28-31,
# logits/kernel 32-43, logits/bias 44-46. Each pattern runs in one BN mode and method.
CASES = [
    ("hidden/kernel", list(range(0, 20)), "inference", "forward_over_backward"),
    ("norm/|logits/bias", list(range(24, 32)) + list(range(44, 47)), "train",
     "reverse_over_reverse"),
    (r"^tiny/logits/.*$", list(range(32, 47)), "train", "forward_over_backward"),
]


def dense(operator_class, function, x, y, **kwargs):
    operator = operator_class(function, x, y, batch_size=BATCH_SIZE, **kwargs)
    return operators.dense_matrix(operator.matvec, operator.dim), operator


def test_paths_are_keras_paths():
    assert variable_paths(operators.KerasModelFunction(tiny_model())) == [
        "tiny/hidden/kernel", "tiny/hidden/bias", "tiny/norm/gamma", "tiny/norm/beta",
        "tiny/logits/kernel", "tiny/logits/bias"]


@pytest.mark.parametrize("pattern, indices, bn_mode, method", CASES)
def test_hessian_of_a_subset_is_the_principal_sub_block(pattern, indices, bn_mode, method):
    model = tiny_model()
    x, y = tiny_data()
    full, _ = dense(operators.HessianOperator, operators.KerasModelFunction(model), x, y,
                    bn_mode=bn_mode, method=method)
    subset = SubsetModelFunction(operators.KerasModelFunction(model), pattern)
    assert subset.flat_indices() == indices
    block, operator = dense(operators.HessianOperator, subset, x, y, bn_mode=bn_mode,
                            method=method)
    assert operator.dim == len(indices)
    np.testing.assert_allclose(block, full[np.ix_(indices, indices)], atol=1e-12, rtol=1e-10)


def test_gradient_and_ggn_of_a_subset():
    model = tiny_model()
    x, y = tiny_data()
    pattern, indices = CASES[1][:2]
    whole = operators.HessianOperator(operators.KerasModelFunction(model), x, y)
    part = operators.HessianOperator(SubsetModelFunction(operators.KerasModelFunction(model),
                                                         pattern), x, y)
    full_loss, full_gradient = whole.loss_and_gradient()
    loss, gradient = part.loss_and_gradient()
    assert loss == pytest.approx(full_loss, rel=1e-14)
    np.testing.assert_allclose(gradient, full_gradient[indices], atol=1e-14)
    full_ggn, _ = dense(gauss_newton.GaussNewtonOperator, operators.KerasModelFunction(model), x, y)
    ggn, _ = dense(gauss_newton.GaussNewtonOperator,
                   SubsetModelFunction(operators.KerasModelFunction(model), pattern), x, y)
    np.testing.assert_allclose(ggn, full_ggn[np.ix_(indices, indices)], atol=1e-12)


def test_mirrored_subset_equals_one_device():
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    model = tiny_model()
    x, y = tiny_data()
    pattern, indices = CASES[1][:2]
    single, _ = dense(operators.HessianOperator,
                      SubsetModelFunction(operators.KerasModelFunction(model), pattern), x, y,
                      bn_mode="train")
    mirrored, operator = dense(operators.HessianOperator,
                               SubsetModelFunction(operators.KerasModelFunction(model), pattern),
                               x, y, bn_mode="train",
                               strategy=tf.distribute.MirroredStrategy(devices))
    assert operator.strategy.num_replicas_in_sync == 2 and operator.dim == len(indices)
    np.testing.assert_allclose(mirrored, single, atol=1e-13)


def test_unselected_variables_are_read_at_each_product():
    model = tiny_model()
    x, y = tiny_data()
    operator = operators.HessianOperator(
        SubsetModelFunction(operators.KerasModelFunction(model), "logits/"), x, y)
    # Not a constant vector: a constant shift of the logits is in the Hessian's kernel.
    vector = np.random.default_rng(1).standard_normal(operator.dim)
    before = operator.matvec(vector)
    model.get_layer("hidden").kernel.assign(model.get_layer("hidden").kernel * 2.0)
    after = operator.matvec(vector)
    expected = dense(operators.HessianOperator, operators.KerasModelFunction(model), x, y)[0]
    np.testing.assert_allclose(after, expected[32:, 32:] @ vector, atol=1e-12)
    assert np.max(np.abs(after - before)) > 1e-3


def test_saved_model_subset(tmp_path):
    model = tiny_model()
    x, y = tiny_data()
    model.export(str(tmp_path / "exported"), verbose=False)
    loaded = operators.SavedModelFunction(tf.saved_model.load(str(tmp_path / "exported")))
    assert variable_paths(loaded)[4:] == ["tiny/logits/kernel", "tiny/logits/bias"]
    full, _ = dense(operators.HessianOperator, operators.KerasModelFunction(model), x, y)
    block, operator = dense(operators.HessianOperator, SubsetModelFunction(loaded, "norm/"), x, y)
    assert operator.method == "reverse_over_reverse"
    np.testing.assert_allclose(block, full[24:32, 24:32], atol=1e-12)


def test_no_match_names_the_flag_the_regex_and_the_paths():
    function = operators.KerasModelFunction(tiny_model())
    with pytest.raises(ValueError) as error:
        SubsetModelFunction(function, "conv2d")
    message = str(error.value)
    assert "--variables='conv2d'" in message and "matches none" in message
    assert "tiny/hidden/kernel" in message and "tiny/logits/bias" in message


def test_invalid_regex():
    function = operators.KerasModelFunction(tiny_model())
    with pytest.raises(ValueError, match=r"--variables='dense\['.*not a valid regular expression.*"
                                         r"tiny/norm/gamma"):
        SubsetModelFunction(function, "dense[")
