"""SLQ driver diagnostics."""

import functools
import mmap
import sys
import threading
import time

import numpy as np
import pytest

from hessian_tf import linalg
from hessian_tf import spectrum as spectrum_lib


def test_orthogonality_loss_of_a_float32_basis_is_that_of_its_rows():
    # The float32 basis's rows, multiplied in float64: a float32 Gram matrix would
    # report its own rounding (several times larger here) instead.
    dim, steps = 3000, 120
    matrix = np.linspace(-1.0, 50.0, dim)
    state = linalg.lanczos_init(
        np.random.default_rng(0).standard_normal(dim), steps, basis_dtype=np.float32)
    while not linalg.is_finished(state):
        state = linalg.lanczos_step(state, matrix * linalg.current_vector(state))
    rows = state.basis[: state.num_steps].astype(np.float64)
    exact = np.max(np.abs(rows @ rows.T - np.eye(state.num_steps)))
    assert abs(linalg.lanczos_orthogonality_loss(state) - exact) <= 1e-12


def test_automatic_lockstep_holds_the_bases_that_fit_a_quarter_of_memory(monkeypatch):
    basis = 90 * 1000 * 8  # bytes of one draw's basis
    monkeypatch.setattr(spectrum_lib, "host_memory_bytes", lambda: 4 * 3 * basis)
    assert spectrum_lib.lockstep_group(9, 90, 1000) == 3  # 3 bases fit
    assert spectrum_lib.lockstep_group(9, 90, 1000, basis_bytes_per_entry=4) == 5  # 6 fit: 5+4
    assert spectrum_lib.lockstep_group(9, 90, 1000, lockstep=1) == 1  # given, not automatic
    monkeypatch.setattr(spectrum_lib, "host_memory_bytes", lambda: basis)
    assert spectrum_lib.lockstep_group(9, 90, 1000) == 1  # none fits: one at a time
    monkeypatch.setattr(spectrum_lib, "host_memory_bytes", lambda: 2**50)
    assert spectrum_lib.lockstep_group(20, 90, 1000) == 7  # at most 8: 7, 7, 6


def test_bases_beyond_the_hosts_memory_are_refused_with_the_ways_out_that_suffice(monkeypatch):
    basis = 90 * 1000 * 8  # bytes of one float64 basis
    monkeypatch.setattr(spectrum_lib, "host_memory_bytes", lambda: 2 * basis)
    refusal = functools.partial(spectrum_lib.basis_memory_refusal, flag="F", steps_flag="S",
                                float32_flag="H", one_basis_flag="O")
    assert refusal(2, 90, 1000) == ""  # fits exactly
    assert refusal(3, 90, 1000, np.float32) == ""  # half the bytes
    assert refusal(3, 90, 1000) == (
        "F: 3 Lanczos bases (90 steps × 1,000 float64 entries each) need 0.00201 GiB, more "
        "than the memory here (0.00134 GiB: the host's, or its cgroup's limit); pass at most "
        "S=60, H (half the memory) or "
        "O (one basis at a time).")
    # Only what suffices: float32 halves 8 bases to 4 (too many); one basis fits.
    assert refusal(8, 90, 1000).endswith("; pass at most S=22 or O (one basis at a time).")
    assert refusal(1, 400, 1000).endswith("; pass at most S=180.")  # neither would do
    assert refusal(1, 300, 1000).endswith("; pass at most S=180 or H (half the memory).")
    # More steps than parameters: the parameter count, where it fits.
    assert refusal(1, 10**9, 20).endswith(
        "; pass S=20 (more steps than the 20 parameters add nothing: Lanczos ends after at "
        "most that many).")
    assert "one step's row of 1,000,000 entries does not fit" in refusal(1, 90, 10**6)
    # A basis and its Ritz vectors (--gradient_overlap's): 180 rows fit, 10 of them vectors.
    assert spectrum_lib.basis_memory_refusal(1, 200, 1000, ritz_vectors=10, flag="F",
                                             steps_flag="S") == (
        "F: the Lanczos basis (200 steps × 1,000 float64 entries) and its 10 Ritz vectors "
        "need 0.00156 GiB, more than the memory here (0.00134 GiB: the host's, or its "
        "cgroup's limit); pass at most S=170.")
    # Only as many Ritz vectors as steps are made (room for 180 rows here).
    ritz = functools.partial(spectrum_lib.basis_memory_refusal, flag="F", steps_flag="S",
                             ritz_flag="K")
    assert ritz(1, 90, 1000, ritz_vectors=300) == ""  # 90 + 90 rows
    assert ritz(1, 100, 1000, ritz_vectors=100).endswith(
        "and its 100 Ritz vectors need 0.00149 GiB, more than the memory here (0.00134 GiB: "
        "the host's, or its cgroup's limit); pass at most S=90 or at most K=80.")
    assert ritz(1, 150, 1000, ritz_vectors=40).endswith("; pass at most S=140 or at most K=30.")
    # Without the optional flags (the Keras callback has no float32 basis).
    assert spectrum_lib.basis_memory_refusal(
        1, 300, 1000, flag="F", steps_flag="S").endswith("; pass at most S=180.")


def test_a_basis_map_the_os_refuses_is_a_memory_error(monkeypatch):
    import errno

    import importlib

    from hessian_tf.linalg.lanczos import SMALL_PAGES_FROM_BYTES, BasisMemoryError, zero_basis

    def refused(*args, **kwargs):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(mmap, "mmap", refused)
    rows = SMALL_PAGES_FROM_BYTES // 8  # a map, not NumPy's memory
    with pytest.raises(BasisMemoryError, match=r"a Lanczos basis of [\d,]+ × 1 float64 entries"):
        zero_basis(rows, 1)

    # A small basis is NumPy's memory: NumPy's refusal is told as the basis's too.
    def numpy_refuses(*args, **kwargs):
        raise MemoryError("Unable to allocate 80 B for an array with shape (10,)")

    monkeypatch.setattr(importlib.import_module("hessian_tf.linalg.lanczos"), "aligned_array",
                        numpy_refuses)
    with pytest.raises(BasisMemoryError, match=r"a Lanczos basis of 2 × 5 float64 entries"):
        zero_basis(2, 5)


def test_progress_after_a_resume_counts_this_sessions_products(monkeypatch):
    from hessian_tf import job

    matrix = np.linspace(1.0, 2.0, 30)
    stopped = []

    def stop_after_five(state):
        if state.num_products >= 5 and not stopped:
            stopped.append(state)
            raise KeyboardInterrupt

    run = dict(lanczos_steps=6, num_draws=3, matmat=lambda v: v * matrix)
    try:
        spectrum_lib.stochastic_lanczos_quadrature(lambda v: v * matrix, 30, after_step=stop_after_five, **run)
    except KeyboardInterrupt:
        pass
    seen = []
    spectrum_lib.stochastic_lanczos_quadrature(
        lambda v: v * matrix, 30, initial_state=stopped[0], progress=seen.append, **run)
    assert [p.session_products for p in seen] == list(range(1, 14))  # 18 products - 5 done
    lines = []
    monkeypatch.setattr(job.logging, "info", lambda form, *args: lines.append(form % args))
    job.log_progress(seen[-1]._replace(seconds=1.3, first_step_seconds=0.1))
    assert "0.100 s/product (mean after the first step)" in lines[0]  # 1.2 s / 12 products
    job.log_progress(seen[0]._replace(first_step_seconds=0.25))
    assert "first step 0.250 s" in lines[1]


def test_progress_rates_leave_out_the_first_step(monkeypatch):
    # A fake clock: the first block takes 10 s (tracing, say), each later product 1 s.
    clock = [0.0]
    monkeypatch.setattr(spectrum_lib.time, "perf_counter", lambda: clock[0])
    matrix = np.linspace(1.0, 2.0, 30)

    def matmat(vectors):
        clock[0] += 10.0 if clock[0] == 0.0 else float(len(vectors))
        return vectors * matrix

    seen = []
    spectrum_lib.stochastic_lanczos_quadrature(
        None, 30, lanczos_steps=5, num_draws=2, lockstep=2, matmat=matmat, progress=seen.append)
    first, last = seen[0], seen[-1]
    assert (first.first_step_seconds, first.first_step_products) == (10.0, 2)
    assert np.isnan(first.seconds_per_product)
    assert first.seconds_left == 10.0 / 2 * 8  # no later step yet: the first step's rate
    assert [p.seconds_per_product for p in seen[1:]] == [1.0] * 4
    assert seen[1].seconds_left == 6.0  # 6 products left at 1 s, not at 12 s / 4
    assert last.seconds_left == 0.0


def test_a_non_finite_product_names_its_draw_and_the_step_it_was_for():
    import pytest

    from hessian_tf.operators import NonFiniteError

    calls = []

    def matmat(vectors):
        calls.append(len(vectors))
        if len(calls) == 4:  # the 4th step of draws 4-6 (draws 1-3 took 3 calls)
            raise NonFiniteError("the product has 1 non-finite entries", row=1)
        return vectors * np.linspace(1.0, 2.0, 20)

    with pytest.raises(NonFiniteError, match=r"^draw 5, Lanczos step 1: the product") as raised:
        spectrum_lib.stochastic_lanczos_quadrature(
            None, 20, lanczos_steps=3, num_draws=6, lockstep=3, matmat=matmat)
    assert raised.value.row == 1


class _FirstBlock(Exception):
    """Stops a run at its first product."""


@pytest.mark.parametrize("basis_dtype", [np.float64, np.float32])
def test_first_block_is_what_a_run_multiplies_first(basis_dtype):
    # Long enough for a threaded BLAS norm: the run normalises on one BLAS thread.
    dim = 3_000_000
    seen = []

    def first_product(vectors):
        seen.append(vectors.copy())
        raise _FirstBlock

    with pytest.raises(_FirstBlock):
        spectrum_lib.stochastic_lanczos_quadrature(
            None, dim, lanczos_steps=2, num_draws=3, seed=5, first_product=first_product,
            matmat=lambda vectors: vectors, lockstep=2, basis_dtype=basis_dtype)
    start = spectrum_lib.new_state(dim, lanczos_steps=2, num_draws=3, seed=5, lockstep=2,
                                   basis_dtype=basis_dtype)
    first = spectrum_lib.first_block(start)
    assert first.shape == (2, dim) and first.dtype == np.float64
    np.testing.assert_array_equal(first, seen[0])


@pytest.mark.parametrize("basis_dtype", [np.float64, np.float32])
@pytest.mark.parametrize("lockstep", [1, 2])
def test_a_run_from_new_state_draws_its_first_group_once_and_equals_a_new_run(
        basis_dtype, lockstep, monkeypatch):
    dim = 5_000
    diagonal = np.linspace(-1.0, 3.0, dim)
    arguments = dict(lanczos_steps=6, num_draws=3, seed=2, lockstep=lockstep,
                     basis_dtype=basis_dtype)
    plain = spectrum_lib.stochastic_lanczos_quadrature(
        None, dim, matmat=lambda vectors: vectors * diagonal, **arguments)
    start = spectrum_lib.new_state(dim, **arguments)
    first = spectrum_lib.first_block(start).copy()
    seen = []
    drawn = []
    start_vector = spectrum_lib.start_vector
    monkeypatch.setattr(spectrum_lib, "start_vector",
                        lambda *args, **kwargs: drawn.append(args) or start_vector(*args, **kwargs))

    def first_product(vectors):
        seen.append(vectors.copy())
        return vectors * diagonal

    resumed = spectrum_lib.stochastic_lanczos_quadrature(
        None, dim, matmat=lambda vectors: vectors * diagonal, first_product=first_product,
        initial_state=start, **arguments)
    np.testing.assert_array_equal(seen[0], first)
    # Only the draws after the first group are drawn in the run.
    assert [args[2] for args in drawn] == list(range(lockstep, 3))
    np.testing.assert_array_equal(resumed.nodes, plain.nodes)
    np.testing.assert_array_equal(resumed.weights, plain.weights)
    assert resumed.num_products == plain.num_products


@pytest.mark.parametrize("basis_dtype", [np.float64, np.float32])
def test_start_vectors_drawn_in_place_are_the_plain_expressions(basis_dtype):
    # first_block and the run draw and normalise each vector in its own row; the
    # numbers are those of the plain expressions, new arrays at each step (as before
    # the rows were written in place), on one BLAS thread as the run normalises.
    dim, seed = 3_000_000, 7
    with spectrum_lib._one_blas_thread():
        plain = []
        for draw in range(2):
            vector = np.random.default_rng([seed, draw]).standard_normal(dim) / np.sqrt(dim)
            vector = vector / np.linalg.norm(vector)
            plain.append(vector.astype(basis_dtype).astype(np.float64))
        state = spectrum_lib._initial_state(dim, seed, 1, 3, basis_dtype)
    drawn = np.zeros(dim)
    assert spectrum_lib.start_vector(dim, seed, 1, out=drawn) is drawn
    np.testing.assert_array_equal(drawn, spectrum_lib.start_vector(dim, seed, 1))
    first = spectrum_lib.first_block(spectrum_lib.new_state(
        dim, lanczos_steps=3, num_draws=2, seed=seed, lockstep=2, basis_dtype=basis_dtype))
    np.testing.assert_array_equal(first, np.stack(plain))
    assert state.basis.dtype == basis_dtype and state.basis.shape == (3, dim)
    np.testing.assert_array_equal(state.basis[0].astype(np.float64), plain[1])
    assert not state.basis[1:].any()


def _minor_faults() -> int:
    """This thread's minor page faults (the process's where the OS counts no thread's)."""
    resource = pytest.importorskip("resource")  # Unix: getrusage
    who = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)
    return resource.getrusage(who).ru_minflt


def test_the_next_rows_pages_are_taken_while_the_product_runs(monkeypatch):
    # 600,000 float64 entries: rows of 4.8 MB, above PAGED_ROWS_FROM_BYTES.
    dim, steps = 600_000, 4
    diagonal = np.linspace(-1.0, 3.0, dim)
    taken = threading.Event()
    threads, failures, alive_at_step = [], [], []
    take_pages = spectrum_lib._take_pages

    def recorded(rows):
        threads.append(threading.current_thread())
        try:
            if any(row.any() for row in rows):
                failures.append("a row to take was not zero")
            take_pages(rows)
        except Exception as error:  # noqa: BLE001 (reported by the test's thread)
            failures.append(repr(error))
        finally:
            taken.set()
        time.sleep(0.2)  # still running when the product returns: the step must wait

    calls = []

    def matmat(vectors):
        # The thread runs while the product does (but at the last step, which writes
        # no row).
        calls.append(len(calls))
        if len(calls) < steps:
            assert taken.wait(timeout=60)
            taken.clear()
        return vectors * diagonal

    step = linalg.lanczos_step

    def checked_step(state, product):
        alive_at_step.append(any(t.is_alive() for t in threads))
        return step(state, product)

    def run():
        return spectrum_lib.stochastic_lanczos_quadrature(
            None, dim, lanczos_steps=steps, num_draws=2, lockstep=2, seed=1, matmat=matmat)

    monkeypatch.setattr(spectrum_lib, "_take_pages", recorded)
    monkeypatch.setattr(spectrum_lib.linalg, "lanczos_step", checked_step)
    paged = run()
    assert failures == []
    # Each step but the last writes a new row of each draw; every step came after the
    # thread's join.
    assert len(threads) == steps - 1 and len(alive_at_step) == 2 * steps
    assert not any(alive_at_step)
    assert all(t is not threading.main_thread() for t in threads)
    monkeypatch.setattr(spectrum_lib, "PAGED_ROWS_FROM_BYTES", 1 << 62)

    def unpaged_matmat(vectors):
        return vectors * diagonal

    plain = spectrum_lib.stochastic_lanczos_quadrature(
        None, dim, lanczos_steps=steps, num_draws=2, lockstep=2, seed=1, matmat=unpaged_matmat)
    assert len(threads) == steps - 1  # none for rows below the size
    np.testing.assert_array_equal(paged.nodes, plain.nodes)
    np.testing.assert_array_equal(paged.weights, plain.weights)
    np.testing.assert_array_equal(paged.alphas, plain.alphas)


def test_taking_a_rows_pages_leaves_it_zero_and_its_writes_without_page_faults():
    pages = 4096
    # Mapped (its pages not yet taken), rows a few entries longer than whole pages.
    basis = linalg.zero_basis(3, pages * mmap.PAGESIZE // 8 + 3)
    row = basis[1]
    spectrum_lib._take_pages([row])
    assert not row.any()
    before = _minor_faults()
    row[:] = 1.0
    after_taken = _minor_faults() - before
    before = _minor_faults()
    basis[2] = 1.0  # a row whose pages were not taken (nor read)
    not_taken = _minor_faults() - before
    assert not_taken >= pages // 2  # the count sees this row's pages
    assert after_taken <= pages // 100


def _blas_threads() -> set:
    return {info["num_threads"] for info in spectrum_lib.threadpoolctl.threadpool_info()
            if info["user_api"] == "blas"}


def test_large_steps_run_their_blas_on_more_threads_and_draws_in_lockstep_as_alone(
        monkeypatch):
    if not _blas_threads():
        pytest.skip("threadpoolctl finds no BLAS library in this NumPy")
    monkeypatch.setattr(spectrum_lib.host, "usable_cores", lambda: 2)
    dim, steps = 20_000, 6
    diagonal = np.linspace(-2.0, 5.0, dim)
    # The active basis of step k is (k + 1) rows of 160,000 bytes: threaded from k = 2.
    monkeypatch.setattr(spectrum_lib, "THREADED_STEPS_FROM_BYTES", 3 * dim * 8)
    seen = []
    step = linalg.lanczos_step

    def recorded(state, product):
        seen.append((state.num_steps, _blas_threads()))
        return step(state, product)

    monkeypatch.setattr(spectrum_lib.linalg, "lanczos_step", recorded)

    def run(blas_threads, **options):
        # The BLAS's own setting (OMP_NUM_THREADS, or a caller's limit) bounds the steps'.
        with spectrum_lib.threadpoolctl.threadpool_limits(blas_threads, user_api="blas"):
            return spectrum_lib.stochastic_lanczos_quadrature(
                None, dim, lanczos_steps=steps, seed=2, matmat=lambda v: v * diagonal,
                **options)

    before = _blas_threads()
    together = run(4, num_draws=2, lockstep=2)  # at most the 2 usable cores
    assert seen == [(k, {1} if k < 2 else {2}) for k in range(steps) for _ in range(2)]
    assert _blas_threads() == before  # the run's limits undone
    alone = run(4, num_draws=2, lockstep=1)
    np.testing.assert_array_equal(together.alphas, alone.alphas)
    np.testing.assert_array_equal(together.nodes, alone.nodes)
    np.testing.assert_array_equal(together.weights, alone.weights)
    for blas_threads, cores in ((1, 2), (4, 1)):
        seen.clear()
        monkeypatch.setattr(spectrum_lib.host, "usable_cores", lambda: cores)
        run(blas_threads, num_draws=1)
        assert seen and all(threads == {1} for _, threads in seen)


def test_algebra_seconds_extrapolates_two_timed_steps(monkeypatch):
    # A fake clock in which a step with j active basis rows costs (a + b j) per entry:
    # the estimate is then exactly dim (m a + b m (m + 1) / 2) per draw.
    a, b = 3e-9, 1e-9
    clock = [0.0]
    monkeypatch.setattr(spectrum_lib.time, "perf_counter", lambda: clock[0])

    def step(state, product):
        clock[0] += (a + b * (state.num_steps + 1)) * state.basis.shape[1]
        return state

    monkeypatch.setattr(spectrum_lib.linalg, "lanczos_step", step)
    for dim, steps, draws in ((5000, 90, 2), (3_000_000, 20, 1), (40, 3, 1)):
        expected = draws * dim * (steps * a + b * steps * (steps + 1) / 2)
        estimate = spectrum_lib.algebra_seconds(dim, steps, draws, np.float32)
        assert estimate == pytest.approx(expected, rel=1e-9)


def test_algebra_seconds_times_real_steps_on_one_blas_thread(monkeypatch):
    seen = []
    limits = spectrum_lib.threadpoolctl.threadpool_limits

    def recording(**kwargs):
        seen.append(kwargs)
        return limits(**kwargs)

    monkeypatch.setattr(spectrum_lib.threadpoolctl, "threadpool_limits", recording)
    estimate = spectrum_lib.algebra_seconds(20000, 10, 1)
    assert np.isfinite(estimate) and estimate > 0
    assert seen == [{"limits": 1, "user_api": "blas"}]


@pytest.mark.parametrize("basis_dtype", [np.float64, np.float32])
def test_algebra_seconds_times_one_reorthogonalisation_pass_per_step(monkeypatch, basis_dtype):
    # As a Hessian step after its recurrence: one pass; a second (DGKS) pass would mean a
    # timed step found an earlier timed step's row, the product's direction, in its basis.
    lanczos_module = sys.modules[spectrum_lib.linalg.lanczos_step.__module__]
    project = lanczos_module._project
    passes = []
    monkeypatch.setattr(lanczos_module, "_project",
                        lambda active, w: passes.append(active.shape[0]) or project(active, w))
    spectrum_lib.algebra_seconds(4096, 90, 1, basis_dtype, repeats=2)
    assert passes == [2, 2, 7, 7]  # steps 1 and 6 of 8 sample rows, each once per repeat


def test_a_matmat_taking_out_writes_every_step_into_one_array():
    rng = np.random.default_rng(4)
    matrix = rng.standard_normal((40, 40))
    matrix = matrix + matrix.T
    outs = []

    def matmat(vectors, out=None):
        outs.append(out)
        np.matmul(vectors, matrix, out=out)
        return out

    def plain(vectors):
        return vectors @ matrix

    options = dict(lanczos_steps=12, num_draws=3, seed=0, lockstep=2)
    reused = spectrum_lib.stochastic_lanczos_quadrature(None, 40, matmat=matmat, **options)
    fresh = spectrum_lib.stochastic_lanczos_quadrature(None, 40, matmat=plain, **options)
    # Groups of 2 and 1 draws: one array, its first rows for the smaller block.
    assert len(outs) == 24 and len({id(o.base if o.base is not None else o) for o in outs}) == 1
    assert [o.shape[0] for o in outs] == [2] * 12 + [1] * 12
    np.testing.assert_array_equal(reused.nodes, fresh.nodes)
    np.testing.assert_array_equal(reused.weights, fresh.weights)
