"""The standalone spectrum job: configuration in, three result files out.

OUTPUT_DIR/spectrum.npz   alphas, betas, nodes, weights [num_draws, m]; grid, density [G]
OUTPUT_DIR/summary.json   statistics, counts, timings and the resolved configuration
OUTPUT_DIR/density.png    the density on a log scale
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import shutil
import signal
import subprocess
import threading
import time
from typing import Sequence

import ml_collections
import numpy as np
from absl import logging

import hessian_tf
from hessian_tf import config as config_lib
from hessian_tf import host
from hessian_tf import plotting
from hessian_tf import spectrum as spectrum_lib
from hessian_tf.io import checkpoints, results
from hessian_tf.linalg import statistics as statistics_lib


def _dataset_label(dataset: str) -> str:
    """'npz:data.npz' for 'npz:/a/long/path/data.npz'; other names as they are."""
    if dataset.startswith("npz:"):
        return "npz:" + os.path.basename(dataset[len("npz:"):])
    return dataset


def _format_seconds(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))


def log_progress(progress: spectrum_lib.Progress) -> None:
    draws = range(progress.draw, progress.draw + progress.group_size)
    # Both since this session started: a resumed job's earlier products took time this
    # session did not see. The first step's time stands apart: it includes tracing, or
    # next to nothing where its products came from --method=auto's timing.
    rate = progress.seconds_per_product
    speed = (f"{rate:.3f} s/product (mean after the first step)" if np.isfinite(rate)
             else f"first step {progress.first_step_seconds:.3f} s")
    logging.info(
        "%s/%d, Lanczos step %d/%d: alpha=%.6g beta=%.6g, %s, %s left%s",
        spectrum_lib.draws_label(draws),
        progress.num_draws,
        progress.step,
        progress.lanczos_steps,
        progress.alpha,
        progress.beta,
        speed,
        _format_seconds(progress.seconds_left),
        " (Krylov space exhausted: exact spectrum)" if progress.exhausted else "",
    )


def basis_dtype(config) -> np.dtype:
    """The storage type of the Lanczos bases (--basis_dtype)."""
    return np.dtype(np.float32 if config.basis_dtype == "float32" else np.float64)


def lockstep_group(config, dim: int) -> int:
    """Draws per lockstep group: equal groups of at most --lockstep_draws draws, or
    automatically (0) as many as MAX_LOCKSTEP_DRAWS whose Lanczos bases together fit
    in a quarter of the host's memory."""
    return spectrum_lib.lockstep_group(
        config.num_draws, config.lanczos_steps, dim, lockstep=config.lockstep_draws,
        basis_bytes_per_entry=basis_dtype(config).itemsize,
    )


def basis_memory_refusal(config, dim: int) -> str:
    """Why the job's Lanczos bases cannot run on this host (more than its memory), or
    "" (spectrum.basis_memory_refusal): the spectrum's, and --gradient_overlap's (one
    float64 basis kept, and its --num_eigenpairs Ritz vectors, after the spectrum's
    are freed)."""
    refusal = spectrum_lib.basis_memory_refusal(
        lockstep_group(config, dim), config.lanczos_steps, dim, basis_dtype(config),
        flag=f"--lanczos_steps={config.lanczos_steps}", steps_flag="--lanczos_steps",
        float32_flag="--basis_dtype=float32", one_basis_flag="--lockstep_draws=1")
    if refusal or not config.gradient_overlap:
        return refusal
    return spectrum_lib.basis_memory_refusal(
        1, config.lanczos_steps, dim, np.float64, ritz_vectors=config.num_eigenpairs,
        flag=f"--gradient_overlap with --lanczos_steps={config.lanczos_steps}",
        steps_flag="--lanczos_steps", ritz_flag="--num_eigenpairs")


OPERATOR_NAMES = {"hessian": "Hessian", "ggn": "generalised Gauss-Newton matrix",
                  "fisher": "empirical Fisher"}
SHORT_OPERATOR_NAMES = {"hessian": "Hessian", "ggn": "GGN", "fisher": "Fisher"}


def analysis_products(config, dim: int) -> int:
    """Products the analyses after the spectrum take: Hutch++'s (--trace) and
    --gradient_overlap's Lanczos run (at most --lanczos_steps)."""
    from hessian_tf.linalg import trace as trace_lib

    return ((trace_lib.hutchpp_products(dim, config.trace_matvecs) if config.trace else 0)
            + (config.lanczos_steps if config.gradient_overlap else 0))


def check_products(config, operator) -> int:
    """The products over the whole data (blocks, or vectors) that the determinism check
    adds to the Lanczos steps': one where it multiplies the first block twice over
    the whole data, else none (two runs over the first batches)."""
    return int(bool(config.check_determinism) and operator.whole_determinism_check)


def block_products(config, group: int, operator) -> int:
    """The products of blocks of `group` vectors that a job runs over the whole data:
    the Lanczos steps of each lockstep group of draws, and the determinism check's."""
    return (spectrum_lib.lanczos_block_products(config.num_draws, config.lanczos_steps, group)
            + check_products(config, operator))


# The job's watchdog (argv: the job's pid, the seconds, the line, the pipe the job says
# "the wait is over" on, the pipe it answers on, then the directories the job created,
# deepest first). Told in time, it answers and ends; the job's block does not end before
# that answer, so once the time is up the outcome is this process's alone: it writes
# the line, removes those directories while they are empty, and ends the job (SIGINT,
# which `_exit_on_sigint` makes exit with status 2; SIGKILL if it has not ended 5 s
# later). If the job ends during the wait some other way (Ctrl-C, a kill, a crash: the
# pipe closes), it removes the directories and says nothing. Its own session keeps it
# out of the terminal's Ctrl-C.
_WATCHDOG = """
import os, select, signal, sys, time
parent, seconds, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
seconds = min(seconds, 1e9)  # "forever" (31 years): select refuses more than time_t holds
over, answer = int(sys.argv[4]), int(sys.argv[5])

def remove_created():
    from hessian_tf.io.results import remove_empty_directories  # no TensorFlow

    remove_empty_directories(sys.argv[6:])

if select.select([over], [], [], seconds)[0]:
    if os.read(over, 1):
        os.write(answer, b"k")
    else:
        remove_created()
    sys.exit(0)
sys.stderr.write("hessian-spectrum: error: " + message + "\\n")
sys.stderr.flush()
remove_created()
os.kill(parent, signal.SIGINT)
deadline = time.monotonic() + 5
while os.getppid() == parent and time.monotonic() < deadline:
    time.sleep(0.1)
if os.getppid() == parent:
    os.kill(parent, signal.SIGKILL)
"""


@contextlib.contextmanager
def _exit_on_sigint():
    """While the block runs, SIGINT ends the process at once with exit status 2 (the C
    library's _exit, called with the signal's number, 2, as the handler): Python's own
    handler only sets a flag, which a thread waiting inside TensorFlow's C++ with the
    GIL never reads. After the block Python installs its handler again, as it installs
    it. Only in the main thread (where Python handles signals); elsewhere, or where the
    C library cannot be reached this way, nothing changes (the watchdog then falls
    back to SIGKILL)."""
    import ctypes

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        libc = ctypes.CDLL(None)
        install = libc.signal
        install.restype = ctypes.c_void_p
        install.argtypes = (ctypes.c_int, ctypes.c_void_p)
        handler = ctypes.cast(libc._exit, ctypes.c_void_p).value
    except (OSError, AttributeError):  # no C library by that name (not a POSIX host)
        yield
        return
    python_handler = signal.getsignal(signal.SIGINT)
    previous = install(signal.SIGINT, handler)
    if previous == ctypes.c_void_p(-1).value:  # SIG_ERR: nothing was installed
        yield
        return
    try:
        yield
    finally:
        if python_handler is None:  # not Python's: the C library's own back
            install(signal.SIGINT, previous)
        else:  # with Python's flags (the C library's signal() sets others: SA_RESTART)
            signal.signal(signal.SIGINT, python_handler)


@contextlib.contextmanager
def _deadline(seconds: float, message: str, *, enabled: bool = True,
              created: Sequence[str] = ()):
    """Ends the process with `message` and exit status 2 if the block outlasts
    `seconds`, and removes the directories the job `created` (deepest first) that
    are then empty (also if the process ends otherwise during the block).

    TensorFlow waits without limit for the workers of a multi-worker cluster to
    join, inside C++ and holding the GIL, so neither a Python thread nor a signal
    handler can interrupt it: a watchdog process does.
    """
    if not enabled:
        yield
        return
    over_read, over = os.pipe()  # job → watchdog: the wait is over (or, closed: the job ended)
    answer, answer_write = os.pipe()  # watchdog → job: understood
    try:
        watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(seconds), message,
             str(over_read), str(answer_write), *created],
            pass_fds=(over_read, answer_write), start_new_session=True,
        )
    finally:
        os.close(over_read)
        os.close(answer_write)
    with _exit_on_sigint():
        try:
            yield
        finally:  # SIGINT still ends the process while the watchdog may act
            try:
                os.write(over, b"o")
                os.read(answer, 1)  # b"k"; b"" if the watchdog is gone
            except OSError:  # BrokenPipeError: the watchdog is gone
                pass
            os.close(over)
            os.close(answer)
            watchdog.wait()


def _default_model_function(config, x, y, output_dir):
    """Trains the embedded default MLP on (x, y) and saves it beside the results."""
    from hessian_tf import models
    from hessian_tf.operators import KerasModelFunction, flat_parameters

    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        raise ValueError(
            f"--model is empty, so the embedded default MLP is trained, which needs integer "
            f"class labels; --dataset={config.dataset} has labels of shape {y.shape[1:]} "
            f"and dtype {y.dtype}. Pass --model."
        )
    flat = x.reshape(x.shape[0], -1)
    model = models.mlp(flat.shape[1], num_classes=int(y.max()) + 1, seed=config.seed)
    if not (config.dry_run or config.variables):  # before training it and saving it
        refusal = basis_memory_refusal(
            config, flat_parameters.num_parameters(model.trainable_variables))
        if refusal:
            raise ValueError(refusal)
    accuracy = models.train_briefly(
        model, flat, y, epochs=config.default_model_epochs, seed=config.seed
    )
    logging.info(
        "Trained the default MLP (%d parameters) for %d epochs: training accuracy %.4f",
        model.count_params(), config.default_model_epochs, accuracy,
    )
    path = os.path.join(output_dir, "model.keras")
    results.write_files(output_dir, {"model.keras": model.save})
    logging.info("Saved the default model to %s", path)
    function = KerasModelFunction(model, unroll_steps=config.unroll_steps)
    return function, flat, {"default_model_accuracy": accuracy, "model_file": path}


def _in_dtype(model_function, x, dtype: str):
    """The model function and inputs in `dtype` (--precision=float32 or float64)."""
    from hessian_tf.operators import KerasModelFunction
    from hessian_tf.operators.precision import cast_model

    if not isinstance(model_function, KerasModelFunction):
        raise ValueError(
            f"--precision={dtype} needs a .keras model (a SavedModel's functions are "
            "fixed in their dtype); use --precision=model."
        )
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype(dtype)
    return model_function.with_model(cast_model(model_function.model, dtype)), x


def _warn_of_half_precision(model_function, stream: bool) -> None:
    """--precision=model on a model computing in float16 or bfloat16: one warning."""
    from hessian_tf.operators import KerasModelFunction
    from hessian_tf.operators.precision import half_precision_warning

    if isinstance(model_function, KerasModelFunction):
        fix = ("--precision=float32 takes them in a float32 copy (on a CPU, which emulates "
               "half precision, also faster)" + (", with the data in memory (not with "
                                                 "--stream)." if stream else "."))
        warning = half_precision_warning(model_function.model, "--precision=model", fix)
        if warning:
            logging.warning("%s", warning)


def _dry_run(config, operator, model_function, x, y, stream) -> dict:
    """Prints what the job would cost, from one timed batch, and computes nothing else."""
    from hessian_tf.operators import HessianOperator, gauss_newton
    from hessian_tf.operators.hessian import residual_cache_budget

    x_all, y_all = x, y  # the run's fingerprint's
    if stream is not None:
        import tensorflow as tf

        batch = next(iter(stream[0](tf.distribute.InputContext())))
        x, y = batch[0].numpy(), batch[1].numpy()
    x, y = x[: config.batch_size], y[: config.batch_size]
    # The job's own operator (Hessian, GGN or Fisher) and regularization, on one batch.
    one_batch = gauss_newton.operator_class(config.operator, HessianOperator)(
        model_function, x, y, batch_size=config.batch_size, loss=config.loss,
        bn_mode=config.bn_mode, method=config.method, regularization=config.regularization,
        cache_residuals=config.cache_residuals, accumulation=operator.accumulation,
    )
    group = lockstep_group(config, operator.dim)
    replicas = operator.strategy.num_replicas_in_sync
    batches = -(-operator.num_examples // config.batch_size)
    batches_per_replica = -(-batches // replicas)
    if operator.times_methods:  # --method=auto as the job would, here on this one batch
        # (whose products stand for the whole data's batches per replica)
        one_batch.choose_method(
            group, block_products(config, group, operator) * batches_per_replica)
    else:  # the job's method (streamed data, several workers: not timed)
        one_batch.use_method(operator.method)
    vector = np.ones(one_batch.dim) / np.sqrt(one_batch.dim)
    one_batch.matvec(vector)  # traces
    started = time.perf_counter()
    one_batch.matvec(vector)
    batch_seconds = time.perf_counter() - started
    analyses = analysis_products(config, operator.dim)  # one vector a pass
    products = (config.num_draws * config.lanczos_steps + group * check_products(config, operator)
                + analyses)
    passes = block_products(config, group, operator) + analyses + 1  # + the gradient's
    basis_bytes = group * config.lanczos_steps * operator.dim * basis_dtype(config).itemsize
    refusal = basis_memory_refusal(config, operator.dim)
    # An upper bound: a block of k products in lockstep costs less than k products.
    product_seconds = batch_seconds * batches_per_replica * (products + 1)
    # The host's Lanczos algebra beside them: on large models and little data, a
    # quarter of a run and more (DenseNet-121, 128 images, m = 90).
    algebra = spectrum_lib.algebra_seconds(operator.dim, config.lanczos_steps,
                                           config.num_draws, basis_dtype(config))
    seconds = product_seconds + algebra
    cost = {
        "num_params": operator.dim,
        "num_examples": operator.num_examples,
        "num_replicas": replicas,
        "hessian_vector_products": products,
        "data_passes": passes,
        "examples_read": passes * operator.num_examples,
        "lanczos_basis_bytes": basis_bytes,
        "lockstep_draws": group,
        "seconds_per_batch_product": batch_seconds,
        "method": one_batch.method,
        "estimated_product_seconds": product_seconds,
        "estimated_algebra_seconds": algebra,
        "estimated_seconds": seconds,
    }
    lines = [
        f"dry run: {operator.dim:,} parameters, {operator.num_examples:,} examples, {replicas} replica(s)",
        f"  {products} {SHORT_OPERATOR_NAMES[config.operator]}-vector products ({group} "
        "draw(s) in lockstep) + 1 gradient pass "
        f"= {passes} passes over the data, {passes * operator.num_examples:,} examples read",
        f"  Lanczos bases: {basis_bytes / 2**30:.2f} GiB ({group} x {config.basis_dtype}, on "
        "the host; --basis_dtype=float32 halves it, --lockstep_draws=1 keeps one)"
        + (f"; this run would be refused: {refusal}" if refusal else ""),
        f"  one batch of {config.batch_size}: {batch_seconds:.3f} s per product here "
        f"({one_batch.method.replace('_', ' ')}); estimate "
        f"{datetime.timedelta(seconds=int(seconds))} on {replicas} replica(s) of this speed: "
        f"{datetime.timedelta(seconds=int(product_seconds))} of products and "
        f"{datetime.timedelta(seconds=int(algebra))} of Lanczos algebra on this host",
    ]
    if config.cache_residuals:
        # An upper bound: every batch holds as much as the first (the last may hold less).
        cache_bytes = one_batch.residual_bytes * batches
        budget = residual_cache_budget()
        cost["residual_cache_bytes"] = cache_bytes
        refused = "; this run would be refused" if cache_bytes > budget else ""
        lines.append(
            f"  --cache_residuals: at most {cache_bytes / 2**30:.2f} GiB of residuals "
            f"({one_batch.residual_bytes / 2**20:.1f} MiB per batch; the timing above uses "
            "them, the first pass also builds them); the run refuses more than "
            f"{budget / 2**30:.2f} GiB, a quarter of the memory here{refused}")
    lines.extend(_dry_run_checkpoint_lines(config, cost, model_function, x_all, y_all))
    print("\n".join(lines), flush=True)
    return cost


def _checkpointer(config, model_function, x, y) -> checkpoints.SLQCheckpointer:
    """The checkpoints of the run under --output_dir, with its fingerprint (its options,
    the dry run's as the run's own; the model's variables; the data)."""
    fingerprint, details = checkpoints.fingerprint_and_details(
        {**config.to_dict(), "dry_run": False}, _variable_values(model_function), x, y)
    return checkpoints.SLQCheckpointer(
        os.path.join(config.output_dir, checkpoints.CHECKPOINT_SUBDIR),
        fingerprint=fingerprint, details=details)


def _dry_run_checkpoint_lines(config, cost: dict, model_function, x, y) -> list[str]:
    """A dry run's word on the checkpoint in --output_dir that the run would resume,
    checked as the run checks it (its run's options, model and data; its step counts)
    but without its bases: the products it has done and those a resume would leave,
    or why the run would refuse it."""
    if config.restart or not os.path.isdir(
            os.path.join(config.output_dir, checkpoints.CHECKPOINT_SUBDIR)):
        return []  # nothing to resume: the fingerprint's pass over the data is not needed
    try:
        found = _checkpointer(config, model_function, x, y).progress(
            lanczos_steps=config.lanczos_steps, num_draws=config.num_draws)
    except checkpoints.CheckpointError as error:
        return [f"  this run would be refused: {error}"]
    if found is None:
        return []
    path, done, lanczos_left = found
    # A resumed run has no determinism check; the analyses run after the steps.
    left = lanczos_left + analysis_products(config, cost["num_params"])
    lanczos = config.num_draws * config.lanczos_steps
    cost["checkpoint_products_done"] = done
    cost["products_left_if_resumed"] = left
    cost["estimated_seconds_if_resumed"] = (
        cost["estimated_product_seconds"] * left / max(cost["hessian_vector_products"], 1)
        + cost["estimated_algebra_seconds"] * lanczos_left / lanczos)
    return [
        f"  {path}: this run resumes it, {done} of the {lanczos} Lanczos products done; "
        f"at most {left} products are left, about "
        f"{datetime.timedelta(seconds=int(cost['estimated_seconds_if_resumed']))} "
        "(--restart starts over)"]


def _analyses(config, operator, spectrum, loss, gradient):
    """Top eigenvalues, and when asked the Hutch++ trace and the gradient overlap;
    with several draws, a bootstrap band of the density. Products here are
    collectives: every worker runs them. Returns (summary entries, extra npz
    arrays, (lower, upper) or None)."""
    from hessian_tf import analysis
    from hessian_tf.linalg import bootstrap, eigenpairs
    from hessian_tf.linalg import trace as trace_lib

    stats = spectrum.statistics
    top = eigenpairs.top_eigenpairs_over_draws(
        spectrum.alphas, spectrum.betas, spectrum.residual_norms, spectrum.num_steps,
        config.num_eigenpairs,
    )
    # Asked for (not the default): fewer pairs than steps give is then worth a word.
    if (len(top.eigenvalues) < config.num_eigenpairs
            and config.num_eigenpairs != config_lib.default_config().num_eigenpairs):
        logging.warning(
            "--num_eigenpairs=%d: %d reported, as many Ritz values as the Lanczos steps "
            "taken (at most --lanczos_steps=%d, and the %d parameters) give",
            config.num_eigenpairs, len(top.eigenvalues), config.lanczos_steps, operator.dim)
    summary = {
        "operator": config.operator,
        "variables": config.variables or None,
        "variable_paths": getattr(operator.model_function, "paths", None),
        "top_eigenvalues": [float(v) for v in top.eigenvalues],
        "top_eigenvalue_residual_bounds": [float(b) for b in top.residual_bounds],
        "top_eigenvalues_converged": [bool(c) for c in top.converged],
    }
    if config.trace:
        estimate = trace_lib.hutchpp(
            operator.matvec, operator.dim, num_matvecs=config.trace_matvecs, seed=config.seed
        )
        summary["trace"] = trace_lib.trace_summary(
            estimate, slq_estimate=stats.trace, slq_stderr=stats.trace_stderr
        )
    if config.gradient_overlap:
        pairs = analysis.top_eigenspace(
            operator.matvec, operator.dim, num_eigenpairs=config.num_eigenpairs,
            lanczos_steps=config.lanczos_steps, seed=config.seed,
        )
        summary["gradient_overlap"] = analysis.overlap_summary(
            analysis.OverlapAnalysis(loss, pairs, analysis.gradient_overlap(gradient, pairs.vectors))
        )
    arrays, band = {}, None
    if spectrum.nodes.shape[0] >= 2:
        quadratures = spectrum_lib.quadratures_of(spectrum)
        result = bootstrap.bootstrap_density_band(
            [q.nodes for q in quadratures], [q.weights for q in quadratures],
            grid=spectrum.density.grid, kernel_width=spectrum.density.kernel_width,
            seed=config.seed,
        )
        arrays = {"density_lower": result.lower, "density_upper": result.upper}
        band = (result.lower, result.upper)
        summary["density_band"] = {
            "confidence": result.confidence, "num_resamples": result.num_resamples,
            "num_draws": result.num_draws,
        }
    return summary, arrays, band


class Preempted(BaseException):
    """SIGTERM arrived (during the steps, a checkpoint was written). Re-run the same
    command to resume. A BaseException, as KeyboardInterrupt: raised by a signal
    handler anywhere, it must not be taken for a failure that code catching Exception
    (a probe's, a fallback's) handles."""

    exit_status = 75  # EX_TEMPFAIL: try again


class WriteFailed(Exception):
    """A checkpoint or the results could not be written (a full disk, a file-size or
    quota limit, a directory in a file's place): the line says what holds the work."""

    exit_status = 74  # EX_IOERR: not bad input (2), which launchers do not retry


def _write_failed(error: OSError, what: str, config) -> WriteFailed:
    saved = latest_checkpoint(config)
    holds = (f"the checkpoint {saved} holds the run so far" if saved
             else "no checkpoint holds the run")
    return WriteFailed(
        f"--output_dir={config.output_dir}: writing {what} failed ("
        f"{error.strerror or f'a file was cut short: {error}'}"
        f"{': ' + str(error.filename) if getattr(error, 'filename', None) else ''}); "
        f"{holds}: free space (or raise the file-size limit, or fix the path), then run "
        f"{same_command(config)}.")


def _save(checkpointer, state, config) -> str:
    """checkpointer.save(state); a write that fails (a full disk, a file-size limit) is
    WriteFailed."""
    try:
        return checkpointer.save(state)
    except OSError as error:
        raise _write_failed(error, "a checkpoint", config) from error


def _variable_values(model_function) -> list[np.ndarray]:
    from hessian_tf.operators.subset import base_function

    model_function = base_function(model_function)  # under variable subsets
    model = getattr(model_function, "model", None)
    if model is not None:
        return [np.asarray(v.numpy()) for v in model.weights]
    loaded = model_function.loaded
    return [v.numpy() for v in getattr(loaded, "variables", model_function.variables)]


@contextlib.contextmanager
def _checkpointing(config, checkpointer, *, chief: bool, start_products: int = 0):
    """Yields the after-step hook: a checkpoint once `checkpoint_every` products and
    `checkpoint_seconds` have passed since the last, and one more then a clean stop
    when SIGTERM (the preemption notice) has arrived. SIGTERM is caught only inside
    the block; the previous handler is restored after it."""
    preempted = []
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: preempted.append(signum))
    last = {"products": start_products, "time": time.monotonic()}

    def after_step(state) -> None:
        after_step.state = state
        if _PHASE["deferred"]:  # SIGTERM just before this block's handler was installed
            _PHASE["deferred"] = False
            preempted.append(signal.SIGTERM)
        due = (
            config.checkpoint_every
            and state.num_products - last["products"] >= config.checkpoint_every
            and time.monotonic() - last["time"] >= config.checkpoint_seconds
        )
        finished = state.draw >= config.num_draws
        if chief and (preempted or (due and not finished)):
            logging.info("Checkpoint %s", _save(checkpointer, state, config))
        if due:
            last.update(products=state.num_products, time=time.monotonic())
        if preempted:
            if state.lanczos:
                draws = range(state.draw, state.draw + len(state.lanczos))
                where = (f"in {spectrum_lib.draws_label(draws)} at Lanczos step "
                         f"{state.lanczos[0].num_steps}")
            else:
                where = f"after {state.draw} finished draw(s)"
            raise Preempted(
                f"preempted (SIGTERM) {where}; a checkpoint is in {checkpointer.directory}: "
                f"run {same_command(config)} to resume." if chief else
                f"preempted (SIGTERM) {where}; the chief (worker 0) writes the checkpoints, "
                f"in {checkpointer.directory}: run {same_command(config)} to resume from "
                "its latest."
            )

    after_step.state = None  # the last state a step ended in
    after_step.preempted = preempted
    try:
        yield after_step
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# What SIGTERM outside the Lanczos steps (which `_checkpointing` handles) does: the job's
# phase, set by `_run` ("start-up", "analyses" once a checkpoint of the finished steps is
# saved, "writing" the results); "deferred" once SIGTERM came while they were written.
_PHASE = {"name": "start-up", "deferred": False}


@contextlib.contextmanager
def _sigterm_outside_the_steps(config):
    """While the job runs, SIGTERM (a preemption notice) outside the Lanczos steps stops
    it at once with Preempted (status 75, one line) during start-up and the analyses
    (--trace, --gradient_overlap), whose results a resume computes again; at the end of
    the steps, and while the results are assembled and written, it is noted and they
    are finished first (a second or so). It
    had been the default handler: status 143, no line, temporary files left. Only in
    the main thread (where Python handles signals)."""
    _PHASE.update(name="start-up", deferred=False)  # whichever thread runs the job
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if _PHASE["name"] in ("steps", "results", "writing"):
            _PHASE["deferred"] = True
            return
        raise _preempted_outside_the_steps(config)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


LOCK_FILE = ".hessian-spectrum.lock"


@contextlib.contextmanager
def _output_lock(output_dir: str):
    """Holds an exclusive lock on OUTPUT_DIR/.hessian-spectrum.lock (flock: the OS
    releases it when the process ends, however it ends) while the job runs, and
    removes the file after. A second job on the same --output_dir (a re-run while the
    first, or a launcher's orphaned workers, still runs) had taken the live job's
    checkpoints and raced its writes; it is refused in one line."""
    import fcntl

    path = os.path.join(output_dir, LOCK_FILE)
    while True:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.read(handle, 32).decode(errors="replace").strip()
            os.close(handle)
            raise ValueError(
                f"--output_dir={output_dir}: another hessian-spectrum job is running there"
                f"{f' (process {holder})' if holder else ''}; wait for it to end (or stop "
                "it), or pass another --output_dir.") from error
        try:  # the file locked is still the one of that name (not removed by its holder)
            if os.stat(path).st_ino == os.fstat(handle).st_ino:
                break
        except OSError:  # gone (its holder removed it): lock the new one
            pass
        os.close(handle)
    os.ftruncate(handle, 0)
    os.write(handle, f"{os.getpid()}\n".encode())
    try:
        yield
    finally:
        try:
            os.remove(path)
        except OSError:
            pass
        os.close(handle)


def same_command(config) -> str:
    """How the preempted and interrupted lines name the command that resumes a run:
    --restart would delete the checkpoint it names."""
    return "the same command without --restart" if config.restart else "the same command"


def _preempted_outside_the_steps(config) -> Preempted:
    saved = latest_checkpoint(config)
    again = same_command(config)
    if _PHASE["name"] == "analyses":
        return Preempted(
            "preempted (SIGTERM) after the Lanczos steps, during --trace or "
            f"--gradient_overlap; the checkpoint {saved} holds the steps: run {again} to "
            "resume (the analyses start again)." if saved else
            "preempted (SIGTERM) after the Lanczos steps, during --trace or "
            f"--gradient_overlap; the chief (worker 0) writes the checkpoints: run {again} "
            "to resume from its latest.")
    return Preempted(
        "preempted (SIGTERM) during start-up, before the first Lanczos step; "
        + (f"the checkpoint {saved} is as it was: run the same command to resume."
           if saved and not config.restart else
           "nothing was computed yet: run the same command to start."))


def latest_checkpoint(config: ml_collections.ConfigDict):
    """The path of the latest checkpoint of the job's --output_dir, or None (also
    where its index is damaged)."""
    directory = os.path.join(config.output_dir, checkpoints.CHECKPOINT_SUBDIR)
    try:  # the one a resume takes (an index missing: the newest complete one)
        return checkpoints.latest_checkpoint(directory)
    except Exception:  # noqa: BLE001 - a damaged index: none to name
        return None


def run(config: ml_collections.ConfigDict) -> dict:
    """Runs one spectrum job; returns the summary written to summary.json (for a dry
    run, the cost). A job that fails, or a dry run, leaves no directory it created
    empty behind."""
    started = time.perf_counter()
    config_lib.validate(config)
    from hessian_tf.linalg import bootstrap

    refusal = bootstrap.density_memory_refusal(
        config.num_grid_points, config.num_draws, bootstrap.DEFAULT_NUM_RESAMPLES,
        host.memory_bytes() // 2, "--num_grid_points")
    if refusal:
        raise ValueError(refusal)
    created = results.check_writable(config.output_dir)
    refusal = results.occupied(config.output_dir, (
        results.DENSITY_FILE, results.SUMMARY_FILE, results.SPECTRUM_FILE))
    checkpoint_dir = os.path.join(config.output_dir, checkpoints.CHECKPOINT_SUBDIR)
    if not refusal and os.path.exists(checkpoint_dir) and not os.path.isdir(checkpoint_dir):
        refusal = (f"--output_dir={config.output_dir}: {checkpoint_dir} is a file, where "
                   "the checkpoints' directory goes; remove or rename it, or pass another "
                   "--output_dir.")
    if refusal:
        results.remove_empty_directories(created)
        raise ValueError(refusal)
    try:
        with contextlib.ExitStack() as contexts:
            contexts.enter_context(_sigterm_outside_the_steps(config))
            summary = _run(config, started, contexts, created)
    except BaseException:
        results.remove_empty_directories(created)
        raise
    if config.dry_run:
        results.remove_empty_directories(created)
    return summary


def _run(config: ml_collections.ConfigDict, started: float,
         contexts: contextlib.ExitStack, created: list[str]) -> dict:
    output_dir = config.output_dir

    # Imported here so that strategy creation (and logical CPU devices) come before
    # anything else touches TensorFlow's devices.
    from hessian_tf.distribute import (
        cpu_threads, graph_optimization, is_chief, make_strategy, wait_for_workers)
    from hessian_tf.io.datasets import load_dataset
    from hessian_tf.io.models import (
        check_model_path, compiled_loss_warning, import_modules, load_model_function)
    from hessian_tf.operators import (
        HessianOperator, NonDeterministicError, NonFiniteError)
    from hessian_tf.operators import gauss_newton
    from hessian_tf.operators.subset import SubsetModelFunction
    from hessian_tf.operators.precision import compute_dtypes
    from hessian_tf.operators.hessian import AUTO_TIMING_BATCHES, auto_margin_note
    from hessian_tf.operators.model_function import regularizers_left_out

    multi_worker = config.strategy == "multi_worker"
    waiting = (
        f"--worker_timeout={config.worker_timeout:g}: not every worker joined the cluster "
        "in time; check that every worker runs and can reach the others (TF_CONFIG)."
    )
    with _deadline(config.worker_timeout, waiting, enabled=multi_worker,
                   created=created):
        strategy = make_strategy(
            config.strategy,
            num_cpu_devices=config.num_cpu_devices,
            tpu=config.tpu,
            worker_timeout=config.worker_timeout,
            intra_op_threads=config.intra_op_threads,
            inter_op_threads=config.inter_op_threads,
        )
    chief = is_chief(strategy)
    if chief and not config.dry_run:
        contexts.enter_context(_output_lock(output_dir))
    # Grappler's set-up of the job's functions, once TensorFlow's threads are set.
    light_graphs = contexts.enter_context(
        graph_optimization(config.graph_optimization, tpu=config.strategy == "tpu"))
    if config.model:
        check_model_path(config.model)  # before the data, which can take long to load
        import_modules(config.import_modules)
    stream = None
    if config.stream:
        from hessian_tf.io.streaming import tfds_stream

        dataset_fn, num_examples, (x, y) = tfds_stream(
            config.dataset[len("tfds:"):], split=config.split, data_dir=config.data_dir or None,
            batch_size=config.batch_size, preprocessing=config.preprocessing,
        )
        stream = (dataset_fn, num_examples)
        logging.info("Streaming %s: %d examples, inputs %s", config.dataset, num_examples, x.shape[1:])
    else:
        x, y = load_dataset(config.dataset, split=config.split, data_dir=config.data_dir or None)
        logging.info("Dataset %s: x %s, y %s", config.dataset, x.shape, y.shape)
    extra = {}
    if config.model:
        model_function = load_model_function(config.model, strategy, config.import_modules,
                                             unroll_steps=config.unroll_steps)
    else:
        model_function, x, extra = _default_model_function(config, x, y, output_dir)
    if config.precision == "model":
        _warn_of_half_precision(model_function, config.stream)
    else:
        model_function, x = _in_dtype(model_function, x, config.precision)
    options = dict(
        batch_size=config.batch_size,
        loss=config.loss,
        bn_mode=config.bn_mode,
        strategy=strategy,
        regularization=config.regularization,
        method=config.method,
    )
    if config.cache_residuals:
        options["cache_residuals"] = True
    if config.variables:
        model_function = SubsetModelFunction(model_function, config.variables)
    if stream is not None:
        from hessian_tf.operators.streaming import StreamingHessianOperator

        operator_type = gauss_newton.operator_class(config.operator, StreamingHessianOperator)
        operator = operator_type(
            model_function, stream[0], num_examples=stream[1], sample=(x, y), **options
        )
    else:
        operator_type = gauss_newton.operator_class(config.operator, HessianOperator)
        operator = operator_type(model_function, x, y, **options)
    # After the operator's own refusals (a final softmax, labels that fit no loss).
    differs = compiled_loss_warning(config.model, config.loss)  # None but for .keras files
    if differs:
        logging.warning("%s", differs)
    if config.dry_run:
        return _dry_run(config, operator, model_function, x, y, stream)
    refusal = basis_memory_refusal(config, operator.dim)
    if refusal:
        raise ValueError(refusal)
    group = lockstep_group(config, operator.dim)
    checkpointer = _checkpointer(config, model_function, x, y)
    if config.restart and chief and os.path.isdir(checkpointer.directory):
        shutil.rmtree(checkpointer.directory)
        logging.info("--restart: removed the checkpoints in %s", checkpointer.directory)
    resumed = None if config.restart else checkpointer.restore(
        lanczos_steps=config.lanczos_steps, dim=operator.dim, basis_dtype=basis_dtype(config)
    )
    if checkpointer.resumed_across:
        logging.info("The checkpoint's run differs only in options applied after the "
                     "Lanczos steps, which this run applies: %s",
                     ", ".join(checkpointer.resumed_across))
    if resumed is not None and resumed.draw >= config.num_draws:
        logging.info("Resuming after the Lanczos steps (%d draw(s), %d products done) from %s",
                     resumed.draw, resumed.num_products, checkpointer.latest())
    elif resumed is not None:
        step = resumed.lanczos[0].num_steps if resumed.lanczos else 0
        draws = range(resumed.draw, resumed.draw + len(resumed.lanczos or (None,)))
        logging.info(
            "Resuming %s at Lanczos step %d (%d products done) from %s",
            spectrum_lib.draws_label(draws), step, resumed.num_products, checkpointer.latest(),
        )
        if resumed.lanczos and len(draws) != group:
            logging.info(
                "The checkpoint's %d draw(s) in lockstep continue together%s",
                len(draws), f"; the later draws go {group} at a time (--lockstep_draws="
                f"{config.lockstep_draws})" if draws.stop < config.num_draws else "")
    # The checkpoint's group in progress, which goes on whatever --lockstep_draws says.
    resumed_group = len(resumed.lanczos) if resumed is not None and resumed.lanczos else None
    start = None  # a new run's state, where its first block is drawn before the run
    if resumed is not None and checkpointer.restored_method and operator.times_methods:
        # --method=auto: the method this run began with, so that it continues the same
        # arithmetic.
        operator.use_method(checkpointer.restored_method)
    else:
        # --method=auto: the faster over the first batches, for blocks of `group` vectors
        # (forward mode not timed where its set-up would cost more than it could save),
        # timed on the first block: its timed runs are then the determinism check's
        # (a resumed run has no check), and its products where those batches are all
        # the data. The run then starts from the state whose first block the methods
        # were timed on (its start vectors drawn once).
        start = spectrum_lib.new_state(
            operator.dim, lanczos_steps=config.lanczos_steps, num_draws=config.num_draws,
            seed=config.seed, lockstep=group, basis_dtype=basis_dtype(config),
        ) if (operator.times_methods and config.check_determinism
              and resumed is None) else None
        first = spectrum_lib.first_block(start) if start is not None else None
        operator.choose_method(group, block_products(config, group, operator), first)
        del first
    checkpointer.method_of = lambda: operator.method
    if operator.method_seconds:
        def timed(method):
            runs = operator.method_runs[method]
            return (f"{operator.method_seconds[method]:.4g} s "
                    f"({runs} timed run{'' if runs == 1 else 's'})")

        logging.info(
            "--method=auto: reverse over reverse %s, forward over backward %s; medians "
            "of products of blocks of %d vector(s) over %d batch(es)%s; --method fixes one",
            timed("reverse_over_reverse"),
            timed("forward_over_backward")
            if operator.method_seconds["forward_over_backward"] is not None
            else operator.forward_mode_untimed
            or f"does not run through this model ({operator.forward_mode_failure})",
            group, min(AUTO_TIMING_BATCHES, operator.batches_per_replica),
            f"; {margin}" if (margin := auto_margin_note(operator.method_seconds)) else "",
        )
    logging.info(
        "%s of the mean %s%s over %d examples: %d parameters, %s products, %d replicas, "
        "sums in %s", OPERATOR_NAMES[config.operator][0].upper()
        + OPERATOR_NAMES[config.operator][1:], config.loss,
        " + the model's own losses (regularizers)"
        if config.regularization and model_function.regularizers else "",
        operator.num_examples, operator.dim, operator.method,
        strategy.num_replicas_in_sync, operator.accumulation,
    )
    left_out = regularizers_left_out(
        0 if config.regularization else model_function.regularizers, "--regularization")
    if left_out:
        logging.info("%s", left_out[0].upper() + left_out[1:])
    preemption = _checkpointing(
        config, checkpointer, chief=chief,
        start_products=resumed.num_products if resumed is not None else 0,
    )
    _PHASE["name"] = "steps"  # SIGTERM noted (`_checkpointing` handles it within)
    try:
        with preemption as after_step:
            # The first all-reduce is where a worker lost since the strategy began would
            # hang: one of a scalar, so that the deadline times the wait alone.
            if multi_worker:
                with _deadline(
                        config.worker_timeout,
                        f"--worker_timeout={config.worker_timeout:g}: not every worker reached "
                        "the first all-reduce in time (one was lost, or took that much longer "
                        "to load its data and model); check the other workers' logs, or "
                        "raise --worker_timeout.", created=created):
                    wait_for_workers(strategy)
            loss, gradient = operator.loss_and_gradient()
            spectrum = spectrum_lib.stochastic_lanczos_quadrature(
                operator.matvec,
                operator.dim,
                lanczos_steps=config.lanczos_steps,
                num_draws=config.num_draws,
                seed=config.seed,
                kernel_width=config.kernel_width or None,
                num_grid_points=config.num_grid_points,
                first_product=operator.check_determinism if config.check_determinism else None,
                progress=log_progress,
                basis_dtype=basis_dtype(config),
                initial_state=resumed if resumed is not None else start,
                after_step=after_step,
                matmat=operator.matmat,
                lockstep=group,
            )
    except (NonFiniteError, NonDeterministicError) as error:
        raise type(error)(
            f"--model={config.model or '(default MLP)'} --dataset={config.dataset}: {error}"
        ) from error
    # The states the run began from hold its first group's Lanczos bases: freed before
    # the analyses (--gradient_overlap's own basis; the check counts it alone).
    start = resumed = None
    preempted = bool(after_step.preempted) or _PHASE["deferred"]
    _PHASE["deferred"] = False
    if config.trace or config.gradient_overlap:
        # Their products can take as long as the steps: a checkpoint of the finished
        # steps (tridiagonals alone) first, so that SIGTERM during them costs only them.
        if chief and after_step.state is not None:
            logging.info("Checkpoint %s (the Lanczos steps, before the analyses)",
                         _save(checkpointer, after_step.state, config))
        _PHASE["name"] = "analyses"
        if preempted or _PHASE["deferred"]:
            raise _preempted_outside_the_steps(config)
    elif preempted:  # after the last step: the steps are done, finish the results
        logging.warning("SIGTERM arrived after the last Lanczos step; writing the results.")
    stats = spectrum.statistics
    grid, sigma = spectrum.density.grid, spectrum.density.kernel_width
    if grid.size > 1 and sigma < grid[1] - grid[0]:
        logging.warning(
            "%s is below the density grid's spacing (%.3g: %d points over [%.4g, %.4g]): "
            "the Gaussians fall between the points, and the density's mass with them; pass "
            "%s", f"--kernel_width={sigma:.3g}" if config.kernel_width
            else f"the default kernel width ({sigma:.3g}, 0.002 of the range)",
            grid[1] - grid[0], grid.size, grid[0], grid[-1],
            "a wider --kernel_width (0: the default) or more --num_grid_points."
            if config.kernel_width else "more --num_grid_points (the default 4096 resolves it).")
    before = operator.num_products
    analyses, arrays_extra, band = _analyses(config, operator, spectrum, loss, gradient)
    _PHASE["name"] = "results"
    after_spectrum = operator.num_products - before  # --trace's, --gradient_overlap's
    summary = {
        "version": hessian_tf.__version__,
        "num_params": operator.dim,
        "num_examples": operator.num_examples,
        "num_replicas": strategy.num_replicas_in_sync,
        "batch_size": operator.batch_size,
        "bn_mode": operator.bn_mode,
        "bn_statistics": (
            "moving statistics" if operator.bn_mode == "inference"
            else f"statistics of each batch of {operator.batch_size} examples (per replica)"
        ),
        "method": operator.method,
        # --method=auto: {method: median seconds of its products over the first batches
        # (None: did not run, or not timed)}; else null. method_note: why one is None.
        "method_seconds": operator.method_seconds,
        "method_note": operator.forward_mode_untimed or operator.forward_mode_failure
        or auto_margin_note(operator.method_seconds) or operator.auto_untimed_note or None,
        "precision": config.precision,
        # The dtypes the model's layers compute its products in (null for a SavedModel).
        "compute_dtypes": compute_dtypes(model_function),
        "accumulation": operator.accumulation,
        "loss": loss,
        "gradient_norm": float(np.linalg.norm(gradient)),
        "lambda_max": stats.lambda_max,
        "lambda_min": stats.lambda_min,
        "negative_mass": stats.negative_mass,
        "negative_mass_tolerance": stats.negative_mass_tolerance,
        "zero_tolerance": stats.zero_tolerance,
        "trace_estimate": stats.trace,
        "trace_stderr": stats.trace_stderr,
        "kernel_width": spectrum.density.kernel_width,
        "lanczos_steps_completed": spectrum.num_steps.tolist(),
        "krylov_exhausted": spectrum.exhausted.tolist(),
        "orthogonality_loss": spectrum.orthogonality_loss,
        # Over the whole data, across sessions of a resumed job; the determinism check
        # costs one more where it runs over the whole data (else two runs over its
        # first batches, not counted).
        "num_hvps": (spectrum.num_products + group * check_products(config, operator)
                     + after_spectrum),
        "num_hvps_this_session": operator.num_products,
        "product_seconds": operator.product_seconds,
        "lanczos_seconds": spectrum.seconds,
        # One step of the group (k products in one data pass and the algebra), after
        # the first step, which includes tracing.
        "seconds_per_step": spectrum.seconds_per_step,
        "lockstep_draws": group,
        "resumed_lockstep_draws": resumed_group,
        "residual_bytes": getattr(operator, "residual_bytes", 0),
        "cpu_threads": cpu_threads(),
        "graph_optimization": "light" if light_graphs else "full",
        "seconds": None,  # filled in just before writing
        "config": config.to_dict(),
        **analyses,
        **extra,
    }
    arrays = {**spectrum_lib.spectrum_arrays(spectrum), **arrays_extra}
    title = (
        ("" if config.operator == "hessian" else f"{SHORT_OPERATOR_NAMES[config.operator]}: ")
        + f"{os.path.basename(config.model.rstrip('/')) or 'default MLP'} on "
        f"{_dataset_label(config.dataset)}: "
        + (f"variables '{config.variables}', " if config.variables else "")
        + f"n={operator.dim:,}, {plotting.steps_label(spectrum.num_steps, config.lanczos_steps)}"
        + f", {config.num_draws} draw(s)"
        + (f", BN {config.bn_mode}" if model_function.batch_norms != 0 else "")
    )
    summary["seconds"] = time.perf_counter() - started
    summary = results.strict_json(summary)  # exactly what summary.json holds
    if not chief:
        logging.info("Not the chief: the chief writes the results.")
        return summary
    _PHASE["name"] = "writing"
    try:
        written = results.write_files(
            output_dir,
            {
                results.DENSITY_FILE: lambda path: plotting.plot_densities(
                    [plotting.Curve(spectrum.density.grid, spectrum.density.density,
                                    *(band or (None, None)))],
                    path,
                    title=title,
                ),
                results.SUMMARY_FILE: results.json_writer(summary),
                results.SPECTRUM_FILE: results.npz_writer(arrays),
            },
        )
    except OSError as error:
        raise _write_failed(error, "the results", config) from error
    logging.info("%s; %.1f s, %d products", statistics_lib.headline(stats),
                 summary["seconds"], operator.num_products)
    for path in written:
        logging.info("Wrote %s", path)
    # Checkpoints live only while a job is unfinished.
    if os.path.isdir(checkpointer.directory):
        shutil.rmtree(checkpointer.directory)
    if _PHASE["deferred"]:
        logging.warning("SIGTERM arrived while the results were written; they were "
                        "finished first.")
    return summary
