"""Stochastic Lanczos quadrature of an operator: draws, nodes, weights, density."""

from __future__ import annotations

import contextlib
import inspect
import mmap
import threading
import time
from typing import Callable, NamedTuple, Optional

import numpy as np
import threadpoolctl

from hessian_tf import host, linalg
from hessian_tf.operators.hessian import NonFiniteError


class Progress(NamedTuple):
    """What a progress callback receives after every Lanczos step."""

    draw: int  # the first draw of the lockstep group
    num_draws: int
    step: int  # completed steps in this draw (the group's first)
    lanczos_steps: int
    alpha: float
    beta: float
    seconds: float  # since the start of the computation
    seconds_left: float  # estimate
    exhausted: bool
    group_size: int = 1  # draws advanced together (lockstep)
    session_products: int = 0  # products since this computation started (not resumed ones)
    # The session's first step: its wall time (tracing included, or next to nothing where
    # its products were taken from --method=auto's timing) and its products.
    first_step_seconds: float = float("nan")
    first_step_products: int = 0

    @property
    def seconds_per_product(self) -> float:
        """Mean wall time of a product (and its share of the algebra) after the
        session's first step; NaN until a later step."""
        later = self.session_products - self.first_step_products
        return (self.seconds - self.first_step_seconds) / later if later > 0 else float("nan")


class Spectrum(NamedTuple):
    """An SLQ spectrum. Rows are draws; a draw that stopped early (exhausted Krylov
    space) is padded with zeros past `num_steps[d]` (zero weight, zero β).

    Attributes:
      alphas: [num_draws, m]; betas: [num_draws, m - 1]; nodes, weights,
      ritz_residuals: [num_draws, m]; num_steps: [num_draws];
      residual_norms: [num_draws] β after the last step; exhausted: [num_draws];
      orthogonality_loss: max over draws of max |Q Qᵀ − I|;
      density: the smoothed density; statistics: SpectrumStatistics;
      num_products: the Lanczos steps' products (a determinism check's returned
        product is the first; its other runs are not counted); seconds;
      seconds_per_step: wall time of a Lanczos step (one block of products and the
        algebra) after the first, which includes tracing; NaN after one step.
    """

    alphas: np.ndarray
    betas: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    ritz_residuals: np.ndarray
    num_steps: np.ndarray
    residual_norms: np.ndarray
    exhausted: np.ndarray
    orthogonality_loss: float
    density: linalg.Density
    statistics: linalg.SpectrumStatistics
    num_products: int
    seconds: float
    seconds_per_step: float = float("nan")


def start_vector(dim: int, seed: int, draw: int,
                 out: Optional[np.ndarray] = None) -> np.ndarray:
    """v ~ N(0, I/dim) for one draw; depends only on (seed, draw). Drawn into `out` (a
    float64 [dim] array) if given, else a new array; the same numbers either way."""
    vector = np.random.default_rng([seed, draw]).standard_normal(dim, out=out)
    vector /= np.sqrt(dim)
    return vector


def new_state(dim: int, *, lanczos_steps: int, num_draws: int, seed: int, lockstep: int,
              basis_dtype=np.float64) -> SLQState:
    """A new run's state before its first step, to pass as `stochastic_lanczos_quadrature`'s
    `initial_state` (with these arguments): its first lockstep group's Lanczos states,
    each start vector drawn and normalised in the first row of its basis, on one BLAS
    thread as the run normalises. The run then multiplies `first_block(state)` first
    and does not draw the vectors again: drawn twice, they took 1.2 s each time at
    InceptionResNet-V2's 54.3M parameters (cProfile, ad hoc)."""
    with _one_blas_thread():
        group = _new_group(dim, seed, 0, group_size(num_draws, lockstep), num_draws,
                           lanczos_steps, basis_dtype)
    return SLQState(draw=0, lanczos=group, completed=(), num_products=0)


def first_block(state: SLQState) -> np.ndarray:
    """The vectors [k, dim] float64 that a run from `new_state`'s `state` multiplies
    first (through its `first_product`), bit for bit: a read-only view of the basis
    row for one draw of a float64 basis, else a copy."""
    return linalg.current_vectors(state.lanczos)


def _new_group(dim: int, seed: int, draw: int, size: int, num_draws: int,
               lanczos_steps: int, basis_dtype) -> tuple:
    """The Lanczos states, before their first step, of the lockstep group of at most
    `size` draws that starts at `draw` (of `num_draws`)."""
    return tuple(_initial_state(dim, seed, d, lanczos_steps, basis_dtype)
                 for d in range(draw, min(draw + size, num_draws)))


def _initial_state(dim: int, seed: int, draw: int, lanczos_steps: int,
                   basis_dtype) -> linalg.LanczosState:
    """A draw's Lanczos state before its first step, its start vector drawn into the
    first row of a float64 basis (no vector-sized temporary)."""
    basis = linalg.zero_basis(lanczos_steps, dim, basis_dtype)
    row = basis[0] if basis.dtype == np.float64 else None
    return linalg.lanczos_init(start_vector(dim, seed, draw, out=row), lanczos_steps,
                               basis_dtype=basis_dtype, basis=basis)


def _takes_out(function) -> bool:
    """Whether `function` takes an `out` keyword argument."""
    try:
        return "out" in inspect.signature(function).parameters
    except (TypeError, ValueError):  # no signature (a builtin)
        return False


def _one_blas_thread():
    """The host's BLAS on one thread, as SLQ runs (but see `_step_threads`): the
    reorthogonalisation of small models is small BLAS work between large products;
    with more than one BLAS thread it stalled whenever another process held a core
    (measured on the digits MLP: 2 ms → 45 ms per step on 2 cores)."""
    return threadpoolctl.threadpool_limits(limits=1, user_api="blas")


# A Lanczos step whose active basis (the rows its reorthogonalisation reads, twice) is
# this large runs its BLAS on more threads (`_step_threads`).
THREADED_STEPS_FROM_BYTES = 64 << 20

_BLAS = []  # the host's BLAS libraries (threadpoolctl's controller), found once


def _large_step_threads(limits) -> int:
    """The BLAS threads for a run's large steps: as many as its BLAS had before the run
    limited it to one (so OMP_NUM_THREADS, OPENBLAS_NUM_THREADS or a caller's own
    limit still hold), at most the process's usable cores."""
    before = [threads for threads in limits.get_original_num_threads().values() if threads]
    return max(1, min([host.usable_cores(), *before]))


def _step_threads(state: linalg.LanczosState, threads: int):
    """The BLAS threads for `state`'s next Lanczos step: `threads` (`_large_step_threads`)
    where its active basis is from THREADED_STEPS_FROM_BYTES on, else the run's one.
    Such a step reads gigabytes, with the device (or the CPU's TensorFlow threads)
    idle between products; a one-thread pass does not fill the memory's bandwidth.
    `lanczos_step` alone on 2 cores, float64 (ad hoc, best of 3, one thread against
    two): 7M entries, 45 rows 251 against 152 ms, 89 rows 487 against 353 ms; 2M
    entries, 45 rows 85 against 63 ms; 466,906 entries, 89 rows 42 against 28 ms
    (measured on 2 cores only). Decided per state, so a lockstep group's steps run as
    a single draw's would (the same numbers); the thread count rounds the projections
    its own way, so a run resumed where it differs continues within rounding of the
    run it resumes, not bit for bit."""
    active = (state.num_steps + 1) * state.basis.shape[1] * state.basis.itemsize
    if threads < 2 or active < THREADED_STEPS_FROM_BYTES:
        return contextlib.nullcontext()
    if not _BLAS:
        _BLAS.append(threadpoolctl.ThreadpoolController())
    return _BLAS[0].limit(limits=threads, user_api="blas")


# Basis rows from this size on have their memory pages taken while the product runs
# (`_rows_paged`); below it a thread's start costs more than the pages.
PAGED_ROWS_FROM_BYTES = 4 << 20


@contextlib.contextmanager
def _rows_paged(states):
    """While the product runs: the memory pages of the basis rows that the states' next
    Lanczos steps write, taken from the OS by a thread of their own. A row's pages
    are taken when the row is first written; on ResNet50-V2's 23.5M parameters that
    took the three-term recurrence from about 40 ms to 93-525 ms per step (the OS's
    time, growing as a process takes more memory; ad hoc, this machine's VM). The
    product's ops release Python's lock and rarely hold both cores (ResNet50-V2's
    about 1.8 of 2), so the pages come nearly free there. The rows are zero, as
    before: one zero is written per page, and the thread is joined before the step
    writes the row."""
    rows = [row for row in map(linalg.next_row, states)
            if row is not None and row.nbytes >= PAGED_ROWS_FROM_BYTES]
    if not rows:
        yield
        return
    thread = threading.Thread(target=_take_pages, args=(rows,), name="hessian_tf basis pages")
    thread.start()
    try:
        yield
    finally:
        thread.join()


def _take_pages(rows) -> None:
    for row in rows:
        row[:: max(1, mmap.PAGESIZE // row.itemsize)] = 0
        row[-1] = 0


class SLQState(NamedTuple):
    """Everything needed to continue an SLQ run: what a checkpoint holds.

    Attributes:
      draw: the first draw of the lockstep group in progress (== num_draws when
        all are done).
      lanczos: the Lanczos states of the group's draws (a tuple), or None before
        the group's first step.
      completed: per finished draw, (LanczosResult, orthogonality loss).
      num_products: products used so far (all sessions).
    """

    draw: int
    lanczos: Optional[tuple]
    completed: tuple
    num_products: int


def stochastic_lanczos_quadrature(
    matvec: Callable[[np.ndarray], np.ndarray],
    dim: int,
    *,
    lanczos_steps: int = 90,
    num_draws: int = 1,
    seed: int = 0,
    kernel_width: Optional[float] = None,
    num_grid_points: int = linalg.density.DEFAULT_NUM_GRID_POINTS,
    first_product: Optional[Callable[[np.ndarray], np.ndarray]] = None,
    progress: Optional[Callable[[Progress], None]] = None,
    basis_dtype=np.float64,
    initial_state: Optional[SLQState] = None,
    after_step: Optional[Callable[[SLQState], None]] = None,
    matmat: Optional[Callable[[np.ndarray], np.ndarray]] = None,
    lockstep: int = 1,
) -> Spectrum:
    """Runs `num_draws` Lanczos draws of `lanczos_steps` steps and smooths them.

    Args:
      matvec: float64 [dim] → [dim], a symmetric operator. The vectors it, matmat
        and first_product are given may be read-only views of the Lanczos basis.
      dim: its dimension.
      first_product: used instead of the product for the very first block (e.g.
        a determinism check that computes it twice); takes and returns [k, dim].
      matmat: the products of a block [k, dim] → [k, dim] at once (one data pass
        for k draws); default: `matvec` row by row. A matmat with an `out` keyword
        (`HessianOperator.matmat`) is given the same array at every step to write
        the products into, instead of a new one each time.
      lockstep: advance up to this many draws together, one block of products per
        step. The draws are split into as few groups as lockstep allows, all of one
        size but the last (8 draws at lockstep 6: 4 and 4; 10 at lockstep 4: 4, 4
        and 2), so at most two block sizes are traced (more only when draws exhaust
        their Krylov space and leave a block). Results do not depend on it beyond
        rounding.
      progress: called after every step with a Progress.
      initial_state: continue from this state (a restored checkpoint); start
        vectors depend only on (seed, draw), so a resumed run equals an
        uninterrupted one. Or `new_state`'s, whose start vectors are drawn.
      after_step: called with the SLQState after every step (checkpointing,
        preemption); it may raise to stop the run.
    """
    if lanczos_steps < 1:
        raise ValueError(f"--lanczos_steps={lanczos_steps}: pass at least 1 (the paper uses 90).")
    if num_draws < 1:
        raise ValueError(f"--num_draws={num_draws}: pass at least 1.")
    if lockstep < 1:
        raise ValueError(f"--lockstep_draws={lockstep}: pass at least 1.")
    if matmat is None:
        matmat = lambda vectors: np.stack([matvec(v) for v in vectors])  # noqa: E731
    with _one_blas_thread() as limits:
        return _slq(
            dim, lanczos_steps=lanczos_steps, num_draws=num_draws, seed=seed,
            kernel_width=kernel_width, num_grid_points=num_grid_points,
            first_product=first_product, progress=progress, basis_dtype=basis_dtype,
            state=initial_state or SLQState(draw=0, lanczos=None, completed=(), num_products=0),
            after_step=after_step, matmat=matmat, lockstep=lockstep,
            step_threads=_large_step_threads(limits),
        )


# The most draws run in lockstep by default (the binary and the Keras callback):
# each one adds a whole Lanczos basis on the host and a vector per product block.
MAX_LOCKSTEP_DRAWS = 8


def host_memory_bytes() -> int:
    """The memory this process may use: the host's physical memory (8 GiB when the
    system does not say), or its cgroup's limit where lower (a container's, a
    Kubernetes pod's, a Slurm job's: `host.cgroup_memory_limit`)."""
    return host.memory_bytes()


def lockstep_group(num_draws: int, lanczos_steps: int, dim: int, *, lockstep: int = 0,
                   basis_bytes_per_entry: int = 8) -> int:
    """Draws per lockstep group: groups of at most `lockstep` draws, or, for
    lockstep=0, of at most MAX_LOCKSTEP_DRAWS whose Lanczos bases together fit in a
    quarter of the host's memory."""
    if lockstep:
        return group_size(num_draws, lockstep)
    per_draw = lanczos_steps * dim * basis_bytes_per_entry
    fits = max(1, min(MAX_LOCKSTEP_DRAWS, host_memory_bytes() // 4 // max(1, per_draw)))
    return group_size(num_draws, fits)


def basis_memory_refusal(bases: int, lanczos_steps: int, dim: int, basis_dtype=np.float64, *,
                         flag: str, steps_flag: str, float32_flag: str = "",
                         one_basis_flag: str = "", ritz_vectors: int = 0,
                         ritz_flag: str = "") -> str:
    """Why `bases` Lanczos bases of `lanczos_steps` rows of `dim` entries of
    `basis_dtype` cannot run here, or "": together they exceed the memory here
    (`host_memory_bytes`: the host's, or its cgroup's limit). The bases are taken a row at a time, so such a run would start, then fail
    or be killed by the OS steps later. The line names `flag` and the ways out that
    suffice: at most so many steps (`steps_flag`, the flag's name), and where given
    and enough alone, a float32 basis (`float32_flag`) or one basis at a time
    (`one_basis_flag`). `ritz_vectors`: the top eigenvectors asked of one basis, of
    which at most its steps are made, each a row more (`ritz_flag`: the flag that asks
    for them)."""
    dtype = np.dtype(basis_dtype)
    row = dim * dtype.itemsize
    ritz = min(ritz_vectors, lanczos_steps)
    need = bases * (lanczos_steps + ritz) * row
    have = host_memory_bytes()
    if need <= have:
        return ""
    rows = have // (bases * row)  # rows that fit, basis and Ritz vectors together
    # The most steps m with m + min(ritz_vectors, m) rows.
    fitting = rows - ritz_vectors if rows - ritz_vectors >= ritz_vectors else (
        rows // 2 if ritz_vectors else rows)
    if fitting < 1:
        ways = [f"a model with fewer parameters: one step's row of {dim:,} entries "
                "does not fit"]
    elif lanczos_steps > dim and fitting >= dim:
        ways = [f"{steps_flag}={dim} (more steps than the {dim:,} parameters add nothing: "
                "Lanczos ends after at most that many)"]
    else:
        ways = [f"at most {steps_flag}={fitting}"]  # a value to pass: no separators
    if ritz_flag and ritz and rows > lanczos_steps:
        ways.append(f"at most {ritz_flag}={rows - lanczos_steps}")
    if float32_flag and dtype.itemsize > 4 and need // 2 <= have:
        ways.append(f"{float32_flag} (half the memory)")
    if one_basis_flag and bases > 1 and need // bases <= have:
        ways.append(f"{one_basis_flag} (one basis at a time)")
    told = ways[0] if len(ways) == 1 else ", ".join(ways[:-1]) + " or " + ways[-1]
    plural = bases > 1 or ritz > 0
    return (
        f"{flag}: {'the Lanczos basis' if bases == 1 else f'{bases} Lanczos bases'} "
        f"({lanczos_steps:,} steps × {dim:,} {dtype.name} entries{' each' * (bases > 1)})"
        + (f" and its {ritz:,} Ritz vectors" if ritz else "")
        + f" {'need' if plural else 'needs'} {need / 2**30:.3g} GiB, more than the memory "
        f"here ({have / 2**30:.3g} GiB: the host's, or its cgroup's limit); pass {told}."
    )


def lanczos_block_products(num_draws: int, lanczos_steps: int, group: int) -> int:
    """Products of blocks of `group` vectors in one run: the Lanczos steps of each
    lockstep group of draws."""
    return -(-num_draws // group) * lanczos_steps


# algebra_seconds times its steps on a sample basis of this many rows and entries per row
# (64 MiB in float64): out of the caches, as a model's basis is.
ALGEBRA_SAMPLE_ROWS = 8
ALGEBRA_SAMPLE_ENTRIES = 1 << 20


def algebra_seconds(dim: int, lanczos_steps: int, num_draws: int, basis_dtype=np.float64,
                    *, repeats: int = 3) -> float:
    """An estimate of a run's Lanczos algebra on this host: what its steps cost beside
    the products, from `lanczos_step` timed here on a sample basis.

    A step k reads the vector a few times and the k + 1 basis rows twice (full
    reorthogonalisation), so it costs about (a + b (k + 1)) · dim; a and b come from
    two timed steps of the sample, at k = 1 and at its last row (the best of
    `repeats`, on one BLAS thread, as the run's small steps; a run's steps from
    THREADED_STEPS_FROM_BYTES on use more threads, 0.6-0.75 of this time on 2 cores, so
    the estimate is high for large models' later steps). The run's m steps then cost
    dim · (m a + b m (m + 1) / 2) per draw. Measured against whole runs of
    `lanczos_step` (ad hoc, this machine, one BLAS thread): DenseNet-121's 6,964,106
    float64 entries, 90 steps, took 39.5 s (twice; a quarter of the run for 128 images)
    against estimates of 36.6-39.5 s; a float32 basis 43.5 s against 27-38 s; 1,313,602
    entries, 20 steps, 0.6 s against 0.48-0.53 s; the digits MLP's 16,510, 90 steps,
    0.1 s against 0.025 s (its sample basis stays in the caches). Not an upper bound: a
    step that the DGKS test repeats costs more.
    """
    rows = max(4, min(ALGEBRA_SAMPLE_ROWS, lanczos_steps))
    entries = max(1, min(ALGEBRA_SAMPLE_ENTRIES, dim))
    state, product = linalg.sample_state(rows, entries, basis_dtype, np.random.default_rng(0))

    def best(step: int) -> float:
        # Each call writes row step + 1 (≈ the product's direction) and the recurrence's
        # α, β: put them back, or a later timed step would find the product in its basis
        # and run the DGKS test's second pass.
        saved = (state.basis[step + 1].copy(), state.alphas.copy(), state.betas.copy())
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            linalg.lanczos_step(state._replace(num_steps=step), product)
            times.append(time.perf_counter() - started)
            state.basis[step + 1], state.alphas[:], state.betas[:] = saved
        return min(times) / entries

    # Steps 1 and rows - 2 (2 and rows - 1 active rows; the next one written): step 0
    # lacks the recurrence's β term, a pass over the vector that would count as rows.
    with _one_blas_thread():
        first, last = best(1), best(rows - 2)
    per_row = max(0.0, (last - first) / (rows - 3))  # rows >= 4
    per_vector = max(0.0, first - 2 * per_row)
    steps = lanczos_steps
    return num_draws * dim * (steps * per_vector + per_row * steps * (steps + 1) / 2)


def group_size(num_draws: int, lockstep: int) -> int:
    """Draws per lockstep group: the fewest groups of at most `lockstep` draws, of
    one size but the last."""
    groups = -(-num_draws // max(1, lockstep))
    return -(-num_draws // groups)


def _slq(dim, *, lanczos_steps, num_draws, seed, kernel_width, num_grid_points,
         first_product, progress, basis_dtype, state, after_step, matmat, lockstep,
         step_threads=1):
    started = time.perf_counter()
    size = group_size(num_draws, lockstep)
    # The products' array, reused from step to step where matmat takes `out`: a new
    # one takes its pages from the OS at every step.
    reused = _takes_out(matmat)
    products_out = None
    session_products = 0
    first_step_end = None  # time after the session's first step (it includes tracing)
    first_step_products = 0
    session_steps = 0
    while state.draw < num_draws:
        draw = state.draw
        group = state.lanczos or _new_group(
            dim, seed, draw, size, num_draws, lanczos_steps, basis_dtype)
        while not all(linalg.is_finished(s) for s in group):
            # Draws whose Krylov space is exhausted leave the block.
            active = [i for i, s in enumerate(group) if not linalg.is_finished(s)]
            vectors = linalg.current_vectors(group[i] for i in active)
            use_first = first_product is not None and state.num_products == 0
            try:
                with _rows_paged(group[i] for i in active):
                    if use_first:
                        products = first_product(vectors)
                    elif reused:
                        if products_out is None or products_out.shape[0] < len(active):
                            products_out = np.empty((len(active), dim))
                        products = matmat(vectors, out=products_out[: len(active)])
                    else:
                        products = matmat(vectors)
            except NonFiniteError as error:
                members = active if error.row is None else [active[error.row]]
                steps = group[members[0]].num_steps
                raise NonFiniteError(
                    f"{draws_label(draw + i for i in members)}, Lanczos step "
                    f"{steps + 1}: {error}",
                    row=error.row,
                ) from error
            session_products += len(active)
            group = list(group)
            for row, i in enumerate(active):
                with _step_threads(group[i], step_threads):
                    group[i] = linalg.lanczos_step(group[i], products[row])
            group = tuple(group)
            state = state._replace(lanczos=group, num_products=state.num_products + len(active))
            session_steps += 1
            if first_step_end is None:
                first_step_end = time.perf_counter()
                first_step_products = session_products
            lead = group[active[0]]
            if progress is not None:
                elapsed = time.perf_counter() - started
                remaining = (num_draws - draw - len(group)) * lanczos_steps + sum(
                    0 if s.exhausted else lanczos_steps - s.num_steps for s in group
                )
                report = Progress(
                    draw=draw,
                    num_draws=num_draws,
                    step=lead.num_steps,
                    lanczos_steps=lanczos_steps,
                    alpha=float(lead.alphas[lead.num_steps - 1]),
                    beta=float(lead.betas[lead.num_steps - 1]),
                    seconds=elapsed,
                    seconds_left=float("nan"),
                    exhausted=lead.exhausted,
                    group_size=len(group),
                    session_products=session_products,
                    first_step_seconds=first_step_end - started,
                    first_step_products=first_step_products,
                )
                # After the first step, at the rate of the later ones: the first traces,
                # or took its products from the timing for free.
                rate = report.seconds_per_product
                if not np.isfinite(rate):
                    rate = elapsed / session_products
                progress(report._replace(seconds_left=rate * remaining))
            if all(linalg.is_finished(s) for s in group):
                state = SLQState(
                    draw=draw + len(group),
                    lanczos=None,
                    completed=state.completed + tuple(
                        (linalg.lanczos_result(s), linalg.lanczos_orthogonality_loss(s)) for s in group
                    ),
                    num_products=state.num_products,
                )
            if after_step is not None:
                after_step(state)
    finished = time.perf_counter()
    per_step = (
        (finished - first_step_end) / (session_steps - 1) if session_steps > 1 else float("nan")
    )
    return _assemble(
        list(state.completed),
        dim=dim,
        lanczos_steps=lanczos_steps,
        kernel_width=kernel_width,
        num_grid_points=num_grid_points,
        num_products=state.num_products,
        seconds=finished - started,
        seconds_per_step=per_step,
    )


def draws_label(draws) -> str:
    """'draw 3' or 'draws 1-8' (1-based, from 0-based indices) for messages."""
    draws = list(draws)
    if len(draws) == 1:
        return f"draw {draws[0] + 1}"
    return f"draws {draws[0] + 1}-{draws[-1] + 1}"


def _assemble(results, *, dim, lanczos_steps, kernel_width, num_grid_points, num_products, seconds,
              seconds_per_step=float("nan")):
    num_draws = len(results)
    m = max(r.alphas.size for r, _ in results)
    arrays = {name: np.zeros((num_draws, m)) for name in ("alphas", "nodes", "weights", "ritz")}
    betas = np.zeros((num_draws, max(m - 1, 0)))
    quadratures = []
    for d, (result, _) in enumerate(results):
        k = result.alphas.size
        quadrature = linalg.tridiagonal_quadrature(result.alphas, result.betas, result.residual_norm)
        quadratures.append(quadrature)
        arrays["alphas"][d, :k] = result.alphas
        betas[d, : k - 1] = result.betas
        arrays["nodes"][d, :k] = quadrature.nodes
        arrays["weights"][d, :k] = quadrature.weights
        arrays["ritz"][d, :k] = quadrature.ritz_residuals
    density = linalg.gaussian_density(
        [q.nodes for q in quadratures],
        [q.weights for q in quadratures],
        kernel_width=kernel_width,
        num_grid_points=num_grid_points,
    )
    return Spectrum(
        alphas=arrays["alphas"],
        betas=betas,
        nodes=arrays["nodes"],
        weights=arrays["weights"],
        ritz_residuals=arrays["ritz"],
        num_steps=np.array([r.alphas.size for r, _ in results]),
        residual_norms=np.array([r.residual_norm for r, _ in results]),
        exhausted=np.array([r.exhausted for r, _ in results]),
        orthogonality_loss=max(o for _, o in results),
        density=density,
        statistics=linalg.spectrum_statistics(quadratures, dim),
        num_products=num_products,
        seconds=seconds,
        seconds_per_step=seconds_per_step,
    )


def spectrum_arrays(spectrum: Spectrum) -> dict[str, np.ndarray]:
    """The arrays of `spectrum.npz` (the fixed contract), by name."""
    return {
        "alphas": spectrum.alphas,
        "betas": spectrum.betas,
        "nodes": spectrum.nodes,
        "weights": spectrum.weights,
        "ritz_residuals": spectrum.ritz_residuals,
        "num_steps": spectrum.num_steps,
        "grid": spectrum.density.grid,
        "density": spectrum.density.density,
    }


def quadratures_of(spectrum: Spectrum) -> list[linalg.Quadrature]:
    """The per-draw quadratures of a Spectrum, without the padding."""
    return [
        linalg.Quadrature(
            spectrum.nodes[d, :k], spectrum.weights[d, :k], spectrum.ritz_residuals[d, :k]
        )
        for d, k in enumerate(spectrum.num_steps)
    ]
