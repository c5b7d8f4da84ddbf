"""Bootstrap band over draws: shape, agreement with gaussian_density, coverage, one draw."""

import numpy as np
import pytest

from hessian_tf import linalg
from hessian_tf.linalg import bootstrap


def random_draws(rng, num_draws, num_nodes=6):
    nodes = [rng.normal(0.0, 1.0, num_nodes) for _ in range(num_draws)]
    weights = [w / w.sum() for w in (rng.uniform(0.1, 1.0, num_nodes) for _ in range(num_draws))]
    return nodes, weights


def test_shapes_and_the_density_is_gaussian_density():
    rng = np.random.default_rng(0)
    nodes, weights = random_draws(rng, 5)
    grid = np.linspace(-6, 6, 301)
    band = bootstrap.bootstrap_density_band(nodes, weights, grid=grid, kernel_width=0.3,
                                            num_resamples=200)
    for array in (band.grid, band.density, band.lower, band.upper):
        assert array.shape == (301,)
    expected = linalg.gaussian_density(nodes, weights, grid=grid, kernel_width=0.3).density
    np.testing.assert_allclose(band.density, expected, rtol=1e-12, atol=1e-15)
    assert np.all(band.lower <= band.upper)
    assert np.all(band.lower >= 0)
    assert band.num_draws == 5 and band.num_resamples == 200 and band.confidence == 0.9
    # Spread where the mass is, nothing far away.
    assert np.max(band.upper - band.lower) > 0.01
    assert band.upper[0] - band.lower[0] < 1e-12


def test_each_resample_is_the_density_of_resampled_draws():
    rng = np.random.default_rng(1)
    nodes, weights = random_draws(rng, 4)
    grid = np.linspace(-5, 5, 101)
    # With a confidence that keeps the extremes, the band is the envelope of the
    # resamples; any single resample lies inside it.
    band = bootstrap.bootstrap_density_band(nodes, weights, grid=grid, kernel_width=0.4,
                                            num_resamples=2000, confidence=0.9999, seed=2)
    picked = [0, 0, 3, 1]
    resample = linalg.gaussian_density([nodes[i] for i in picked], [weights[i] for i in picked],
                                       grid=grid, kernel_width=0.4).density
    assert np.all(resample >= band.lower - 1e-12) and np.all(resample <= band.upper + 1e-12)


def test_one_draw_collapses_the_band():
    rng = np.random.default_rng(3)
    nodes, weights = random_draws(rng, 1)
    band = bootstrap.bootstrap_density_band(nodes, weights, grid=np.linspace(-4, 4, 50),
                                            kernel_width=0.5)
    np.testing.assert_array_equal(band.lower, band.density)
    np.testing.assert_array_equal(band.upper, band.density)


def test_pointwise_coverage_of_the_expected_density():
    # Each draw is one node ~ N(0, 1) of weight 1, so the expected density is the
    # N(0, 1 + σ²) pdf. The 90% percentile band of 30 draws should cover it at a
    # point about 90% of the time (a little less: percentile bootstrap of a mean).
    rng = np.random.default_rng(4)
    sigma = 0.5
    grid = np.linspace(-8, 8, 161)
    points = [60, 80, 100]  # t = -2, 0, 2
    truth = np.exp(-0.5 * grid**2 / (1 + sigma**2)) / np.sqrt(2 * np.pi * (1 + sigma**2))
    covered = []
    for experiment in range(200):
        draws = rng.normal(size=30)
        band = bootstrap.bootstrap_density_band(
            [np.array([d]) for d in draws], [np.ones(1)] * 30, grid=grid, kernel_width=sigma,
            num_resamples=200, seed=experiment)
        covered.append([(band.lower[p] <= truth[p] <= band.upper[p]) for p in points])
    coverage = np.mean(covered, axis=0)
    assert np.all(coverage > 0.78) and np.all(coverage < 0.97), coverage


def test_unnormalised_band_keeps_the_mass_of_the_weights():
    nodes = [np.array([1.0, 2.0]), np.array([1.5, 2.5])]
    weights = [np.array([0.2, 0.1]), np.array([0.1, 0.1])]
    grid = np.linspace(-3, 7, 2001)
    band = bootstrap.bootstrap_density_band(nodes, weights, grid=grid, kernel_width=0.2,
                                            normalize=False)
    assert np.trapezoid(band.density, grid) == pytest.approx(0.25, rel=1e-6)


def test_bad_arguments():
    nodes, weights = [np.zeros(2)], [np.ones(2) / 2]
    grid = np.linspace(-1, 1, 5)
    with pytest.raises(ValueError, match="kernel_width=0"):
        bootstrap.bootstrap_density_band(nodes, weights, grid=grid, kernel_width=0)
    with pytest.raises(ValueError, match="confidence=1.5"):
        bootstrap.bootstrap_density_band(nodes, weights, grid=grid, kernel_width=1, confidence=1.5)
    with pytest.raises(ValueError, match="num_resamples=0"):
        bootstrap.bootstrap_density_band(nodes, weights, grid=grid, kernel_width=1, num_resamples=0)
    with pytest.raises(ValueError, match="per draw"):
        bootstrap.bootstrap_density_band([], [], grid=grid, kernel_width=1)
    with pytest.raises(ValueError, match="2 nodes but 3 weights"):
        bootstrap.bootstrap_density_band(nodes, [np.ones(3)], grid=grid, kernel_width=1)
