"""Checkpoints of an SLQ run, so a long job resumes mid-Lanczos.

A checkpoint (tf.train.Checkpoint, rotated by tf.train.CheckpointManager under
OUTPUT_DIR/checkpoints) holds the draws in progress (one lockstep group), their
Lanczos states (α, β and the number of basis rows written so far: full
reorthogonalisation needs all of them), the
finished draws' tridiagonals, the product count, and a fingerprint of the model,
the dataset and the configuration. Start vectors depend only on (seed, draw), so
no random state needs saving. TensorFlow writes the data files first and points
the `checkpoint` index at them last: a crash mid-save leaves the previous
checkpoint in force.

Basis rows never change once written, so each is saved once, as its own file
(OUTPUT_DIR/checkpoints/basis/draw{D}_row{R}.npy, written whole then renamed),
before the checkpoint that counts it: a save writes only the rows that are new
since the last, and copies nothing in memory (a basis can be most of the host's
memory). Once a checkpoint is saved, the rows of the draws it counts as finished are
deleted: on disk there is at most one lockstep group's bases.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from typing import Callable, Iterable, Optional

import numpy as np
import tensorflow as tf
from absl import logging

from hessian_tf import linalg
from hessian_tf.messages import first_line
from hessian_tf.spectrum import SLQState, host_memory_bytes

CHECKPOINT_SUBDIR = "checkpoints"
BASIS_SUBDIR = "basis"
_ROW_FILE = re.compile(r"draw(\d+)_row\d+\.npy(\.tmp)?$")
_INDEX_FILE = re.compile(r"ckpt-(\d+)\.index$")

# Options that do not change the result: a run resumes across changes of these.
# unroll_steps and graph_optimization: the same function, unrolled or looped, set up by
# Grappler's light or full configuration (rounding apart); and runs checkpointed
# before the options existed resume.
_OPERATIONAL_OPTIONS = (
    "output_dir", "checkpoint_every", "checkpoint_seconds", "restart", "worker_timeout",
    "lockstep_draws", "import_modules", "unroll_steps", "graph_optimization",
)


# Options applied to the finished tridiagonals alone (the density, the analyses): a run
# whose checkpoint differs from the command only in these resumes (checkpoints that
# record their run's details; the fingerprint keeps them, as it always has).
_AFTER_THE_STEPS = (
    "num_eigenpairs", "kernel_width", "num_grid_points", "trace", "trace_matvecs",
    "gradient_overlap", "dry_run",
)


def fingerprint_and_details(
    config_dict: dict, variables: Iterable[np.ndarray], x: np.ndarray, y: np.ndarray
) -> tuple[str, str]:
    """(SHA-256 over the configuration (less operational options), the model's
    variable values and the dataset; a JSON text of that configuration and SHA-256s of
    the variables and of the data apart, from the same pass), so that a refused resume
    can name what changed."""
    digest, model, data = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    semantic = {k: v for k, v in sorted(config_dict.items()) if k not in _OPERATIONAL_OPTIONS}
    digest.update(json.dumps(semantic, sort_keys=True, default=str).encode())
    for part, arrays in ((model, variables), (data, (x, y))):
        for value in arrays:
            array = np.ascontiguousarray(value)
            # Its bytes without a copy; as uint8, which every dtype (bfloat16 too, which
            # the buffer protocol refuses) can be viewed as.
            raw = array.reshape(-1).view(np.uint8).data
            for piece in (str((array.dtype.str, array.shape)).encode(), raw):
                digest.update(piece)
                part.update(piece)
    details = {"config": json.loads(json.dumps(semantic, default=str)),
               "model": model.hexdigest(), "data": data.hexdigest()}
    return digest.hexdigest(), json.dumps(details, sort_keys=True)


def fingerprint(
    config_dict: dict, variables: Iterable[np.ndarray], x: np.ndarray, y: np.ndarray
) -> str:
    """SHA-256 over the configuration (less operational options), the model's
    variable values and the dataset."""
    return fingerprint_and_details(config_dict, variables, x, y)[0]


def _difference(stored: str, current: str) -> tuple[list[str], bool]:
    """(What differs between a checkpoint's run details and this run's, as phrases;
    whether only options applied after the steps differ)."""
    stored, current = json.loads(stored), json.loads(current)
    changed = []
    options = []
    for name in sorted(set(stored["config"]) | set(current["config"])):
        before, now = stored["config"].get(name), current["config"].get(name)
        if before != now:
            options.append(name)
            changed.append(f"--{name}={now!r} (the checkpoint's run: {before!r})")
    for part, phrase in (("model", "the model's variables"), ("data", "the data")):
        if stored[part] != current[part]:
            changed.append(phrase)
    only_after = bool(changed) and len(options) == len(changed) and all(
        name in _AFTER_THE_STEPS for name in options)
    return changed, only_after


def _norm(vector: np.ndarray) -> float:
    """The 2-norm, summed in float64 (NumPy's norm of a float32 vector sums in float32:
    a unit vector of 5e7-6e7 entries came out 2e-4 to 5e-3 below 1, by the BLAS)."""
    return float(np.sqrt(np.einsum("i,i->", vector, vector, dtype=np.float64)))


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (corrupted, or of another run)."""


def latest_checkpoint(directory: str, *, warn: bool = False) -> Optional[str]:
    """The latest checkpoint's path in `directory`, or None where it holds none.
    TensorFlow reads an index (the `checkpoint` file) that is missing, or names a
    checkpoint whose files are gone, as no checkpoint at all, and the run would start
    over without a word: the newest complete checkpoint there is taken instead (with a
    warning if `warn`). That state is left by an index deleted by hand, or by a first
    save (or the final removal) cut short; `restore` checks what it takes. Raises
    CheckpointError where the index cannot be read, or names checkpoints of which none
    is left."""
    refusal = (f"--output_dir={os.path.dirname(directory)}: the index of {directory} "
               "(the file `checkpoint`) ")
    fix = ("; pass --restart to start over (it deletes the checkpoints), or use another "
           "--output_dir.")
    try:
        path = tf.train.latest_checkpoint(directory)
    except Exception as error:  # TF raises several types for a damaged index
        raise CheckpointError(
            f"{refusal}cannot be read ({type(error).__name__}: {first_line(error)})"
            f"{fix}") from error
    if path is not None or not os.path.isdir(directory):
        return path
    names = os.listdir(directory)
    numbers = [int(match.group(1)) for match in map(_INDEX_FILE.match, names)
               if match and any(name.startswith(f"ckpt-{match.group(1)}.data-")
                                for name in names)]
    # The newest whose own index (ckpt-N.index) reads: a save cut short can leave one
    # partial beside its data.
    unreadable = []
    for number in sorted(numbers, reverse=True):
        path = os.path.join(directory, f"ckpt-{number}")
        try:
            tf.train.load_checkpoint(path)
        except Exception:  # noqa: BLE001 - TF raises several types for a damaged file
            unreadable.append(os.path.basename(path))
            continue
        if warn:
            logging.warning(
                "%s: the index (the file `checkpoint`) is missing or names no checkpoint "
                "that exists; taking the newest complete one, %s%s.", directory, path,
                f" (past {', '.join(unreadable)}, which cannot be read)" if unreadable
                else "")
        return path
    if numbers:  # none reads: restore refuses the newest, saying why
        return os.path.join(directory, f"ckpt-{max(numbers)}")
    # Basis rows alone are a first save that a crash cut short (they are written
    # before the checkpoint that counts them): nothing to resume, not damage.
    if "checkpoint" in names:
        raise CheckpointError(f"{refusal}names checkpoints of which no file is left{fix}")
    return None


class SLQCheckpointer:
    """Saves and restores SLQState under `directory`."""

    def __init__(self, directory: str, *, fingerprint: str, max_to_keep: int = 2,
                 details: str = ""):
        self.directory = directory
        self.fingerprint = fingerprint
        self.details = details  # fingerprint_and_details's JSON, saved to name changes
        self.max_to_keep = max_to_keep
        self._rows_written: dict[int, int] = {}  # draw -> basis rows on disk
        # The products' method, read at each save (--method=auto chooses it at start,
        # and forward mode may fall back at the first product); a resumed run continues
        # by the method of the checkpoint.
        self.method_of: Optional[Callable[[], str]] = None
        self.restored_method: Optional[str] = None
        self.resumed_across: list[str] = []

    def latest(self) -> Optional[str]:
        return latest_checkpoint(self.directory, warn=True)

    def _row_path(self, draw: int, row: int) -> str:
        return os.path.join(self.directory, BASIS_SUBDIR, f"draw{draw}_row{row}.npy")

    def _write_rows(self, draw: int, lanczos) -> int:
        """Writes the basis rows of `draw` not written yet; returns the row count."""
        rows = min(lanczos.num_steps + 1, lanczos.alphas.size)
        os.makedirs(os.path.join(self.directory, BASIS_SUBDIR), exist_ok=True)
        for row in range(self._rows_written.get(draw, 0), rows):
            path = self._row_path(draw, row)
            try:
                with open(path + ".tmp", "wb") as file:
                    np.save(file, lanczos.basis[row])
                os.replace(path + ".tmp", path)
            except BaseException:  # a full disk, a file-size limit: no part left behind
                if os.path.exists(path + ".tmp"):
                    os.remove(path + ".tmp")
                raise
        self._rows_written[draw] = rows
        return rows

    def save(self, state: SLQState) -> str:
        values = {
            "fingerprint": tf.constant(self.fingerprint),
            "details": tf.constant(self.details),
            "draw": tf.constant(state.draw, tf.int64),
            "num_products": tf.constant(state.num_products, tf.int64),
        }
        if self.method_of is not None:
            values["method"] = tf.constant(self.method_of())
        for member, lanczos in enumerate(state.lanczos or ()):
            # One Lanczos state per draw of the lockstep group in progress.
            rows = self._write_rows(state.draw + member, lanczos)
            values.update({
                f"lanczos{member}_rows": tf.constant(rows, tf.int64),
                f"lanczos{member}_alphas": tf.constant(lanczos.alphas),
                f"lanczos{member}_betas": tf.constant(lanczos.betas),
                f"lanczos{member}_num_steps": tf.constant(lanczos.num_steps, tf.int64),
                f"lanczos{member}_exhausted": tf.constant(lanczos.exhausted),
            })
        for index, (result, orthogonality) in enumerate(state.completed):
            values[f"draw{index}_alphas"] = tf.constant(result.alphas)
            values[f"draw{index}_betas"] = tf.constant(result.betas)
            values[f"draw{index}_residual_norm"] = tf.constant(result.residual_norm, tf.float64)
            values[f"draw{index}_exhausted"] = tf.constant(result.exhausted)
            values[f"draw{index}_orthogonality"] = tf.constant(orthogonality, tf.float64)
        checkpoint = tf.train.Checkpoint(
            **{name: tf.Variable(value, trainable=False) for name, value in values.items()}
        )
        manager = tf.train.CheckpointManager(
            checkpoint, self.directory, max_to_keep=self.max_to_keep
        )
        try:
            path = manager.save(checkpoint_number=state.num_products)
        except tf.errors.OpError as error:  # a full disk, a file-size limit: as the rows'
            for name in os.listdir(self.directory):
                if name.endswith("_temp") and name.startswith("ckpt-"):
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
            raise OSError(f"{type(error).__name__}: {first_line(error)}") from error
        self._delete_rows_before(state.draw)
        return path

    def _delete_rows_before(self, draw: int) -> None:
        """Deletes the basis rows of draws before `draw`: the latest checkpoint (the
        only one restored) holds their tridiagonals, and no longer needs them."""
        directory = os.path.join(self.directory, BASIS_SUBDIR)
        for name in os.listdir(directory) if os.path.isdir(directory) else ():
            match = _ROW_FILE.match(name)
            if match and int(match.group(1)) < draw:
                os.remove(os.path.join(directory, name))
        for finished in [d for d in self._rows_written if d < draw]:
            del self._rows_written[finished]

    def restore(self, *, lanczos_steps: int, dim: int, basis_dtype=np.float64) -> Optional[SLQState]:
        """The latest state, or None if there is no checkpoint. Raises
        CheckpointError for a damaged checkpoint or one of another run."""
        with self._latest_read() as latest:
            if latest is None:
                return None
            path, get, names = latest
            draw = int(get("draw"))
            if "method" in names:
                method = get("method")
                self.restored_method = method.decode() if isinstance(method, bytes) else str(method)
            completed = []
            for index in range(draw):
                completed.append(
                    (
                        linalg.LanczosResult(
                            alphas=get(f"draw{index}_alphas"),
                            betas=get(f"draw{index}_betas"),
                            residual_norm=float(get(f"draw{index}_residual_norm")),
                            basis=None,
                            exhausted=bool(get(f"draw{index}_exhausted")),
                        ),
                        float(get(f"draw{index}_orthogonality")),
                    )
                )
            members = 0  # the draws of the lockstep group in progress
            while f"lanczos{members}_rows" in names:
                members += 1
            need = members * lanczos_steps * dim * np.dtype(basis_dtype).itemsize
            have = host_memory_bytes()
            if need > have:
                raise CheckpointError(
                    f"--output_dir={os.path.dirname(self.directory)}: its checkpoint holds "
                    f"{members} draws in lockstep, whose Lanczos bases need "
                    f"{need / 2**30:.3g} GiB, more than the memory here ({have / 2**30:.3g} "
                    "GiB: the host's, or its cgroup's limit); they continue together "
                    "whatever --lockstep_draws says: resume where there is more memory, "
                    "or pass --restart to start over."
                )
            group = []
            while len(group) < members:
                prefix = f"lanczos{len(group)}"
                rows = int(get(f"{prefix}_rows"))
                alphas = get(f"{prefix}_alphas")
                self._check_steps(alphas.size, lanczos_steps)
                num_steps = int(get(f"{prefix}_num_steps"))
                exhausted = bool(get(f"{prefix}_exhausted"))
                basis = linalg.zero_basis(lanczos_steps, dim, basis_dtype)
                member_draw = draw + len(group)
                for row in range(rows):
                    vector = np.load(self._row_path(member_draw, row), allow_pickle=False)
                    if vector.shape != (dim,):
                        raise CheckpointError(
                            f"--output_dir={os.path.dirname(self.directory)}: its checkpoint "
                            f"has Lanczos vectors of dimension {vector.size}, not {dim}; pass "
                            "--restart to start over."
                        )
                    # Lanczos vectors are unit vectors: a row of zeros (a file whose
                    # data never reached the disk before a crash) or otherwise damaged
                    # in place would be taken, and the steps after it go wrong.
                    norm = _norm(vector)
                    if not abs(norm - 1.0) <= 1e-3 and (row < num_steps or not exhausted):
                        raise CheckpointError(
                            f"--output_dir={os.path.dirname(self.directory)}: its "
                            f"checkpoint's Lanczos vector {self._row_path(member_draw, row)} "
                            f"has norm {norm:.6g}, not 1: it is damaged; pass --restart to "
                            "start over.")
                    basis[row] = vector
                self._rows_written[member_draw] = rows
                group.append(linalg.LanczosState(
                    basis=basis,
                    alphas=alphas.copy(),
                    betas=get(f"{prefix}_betas").copy(),
                    num_steps=num_steps,
                    exhausted=exhausted,
                ))
            lanczos = tuple(group) or None
            return SLQState(
                draw=draw,
                lanczos=lanczos,
                completed=tuple(completed),
                num_products=int(get("num_products")),
            )

    @contextlib.contextmanager
    def _latest_read(self):
        """Yields (path, get, names) of the latest checkpoint (`_checked_reader`'s: its
        fingerprint checked), or None where there is none; what fails in the block is
        a CheckpointError that says why."""
        path = self.latest()
        if path is None:
            yield None
            return
        try:
            yield (path, *self._checked_reader(path))
        except CheckpointError:
            raise
        except MemoryError as error:  # no damage: a basis the host could not give memory
            raise CheckpointError(
                f"--output_dir={os.path.dirname(self.directory)}: its checkpoint's Lanczos "
                f"bases could not be given memory ({first_line(error)}); they continue as "
                "checkpointed whatever the flags say: resume where there is more memory, "
                "or pass --restart to start over."
            ) from error
        except Exception as error:  # TF raises several types for damaged files
            raise self._damaged(path, error) from error

    def _checked_reader(self, path: str):
        """(get, names) of the checkpoint `path`: `get(name)` its value of `name`, and
        the names it holds, once its fingerprint is this run's (a difference only in
        options applied after the steps is noted in `resumed_across`). Raises
        CheckpointError for a checkpoint of another run."""
        reader = tf.train.load_checkpoint(path)
        names = {name.split("/")[0] for name in reader.get_variable_to_shape_map()}

        def get(name):
            return reader.get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE")

        def text(name):
            value = get(name)
            return value.decode() if isinstance(value, bytes) else str(value)

        stored = text("fingerprint")
        details = text("details") if "details" in names else ""
        changed, only_after = (_difference(details, self.details)
                               if stored != self.fingerprint and details and self.details
                               else ([], False))
        if stored != self.fingerprint and not only_after:
            what = ("; it differs in " + ", ".join(changed) if changed else
                    " (the model, dataset or configuration changed)")
            raise CheckpointError(
                f"--output_dir={os.path.dirname(self.directory)}: its checkpoint is of "
                f"another run{what}; pass --restart to start over, or use another "
                "--output_dir."
            )
        self.resumed_across = changed  # options applied after the steps alone
        return get, names

    def _check_steps(self, steps: int, lanczos_steps: int) -> None:
        if steps != lanczos_steps:
            raise CheckpointError(
                f"--output_dir={os.path.dirname(self.directory)}: its checkpoint has "
                f"{steps} Lanczos steps, not {lanczos_steps}; pass --restart to start over."
            )

    def _damaged(self, path: str, error: BaseException) -> CheckpointError:
        """The refusal of the checkpoint `path`, which could not be read (`error`), with
        why where the index's fallback took it."""
        index = os.path.join(self.directory, "checkpoint")
        why = ""
        try:
            named = tf.train.get_checkpoint_state(self.directory)
        except Exception:  # noqa: BLE001 - an index that cannot be read is refused before
            named = None
        if not os.path.exists(index):
            why = ("; it was taken because the index (the file `checkpoint`) is missing, "
                   "and files it needs may have gone since")
        elif named is not None and named.model_checkpoint_path and os.path.abspath(
                named.model_checkpoint_path) != os.path.abspath(path):
            why = (f"; it was taken because the index names "
                   f"{os.path.basename(named.model_checkpoint_path)}, which is gone, and "
                   "files this one needs may have gone with it")
        return CheckpointError(
            f"--output_dir={os.path.dirname(self.directory)}: the checkpoint {path} is "
            f"corrupted or partial ({type(error).__name__}: {first_line(error)}){why}; "
            "pass --restart to start over.")

    def progress(self, *, lanczos_steps: int, num_draws: int) -> Optional[tuple[str, int, int]]:
        """For a dry run: (path, products done, Lanczos products left) of the checkpoint
        a run would resume, without its bases; None where there is none. Raises
        CheckpointError where the run would refuse it (another run's, damaged, other
        step counts)."""
        with self._latest_read() as latest:
            if latest is None:
                return None
            path, get, names = latest
            draw = int(get("draw"))
            left = max(num_draws - draw, 0) * lanczos_steps
            member = 0
            while f"lanczos{member}_rows" in names and draw < num_draws:
                self._check_steps(get(f"lanczos{member}_alphas").size, lanczos_steps)
                # As the progress line counts them: an exhausted draw takes no more.
                left -= (lanczos_steps if bool(get(f"lanczos{member}_exhausted"))
                         else int(get(f"lanczos{member}_num_steps")))
                member += 1
            return path, int(get("num_products")), max(left, 0)
