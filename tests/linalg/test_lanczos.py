"""Lanczos, quadrature, density and statistics on matrices with chosen eigenvalues."""

import importlib

import numpy as np
import pytest

from hessian_tf import linalg

# The module, not the function of the same name that hessian_tf.linalg exports.
lanczos_module = importlib.import_module("hessian_tf.linalg.lanczos")


def matrix_with_eigenvalues(eigenvalues, seed=0):
    """A dense symmetric matrix Q diag(eigenvalues) Qᵀ with a random orthogonal Q."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues), len(eigenvalues))))
    return (q * np.asarray(eigenvalues)) @ q.T, q


def run(matrix, steps, seed=1, **kwargs):
    start = np.random.default_rng(seed).standard_normal(matrix.shape[0])
    return linalg.lanczos(lambda v: matrix @ v, start, steps, **kwargs), start


def test_full_order_recovers_every_eigenvalue():
    eigenvalues = np.linspace(-3.0, 10.0, 40)
    matrix, _ = matrix_with_eigenvalues(eigenvalues)
    result, _ = run(matrix, 40)
    quadrature = linalg.tridiagonal_quadrature(result.alphas, result.betas)
    np.testing.assert_allclose(quadrature.nodes, eigenvalues, atol=1e-10)


def test_full_order_weights_are_squared_projections_of_the_start_vector():
    eigenvalues = np.arange(1.0, 21.0)
    matrix, eigenvectors = matrix_with_eigenvalues(eigenvalues, seed=3)
    result, start = run(matrix, 20, seed=4)
    quadrature = linalg.tridiagonal_quadrature(result.alphas, result.betas)
    unit = start / np.linalg.norm(start)
    expected = (eigenvectors.T @ unit) ** 2
    np.testing.assert_allclose(quadrature.weights, expected, atol=1e-10)
    assert quadrature.weights.sum() == pytest.approx(1.0, abs=1e-14)


def test_weights_use_first_not_last_components():
    # A start vector concentrated on the smallest eigenvector: the weight of the
    # smallest node must be large. The last components would say otherwise.
    eigenvalues = np.arange(1.0, 11.0)
    matrix, eigenvectors = matrix_with_eigenvalues(eigenvalues, seed=5)
    start = 10.0 * eigenvectors[:, 0] + 0.1 * eigenvectors[:, 9] + 0.1 * eigenvectors[:, 4]
    result = linalg.lanczos(lambda v: matrix @ v, start, 10)
    quadrature = linalg.tridiagonal_quadrature(result.alphas, result.betas)
    assert quadrature.nodes.size == 3  # exhausted after 3 distinct components
    assert quadrature.weights[0] > 0.99


def test_extreme_ritz_values_converge_first():
    rng = np.random.default_rng(7)
    eigenvalues = np.concatenate([rng.normal(0.0, 0.1, 496), [-2.0, 5.0, 20.0, 50.0]])
    matrix, _ = matrix_with_eigenvalues(eigenvalues, seed=8)
    result, _ = run(matrix, 40)
    quadrature = linalg.tridiagonal_quadrature(
        result.alphas, result.betas, result.residual_norm
    )
    assert quadrature.nodes[-1] == pytest.approx(50.0, rel=1e-10)
    assert quadrature.nodes[-2] == pytest.approx(20.0, rel=1e-10)
    assert quadrature.nodes[0] == pytest.approx(-2.0, rel=1e-8)
    # The Ritz residual bounds the distance to the nearest eigenvalue.
    for node, residual in zip(quadrature.nodes, quadrature.ritz_residuals):
        assert np.min(np.abs(eigenvalues - node)) <= residual + 1e-10


def test_residual_identity_and_orthogonality():
    eigenvalues = np.linspace(-1.0, 4.0, 200)
    matrix, _ = matrix_with_eigenvalues(eigenvalues, seed=11)
    result, _ = run(matrix, 30, keep_basis=True)
    q = result.basis  # [m, n], rows are Lanczos vectors
    t = linalg.tridiagonal(result.alphas, result.betas)
    residual = matrix @ q.T - q.T @ t  # only the last column may be non-zero
    np.testing.assert_allclose(residual[:, :-1], 0.0, atol=1e-12)
    assert np.linalg.norm(residual[:, -1]) == pytest.approx(result.residual_norm, rel=1e-10)
    np.testing.assert_allclose(q @ q.T, np.eye(30), atol=1e-13)
    assert not q.flags.owndata  # the run's own basis, not a copy (twice the memory)


def test_breakdown_stops_at_the_exact_spectrum():
    eigenvalues = [1.0, 2.0, 2.0, 2.0, 7.0, 7.0]  # three distinct values
    matrix, _ = matrix_with_eigenvalues(eigenvalues, seed=2)
    result, _ = run(matrix, 90)
    assert result.exhausted
    assert result.alphas.size == 3
    quadrature = linalg.tridiagonal_quadrature(result.alphas, result.betas)
    np.testing.assert_allclose(quadrature.nodes, [1.0, 2.0, 7.0], atol=1e-12)


def test_fewer_dimensions_than_steps_stops_at_dimension():
    matrix, _ = matrix_with_eigenvalues(np.linspace(0.5, 3.0, 7), seed=9)
    result, _ = run(matrix, 90)
    assert result.exhausted and result.alphas.size == 7


def test_zero_operator_breaks_down_at_once():
    result = linalg.lanczos(lambda v: 0.0 * v, np.ones(5), 10)
    assert result.exhausted and result.alphas.size == 1 and result.alphas[0] == 0.0


def test_step_function_resumes_identically():
    matrix, _ = matrix_with_eigenvalues(np.linspace(-1, 1, 50), seed=12)
    start = np.random.default_rng(0).standard_normal(50)
    whole = linalg.lanczos(lambda v: matrix @ v, start, 20)
    state = linalg.lanczos_init(start, 20)
    while not linalg.is_finished(state):
        # Copy the state between steps, as a checkpoint round trip would.
        state = linalg.LanczosState(
            state.basis.copy(), state.alphas.copy(), state.betas.copy(),
            state.num_steps, state.exhausted)
        state = linalg.lanczos_step(state, matrix @ linalg.current_vector(state))
    stepped = linalg.lanczos_result(state)
    np.testing.assert_array_equal(stepped.alphas, whole.alphas)
    np.testing.assert_array_equal(stepped.betas, whole.betas)


def test_float32_basis_keeps_extreme_eigenvalues():
    eigenvalues = np.concatenate([np.linspace(0, 1, 300), [10.0]])
    matrix, _ = matrix_with_eigenvalues(eigenvalues, seed=13)
    result, _ = run(matrix, 30, basis_dtype=np.float32)
    nodes = linalg.tridiagonal_quadrature(result.alphas, result.betas).nodes
    assert nodes[-1] == pytest.approx(10.0, rel=1e-6)


@pytest.mark.parametrize("steps", [0, -3])
def test_bad_step_count(steps):
    with pytest.raises(ValueError, match="lanczos_steps"):
        linalg.lanczos(lambda v: v, np.ones(3), steps)


def test_zero_start_vector():
    with pytest.raises(ValueError, match="start vector"):
        linalg.lanczos(lambda v: v, np.zeros(3), 2)


def test_first_vector_out_and_a_basis_given_to_lanczos_init():
    rng = np.random.default_rng(3)
    start = rng.standard_normal(1000) * 1e3
    expected = start / np.linalg.norm(start)
    into = np.empty(1000)
    assert linalg.first_vector(start, out=into) is into
    np.testing.assert_array_equal(into, expected)
    np.testing.assert_array_equal(linalg.first_vector(start), expected)
    np.testing.assert_array_equal(linalg.first_vector(start, np.float32),
                                  expected.astype(np.float32).astype(np.float64))
    for dtype in (np.float64, np.float32):
        plain = linalg.lanczos_init(start, 4, basis_dtype=dtype)
        basis = linalg.zero_basis(4, 1000, dtype)
        if dtype == np.float64:  # the start vector in the basis's first row
            basis[0] = start
            given = linalg.lanczos_init(basis[0], 4, basis_dtype=dtype, basis=basis)
        else:
            given = linalg.lanczos_init(start, 4, basis_dtype=dtype, basis=basis)
        assert given.basis is basis
        np.testing.assert_array_equal(given.basis, plain.basis)
        np.testing.assert_array_equal(plain.basis[0], expected.astype(dtype))
    for shape, dtype in (((3, 1000), np.float64), ((4, 999), np.float64),
                         ((4, 1000), np.float32)):
        with pytest.raises(ValueError, match=r"^basis of shape .*pass zero_basis"):
            linalg.lanczos_init(start, 4, basis=np.zeros(shape, dtype))


def test_next_row_is_the_row_the_next_step_writes():
    diagonal = np.array([1.0, 2.0, 3.0, 4.0])
    state = linalg.lanczos_init(np.ones(4), 3)
    written = []
    while linalg.next_row(state) is not None:
        row = linalg.next_row(state)
        assert not row.any()
        state = linalg.lanczos_step(state, diagonal * linalg.current_vector(state))
        written.append(row.any())
    assert written == [True, True] and state.num_steps == 2  # the last step writes none
    # Two eigenvalues: the Krylov space is exhausted after two steps of four.
    exhausted = linalg.lanczos_init(np.ones(4), 4)
    for _ in range(2):
        exhausted = linalg.lanczos_step(
            exhausted, np.array([1.0, 1.0, 2.0, 2.0]) * linalg.current_vector(exhausted))
    assert exhausted.exhausted and linalg.next_row(exhausted) is None


def test_density_integrates_to_one_and_averages_draws():
    nodes = [np.array([-1.0, 0.0, 3.0]), np.array([0.5, 2.0])]
    weights = [np.array([0.2, 0.5, 0.3]), np.array([0.6, 0.4])]
    density = linalg.gaussian_density(nodes, weights, kernel_width=0.05)
    assert np.trapezoid(density.density, density.grid) == pytest.approx(1.0, abs=1e-12)
    assert density.grid[0] < -1.0 and density.grid[-1] > 3.0
    # Mass near 3.0 is 0.3 / 2 draws.
    near = np.abs(density.grid - 3.0) < 0.4
    assert np.trapezoid(density.density[near], density.grid[near]) == pytest.approx(
        0.15, abs=1e-3
    )


def test_density_default_width_is_relative_to_the_spectrum():
    density = linalg.gaussian_density([np.array([0.0, 100.0])], [np.array([0.5, 0.5])])
    assert density.kernel_width == pytest.approx(0.2)


def test_statistics():
    q1 = linalg.Quadrature(np.array([-2.0, -1e-6, 4.0]), np.array([0.1, 0.6, 0.3]), np.zeros(3))
    q2 = linalg.Quadrature(np.array([-1.0, 1.0, 6.0]), np.array([0.2, 0.5, 0.3]), np.zeros(3))
    stats = linalg.spectrum_statistics([q1, q2], dim=100)
    assert stats.lambda_max == 6.0 and stats.lambda_min == -2.0
    assert stats.negative_mass == pytest.approx((0.7 + 0.2) / 2)
    assert stats.negative_mass_tolerance == pytest.approx((0.1 + 0.2) / 2)
    t1 = 100 * (-0.2 - 0.6e-6 + 1.2)
    t2 = 100 * (-0.2 + 0.5 + 1.8)
    assert stats.trace == pytest.approx((t1 + t2) / 2)
    assert stats.trace_stderr == pytest.approx(abs(t1 - t2) / 2)


def test_trace_estimate_is_unbiased_over_draws():
    eigenvalues = np.linspace(-1.0, 3.0, 60)
    matrix, _ = matrix_with_eigenvalues(eigenvalues, seed=21)
    quadratures = []
    for seed in range(200):
        result, _ = run(matrix, 8, seed=100 + seed)
        quadratures.append(linalg.tridiagonal_quadrature(result.alphas, result.betas))
    stats = linalg.spectrum_statistics(quadratures, dim=60)
    assert abs(stats.trace - eigenvalues.sum()) < 4 * stats.trace_stderr


def test_float32_basis_step_does_not_copy_the_basis_to_float64():
    import tracemalloc

    dim, steps = 100_000, 41
    rng = np.random.default_rng(0)
    state = linalg.lanczos_init(rng.standard_normal(dim), steps, basis_dtype=np.float32)
    state.basis[:] = rng.standard_normal((steps, dim)).astype(np.float32) / np.sqrt(dim)
    state = state._replace(num_steps=steps - 1)
    product = rng.standard_normal(dim)
    tracemalloc.start()
    try:
        linalg.lanczos_step(state, product)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    float64_copy = steps * dim * 8  # 32.8 MB: what `basis @ w` would allocate
    # A few float64 vectors (0.8 MB each) and one block of columns in float64 (1 MiB).
    assert peak < 6 * dim * 8 + lanczos_module._CONVERSION_BYTES < float64_copy / 4, peak


def test_float32_basis_is_projected_in_float64_across_column_blocks():
    rows, dim = 30, 50_000  # 30 rows of 50,000 columns: 12 blocks of 4,369 columns
    rng = np.random.default_rng(3)
    active = rng.standard_normal((rows, dim)).astype(np.float32)
    w = rng.standard_normal(dim) * (1 + 1e-9 * rng.standard_normal(dim))  # float64 bits
    assert lanczos_module._columns_per_block(active) < dim
    exact = active.astype(np.float64) @ w
    np.testing.assert_allclose(lanczos_module._project(active, w), exact, rtol=0, atol=1e-11)


def test_float32_basis_subtraction_rounds_no_more_than_storing_what_remains():
    rows, dim = 30, 50_000
    rng = np.random.default_rng(4)
    active = (rng.standard_normal((rows, dim)) / np.sqrt(dim)).astype(np.float32)
    exact_basis = active.astype(np.float64)
    # The removed part small, as large as what remains, larger; and w almost all removed.
    for scale, inside in ((1e-3, 0.0), (1.0, 0.0), (1e3, 0.0), (10.0, 1.0)):
        coefficients = scale * rng.standard_normal(rows)
        w = inside * exact_basis.T @ coefficients + 1e-4 ** inside * rng.standard_normal(dim)
        exact = w - exact_basis.T @ coefficients
        lanczos_module._subtract(active, coefficients, w)
        # float32 storage of the remainder rounds it by ~6e-8 relative.
        assert np.linalg.norm(w - exact) < 1e-7 * np.linalg.norm(exact), scale


@pytest.mark.parametrize("rows", [30, 300])
def test_float32_basis_subtraction_on_either_side_of_its_threshold(rows):
    # c = Q w removed from w, with 2·k·‖c‖² just below ‖w‖² (summed in float32:
    # rounding within float32 storage of what remains) and just above (in float64).
    dim = 40_000
    rng = np.random.default_rng(rows)
    active = np.linalg.qr(rng.standard_normal((dim, rows)))[0].T.astype(np.float32)
    exact_basis = active.astype(np.float64)
    for share, bound in ((0.9, 2 * 2.0**-24), (1.1, 1e-12)):
        inside = rng.standard_normal(rows)
        outside = rng.standard_normal(dim)
        outside -= exact_basis.T @ (exact_basis @ outside)
        outside *= np.linalg.norm(inside) * np.sqrt(2 * rows / share - 1) / np.linalg.norm(outside)
        w = exact_basis.T @ inside + outside
        coefficients = lanczos_module._project(active, w)
        assert 2 * rows * (coefficients @ coefficients) / (w @ w) == pytest.approx(share, rel=1e-3)
        exact = w - exact_basis.T @ coefficients
        lanczos_module._subtract(active, coefficients, w)
        assert np.linalg.norm(w - exact) < bound * np.linalg.norm(exact), share


def test_float32_basis_step_with_a_product_almost_in_the_basis():
    # A product almost inside the span of the basis (what remains is 1e-6 of it): the
    # removal is large and must not be rounded in float32, or β and the next vector
    # are rounding noise. The same float32 entries as a float64 basis give the truth.
    dim, steps = 20_000, 61
    rng = np.random.default_rng(6)
    rows, _ = np.linalg.qr(rng.standard_normal((dim, steps)))
    state = linalg.lanczos_init(rng.standard_normal(dim), steps + 1, basis_dtype=np.float32)
    state.basis[:steps] = rows.T.astype(np.float32)
    state = state._replace(num_steps=steps - 1)
    as_float64 = state._replace(basis=state.basis.astype(np.float64),
                                alphas=state.alphas.copy(), betas=state.betas.copy())
    product = state.basis[:steps].astype(np.float64).T @ (10 * rng.standard_normal(steps))
    product += 1e-6 * rng.standard_normal(dim) / np.sqrt(dim)
    stepped = linalg.lanczos_step(state, product)
    truth = linalg.lanczos_step(as_float64, product)
    beta, true_beta = stepped.betas[steps - 1], truth.betas[steps - 1]
    assert beta == pytest.approx(true_beta, rel=1e-6)
    np.testing.assert_allclose(stepped.basis[steps], truth.basis[steps], rtol=0, atol=1e-6)


def test_float32_basis_stays_orthogonal_on_a_hessian_like_spectrum():
    # A bulk near 0 and ten outliers, as in a network's Hessian, in 20,000 dimensions
    # (more columns than one conversion block, so the blocked projection is used).
    rng = np.random.default_rng(5)
    dim = 20_000
    vectors, _ = np.linalg.qr(rng.standard_normal((dim, 300)))
    eigenvalues = np.concatenate([0.05 * rng.standard_normal(290), np.geomspace(5, 150, 10)])
    start = rng.standard_normal(dim)

    def matvec(v):
        return vectors @ (eigenvalues * (vectors.T @ v))

    results = {}
    for dtype in (np.float64, np.float32):
        state = linalg.lanczos_init(start, 60, basis_dtype=dtype)
        while not linalg.is_finished(state):
            state = linalg.lanczos_step(state, matvec(linalg.current_vector(state)))
        results[dtype] = linalg.lanczos_result(state)
        if dtype is np.float32:
            assert lanczos_module._columns_per_block(state.basis) < dim
            # float32 storage rounds each entry by ~6e-8; orthogonality stays at that level.
            assert linalg.lanczos_orthogonality_loss(state) < 1e-7
    nodes = {
        dtype: linalg.tridiagonal_quadrature(result.alphas, result.betas).nodes
        for dtype, result in results.items()
    }
    np.testing.assert_allclose(nodes[np.float32][-10:], nodes[np.float64][-10:], rtol=1e-6)
    np.testing.assert_allclose(nodes[np.float64][-10:], np.geomspace(5, 150, 10), rtol=1e-8)



def _memory_owner(array):
    while isinstance(array, np.ndarray):
        array = array.base
    return array.obj if isinstance(array, memoryview) else array


def _run_lanczos(matrix, start, dtype):
    state = linalg.lanczos_init(start, 12, basis_dtype=dtype)
    while not linalg.is_finished(state):
        state = linalg.lanczos_step(state, matrix @ linalg.current_vector(state))
    return state


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_large_basis_is_a_zero_memory_map_and_runs_as_a_small_one(dtype, monkeypatch):
    import mmap

    small = linalg.zero_basis(3, 5, dtype)
    assert small.dtype == dtype and small.shape == (3, 5) and not small.any()
    assert not isinstance(_memory_owner(small), mmap.mmap)
    assert all(row.ctypes.data % lanczos_module.ROW_ALIGNMENT_BYTES == 0 for row in small)
    large = linalg.zero_basis(2, (4 << 20) // np.dtype(dtype).itemsize, dtype)
    assert isinstance(_memory_owner(large), mmap.mmap)
    assert large.dtype == dtype and large.flags.writeable and not large[:, ::4096].any()
    large[1, -1] = 3.0
    assert large[1, -1] == 3.0 and not large[0].any()
    # The same Lanczos run, bit for bit, with its basis mapped: rows of 41 entries,
    # whose starts are padded to ROW_ALIGNMENT_BYTES.
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((41, 41))
    matrix = matrix + matrix.T
    start = rng.standard_normal(41)
    plain = _run_lanczos(matrix, start, dtype)
    monkeypatch.setattr(lanczos_module, "SMALL_PAGES_FROM_BYTES", 1)
    mapped = _run_lanczos(matrix, start, dtype)
    assert isinstance(_memory_owner(mapped.basis), mmap.mmap)
    assert not mapped.basis.flags.c_contiguous  # padded
    assert all(row.ctypes.data % lanczos_module.ROW_ALIGNMENT_BYTES == 0
               for row in mapped.basis)
    assert not isinstance(_memory_owner(plain.basis), mmap.mmap)
    np.testing.assert_array_equal(mapped.alphas, plain.alphas)
    np.testing.assert_array_equal(mapped.betas, plain.betas)
    np.testing.assert_array_equal(mapped.basis, plain.basis)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_steps_updates_are_the_expressions_they_replace(dtype):
    # Across several of the element-wise blocks, for float64 and float32 basis rows.
    rng = np.random.default_rng(1)
    size = 3 * lanczos_module._ELEMENTWISE_BLOCK + 5
    w = rng.standard_normal(size)
    row = rng.standard_normal(size).astype(dtype)
    scale = float(rng.standard_normal())
    q = rng.standard_normal(size).astype(dtype)
    beta = float(rng.standard_normal())
    # The first step: no previous row.
    out = np.empty(size)
    assert lanczos_module._recurrence(w, scale, q, 0.0, None, out) is out
    np.testing.assert_array_equal(out, w - scale * q.astype(np.float64))
    np.testing.assert_array_equal(lanczos_module._recurrence(w, scale, q, beta, row, out),
                                  (w - scale * q.astype(np.float64)) - np.float64(beta) * row)
    out = np.zeros(size, dtype)
    np.divide(w, 0.37, out=out, casting="same_kind")
    np.testing.assert_array_equal(out, (w / 0.37).astype(dtype))


def test_the_float64_subtraction_by_blocks_is_the_whole_product():
    rng = np.random.default_rng(2)
    size = 2 * lanczos_module._ELEMENTWISE_BLOCK + 7
    active = rng.standard_normal((5, size))
    coefficients = rng.standard_normal(5)
    w = rng.standard_normal(size)
    expected = w - active.T @ coefficients
    lanczos_module._subtract(active, coefficients, w)
    np.testing.assert_allclose(w, expected, rtol=0, atol=1e-13 * np.max(np.abs(expected)))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_current_vectors_are_the_current_vectors_in_one_block(dtype):
    rng = np.random.default_rng(3)
    matrix = rng.standard_normal((30, 30))
    matrix = matrix + matrix.T
    states = [linalg.lanczos_init(rng.standard_normal(30), 6, basis_dtype=dtype) for _ in range(3)]
    states[1] = linalg.lanczos_step(states[1], matrix @ linalg.current_vector(states[1]))
    block = linalg.current_vectors(states)
    assert block.dtype == np.float64 and block.shape == (3, 30)
    for row, state in zip(block, states):
        np.testing.assert_array_equal(row, linalg.current_vector(state))
    one = linalg.current_vectors(states[1:2])
    np.testing.assert_array_equal(one[0], linalg.current_vector(states[1]))
    if dtype == np.float64:  # a view of the basis row, which the caller cannot write
        assert np.shares_memory(one, states[1].basis) and not one.flags.writeable
    else:
        assert not np.shares_memory(one, states[1].basis)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("mapped", [False, True])
def test_rows_past_a_breakdown_stay_zero(dtype, mapped, monkeypatch):
    # The next vector is built in its basis row (float64): a breakdown must leave that
    # row zero, as rows past the last vector are.
    if mapped:
        monkeypatch.setattr(lanczos_module, "SMALL_PAGES_FROM_BYTES", 1)
    matrix, _ = matrix_with_eigenvalues([1.0, 2.0, 2.0, 2.0, 7.0, 7.0], seed=2)
    state = linalg.lanczos_init(np.random.default_rng(5).standard_normal(6), 6, basis_dtype=dtype)
    while not linalg.is_finished(state):
        state = linalg.lanczos_step(state, matrix @ linalg.current_vector(state))
    steps = state.num_steps  # 3 distinct eigenvalues; a float32 basis's rounding runs on
    assert state.exhausted and steps == (3 if dtype == np.float64 else steps) < 6
    assert not np.any(state.basis[steps:])
    basis = state.basis[:steps].astype(np.float64)
    np.testing.assert_allclose(basis @ basis.T, np.eye(steps),
                               atol=1e-12 if dtype == np.float64 else 1e-6)


@pytest.mark.parametrize("dtype, count", [(np.float64, 1), (np.float64, 3), (np.float32, 1)])
def test_the_vectors_a_product_reads_start_aligned(dtype, count):
    # As TensorFlow's kernels need to read them in place (HessianOperator.matmat).
    rng = np.random.default_rng(0)
    states = [linalg.lanczos_init(rng.standard_normal(1001), 4, basis_dtype=dtype)
              for _ in range(count)]
    vectors = linalg.current_vectors(states)
    assert vectors.shape == (count, 1001) and vectors.dtype == np.float64
    assert vectors.flags.c_contiguous
    assert vectors.ctypes.data % lanczos_module.ROW_ALIGNMENT_BYTES == 0
    for row, state in zip(vectors, states):
        np.testing.assert_array_equal(row, state.basis[0].astype(np.float64))
