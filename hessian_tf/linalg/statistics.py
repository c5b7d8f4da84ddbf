"""Scalar summaries of a spectrum from its quadrature."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from hessian_tf.linalg.quadrature import Quadrature

# Eigenvalues within this fraction of max|λ| of zero count as zero for
# `negative_mass_tolerance`: most of a network's eigenvalues sit near zero, and
# their signs are noise of the products' precision.
DEFAULT_ZERO_TOLERANCE = 1e-3


class SpectrumStatistics(NamedTuple):
    """Attributes:
    lambda_max: largest Ritz value over all draws (converges first).
    lambda_min: smallest Ritz value over all draws.
    trace: estimate dim · Σᵢ wᵢ ℓᵢ, averaged over draws (Hutchinson through
      the quadrature).
    trace_stderr: standard error of `trace` over draws (NaN with one draw).
    negative_mass: Σ wᵢ over ℓᵢ < 0, averaged over draws.
    negative_mass_tolerance: Σ wᵢ over ℓᵢ < −tolerance, averaged over draws.
    zero_tolerance: the tolerance used, in eigenvalue units.
    """

    lambda_max: float
    lambda_min: float
    trace: float
    trace_stderr: float
    negative_mass: float
    negative_mass_tolerance: float
    zero_tolerance: float


def spectrum_statistics(
    quadratures: Sequence[Quadrature],
    dim: int,
    *,
    relative_zero_tolerance: float = DEFAULT_ZERO_TOLERANCE,
) -> SpectrumStatistics:
    """Statistics of a spectrum of an operator of dimension `dim`."""
    if not quadratures:
        raise ValueError("spectrum_statistics needs at least one draw.")
    lambda_max = max(float(q.nodes.max()) for q in quadratures)
    lambda_min = min(float(q.nodes.min()) for q in quadratures)
    tolerance = relative_zero_tolerance * max(abs(lambda_max), abs(lambda_min))
    traces = np.array([dim * float(q.weights @ q.nodes) for q in quadratures])
    negative = np.array([float(q.weights[q.nodes < 0].sum()) for q in quadratures])
    negative_tol = np.array(
        [float(q.weights[q.nodes < -tolerance].sum()) for q in quadratures]
    )
    stderr = (
        float(traces.std(ddof=1) / np.sqrt(traces.size)) if traces.size > 1 else float("nan")
    )
    return SpectrumStatistics(
        lambda_max=lambda_max,
        lambda_min=lambda_min,
        trace=float(traces.mean()),
        trace_stderr=stderr,
        negative_mass=float(negative.mean()),
        negative_mass_tolerance=float(negative_tol.mean()),
        zero_tolerance=float(tolerance),
    )


def headline(statistics: SpectrumStatistics) -> str:
    """The extreme Ritz values and the negative mass, as the binary's and the callback's
    logs give them."""
    scale = max(abs(statistics.lambda_max), abs(statistics.lambda_min))
    relative = statistics.zero_tolerance / scale if scale > 0 else DEFAULT_ZERO_TOLERANCE
    return (f"lambda_max={statistics.lambda_max:.6g} lambda_min={statistics.lambda_min:.6g} "
            f"negative_mass_tolerance={statistics.negative_mass_tolerance:.4g} (the "
            f"spectrum's weight below -{statistics.zero_tolerance:.3g}, {relative:.3g} of "
            f"max|lambda|; below 0, the bulk's noise near 0 included: "
            f"{statistics.negative_mass:.4g})")
