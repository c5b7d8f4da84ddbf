"""Gradient overlap with the top eigenspace, against a dense Hessian of a tiny model."""

import numpy as np
import pytest
import keras

from hessian_tf import analysis, operators, spectrum


def tiny_problem():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,), dtype="float64"),
                              keras.layers.Dense(4, activation="tanh", dtype="float64"),
                              keras.layers.BatchNormalization(dtype="float64"),
                              keras.layers.Dense(3, dtype="float64")])
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((11, 5)), rng.integers(0, 3, 11).astype(np.int32)
    return operators.HessianOperator(operators.KerasModelFunction(model), x, y, batch_size=4)


def test_overlap_of_known_directions():
    basis = np.eye(6)
    gradient = np.array([3.0, 4.0, 0.0, 0.0, 12.0, 0.0])
    overlap = analysis.gradient_overlap(gradient, basis[:2])
    assert overlap.fraction == pytest.approx(25.0 / 169.0)
    np.testing.assert_allclose(overlap.per_direction, [9 / 169, 16 / 169])
    np.testing.assert_allclose(overlap.cumulative, [9 / 169, 25 / 169])
    assert overlap.gradient_norm == pytest.approx(13.0) and overlap.num_vectors == 2
    # Any basis of the same span gives the same fraction.
    mixed = np.array([[1.0, 1.0, 0, 0, 0, 0], [2.0, -1.0, 0, 0, 0, 0]])
    assert analysis.gradient_overlap(gradient, mixed).fraction == pytest.approx(25.0 / 169.0)
    assert analysis.gradient_overlap(gradient, basis).fraction == pytest.approx(1.0)


def test_zero_gradient_and_bad_vectors():
    assert np.isnan(analysis.gradient_overlap(np.zeros(3), np.eye(3)[:1]).fraction)
    with pytest.raises(ValueError, match="linearly dependent"):
        analysis.gradient_overlap(np.ones(3), np.array([[1.0, 0, 0], [2.0, 0, 0]]))
    with pytest.raises(ValueError, match="shape"):
        analysis.gradient_overlap(np.ones(3), np.eye(4))


def test_overlap_matches_the_dense_hessian():
    operator = tiny_problem()
    hessian = operators.dense_matrix(operator.matvec, operator.dim)
    _, gradient = operator.loss_and_gradient()
    eigenvalues, eigenvectors = np.linalg.eigh(hessian)
    k = 3
    top = eigenvectors[:, ::-1][:, :k]
    expected = np.sum((top.T @ gradient) ** 2) / (gradient @ gradient)

    # Lanczos of full order: exact eigenpairs, so the exact fraction.
    result = analysis.analyze_gradient_overlap(operator, num_eigenpairs=k,
                                               lanczos_steps=operator.dim)
    np.testing.assert_allclose(result.eigenpairs.eigenvalues, eigenvalues[::-1][:k], rtol=1e-9)
    assert result.eigenpairs.converged.all()
    assert result.overlap.fraction == pytest.approx(expected, abs=1e-9)
    np.testing.assert_allclose(result.overlap.per_direction,
                               (top.T @ gradient) ** 2 / (gradient @ gradient), atol=1e-9)
    summary = analysis.overlap_summary(result)
    assert summary["fraction"] == result.overlap.fraction and summary["num_eigenpairs"] == k


def test_top_eigenspace_is_draw_zero_of_slq():
    operator = tiny_problem()
    np.testing.assert_array_equal(
        np.random.default_rng([4, 0]).standard_normal(operator.dim) / np.sqrt(operator.dim),
        spectrum.start_vector(operator.dim, 4, 0))
    pairs = analysis.top_eigenspace(operator.matvec, operator.dim, num_eigenpairs=2,
                                    lanczos_steps=12, seed=4)
    slq = spectrum.stochastic_lanczos_quadrature(operator.matvec, operator.dim,
                                                 lanczos_steps=12, seed=4)
    np.testing.assert_allclose(pairs.eigenvalues, slq.nodes[0][::-1][:2], rtol=1e-12)
    assert pairs.vectors.shape == (2, operator.dim)
