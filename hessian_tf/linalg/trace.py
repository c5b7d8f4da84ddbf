"""Trace estimation on a matvec: Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021).

Hutch++ spends its budget of M products in three parts:
  1. sketch: Y = A S for k = M // 3 random sign vectors S [dim, k]; Q = orth(Y);
  2. the trace of A on range(Q) exactly: tr(Qᵀ A Q), k products;
  3. Hutchinson on the rest: (1/s) Σⱼ gⱼᵀ (I − QQᵀ) A (I − QQᵀ) gⱼ, s = M − 2k products.
The top of the spectrum, which dominates the variance of plain Hutchinson, is taken
exactly in part 2, so the error falls as 1/M instead of 1/√M. Given Q, part 3 is an
unbiased estimate of tr(A) − tr(QᵀAQ); its standard error is estimated from the s
samples (the sample standard deviation over √s). The estimate is exact (standard
error 0) when rank(A) ≤ k.

Memory: Q costs k · dim · 8 bytes.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import numpy as np

DISTRIBUTIONS = ("rademacher", "gaussian")
DEFAULT_NUM_MATVECS = 30


class TraceEstimate(NamedTuple):
    """Attributes:
    estimate: the estimate of tr(A).
    stderr: its standard error given the sketch (NaN with a single Hutchinson
      sample; 0 when the sketch spans A's range).
    low_rank_trace: tr(QᵀAQ), exact on the sketched subspace.
    residual_trace: the Hutchinson estimate of tr(A) − tr(QᵀAQ).
    rank: k, the sketch's columns.
    num_samples: s, the Hutchinson samples.
    num_matvecs: products used (2k + s).
    """

    estimate: float
    stderr: float
    low_rank_trace: float
    residual_trace: float
    rank: int
    num_samples: int
    num_matvecs: int


def _random_vectors(rng: np.random.Generator, dim: int, count: int, distribution: str):
    if distribution == "rademacher":
        return rng.choice(np.array([-1.0, 1.0]), size=(dim, count))
    return rng.standard_normal((dim, count))


def _products(matvec, vectors: np.ndarray, dim: int, callback) -> np.ndarray:
    """A @ vectors, column by column. [dim, count]"""
    columns = []
    for j in range(vectors.shape[1]):
        product = np.asarray(matvec(np.ascontiguousarray(vectors[:, j])), dtype=np.float64)
        if product.shape != (dim,):
            raise ValueError(
                f"matvec returned shape {product.shape}; the operator has dimension {dim}."
            )
        columns.append(product)
        if callback is not None:
            callback(1)
    return np.stack(columns, axis=1) if columns else np.zeros((dim, 0))


def _check(dim: int, num_matvecs: int, distribution: str, minimum: int) -> None:
    if dim < 1:
        raise ValueError(f"dim={dim}: the operator needs a dimension >= 1.")
    if num_matvecs < minimum:
        raise ValueError(
            f"num_matvecs={num_matvecs}: pass at least {minimum} products "
            "(Hutch++ splits them into a sketch, its trace and Hutchinson samples)."
            if minimum == 3
            else f"num_matvecs={num_matvecs}: pass at least {minimum}."
        )
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"distribution={distribution!r} is not valid; use one of {list(DISTRIBUTIONS)}."
        )


def _mean_and_stderr(samples: np.ndarray) -> tuple[float, float]:
    if samples.size == 0:
        return 0.0, 0.0
    mean = float(samples.mean())
    if samples.size == 1:
        return mean, float("nan")
    return mean, float(samples.std(ddof=1) / np.sqrt(samples.size))


def hutchpp_products(dim: int, num_matvecs: int) -> int:
    """The products `hutchpp` takes for a budget of `num_matvecs` on `dim`: the budget,
    or two per dimension where the sketch spans everything."""
    rank = min(num_matvecs // 3, dim)
    return 2 * rank if rank == dim else num_matvecs


def hutchpp(
    matvec: Callable[[np.ndarray], np.ndarray],
    dim: int,
    *,
    num_matvecs: int = DEFAULT_NUM_MATVECS,
    seed: int = 0,
    distribution: str = "rademacher",
    callback: Optional[Callable[[int], None]] = None,
) -> TraceEstimate:
    """Hutch++ estimate of tr(A) for a symmetric operator A, with a standard error.

    Args:
      matvec: float64 [dim] → [dim].
      dim: the operator's dimension.
      num_matvecs: the budget M ≥ 3: a sketch of k = M // 3 columns (capped at
        dim), k products for its trace, and the rest Hutchinson samples.
      seed: seeds the random vectors; the estimate depends only on (seed, A, M).
      distribution: 'rademacher' (random signs, the lower variance) or 'gaussian'.
      callback: called with 1 after every product (progress).

    Returns:
      A TraceEstimate.
    """
    _check(dim, num_matvecs, distribution, 3)
    rank = min(num_matvecs // 3, dim)
    num_samples = hutchpp_products(dim, num_matvecs) - 2 * rank
    rng = np.random.default_rng([seed, 0x48757463])
    sketch = _products(matvec, _random_vectors(rng, dim, rank, distribution), dim, callback)
    basis, _ = np.linalg.qr(sketch)  # [dim, rank], orthonormal columns
    low_rank_trace = float(
        np.sum(basis * _products(matvec, basis, dim, callback))
    )
    # Where Q spans everything, tr(QᵀAQ) is the trace: nothing is left to sample.
    samples = _random_vectors(rng, dim, num_samples, distribution)
    deflated = samples - basis @ (basis.T @ samples)
    values = np.sum(deflated * _products(matvec, deflated, dim, callback), axis=0)
    residual_trace, stderr = _mean_and_stderr(values)
    return TraceEstimate(
        estimate=low_rank_trace + residual_trace,
        stderr=stderr,
        low_rank_trace=low_rank_trace,
        residual_trace=residual_trace,
        rank=rank,
        num_samples=num_samples,
        num_matvecs=2 * rank + num_samples,
    )


def hutchinson(
    matvec: Callable[[np.ndarray], np.ndarray],
    dim: int,
    *,
    num_matvecs: int = DEFAULT_NUM_MATVECS,
    seed: int = 0,
    distribution: str = "rademacher",
) -> TraceEstimate:
    """Plain Hutchinson, (1/M) Σⱼ gⱼᵀ A gⱼ, for comparison with Hutch++."""
    _check(dim, num_matvecs, distribution, 1)
    rng = np.random.default_rng([seed, 0x48757463])
    samples = _random_vectors(rng, dim, num_matvecs, distribution)
    values = np.sum(samples * _products(matvec, samples, dim, None), axis=0)
    estimate, stderr = _mean_and_stderr(values)
    return TraceEstimate(
        estimate=estimate,
        stderr=stderr,
        low_rank_trace=0.0,
        residual_trace=estimate,
        rank=0,
        num_samples=num_matvecs,
        num_matvecs=num_matvecs,
    )


def trace_summary(
    estimate: TraceEstimate,
    *,
    slq_estimate: Optional[float] = None,
    slq_stderr: Optional[float] = None,
) -> dict:
    """A JSON-ready dict of a Hutch++ estimate, cross-checked against SLQ's.

    `agreement_z` = |Hutch++ − SLQ| / √(stderr² + slq_stderr²): values beyond ~3
    say the two disagree more than their errors explain (NaN when either error is
    unknown, e.g. SLQ with one draw).
    """
    summary = {
        "method": "hutch++",
        "estimate": float(estimate.estimate),
        "stderr": float(estimate.stderr),
        "num_matvecs": int(estimate.num_matvecs),
        "sketch_rank": int(estimate.rank),
        "num_samples": int(estimate.num_samples),
    }
    if slq_estimate is not None:
        summary["slq_estimate"] = float(slq_estimate)
        summary["slq_stderr"] = float("nan") if slq_stderr is None else float(slq_stderr)
        spread = np.hypot(estimate.stderr, summary["slq_stderr"])
        difference = abs(estimate.estimate - slq_estimate)
        summary["agreement_z"] = (
            float(difference / spread) if np.isfinite(spread) and spread > 0 else float("nan")
        )
    return summary
