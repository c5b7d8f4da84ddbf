"""Products from cached residuals (the vector-free part of each batch's product,
computed once) equal the operator's ordinary products and the dense Hessian."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from hessian_tf import operators
from hessian_tf import spectrum as spectrum_lib
from hessian_tf.operators import flat_parameters as flatten_lib
from hessian_tf.operators import gauss_newton
from tests.operators.test_hessian import (
    BATCH_SIZE, operator_matrix, reference_hessian, tiny_data, tiny_model)


@pytest.mark.parametrize("bn_mode", ["inference", "train"])
@pytest.mark.parametrize("method", ["forward_over_backward", "reverse_over_reverse"])
def test_cached_products_equal_the_dense_hessian(bn_mode, method):
    model = tiny_model(regularizer=keras.regularizers.L2(0.05))
    x, y = tiny_data()  # 11 examples in batches of 4: an uneven last batch
    matrix, operator = operator_matrix(model, x, y, bn_mode=bn_mode, method=method,
                                       regularization=True, cache_residuals=True)
    expected = reference_hessian(model, x, y, bn_mode=bn_mode, regularization=True)
    np.testing.assert_allclose(matrix, expected, atol=1e-11, rtol=1e-9)
    assert operator.residual_bytes > 0
    block = np.random.default_rng(0).standard_normal((3, operator.dim))
    np.testing.assert_allclose(operator.matmat(block), block @ expected, atol=1e-11, rtol=1e-9)


def test_cached_gauss_newton_equals_the_ordinary_one():
    model = tiny_model()
    x, y = tiny_data()
    common = dict(batch_size=BATCH_SIZE, bn_mode="train")
    ordinary = gauss_newton.GaussNewtonOperator(operators.KerasModelFunction(model), x, y, **common)
    cached = gauss_newton.GaussNewtonOperator(
        operators.KerasModelFunction(model), x, y, cache_residuals=True, **common)
    block = np.random.default_rng(1).standard_normal((2, ordinary.dim))
    np.testing.assert_allclose(cached.matmat(block), ordinary.matmat(block), atol=1e-12, rtol=1e-10)


def test_float32_model_spectrum_matches_the_ordinary_products():
    model = tiny_model(dtype="float32")
    x, y = tiny_data(np.float32)
    function = operators.KerasModelFunction(model)
    runs = {}
    for cache in (False, True):
        operator = operators.HessianOperator(function, x, y, batch_size=BATCH_SIZE,
                                             cache_residuals=cache)
        runs[cache] = spectrum_lib.stochastic_lanczos_quadrature(
            operator.matvec, operator.dim, lanczos_steps=10, matmat=operator.matmat)
    scale = np.max(np.abs(runs[False].nodes))
    np.testing.assert_allclose(runs[True].nodes, runs[False].nodes, atol=1e-5 * scale)


def test_cache_refuses_several_replicas_and_too_little_memory(monkeypatch):
    model = tiny_model()
    x, y = tiny_data()
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    if len(devices) < 2:
        pytest.fail("the tests configure several logical CPUs (tests/conftest.py)")
    with pytest.raises(ValueError, match="--cache_residuals: the strategy has 2 replicas"):
        operators.HessianOperator(operators.KerasModelFunction(model), x, y,
                                  strategy=tf.distribute.MirroredStrategy(devices),
                                  cache_residuals=True)
    operator = operators.HessianOperator(operators.KerasModelFunction(model), x, y,
                                         batch_size=BATCH_SIZE, cache_residuals=True)
    monkeypatch.setattr(spectrum_lib, "host_memory_bytes", lambda: 1024)
    with pytest.raises(ValueError, match="--cache_residuals: the residuals of 3 batches need"):
        operator.matvec(np.ones(operator.dim))


def test_cache_refuses_a_saved_model_and_serves_a_variable_subset(tmp_path):
    from hessian_tf.io.export import export_for_spectrum
    from hessian_tf.io.models import load_model_function
    from hessian_tf.operators.subset import SubsetModelFunction

    model = tiny_model(dtype="float32")
    x, y = tiny_data(np.float32)
    export_for_spectrum(model, str(tmp_path / "exported"))
    with pytest.raises(ValueError, match="--cache_residuals: a SavedModel"):
        operators.HessianOperator(load_model_function(str(tmp_path / "exported")), x, y,
                                  cache_residuals=True)
    subset = SubsetModelFunction(operators.KerasModelFunction(model), "dense")
    ordinary = operators.HessianOperator(subset, x, y, batch_size=BATCH_SIZE)
    cached = operators.HessianOperator(subset, x, y, batch_size=BATCH_SIZE, cache_residuals=True)
    block = np.random.default_rng(2).standard_normal((2, ordinary.dim))
    np.testing.assert_allclose(cached.matmat(block), ordinary.matmat(block), rtol=1e-5,
                               atol=1e-6 * np.max(np.abs(ordinary.matmat(block))))


@pytest.mark.parametrize("changed", ["kernel", "moving_mean"])
def test_cache_follows_the_model_and_can_be_freed(changed):
    # A weight (or, with inference-mode BN, a moving statistic) changed after the
    # cache was built: the next product recomputes the residuals, reusing the traces.
    model = tiny_model()
    x, y = tiny_data()
    cached = operators.HessianOperator(operators.KerasModelFunction(model), x, y,
                                       batch_size=BATCH_SIZE, cache_residuals=True)
    vector = np.random.default_rng(3).standard_normal(cached.dim)
    before = cached.matvec(vector)
    splits = dict(cached._splits)
    variable = {"kernel": model.layers[0].kernel, "moving_mean": model.layers[1].moving_mean}[changed]
    variable.assign(variable.numpy() * 1.5 + 0.1)
    fresh = operators.HessianOperator(operators.KerasModelFunction(model), x, y,
                                      batch_size=BATCH_SIZE).matvec(vector)
    assert np.max(np.abs(fresh - before)) > 1e-3 * np.max(np.abs(fresh))
    np.testing.assert_allclose(cached.matvec(vector), fresh, atol=1e-12, rtol=1e-10)
    assert set(cached._splits) == {4, 3}
    assert all(cached._splits[size] is split for size, split in splits.items())
    cached.drop_residuals()
    assert cached._cache is None
    np.testing.assert_allclose(cached.matvec(vector), fresh, atol=1e-12, rtol=1e-10)


def test_cached_products_sum_the_batches_per_variable_in_batch_order():
    # The batches' products from their residuals, added per variable in batch order
    # in float64 and joined into one vector once: bit for bit what separate calls and a
    # host sum give.
    model = tiny_model()
    x, y = tiny_data()  # 11 examples in batches of 4, 4 and 3
    cached = operators.HessianOperator(operators.KerasModelFunction(model), x, y,
                                       batch_size=BATCH_SIZE, cache_residuals=True)
    vector = np.random.default_rng(4).standard_normal(cached.dim)
    got = cached.matvec(vector)
    inputs = cached.model_function.primals() + cached.model_function.state()
    tangents = flatten_lib.unflatten(tf.constant(vector), cached.model_function.primals())
    expected = np.zeros(cached.dim)
    for start in range(0, len(x), BATCH_SIZE):
        batch = inputs + [tf.constant(x[start: start + BATCH_SIZE]),
                          tf.constant(y[start: start + BATCH_SIZE])]
        split = cached._splits[len(batch[-1])]
        arguments = split.residuals_of(*batch) + [batch[i] for i in split.passed]
        products = split.from_residuals(*arguments, *tangents)
        expected += np.concatenate([product.numpy().ravel() for product in products])
    np.testing.assert_array_equal(got, expected / len(x))


def test_tensors_made_of_constants_alone_are_recomputed_not_kept():
    # A tensor that reads no argument (the ones a sum's gradient tiles to a variable's
    # shape, an activation's zeros) is not a residual: kept for every batch it would
    # hold memory for nothing. Only exp(x) is.
    from hessian_tf.operators import residuals as residuals_lib

    size = 1000

    def product(x, vector):
        ones = tf.tile(tf.constant([1.0], tf.float64), [size])
        return ones * vector * tf.exp(x)

    spec = tf.TensorSpec([size], tf.float64)
    split = residuals_lib.split(product, [spec], spec)
    assert split.residual_bytes == size * 8
    x = tf.constant(np.linspace(-1.0, 1.0, size))
    vector = tf.constant(np.random.default_rng(5).standard_normal(size))
    residuals = split.residuals_of(x)
    assert len(residuals) == 1
    np.testing.assert_allclose(residuals[0].numpy(), np.exp(x.numpy()), rtol=1e-15)
    got = split.from_residuals(*residuals, *[[x][i] for i in split.passed], vector)
    np.testing.assert_allclose(got.numpy(), product(x, vector).numpy(), rtol=1e-15)


def test_a_random_draw_stays_the_one_drawn_with_the_residuals():
    # A stateful op reads no argument, but drawing it again at each product would change
    # the operator from step to step: its draw is a residual, not recomputed.
    from hessian_tf.operators import residuals as residuals_lib

    size = 1000

    def product(x, vector):
        mask = tf.random.uniform([size], dtype=tf.float64)
        return mask * vector * tf.exp(x)

    spec = tf.TensorSpec([size], tf.float64)
    split = residuals_lib.split(product, [spec], spec)
    assert split.residual_bytes == 2 * size * 8
    x = tf.constant(np.linspace(-1.0, 1.0, size))
    residuals = split.residuals_of(x)
    ones = tf.ones([size], tf.float64)
    first = split.from_residuals(*residuals, ones).numpy()
    np.testing.assert_array_equal(split.from_residuals(*residuals, ones).numpy(), first)
    mask = [r.numpy() for r in residuals if not np.allclose(r.numpy(), np.exp(x.numpy()))]
    assert len(mask) == 1
    np.testing.assert_allclose(first, mask[0] * np.exp(x.numpy()), rtol=1e-15)


def test_a_product_output_without_a_path_from_the_vector_is_refused():
    from hessian_tf.operators import residuals as residuals_lib

    spec = tf.TensorSpec([4], tf.float64)
    with pytest.raises(ValueError, match="output 1 .* does not depend on the vector"):
        residuals_lib.split(lambda x, vector: [vector * tf.exp(x), 2.0 * x], [spec], spec)


def test_cached_products_of_a_model_with_one_variable():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, use_bias=False)])
    x = np.random.default_rng(6).standard_normal((10, 3))
    y = np.arange(10) % 2
    common = dict(batch_size=4)
    ordinary = operators.HessianOperator(operators.KerasModelFunction(model), x, y, **common)
    cached = operators.HessianOperator(operators.KerasModelFunction(model), x, y,
                                       cache_residuals=True, **common)
    block = np.random.default_rng(7).standard_normal((2, ordinary.dim))
    np.testing.assert_allclose(cached.matmat(block), ordinary.matmat(block), rtol=1e-10,
                               atol=1e-12 * np.max(np.abs(ordinary.matmat(block))))
