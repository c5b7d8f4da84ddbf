"""Analyses beyond the density: the top eigenspace and how much of the gradient lies in it.

Ghorbani, Krishnan & Xiao (2019) found that the full-batch gradient concentrates in
the span of the Hessian's few outlier eigenvectors. `gradient_overlap` measures
that: the fraction ‖P_k g‖² / ‖g‖² of the gradient's energy in the span of k
vectors (P_k the orthogonal projector onto them), direction by direction.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import numpy as np
import threadpoolctl

from hessian_tf.linalg import eigenpairs as eigenpairs_lib
from hessian_tf.linalg.lanczos import lanczos


class GradientOverlap(NamedTuple):
    """Attributes:
    fraction: ‖P_k g‖² / ‖g‖² ∈ [0, 1] (NaN for a zero gradient).
    cumulative: [k] the fraction in the span of the first 1, 2, …, k vectors.
    per_direction: [k] (qᵢ·g)² / ‖g‖² for the orthonormalised vectors qᵢ (in the
      order given: for Ritz vectors, by descending eigenvalue).
    gradient_norm: ‖g‖.
    num_vectors: k.
    """

    fraction: float
    cumulative: np.ndarray
    per_direction: np.ndarray
    gradient_norm: float
    num_vectors: int


def gradient_overlap(gradient: np.ndarray, vectors: np.ndarray) -> GradientOverlap:
    """The share of the gradient's energy in the span of `vectors`.

    Args:
      gradient: [dim] the full-batch gradient g.
      vectors: [k, dim] spanning vectors as rows (e.g. `Eigenpairs.vectors`); they
        are orthonormalised in order (Gram–Schmidt by QR), so they need not be
        exactly orthonormal (a float32 Lanczos basis).

    Returns:
      A GradientOverlap.
    """
    gradient = np.asarray(gradient, dtype=np.float64).ravel()
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
    if vectors.shape[1] != gradient.size:
        raise ValueError(
            f"vectors have shape {vectors.shape} but the gradient has {gradient.size} "
            "entries: pass [k, dim] vectors of the gradient's dimension."
        )
    if vectors.shape[0] == 0 or vectors.shape[0] > gradient.size:
        raise ValueError(
            f"got {vectors.shape[0]} vectors in dimension {gradient.size}: pass between 1 "
            "and dim vectors."
        )
    basis, upper = np.linalg.qr(vectors.T)  # columns: orthonormalised vectors, in order
    diagonal = np.abs(np.diag(upper))
    if diagonal.min() <= 1e-10 * max(diagonal.max(), np.finfo(np.float64).tiny):
        raise ValueError("the vectors are linearly dependent; pass independent directions.")
    norm = float(np.linalg.norm(gradient))
    if norm == 0.0:
        nan = np.full(vectors.shape[0], np.nan)
        return GradientOverlap(float("nan"), nan, nan.copy(), 0.0, vectors.shape[0])
    per_direction = (basis.T @ gradient) ** 2 / norm**2
    cumulative = np.cumsum(per_direction)
    return GradientOverlap(
        fraction=float(min(cumulative[-1], 1.0)),
        cumulative=np.minimum(cumulative, 1.0),
        per_direction=per_direction,
        gradient_norm=norm,
        num_vectors=vectors.shape[0],
    )


def top_eigenspace(
    matvec: Callable[[np.ndarray], np.ndarray],
    dim: int,
    *,
    num_eigenpairs: int,
    lanczos_steps: int,
    seed: int = 0,
    relative_tolerance: float = eigenpairs_lib.DEFAULT_RELATIVE_TOLERANCE,
    start_vector: Optional[np.ndarray] = None,
) -> eigenpairs_lib.Eigenpairs:
    """The top `num_eigenpairs` Ritz pairs of a symmetric operator, with vectors.

    Runs one Lanczos draw of `lanczos_steps` products keeping its basis
    (`lanczos_steps · dim · 8` bytes, plus `num_eigenpairs · dim · 8` for the
    vectors). With the default start vector it is draw 0 of
    `spectrum.stochastic_lanczos_quadrature` with the same seed, so its Ritz values
    equal that draw's largest nodes.
    """
    if start_vector is None:
        start_vector = np.random.default_rng([seed, 0]).standard_normal(dim) / np.sqrt(dim)
    # One BLAS thread, as in spectrum.py: the reorthogonalisation stalls otherwise.
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        result = lanczos(matvec, start_vector, lanczos_steps, keep_basis=True)
        return eigenpairs_lib.top_eigenpairs(
            result,
            num_eigenpairs,
            ritz_vectors=True,
            relative_tolerance=relative_tolerance,
        )


class OverlapAnalysis(NamedTuple):
    """Attributes: loss (the mean loss), eigenpairs (with vectors), overlap."""

    loss: float
    eigenpairs: eigenpairs_lib.Eigenpairs
    overlap: GradientOverlap


def analyze_gradient_overlap(
    operator,
    *,
    num_eigenpairs: int,
    lanczos_steps: int,
    seed: int = 0,
    relative_tolerance: float = eigenpairs_lib.DEFAULT_RELATIVE_TOLERANCE,
) -> OverlapAnalysis:
    """The fraction of an operator's full-batch gradient in its top-k eigenspace.

    Args:
      operator: a HessianOperator (or GGN/Fisher, or one on a variable subset):
        anything with `matvec`, `dim` and `loss_and_gradient()`.
      num_eigenpairs: k.
      lanczos_steps: Lanczos order for the eigenspace (costs that many products);
        check `eigenpairs.converged`: an unconverged Ritz vector is a mixture of
        eigenvectors and its overlap means little.
    """
    loss, gradient = operator.loss_and_gradient()
    pairs = top_eigenspace(
        operator.matvec,
        operator.dim,
        num_eigenpairs=num_eigenpairs,
        lanczos_steps=lanczos_steps,
        seed=seed,
        relative_tolerance=relative_tolerance,
    )
    return OverlapAnalysis(loss, pairs, gradient_overlap(gradient, pairs.vectors))


def overlap_summary(analysis: OverlapAnalysis) -> dict:
    """A JSON-ready dict for summary.json."""
    overlap = analysis.overlap
    return {
        "fraction": overlap.fraction,
        "cumulative": [float(c) for c in overlap.cumulative],
        "num_eigenpairs": overlap.num_vectors,
        "gradient_norm": overlap.gradient_norm,
        "eigenvalues": [float(v) for v in analysis.eigenpairs.eigenvalues],
        "converged": [bool(c) for c in analysis.eigenpairs.converged],
    }
