"""A pointwise error band for an SLQ density, by bootstrap over the draws.

The density is the mean of D per-draw densities (one per random start vector). The
band resamples the D draws with replacement B times, recomputes the averaged
density on one fixed grid each time, and takes pointwise quantiles. It measures
the spread due to the start vectors (the stochastic part of SLQ), not the bias of
a finite Lanczos order m or of the kernel width σ. With one draw there is nothing
to resample: the band collapses onto the density.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

DEFAULT_NUM_RESAMPLES = 500
DEFAULT_CONFIDENCE = 0.9


def density_memory_refusal(num_grid_points: int, num_draws: int, num_resamples: int,
                           available: int, flags: str) -> str:
    """"" where a density of `num_grid_points` points, with its band over `num_draws`
    draws and `num_resamples` resamples (float64 [draws + resamples, points] arrays,
    and a few of the grid's size), fits in `available` bytes; else the one line that
    refuses it, naming `flags` (the options that shrink it)."""
    need = 8 * num_grid_points * ((num_draws + num_resamples if num_draws > 1 else 1) + 8)
    if need <= available:
        return ""
    return (f"--num_grid_points={num_grid_points}: the density's arrays would need "
            f"{need / 2**30:.3g} GiB, more than the memory here ({available / 2**30:.3g} "
            f"GiB); pass fewer {flags} (a plot's width is a few thousand points).")


class DensityBand(NamedTuple):
    """Attributes:
    grid: [G] the fixed grid.
    density: [G] the density of all draws (as `gaussian_density` on this grid).
    lower: [G] pointwise (1 − confidence)/2 quantile over resamples.
    upper: [G] pointwise (1 + confidence)/2 quantile over resamples.
    kernel_width: σ used.
    confidence: the band's nominal pointwise coverage.
    num_resamples: B.
    num_draws: D.
    """

    grid: np.ndarray
    density: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    kernel_width: float
    confidence: float
    num_resamples: int
    num_draws: int


def per_draw_kernel_sums(
    nodes: Sequence[np.ndarray],
    weights: Sequence[np.ndarray],
    grid: np.ndarray,
    kernel_width: float,
) -> np.ndarray:
    """Σᵢ w_{d,i} g_σ(t − ℓ_{d,i}) for every draw d, unnormalised. [D, G]"""
    grid = np.asarray(grid, dtype=np.float64)
    sums = np.empty((len(nodes), grid.size))
    normaliser = 1.0 / (kernel_width * np.sqrt(2.0 * np.pi))
    for d, (draw_nodes, draw_weights) in enumerate(zip(nodes, weights)):
        draw_nodes = np.asarray(draw_nodes, np.float64).ravel()
        draw_weights = np.asarray(draw_weights, np.float64).ravel()
        if draw_nodes.shape != draw_weights.shape:
            raise ValueError(f"draw {d} has {draw_nodes.size} nodes but {draw_weights.size} weights.")
        kernel = np.exp(-0.5 * ((grid[:, None] - draw_nodes[None, :]) / kernel_width) ** 2)
        sums[d] = normaliser * (kernel @ draw_weights)
    return sums


def bootstrap_density_band(
    nodes: Sequence[np.ndarray],
    weights: Sequence[np.ndarray],
    *,
    grid: np.ndarray,
    kernel_width: float,
    num_resamples: int = DEFAULT_NUM_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
    normalize: bool = True,
) -> DensityBand:
    """Pointwise bootstrap band of the draw-averaged Gaussian density.

    Args:
      nodes: per draw, the quadrature nodes [m_d] (drop padding past num_steps, or
        keep it: padded entries have zero weight).
      weights: per draw, the weights [m_d].
      grid: [G] the fixed grid every resample is evaluated on.
      kernel_width: σ > 0.
      num_resamples: B ≥ 1 resamples of the draws.
      confidence: in (0, 1), e.g. 0.9 for the 5% and 95% quantiles.
      seed: seeds the resampling.
      normalize: renormalise each density to integrate to 1 over the grid, as
        `gaussian_density` does; False keeps the raw mixture (whose mass is the
        weights' total, e.g. one sign of the spectrum).

    Returns:
      A DensityBand; `density` equals `gaussian_density(nodes, weights, grid=grid,
      kernel_width=kernel_width).density` when `normalize`.
    """
    num_draws = len(nodes)
    if num_draws == 0 or num_draws != len(weights):
        raise ValueError(
            f"got {len(nodes)} node arrays and {len(weights)} weight arrays: pass one "
            "of each per draw, at least one draw."
        )
    if not kernel_width > 0:
        raise ValueError(f"kernel_width={kernel_width}: pass a positive width.")
    if num_resamples < 1:
        raise ValueError(f"num_resamples={num_resamples}: pass at least 1.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: pass a number strictly between 0 and 1.")
    grid = np.asarray(grid, dtype=np.float64).ravel()
    if grid.size < 2:
        raise ValueError(f"the grid has {grid.size} points; pass at least 2.")
    sums = per_draw_kernel_sums(nodes, weights, grid, float(kernel_width))
    rng = np.random.default_rng([seed, 0x426F6F74])
    # Resampling draws with replacement = multinomial counts of each draw.
    counts = rng.multinomial(num_draws, np.full(num_draws, 1.0 / num_draws), size=num_resamples)
    resampled = counts @ sums / num_draws  # [B, G]
    density = sums.mean(axis=0)
    if normalize:
        resampled = _normalized(resampled, grid)
        density = _normalized(density[None], grid)[0]
    tail = (1.0 - confidence) / 2.0
    lower, upper = np.quantile(resampled, [tail, 1.0 - tail], axis=0)
    if num_draws == 1:
        # Every resample is the one draw; quantiles would only add rounding.
        lower, upper = density.copy(), density.copy()
    return DensityBand(
        grid=grid,
        density=density,
        lower=lower,
        upper=upper,
        kernel_width=float(kernel_width),
        confidence=float(confidence),
        num_resamples=int(num_resamples),
        num_draws=num_draws,
    )


def _normalized(densities: np.ndarray, grid: np.ndarray) -> np.ndarray:
    integrals = np.trapezoid(densities, grid, axis=-1)
    integrals = np.where(integrals > 0, integrals, 1.0)
    return densities / integrals[:, None]

