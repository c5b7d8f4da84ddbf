"""Hutch++: exact on low-rank matrices, unbiased with honest standard errors, and
consistent with the SLQ trace estimate."""

import numpy as np
import pytest

from hessian_tf import spectrum
from hessian_tf.linalg import trace as trace_lib
from tests.linalg import test_lanczos


def matrix_with_eigenvalues(eigenvalues, seed=0):
    return test_lanczos.matrix_with_eigenvalues(eigenvalues, seed)[0]


class Counting:
    def __init__(self, matrix):
        self.matrix, self.count = matrix, 0

    def __call__(self, vector):
        self.count += 1
        return self.matrix @ vector


def test_exact_on_low_rank_matrices():
    eigenvalues = np.zeros(200)
    eigenvalues[:6] = [50.0, -3.0, 7.0, 1.5, 0.25, 12.0]
    matvec = Counting(matrix_with_eigenvalues(eigenvalues))
    estimate = trace_lib.hutchpp(matvec, 200, num_matvecs=21, seed=3)
    assert estimate.rank == 7 and estimate.num_samples == 7 and estimate.num_matvecs == 21
    assert matvec.count == 21
    assert estimate.estimate == pytest.approx(eigenvalues.sum(), abs=1e-10)
    assert estimate.stderr < 1e-10


def test_budget_of_the_whole_dimension_is_exact():
    eigenvalues = np.random.default_rng(1).normal(size=12)
    estimate = trace_lib.hutchpp(Counting(matrix_with_eigenvalues(eigenvalues)), 12,
                                 num_matvecs=40)
    assert estimate.rank == 12 and estimate.num_samples == 0 and estimate.num_matvecs == 24
    assert estimate.estimate == pytest.approx(eigenvalues.sum(), abs=1e-10)
    assert estimate.stderr == 0.0


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_unbiased_with_calibrated_standard_errors(distribution):
    rng = np.random.default_rng(5)
    eigenvalues = np.concatenate([[40.0, 25.0, -10.0], rng.normal(0.5, 1.0, 97)])
    matrix = matrix_with_eigenvalues(eigenvalues, seed=6)
    truth = eigenvalues.sum()
    estimates = [trace_lib.hutchpp(lambda v: matrix @ v, 100, num_matvecs=30, seed=seed,
                                   distribution=distribution) for seed in range(300)]
    values = np.array([e.estimate for e in estimates])
    stderrs = np.array([e.stderr for e in estimates])
    # Unbiased: the mean of 300 estimates is within 4 standard errors of the truth.
    assert abs(values.mean() - truth) < 4 * values.std(ddof=1) / np.sqrt(values.size)
    # Calibrated: |error| < 2 stderr about as often as a t distribution with 9
    # degrees of freedom says (92%), and the stderr matches the actual spread.
    coverage = np.mean(np.abs(values - truth) < 2 * stderrs)
    assert 0.85 < coverage < 0.98
    assert np.sqrt(np.mean(stderrs**2)) == pytest.approx(values.std(), rel=0.25)


def test_hutchpp_beats_hutchinson_on_a_decaying_spectrum():
    eigenvalues = 100.0 / np.arange(1, 201) ** 2
    matrix = matrix_with_eigenvalues(eigenvalues, seed=2)
    truth = eigenvalues.sum()
    plus = [trace_lib.hutchpp(lambda v: matrix @ v, 200, num_matvecs=30, seed=s).estimate
            for s in range(40)]
    plain = [trace_lib.hutchinson(lambda v: matrix @ v, 200, num_matvecs=30, seed=s).estimate
             for s in range(40)]
    plus_error = np.sqrt(np.mean((np.array(plus) - truth) ** 2))
    plain_error = np.sqrt(np.mean((np.array(plain) - truth) ** 2))
    assert plus_error < plain_error / 10


def test_agrees_with_the_slq_trace_estimate():
    rng = np.random.default_rng(7)
    eigenvalues = np.concatenate([[30.0, 12.0], rng.normal(0.2, 0.5, 148)])
    matrix = matrix_with_eigenvalues(eigenvalues, seed=8)
    result = spectrum.stochastic_lanczos_quadrature(
        lambda v: matrix @ v, 150, lanczos_steps=20, num_draws=8, seed=1)
    slq = result.statistics
    estimate = trace_lib.hutchpp(lambda v: matrix @ v, 150, num_matvecs=60, seed=1)
    truth = eigenvalues.sum()
    assert abs(slq.trace - truth) < 4 * slq.trace_stderr
    assert abs(estimate.estimate - truth) < 4 * estimate.stderr
    summary = trace_lib.trace_summary(estimate, slq_estimate=slq.trace,
                                      slq_stderr=slq.trace_stderr)
    assert summary["estimate"] == estimate.estimate and summary["stderr"] == estimate.stderr
    assert summary["agreement_z"] < 4
    # Hutch++ takes the outliers exactly: its error is far below SLQ's at 8 draws.
    assert estimate.stderr < slq.trace_stderr / 3


def test_one_sample_has_unknown_stderr_and_bad_budgets_are_refused():
    matrix = matrix_with_eigenvalues(np.arange(1.0, 31.0))
    estimate = trace_lib.hutchpp(lambda v: matrix @ v, 30, num_matvecs=3)
    assert estimate.num_samples == 1 and np.isnan(estimate.stderr)
    assert np.isnan(trace_lib.trace_summary(estimate, slq_estimate=1.0, slq_stderr=0.1)["agreement_z"])
    with pytest.raises(ValueError, match="num_matvecs=2"):
        trace_lib.hutchpp(lambda v: matrix @ v, 30, num_matvecs=2)
    with pytest.raises(ValueError, match="distribution='normal'"):
        trace_lib.hutchpp(lambda v: matrix @ v, 30, distribution="normal")
    with pytest.raises(ValueError, match="dimension 30"):
        trace_lib.hutchpp(lambda v: np.zeros(29), 30)


def test_depends_only_on_the_seed():
    matrix = matrix_with_eigenvalues(np.linspace(-1, 4, 40))
    first = trace_lib.hutchpp(lambda v: matrix @ v, 40, num_matvecs=12, seed=9)
    second = trace_lib.hutchpp(lambda v: matrix @ v, 40, num_matvecs=12, seed=9)
    third = trace_lib.hutchpp(lambda v: matrix @ v, 40, num_matvecs=12, seed=10)
    assert first == second and first.estimate != third.estimate
