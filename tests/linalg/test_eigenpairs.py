"""Top-k eigenpairs from Lanczos on matrices with prescribed eigenvalues."""

import numpy as np
import pytest

from hessian_tf import linalg
from hessian_tf.linalg import eigenpairs as eigenpairs_lib
from tests.linalg.test_lanczos import matrix_with_eigenvalues


def run(matrix, steps, seed=1, **kwargs):
    start = np.random.default_rng(seed).standard_normal(matrix.shape[0])
    return linalg.lanczos(lambda v: matrix @ v, start, steps, **kwargs)


def test_full_order_gives_exact_eigenpairs():
    eigenvalues = np.linspace(-2.0, 9.0, 30)
    matrix, q = matrix_with_eigenvalues(eigenvalues)
    result = run(matrix, 30, keep_basis=True)
    pairs = eigenpairs_lib.top_eigenpairs(result, 4, ritz_vectors=True)
    np.testing.assert_allclose(pairs.eigenvalues, eigenvalues[::-1][:4], atol=1e-10)
    assert pairs.vectors.shape == (4, 30)
    for i in range(4):
        # Same eigenvector up to sign.
        assert abs(pairs.vectors[i] @ q[:, -1 - i]) == pytest.approx(1.0, abs=1e-10)
    assert pairs.converged.all() and pairs.lanczos_steps == 30


def test_outliers_converge_and_the_bulk_does_not():
    # The paper's shape: a bulk near zero and a few large outliers.
    rng = np.random.default_rng(3)
    outliers = np.array([60.0, 35.0, 20.0])
    eigenvalues = np.concatenate([rng.uniform(-0.5, 1.0, 397), outliers])
    matrix, q = matrix_with_eigenvalues(eigenvalues, seed=4)
    result = run(matrix, 40, keep_basis=True)
    pairs = eigenpairs_lib.top_eigenpairs(result, 5, ritz_vectors=True, relative_tolerance=1e-8)
    np.testing.assert_allclose(pairs.eigenvalues[:3], outliers, rtol=1e-10)
    assert pairs.converged.tolist()[:3] == [True, True, True]
    assert not pairs.converged[4]  # the top of the bulk (≈1.0) is not resolved at m = 40
    # Residual bounds are exact residual norms of the Ritz pairs, and bound the error.
    for value, vector, bound in zip(pairs.eigenvalues, pairs.vectors, pairs.residual_bounds):
        residual = np.linalg.norm(matrix @ vector - value * vector)
        assert residual == pytest.approx(bound, rel=1e-6, abs=1e-12)
        assert np.min(np.abs(eigenvalues - value)) <= bound + 1e-12
    # Ritz values of the largest are lower bounds (interlacing), descending.
    top = np.sort(eigenvalues)[::-1][:5]
    assert np.all(pairs.eigenvalues <= top + 1e-10)
    assert np.all(np.diff(pairs.eigenvalues) <= 0)
    # Converged Ritz vectors are the eigenvectors.
    index = np.argsort(eigenvalues)[::-1][:3]
    overlaps = np.abs(np.sum(pairs.vectors[:3] * q[:, index].T, axis=1))
    np.testing.assert_allclose(overlaps, 1.0, atol=1e-8)


def test_smallest_and_magnitude():
    eigenvalues = np.array([-7.0, -1.0, 0.5, 2.0, 3.0, 6.0])
    matrix, _ = matrix_with_eigenvalues(eigenvalues, seed=2)
    result = run(matrix, 6)
    smallest = eigenpairs_lib.top_eigenpairs(result, 2, which="smallest")
    np.testing.assert_allclose(smallest.eigenvalues, [-7.0, -1.0], atol=1e-10)
    magnitude = eigenpairs_lib.top_eigenpairs(result, 3, which="magnitude")
    np.testing.assert_allclose(magnitude.eigenvalues, [-7.0, 6.0, 3.0], atol=1e-10)


def test_more_pairs_than_steps_returns_all_steps():
    matrix, _ = matrix_with_eigenvalues(np.arange(1.0, 21.0))
    pairs = eigenpairs_lib.top_eigenpairs(run(matrix, 5), 10)
    assert pairs.eigenvalues.shape == (5,) and pairs.vectors is None


def test_exhausted_krylov_space_is_exact_and_converged():
    eigenvalues = np.repeat([1.0, 4.0, 9.0], 5)  # three distinct eigenvalues
    matrix, _ = matrix_with_eigenvalues(eigenvalues, seed=6)
    result = run(matrix, 10)
    assert result.exhausted
    pairs = eigenpairs_lib.top_eigenpairs(result, 3)
    np.testing.assert_allclose(pairs.eigenvalues, [9.0, 4.0, 1.0], atol=1e-10)
    assert pairs.converged.all() and np.all(pairs.residual_bounds < 1e-9)


def test_float32_basis_gives_unit_vectors():
    matrix, q = matrix_with_eigenvalues(np.concatenate([np.linspace(0, 1, 48), [5.0, 10.0]]))
    result = run(matrix, 30, keep_basis=True, basis_dtype=np.float32)
    pairs = eigenpairs_lib.top_eigenpairs(result, 2, ritz_vectors=True)
    np.testing.assert_allclose(np.linalg.norm(pairs.vectors, axis=1), 1.0, atol=1e-12)
    assert abs(pairs.vectors[0] @ q[:, -1]) == pytest.approx(1.0, abs=1e-6)


def test_memory_and_summary():
    assert eigenpairs_lib.ritz_vectors_bytes(10, 466_906) == 10 * 466_906 * 8
    matrix, _ = matrix_with_eigenvalues(np.arange(1.0, 11.0))
    summary = eigenpairs_lib.eigenpairs_summary(eigenpairs_lib.top_eigenpairs(run(matrix, 10), 2))
    assert summary["eigenvalues"] == pytest.approx([10.0, 9.0])
    assert summary["converged"] == [True, True] and len(summary["residual_bounds"]) == 2


def test_bad_arguments():
    matrix, _ = matrix_with_eigenvalues(np.arange(1.0, 6.0))
    result = run(matrix, 5)
    with pytest.raises(ValueError, match="keep_basis=True"):
        eigenpairs_lib.top_eigenpairs(result, 2, ritz_vectors=True)
    with pytest.raises(ValueError, match="num_eigenpairs=0"):
        eigenpairs_lib.top_eigenpairs(result, 0)
    with pytest.raises(ValueError, match="which='biggest'"):
        eigenpairs_lib.top_eigenpairs(result, 1, which="biggest")


def test_over_draws_takes_the_best_draw_for_each_eigenvalue():
    eigenvalues = np.concatenate([np.linspace(0.0, 1.0, 57), [4.0, 8.0, 16.0]])
    matrix, q = matrix_with_eigenvalues(eigenvalues, seed=9)
    rng = np.random.default_rng(10)
    blind = rng.standard_normal(60)
    blind -= (blind @ q[:, -1]) * q[:, -1]  # draw 0 cannot see the top eigenvector
    results = [linalg.lanczos(lambda v: matrix @ v, start, 12)
               for start in (blind, rng.standard_normal(60))]
    alphas = np.stack([r.alphas for r in results])
    betas = np.stack([r.betas for r in results])
    norms = np.array([r.residual_norm for r in results])
    alone = eigenpairs_lib.top_eigenpairs(results[0], 3)
    assert alone.eigenvalues[0] == pytest.approx(8.0, rel=1e-6)  # draw 0 misses 16
    pairs = eigenpairs_lib.top_eigenpairs_over_draws(alphas, betas, norms, [12, 12], 3)
    np.testing.assert_allclose(pairs.eigenvalues, [16.0, 8.0, 4.0], rtol=1e-6)
    assert pairs.draws[0] == 1 and pairs.converged.all() and pairs.vectors is None


def test_over_draws_ignores_padding_past_num_steps():
    eigenvalues = np.arange(1.0, 17.0)
    matrix, q = matrix_with_eigenvalues(eigenvalues, seed=11)
    short = linalg.lanczos(lambda v: matrix @ v, q[:, 0] + q[:, 2], 8)  # exhausted: 2 steps
    full = linalg.lanczos(lambda v: matrix @ v, np.ones(16), 8)
    assert short.alphas.size == 2 and full.alphas.size == 8
    alphas, betas = np.zeros((2, 8)), np.zeros((2, 7))
    alphas[0, :2], betas[0, :1] = short.alphas, short.betas
    alphas[1], betas[1] = full.alphas, full.betas
    pairs = eigenpairs_lib.top_eigenpairs_over_draws(
        alphas, betas, [short.residual_norm, full.residual_norm], [2, 8], 2, which="smallest")
    # Draw 0 holds 1 and 3 exactly; its zero padding must not pose as an eigenvalue 0.
    np.testing.assert_allclose(pairs.eigenvalues[0], 1.0, atol=1e-10)
    assert 2.0 - 1e-10 <= pairs.eigenvalues[1] <= 3.0 + 1e-10
