"""Lanczos tridiagonalisation with full reorthogonalisation, in float64.

The algorithm sees the operator only through its products: the caller computes
`matvec(q)` for the current Lanczos vector `q` and hands the result to
`lanczos_step`. Keeping the product outside the step lets a driver checkpoint,
log or reduce across workers between steps, and keeps this module free of
models, data and strategies.

The recurrence and the basis live on the host in float64 numpy arrays. The basis
costs `lanczos_steps * dim * 8` bytes; `basis_dtype=np.float32` halves it (the
recurrence and the reorthogonalisation's coefficients stay in float64; only the
removal of a small part of the vector is summed in float32, see `_subtract`).
"""

from __future__ import annotations

import errno
import mmap
from typing import Callable, NamedTuple, Optional

import numpy as np

# A residual norm below this fraction of the scale of T (the largest |alpha| or
# beta seen) means the Krylov space is exhausted: T's eigenvalues are then exact
# eigenvalues of the operator restricted to the Krylov space.
DEFAULT_BREAKDOWN_TOLERANCE = 1e-10

# A reorthogonalisation pass that leaves less than this fraction of the vector's
# norm is repeated once (Daniel, Gragg, Kaufman and Stewart, 1976).
REORTHOGONALIZATION_THRESHOLD = 1 / np.sqrt(2)


# Bases from this size on are mapped from the OS in small pages (`zero_basis`); NumPy
# advises huge pages for arrays from 4 MiB on.
SMALL_PAGES_FROM_BYTES = 4 << 20
# A basis's rows (`zero_basis`, mapped or not) start at multiples of this many bytes,
# the alignment TensorFlow's CPU kernels require of a tensor's memory (Eigen's largest),
# so that a row can be a product's input without a copy (`hessian.host_tensor`).
ROW_ALIGNMENT_BYTES = 64


class BasisMemoryError(MemoryError):
    """The host could not give a Lanczos basis its memory (`zero_basis`)."""


def zero_basis(rows: int, dim: int, dtype=np.float64) -> np.ndarray:
    """A zero [rows, dim] array for a Lanczos basis, its memory taken a row at a time
    as the rows are written.

    From SMALL_PAGES_FROM_BYTES on it is an anonymous memory map in the OS's small
    pages: NumPy's own large arrays are advised into huge pages, and where the kernel
    then compacts memory for each new huge page (transparent huge pages on `madvise`,
    the default of many distributions), writing a new 56 MB row (DenseNet-121's
    6,964,106 parameters in float64) took 0.135 s against 0.025 s in small pages,
    with the reorthogonalisation's reads of the basis as fast (ad hoc, this
    machine). Each Lanczos step writes one new row.

    The map is private, as NumPy's own memory: a shared anonymous map (mmap's
    default) is the OS's shared memory, whose pages cost more to take. Writing a new
    row of 7,000,000 float64 took 23.5 ms against 34 ms shared (eight rows each, ad
    hoc, this machine; 4.3 ms once its pages are taken). Huge pages are refused
    for it, also where the OS would give them unasked.

    Its rows start at multiples of ROW_ALIGNMENT_BYTES (the map at a page), each
    padded to that length where its entries are not (the array is then not
    C-contiguous; each row is, and NumPy's BLAS takes the rows' stride as they are).
    A smaller basis is NumPy's memory, laid out the same way."""
    dtype = np.dtype(dtype)
    size = rows * dim * dtype.itemsize
    stride = _padded_width(dim, dtype) * dtype.itemsize
    refused = BasisMemoryError(  # told as NumPy tells its own, with what was asked
        f"a Lanczos basis of {rows:,} × {dim:,} {dtype.name} entries, "
        f"{rows * stride / 2**30:.3g} GiB")
    if size < SMALL_PAGES_FROM_BYTES or not hasattr(mmap, "MAP_PRIVATE"):
        # (No such maps on Windows: NumPy's memory there too.)
        try:
            return aligned_array(rows, dim, dtype, padded=True)
        except MemoryError as error:
            raise refused from error
    try:
        memory = mmap.mmap(-1, rows * stride, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as error:  # the OS refuses the map
        if error.errno != errno.ENOMEM:
            raise
        raise refused from error
    try:
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    except (AttributeError, OSError):  # no such advice on this OS: its pages as they come
        pass
    return np.ndarray((rows, dim), dtype=dtype, buffer=memory, strides=(stride, dtype.itemsize))


def aligned_array(rows: int, dim: int, dtype=np.float64, *, padded: bool = False) -> np.ndarray:
    """A zero [rows, dim] array of NumPy's memory that starts at a multiple of
    ROW_ALIGNMENT_BYTES, C-contiguous; or, `padded`, each of whose rows starts at one
    (the rows padded, the array then not C-contiguous)."""
    dtype = np.dtype(dtype)
    width = _padded_width(dim, dtype) if padded else dim
    flat = np.zeros(rows * width + ROW_ALIGNMENT_BYTES // dtype.itemsize, dtype)
    start = (-flat.ctypes.data % ROW_ALIGNMENT_BYTES) // dtype.itemsize
    return flat[start:start + rows * width].reshape(rows, width)[:, :dim]


def _padded_width(dim: int, dtype: np.dtype) -> int:
    """Entries per row of `dtype` when rows of `dim` start ROW_ALIGNMENT_BYTES apart."""
    per = ROW_ALIGNMENT_BYTES // dtype.itemsize
    return -(-dim // per) * per


class LanczosState(NamedTuple):
    """State between Lanczos steps. The arrays are buffers updated in place.

    Attributes:
      basis: [lanczos_steps, dim] orthonormal Lanczos vectors; rows at and past
        `num_steps + 1` are zero (row `num_steps` is the next vector to multiply).
      alphas: [lanczos_steps] diagonal of T; entries past `num_steps` are zero.
      betas: [lanczos_steps] `betas[k]` is the norm of the residual after step k,
        i.e. the coupling between vectors k and k+1; `betas[num_steps - 1]` is the
        residual norm of the whole factorisation.
      num_steps: number of completed steps.
      exhausted: True when the Krylov space was exhausted (breakdown): no more
        steps are possible and T holds exact eigenvalues.
    """

    basis: np.ndarray
    alphas: np.ndarray
    betas: np.ndarray
    num_steps: int
    exhausted: bool


class LanczosResult(NamedTuple):
    """A finished tridiagonalisation A Qᵀ = Qᵀ T + β e_mᵀ ⊗ r.

    Attributes:
      alphas: [num_steps] diagonal of T.
      betas: [num_steps - 1] off-diagonal of T.
      residual_norm: norm of the residual after the last step (β_m).
      basis: [num_steps, dim] Lanczos vectors (rows), or None if not kept.
      exhausted: True when Lanczos stopped early on an exhausted Krylov space.
    """

    alphas: np.ndarray
    betas: np.ndarray
    residual_norm: float
    basis: Optional[np.ndarray]
    exhausted: bool


def lanczos_init(
    start_vector: np.ndarray,
    lanczos_steps: int,
    *,
    basis_dtype=np.float64,
    basis: Optional[np.ndarray] = None,
) -> LanczosState:
    """Returns the state before the first step, from any non-zero start vector.

    basis: optionally, the zero [lanczos_steps, dim] array of `basis_dtype` that is to
    hold the basis (as `zero_basis` makes it); the start vector may be its first row,
    which is then normalised in place (no vector-sized temporary: each is a pass over
    fresh memory, 188 MB at ResNet50-V2's 23.5M parameters)."""
    if lanczos_steps < 1:
        raise ValueError(
            f"lanczos_steps={lanczos_steps}: Lanczos needs at least one step; "
            "pass lanczos_steps >= 1."
        )
    dim = np.size(start_vector)
    if basis is None:
        basis = zero_basis(lanczos_steps, dim, basis_dtype)
    elif basis.shape != (lanczos_steps, dim) or basis.dtype != np.dtype(basis_dtype):
        raise ValueError(
            f"basis of shape {basis.shape} and dtype {basis.dtype}: the basis of "
            f"{lanczos_steps} steps of {dim} {np.dtype(basis_dtype)} entries is "
            f"[{lanczos_steps}, {dim}] {np.dtype(basis_dtype)}; pass zero_basis(...)."
        )
    if basis.dtype == np.float64:
        first_vector(start_vector, out=basis[0])
    else:
        basis[0] = first_vector(start_vector)
    return LanczosState(
        basis=basis,
        alphas=np.zeros(lanczos_steps),
        betas=np.zeros(lanczos_steps),
        num_steps=0,
        exhausted=False,
    )


def sample_state(rows: int, dim: int, basis_dtype, rng) -> tuple[LanczosState, np.ndarray]:
    """A state of `rows` random unit basis rows and a product orthogonal to all of them,
    for timing `lanczos_step` (`spectrum.algebra_seconds`, benchmarks/algebra.py): as
    after a Hessian step's three-term recurrence (the βs are 0), a step given this
    product runs one reorthogonalisation pass that removes rounding only. (A random
    product keeps ~k/dim of its norm² in the span of k random rows: near the float32
    subtraction's threshold at small dim, which real steps never are.)"""
    state = lanczos_init(rng.standard_normal(dim), rows, basis_dtype=basis_dtype)
    for row in range(1, rows):
        vector = rng.standard_normal(dim)
        state.basis[row] = vector / np.linalg.norm(vector)
    product = rng.standard_normal(dim)
    for row in state.basis:
        row = row.astype(np.float64)
        product -= (row @ product) / (row @ row) * row
    return state, product


def first_vector(start_vector: np.ndarray, basis_dtype=None,
                 out: Optional[np.ndarray] = None) -> np.ndarray:
    """The first Lanczos vector [dim] float64 of a finite, non-zero start vector: the
    start vector normalised, rounded to `basis_dtype` if given (as the basis holds it,
    so that `current_vector` of a new state returns it). Written into `out` (a
    float64 [dim] array, which may be `start_vector` itself) if given, else a new
    array; the same numbers either way."""
    start_vector = np.asarray(start_vector, dtype=np.float64).reshape(-1)
    if out is not None and out.dtype != np.float64:
        raise ValueError(
            f"out has dtype {out.dtype}: first_vector writes the float64 vector; pass a "
            "float64 array (a float32 basis row takes its rounding by assignment)."
        )
    norm = np.linalg.norm(start_vector)
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError(
            f"start_vector has norm {norm}: Lanczos needs a finite, non-zero start "
            "vector."
        )
    first = np.divide(start_vector, norm, out=out)
    if basis_dtype is not None and np.dtype(basis_dtype) != np.float64:
        first[...] = first.astype(basis_dtype)
    return first


def current_vector(state: LanczosState) -> np.ndarray:
    """The float64 vector whose product `lanczos_step` expects next. [dim]"""
    return state.basis[state.num_steps].astype(np.float64)


def current_vectors(states) -> np.ndarray:
    """The vectors whose products the `states` expect next, [len(states), dim] float64,
    for one block product: one float64 state's is a read-only view of its basis row,
    others are copied once into one new array (converted from a float32 basis). Each
    copy of a vector is a pass over memory as long as a step's three-term recurrence;
    on DenseNet-121's 6,964,106 parameters the two copies this replaced (a row's
    float64 copy, then `np.stack`) took about 15 ms of a step. Either starts at a
    multiple of ROW_ALIGNMENT_BYTES, as a product reads it in place (`zero_basis`)."""
    states = list(states)
    if len(states) == 1 and states[0].basis.dtype == np.float64:
        view = states[0].basis[states[0].num_steps][np.newaxis]
        view.flags.writeable = False
        return view
    vectors = aligned_array(len(states), states[0].basis.shape[1])
    for row, state in enumerate(states):
        vectors[row] = state.basis[state.num_steps]
    return vectors


def next_row(state: LanczosState) -> Optional[np.ndarray]:
    """The basis row that the state's next `lanczos_step` writes (zero until then), or
    None where that step writes none (its last, or a finished state)."""
    if state.exhausted or state.num_steps + 1 >= state.basis.shape[0]:
        return None
    return state.basis[state.num_steps + 1]


def is_finished(state: LanczosState) -> bool:
    return state.exhausted or state.num_steps >= state.alphas.size


def lanczos_step(
    state: LanczosState,
    product: np.ndarray,
    *,
    breakdown_tolerance: float = DEFAULT_BREAKDOWN_TOLERANCE,
) -> LanczosState:
    """Advances Lanczos by one step, given `product = A @ current_vector(state)`.

    Full reorthogonalisation (classical Gram-Schmidt against the whole basis,
    repeated when the DGKS test asks) keeps the basis orthogonal to machine
    precision, so no spurious copies of converged Ritz values appear.
    """
    if is_finished(state):
        raise ValueError(
            f"Lanczos is finished after {state.num_steps} steps; no further step is "
            "possible."
        )
    k = state.num_steps
    basis, alphas, betas = state.basis, state.alphas, state.betas
    q = basis[k].astype(np.float64, copy=False)
    w = np.asarray(product, dtype=np.float64).reshape(-1)
    if w.shape != q.shape:
        raise ValueError(
            f"product has shape {w.shape}, but the Lanczos vectors have shape "
            f"{q.shape}: matvec must return a vector of the operator's dimension."
        )
    # Local orthogonalisation (the three-term recurrence), then one classical
    # Gram-Schmidt pass against the whole basis, and a second pass only when the
    # first removed a large part of the vector (the DGKS test, as in ARPACK): "twice
    # is enough", and once is enough when nothing cancels. Each pass reads the whole
    # basis twice, which dominates the cost of a step on small models.
    alpha = float(q @ w)
    # The next vector is made where the basis keeps it (a float64 basis with a row
    # left): no vector-sized temporary is taken from the OS and given back each step
    # (its pages cost as much as the recurrence's own pass on ResNet-sized models).
    if basis.dtype == np.float64 and k + 1 < alphas.size:
        out = basis[k + 1]
    else:
        out = np.empty(w.size)
    w = _recurrence(w, alpha, q, betas[k - 1] if k > 0 else 0.0,
                    basis[k - 1] if k > 0 else None, out)
    active = basis[: k + 1]
    norm = float(np.linalg.norm(w))
    for _ in range(2):
        coefficients = _project(active, w)
        _subtract(active, coefficients, w)
        alpha += float(coefficients[k])
        previous, norm = norm, float(np.linalg.norm(w))
        if norm > REORTHOGONALIZATION_THRESHOLD * previous:
            break
    beta = norm
    alphas[k] = alpha
    betas[k] = beta
    scale = max(np.max(np.abs(alphas[: k + 1])), np.max(betas[: k + 1]))
    exhausted = beta <= breakdown_tolerance * scale
    if k + 1 < alphas.size:
        if exhausted:
            basis[k + 1] = 0.0  # rows past the last vector stay zero
        else:
            np.divide(w, beta, out=basis[k + 1], casting="same_kind")
    return state._replace(num_steps=k + 1, exhausted=bool(exhausted))


# Element-wise updates of w run a block of this many entries at a time, so that their
# temporaries stay in the core's cache instead of a new vector each (page faults on
# ResNet-sized models).
_ELEMENTWISE_BLOCK = 1 << 16


def _recurrence(w: np.ndarray, alpha: float, q: np.ndarray, beta: float,
                previous: Optional[np.ndarray], out: np.ndarray) -> np.ndarray:
    """w - alpha q - beta previous (the three-term recurrence; no `previous` at the
    first step), written into `out` (float64, not one of the others) in one pass over
    the three vectors, a block at a time: the same numbers as
    `(w - alpha * q) - beta * previous` under NumPy 2's promotion (a float32 row is
    scaled in float64), without that expression's vector-sized temporaries (three
    more passes over memory). Returns `out`."""
    for start in range(0, w.size, _ELEMENTWISE_BLOCK):
        block = slice(start, start + _ELEMENTWISE_BLOCK)
        part = out[block]
        np.multiply(q[block], -alpha, out=part, dtype=np.float64)
        part += w[block]
        if previous is not None:
            part -= beta * previous[block].astype(np.float64, copy=False)
    return out


# A float32 basis is projected in float64 a block of columns at a time (the block
# converted to float64 stays in the core's cache): NumPy would otherwise copy the
# whole active basis to float64 (twice the float32 basis), and blocks of whole rows
# shrink to one row, i.e. one pass over w per basis vector, once rows pass 1 MiB.
_CONVERSION_BYTES = 1 << 20


def _columns_per_block(active: np.ndarray) -> int:
    return max(1, _CONVERSION_BYTES // (8 * max(1, active.shape[0])))


def _column_blocks(basis: np.ndarray):
    """Slices of `basis`'s columns, each to be converted to float64 where it is used:
    a converted block is freed before the next is made (a generator yielding the
    converted blocks kept two alive, out of cache: +0.2-0.4 ms a step on the MLP)."""
    columns = _columns_per_block(basis)
    for start in range(0, basis.shape[1], columns):
        yield slice(start, start + columns)


def _project(active: np.ndarray, w: np.ndarray) -> np.ndarray:
    """active @ w in float64 (summed in float64 for a float32 basis too: these are
    the coefficients the reorthogonalisation removes)."""
    if active.dtype == np.float64:
        return active @ w
    coefficients = np.zeros(active.shape[0])
    for columns in _column_blocks(active):
        coefficients += active[:, columns].astype(np.float64) @ w[columns]
    return coefficients


def _subtract(active: np.ndarray, coefficients: np.ndarray, w: np.ndarray) -> None:
    """w -= active.T @ coefficients, in place, with no copy of the basis.

    A float32 basis of k rows subtracts in float32 BLAS when the part removed is
    small against what remains (2·k·‖c‖² ≤ ‖w‖², so √k·‖c‖ ≤ ‖w − Qᵀc‖, since
    ‖w − Qᵀc‖² = ‖w‖² − ‖c‖²): a float32 sum of k terms rounds by about
    √k·u32·‖c‖, no more than storing the next Lanczos vector in the float32 basis
    rounds it (u32·‖w − Qᵀc‖). After the three-term recurrence this is every step:
    c is what the float32 basis's own rounding left, O(u32·‖A‖). A larger removal
    (the cancellation that also makes the DGKS test ask for a second pass) is
    summed in float64, a block of columns at a time.
    """
    if active.dtype == np.float64:
        # A block of columns at a time: the removed part stays in the cache instead of
        # a temporary vector written and read again.
        for start in range(0, w.size, _ELEMENTWISE_BLOCK):
            columns = slice(start, start + _ELEMENTWISE_BLOCK)
            w[columns] -= active[:, columns].T @ coefficients
        return
    if 2 * active.shape[0] * float(coefficients @ coefficients) <= float(w @ w):
        w -= active.T @ coefficients.astype(np.float32)
        return
    for columns in _column_blocks(active):
        w[columns] -= active[:, columns].astype(np.float64).T @ coefficients


def lanczos_orthogonality_loss(state: LanczosState) -> float:
    """max |Q Qᵀ − I| over the completed Lanczos vectors, in float64 (a float32
    product would measure its own rounding, ~1e-7, rather than the basis); a float32
    basis is converted a block of columns at a time."""
    basis = state.basis[: state.num_steps]
    if basis.dtype == np.float64:
        gram = basis @ basis.T
    else:
        gram = np.zeros((basis.shape[0],) * 2)
        for columns in _column_blocks(basis):
            block = basis[:, columns].astype(np.float64)
            gram += block @ block.T
    return float(np.max(np.abs(gram - np.eye(state.num_steps))))


def lanczos_result(state: LanczosState, *, keep_basis: bool = False) -> LanczosResult:
    """Packs the completed steps of `state` into a LanczosResult."""
    m = state.num_steps
    if m == 0:
        raise ValueError("Lanczos has completed no step yet; there is no result.")
    return LanczosResult(
        alphas=state.alphas[:m].copy(),
        betas=state.betas[: m - 1].copy(),
        residual_norm=float(state.betas[m - 1]),
        basis=state.basis[:m].copy() if keep_basis else None,
        exhausted=state.exhausted,
    )


def lanczos(
    matvec: Callable[[np.ndarray], np.ndarray],
    start_vector: np.ndarray,
    lanczos_steps: int,
    *,
    keep_basis: bool = False,
    basis_dtype=np.float64,
    breakdown_tolerance: float = DEFAULT_BREAKDOWN_TOLERANCE,
    callback: Optional[Callable[[LanczosState], None]] = None,
) -> LanczosResult:
    """Runs up to `lanczos_steps` steps of Lanczos on a symmetric operator.

    Args:
      matvec: maps a float64 vector [dim] to the operator's product [dim].
      start_vector: [dim] any non-zero vector; it is normalised.
      lanczos_steps: the Lanczos order m; fewer steps run if the Krylov space is
        exhausted first (then T's eigenvalues are exact).
      keep_basis: return the Lanczos vectors (needed for Ritz vectors).
      basis_dtype: storage type of the basis (float64, or float32 to halve it).
      breakdown_tolerance: relative size of β that counts as breakdown.
      callback: called with the state after every step (progress, checkpoints).

    Returns:
      A LanczosResult with at most `lanczos_steps` steps.
    """
    state = lanczos_init(start_vector, lanczos_steps, basis_dtype=basis_dtype)
    while not is_finished(state):
        product = matvec(current_vector(state))
        state = lanczos_step(state, product, breakdown_tolerance=breakdown_tolerance)
        if callback is not None:
            callback(state)
    result = lanczos_result(state)
    # The state is this function's alone: its basis's rows, not a copy of them (a copy
    # doubled the peak memory of a kept basis, --gradient_overlap's).
    return result._replace(basis=state.basis[:state.num_steps]) if keep_basis else result
