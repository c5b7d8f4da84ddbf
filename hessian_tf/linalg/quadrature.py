"""Gauss quadrature from a Lanczos tridiagonal.

For T = U D Uᵀ built from a start vector v (‖v‖ = 1), vᵀ f(A) v ≈ Σᵢ wᵢ f(ℓᵢ)
with nodes ℓᵢ = Dᵢᵢ and weights wᵢ = U[0, i]²: the squared FIRST components of
T's eigenvectors (the component along v itself).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np


class Quadrature(NamedTuple):
    """Nodes and weights of one draw.

    Attributes:
      nodes: [m] Ritz values, ascending.
      weights: [m] squared first components of T's eigenvectors; sum to 1.
      ritz_residuals: [m] |β_m · U[m-1, i]|, the residual norm ‖A y − ℓ y‖ of
        each Ritz pair (an upper bound on its distance to an eigenvalue).
    """

    nodes: np.ndarray
    weights: np.ndarray
    ritz_residuals: np.ndarray


def tridiagonal(alphas: np.ndarray, betas: np.ndarray) -> np.ndarray:
    """The dense symmetric tridiagonal matrix T. [m, m]"""
    alphas = np.asarray(alphas, dtype=np.float64)
    betas = np.asarray(betas, dtype=np.float64)
    if betas.shape != (max(alphas.size - 1, 0),):
        raise ValueError(
            f"betas has shape {betas.shape}, but {alphas.size} alphas need "
            f"{max(alphas.size - 1, 0)} betas."
        )
    return np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)


def tridiagonal_quadrature(
    alphas: np.ndarray,
    betas: np.ndarray,
    residual_norm: Optional[float] = None,
) -> Quadrature:
    """Nodes, weights and Ritz residuals of the tridiagonal (alphas, betas)."""
    nodes, eigenvectors = np.linalg.eigh(tridiagonal(alphas, betas))
    weights = eigenvectors[0, :] ** 2
    # Weights sum to 1 up to rounding; make it exact so densities integrate to 1.
    weights = weights / weights.sum()
    residual = 0.0 if residual_norm is None else float(residual_norm)
    ritz_residuals = np.abs(residual * eigenvectors[-1, :])
    return Quadrature(nodes=nodes, weights=weights, ritz_residuals=ritz_residuals)
