"""Extreme eigenpairs from a Lanczos tridiagonalisation, with residual bounds.

For A Qᵀ = Qᵀ T + β_m r e_mᵀ (Q's rows orthonormal, ‖r‖ = 1) and T = U diag(ℓ) Uᵀ,
the Ritz pair (ℓᵢ, yᵢ = Qᵀ uᵢ) has residual ‖A yᵢ − ℓᵢ yᵢ‖ = |β_m U[m−1, i]|. For a
symmetric A that residual bounds the distance from ℓᵢ to the nearest eigenvalue of A
(Bauer–Fike / Kahan), whether or not the Ritz vector is kept. With full
reorthogonalisation the Ritz values are free of spurious copies, and the largest
ones are lower bounds of the largest eigenvalues (Cauchy interlacing): ℓ₁ ≤ λ₁.

Memory: Ritz vectors cost `num_eigenpairs · dim · 8` bytes (float64), on top of the
Lanczos basis itself (`lanczos_steps · dim · 8` bytes, needed to form them).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from hessian_tf.linalg.lanczos import LanczosResult
from hessian_tf.linalg.quadrature import tridiagonal

# A Ritz pair counts as converged when its residual bound is below this fraction
# of the operator's scale (the largest |Ritz value|): a relative accuracy of the
# eigenvalue, which is what a Ritz residual bounds.
DEFAULT_RELATIVE_TOLERANCE = 1e-6

WHICH = ("largest", "smallest", "magnitude")


class Eigenpairs(NamedTuple):
    """Ritz approximations of extreme eigenpairs.

    Attributes:
      eigenvalues: [k] Ritz values, descending for 'largest' and 'magnitude'
        (by |ℓ|), ascending for 'smallest'.
      residual_bounds: [k] ‖A y − ℓ y‖ = |β_m U[m−1, i]|: an eigenvalue of A lies
        within this distance of each Ritz value.
      converged: [k] bool, residual_bound ≤ relative_tolerance · scale.
      vectors: [k, dim] unit Ritz vectors (rows, float64), or None when not asked
        for (or no basis was kept).
      scale: max |Ritz value| of the whole tridiagonal, the reference of the
        relative tolerance.
      relative_tolerance: the tolerance used.
      lanczos_steps: the order m of the tridiagonal they came from.
      draws: [k] for `top_eigenpairs_over_draws`, the draw each pair came from;
        None for a single Lanczos run.
    """

    eigenvalues: np.ndarray
    residual_bounds: np.ndarray
    converged: np.ndarray
    vectors: Optional[np.ndarray]
    scale: float
    relative_tolerance: float
    lanczos_steps: int
    draws: Optional[np.ndarray] = None


def ritz_vectors_bytes(num_eigenpairs: int, dim: int) -> int:
    """Bytes the Ritz vectors take: num_eigenpairs · dim · 8 (float64)."""
    return int(num_eigenpairs) * int(dim) * 8


def top_eigenpairs(
    lanczos_result: LanczosResult,
    num_eigenpairs: int,
    *,
    which: str = "largest",
    ritz_vectors: bool = False,
    relative_tolerance: float = DEFAULT_RELATIVE_TOLERANCE,
) -> Eigenpairs:
    """The `num_eigenpairs` extreme Ritz pairs of a Lanczos result.

    Args:
      lanczos_result: from `linalg.lanczos` (with `keep_basis=True` if
        `ritz_vectors`). Its alphas/betas may also come from a saved spectrum:
        `LanczosResult(alphas, betas, residual_norm, None, exhausted)`.
      num_eigenpairs: k ≥ 1; at most m pairs are returned (fewer if Lanczos ran
        fewer steps than k).
      which: 'largest' (descending), 'smallest' (ascending) or 'magnitude'
        (descending |ℓ|).
      ritz_vectors: also form the Ritz vectors Qᵀ uᵢ ([k, dim] float64,
        `ritz_vectors_bytes(k, dim)` bytes); needs the basis.
      relative_tolerance: a pair is `converged` when its residual bound is at
        most this times the largest |Ritz value|.

    Returns:
      Eigenpairs.
    """
    if num_eigenpairs < 1:
        raise ValueError(
            f"num_eigenpairs={num_eigenpairs}: ask for at least one eigenpair."
        )
    if which not in WHICH:
        raise ValueError(f"which={which!r} is not valid; use one of {list(WHICH)}.")
    if not relative_tolerance >= 0:
        raise ValueError(
            f"relative_tolerance={relative_tolerance}: pass a non-negative tolerance."
        )
    if ritz_vectors and lanczos_result.basis is None:
        raise ValueError(
            "ritz_vectors=True needs the Lanczos basis: run linalg.lanczos with "
            "keep_basis=True (it costs lanczos_steps · dim · 8 bytes)."
        )
    values, vectors = np.linalg.eigh(
        tridiagonal(lanczos_result.alphas, lanczos_result.betas)
    )
    m = values.size
    if which == "largest":
        order = np.argsort(-values, kind="stable")
    elif which == "smallest":
        order = np.argsort(values, kind="stable")
    else:
        order = np.argsort(-np.abs(values), kind="stable")
    order = order[: min(int(num_eigenpairs), m)]
    bounds = np.abs(float(lanczos_result.residual_norm) * vectors[m - 1, order])
    scale = float(np.max(np.abs(values)))
    converged = bounds <= relative_tolerance * scale
    ritz = None
    if ritz_vectors:
        basis = np.asarray(lanczos_result.basis[:m], dtype=np.float64)
        ritz = vectors[:, order].T @ basis
        # Unit length even for a float32 basis (whose rows are orthonormal only to
        # float32 precision).
        ritz /= np.linalg.norm(ritz, axis=1, keepdims=True)
    return Eigenpairs(
        eigenvalues=values[order],
        residual_bounds=bounds,
        converged=converged,
        vectors=ritz,
        scale=scale,
        relative_tolerance=float(relative_tolerance),
        lanczos_steps=m,
    )


def top_eigenpairs_over_draws(
    alphas: np.ndarray,
    betas: np.ndarray,
    residual_norms: np.ndarray,
    num_steps: np.ndarray,
    num_eigenpairs: int,
    *,
    which: str = "largest",
    relative_tolerance: float = DEFAULT_RELATIVE_TOLERANCE,
) -> Eigenpairs:
    """Extreme Ritz values (no vectors) from the saved tridiagonals of several draws.

    The i-th largest Ritz value of every draw is a lower bound of the i-th largest
    eigenvalue (interlacing), so the largest over draws is the best estimate; each
    comes with the residual bound and converged flag of the draw it was taken from
    (a draw whose start vector nearly missed an eigenvector cannot hide it).
    'smallest' is the mirror image.

    Args:
      alphas: [num_draws, m]; betas: [num_draws, m − 1]; residual_norms:
        [num_draws]; num_steps: [num_draws] completed steps (rows are padded past
        them), as in `spectrum.Spectrum` or spectrum.npz.
      num_eigenpairs, which ('largest' or 'smallest'), relative_tolerance: as for
        `top_eigenpairs`.
    """
    if which not in ("largest", "smallest"):
        raise ValueError(f"which={which!r} is not valid here; use 'largest' or 'smallest'.")
    alphas = np.atleast_2d(np.asarray(alphas, dtype=np.float64))
    betas = np.asarray(betas, dtype=np.float64).reshape(alphas.shape[0], -1)
    per_draw = []
    for d in range(alphas.shape[0]):
        k = int(num_steps[d])
        result = LanczosResult(alphas[d, :k], betas[d, : k - 1], float(residual_norms[d]), None, False)
        per_draw.append(
            top_eigenpairs(result, num_eigenpairs, which=which, relative_tolerance=relative_tolerance)
        )
    count = min(p.eigenvalues.size for p in per_draw)
    values = np.stack([p.eigenvalues[:count] for p in per_draw])  # [num_draws, count]
    best = np.argmax(values, axis=0) if which == "largest" else np.argmin(values, axis=0)
    columns = np.arange(count)
    scale = max(p.scale for p in per_draw)
    bounds = np.stack([p.residual_bounds[:count] for p in per_draw])[best, columns]
    return Eigenpairs(
        eigenvalues=values[best, columns],
        residual_bounds=bounds,
        converged=bounds <= relative_tolerance * scale,
        vectors=None,
        scale=scale,
        relative_tolerance=float(relative_tolerance),
        lanczos_steps=int(np.max(num_steps)),
        draws=best,
    )


def eigenpairs_summary(eigenpairs: Eigenpairs) -> dict:
    """A JSON-ready dict: eigenvalues with their bounds and converged flags."""
    return {
        "eigenvalues": [float(v) for v in eigenpairs.eigenvalues],
        "residual_bounds": [float(b) for b in eigenpairs.residual_bounds],
        "converged": [bool(c) for c in eigenpairs.converged],
        "relative_tolerance": eigenpairs.relative_tolerance,
        "lanczos_steps": eigenpairs.lanczos_steps,
    }
