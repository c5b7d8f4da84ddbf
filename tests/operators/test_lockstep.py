"""Lockstep draws: a block of k products in one data pass equals k single products,
a Lanczos run traces its product graph once, and lockstep SLQ equals sequential SLQ."""

import numpy as np
import pytest
import tensorflow as tf

from hessian_tf import operators
from hessian_tf import spectrum as spectrum_lib
from hessian_tf.operators import gauss_newton
from tests.operators.test_hessian import tiny_data, tiny_model


def block(dim, k, seed=3):
    return np.random.default_rng(seed).standard_normal((k, dim))


@pytest.mark.parametrize("method", ["reverse_over_reverse", "forward_over_backward"])
@pytest.mark.parametrize("bn_mode", ["inference", "train"])
def test_block_equals_single_products(method, bn_mode):
    x, y = tiny_data()
    operator = operators.HessianOperator(
        operators.KerasModelFunction(tiny_model()), x, y, batch_size=4,
        bn_mode=bn_mode, method=method,
    )
    vectors = block(operator.dim, 3)
    together = operator.matmat(vectors)
    apart = np.stack([operator.matvec(v) for v in vectors])
    np.testing.assert_allclose(together, apart, rtol=1e-12, atol=1e-14)
    assert operator.num_products == 6
    assert together.shape == (3, operator.dim)


@pytest.mark.parametrize("name", ["ggn", "fisher"])
def test_block_products_of_curvature_operators(name):
    x, y = tiny_data()
    operator = gauss_newton.make_operator(
        name, operators.KerasModelFunction(tiny_model()), x, y, batch_size=4
    )
    vectors = block(operator.dim, 2)
    np.testing.assert_allclose(
        operator.matmat(vectors), np.stack([operator.matvec(v) for v in vectors]),
        rtol=1e-12, atol=1e-14,
    )


def test_block_over_replicas_equals_one_device():
    x, y = tiny_data()
    model_function = operators.KerasModelFunction(tiny_model())
    one = operators.HessianOperator(model_function, x, y, batch_size=4, bn_mode="train")
    vectors = block(one.dim, 2)
    mirrored = operators.HessianOperator(
        model_function, x, y, batch_size=4, bn_mode="train",
        strategy=tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(3)]),
    )
    np.testing.assert_allclose(mirrored.matmat(vectors), one.matmat(vectors), rtol=1e-12, atol=1e-14)


def test_bad_block_shape_is_one_clear_error():
    x, y = tiny_data()
    operator = operators.HessianOperator(operators.KerasModelFunction(tiny_model()), x, y)
    for bad in (np.ones(operator.dim), np.ones((2, operator.dim + 1)), np.ones((0, operator.dim))):
        with pytest.raises(ValueError, match=r"pass \[k, "):
            operator.matmat(bad)


def test_lanczos_traces_the_product_once_per_block_size():
    x, y = tiny_data()
    operator = operators.HessianOperator(
        operators.KerasModelFunction(tiny_model()), x, y, batch_size=4
    )
    spectrum = spectrum_lib.stochastic_lanczos_quadrature(
        operator.matvec, operator.dim, lanczos_steps=12, num_draws=4, lockstep=2,
        matmat=operator.matmat, first_product=operator.check_determinism,
    )
    # 4 draws x 12 steps + the determinism check's second block of 2.
    assert operator.num_products == 4 * 12 + 2
    assert spectrum.num_products == 4 * 12
    assert operator.num_traces == 1
    # More steps on the same operator do not trace again.
    spectrum_lib.stochastic_lanczos_quadrature(
        operator.matvec, operator.dim, lanczos_steps=5, num_draws=2, lockstep=2,
        matmat=operator.matmat,
    )
    assert operator.num_traces == 1
    operator.matvec(np.ones(operator.dim))  # a block of 1: a second trace, and only one
    operator.matvec(np.ones(operator.dim))
    assert operator.num_traces == 2


@pytest.mark.parametrize("lockstep", [2, 3, 5])
def test_lockstep_spectrum_equals_sequential(lockstep):
    x, y = tiny_data()
    operator = operators.HessianOperator(
        operators.KerasModelFunction(tiny_model()), x, y, batch_size=4, bn_mode="train"
    )
    # 60 steps > 51 parameters: every draw exhausts its Krylov space early and
    # leaves the block while the others go on.
    options = dict(lanczos_steps=60, num_draws=5, seed=7)
    sequential = spectrum_lib.stochastic_lanczos_quadrature(operator.matvec, operator.dim, **options)
    together = spectrum_lib.stochastic_lanczos_quadrature(
        operator.matvec, operator.dim, matmat=operator.matmat, lockstep=lockstep, **options
    )
    assert together.exhausted.all()
    np.testing.assert_array_equal(together.num_steps, sequential.num_steps)
    scale = np.max(np.abs(sequential.alphas))
    np.testing.assert_allclose(together.alphas, sequential.alphas, atol=1e-10 * scale)
    np.testing.assert_allclose(together.betas, sequential.betas, atol=1e-10 * scale)
    np.testing.assert_allclose(together.density.density, sequential.density.density,
                               rtol=1e-6, atol=1e-9 * np.max(sequential.density.density))


@pytest.mark.parametrize("num_draws, lockstep, expected", [
    (1, 8, 1), (8, 8, 8), (9, 8, 5), (10, 8, 5), (16, 8, 8), (17, 8, 6), (5, 1, 1),
])
def test_group_size_splits_draws_evenly(num_draws, lockstep, expected):
    assert spectrum_lib.group_size(num_draws, lockstep) == expected


def test_bad_lockstep_is_one_clear_error():
    with pytest.raises(ValueError, match="--lockstep_draws=0"):
        spectrum_lib.stochastic_lanczos_quadrature(lambda v: v, 3, lanczos_steps=2, lockstep=0)


def test_product_and_gradient_graphs_are_traced_without_autograph():
    # hessian.py's graphs use TensorFlow's control flow; AutoGraph's conversion of
    # hessian_tf's functions only cost set-up time (2.6 s of ResNet50-V2's 20 s).
    x, y = tiny_data()
    operator = operators.HessianOperator(
        operators.KerasModelFunction(tiny_model()), x, y, batch_size=4)
    product = operator.matvec(np.ones(operator.dim))
    _, gradient = operator.loss_and_gradient()
    assert product.shape == gradient.shape == (operator.dim,)
    for function in (operator._product_function, operator._loss_gradient_function):
        assert function._autograph is False
