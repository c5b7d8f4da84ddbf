"""SLQ checkpoints: a lockstep group round-trips exactly, each basis row is written
once, and damaged row files are refused with one clear error."""

import os

import numpy as np
import pytest

from hessian_tf import linalg
from hessian_tf.io import checkpoints
from hessian_tf.spectrum import SLQState

DIM, STEPS = 40, 12


def group_state(steps_done, draw=2, members=3):
    matrix = np.diag(np.arange(1.0, DIM + 1))
    group = []
    for member in range(members):
        state = linalg.lanczos_init(np.random.default_rng(member).standard_normal(DIM), STEPS)
        for _ in range(steps_done):
            state = linalg.lanczos_step(state, matrix @ linalg.current_vector(state))
        group.append(state)
    completed = tuple(
        (linalg.lanczos_result(linalg.lanczos_init(np.ones(DIM), 3)._replace(num_steps=1)), 0.0)
        for _ in range(draw)
    )
    return SLQState(draw=draw, lanczos=tuple(group), completed=completed,
                    num_products=members * steps_done)


def test_group_round_trips_and_rows_are_written_once(tmp_path):
    saver = checkpoints.SLQCheckpointer(str(tmp_path), fingerprint="f")
    saver.save(group_state(3))
    rows = tmp_path / checkpoints.BASIS_SUBDIR
    first = {p.name: p.stat().st_mtime_ns for p in rows.iterdir()}
    assert len(first) == 3 * 4  # 3 draws x (3 steps + the next vector)
    state = group_state(7)
    saver.save(state)
    second = {p.name: p.stat().st_mtime_ns for p in rows.iterdir()}
    assert len(second) == 3 * 8
    assert all(second[name] == mtime for name, mtime in first.items())  # not rewritten
    restored = checkpoints.SLQCheckpointer(str(tmp_path), fingerprint="f").restore(
        lanczos_steps=STEPS, dim=DIM)
    assert restored.draw == 2 and restored.num_products == 21 and len(restored.completed) == 2
    for original, copy in zip(state.lanczos, restored.lanczos):
        np.testing.assert_array_equal(copy.basis, original.basis)
        np.testing.assert_array_equal(copy.alphas, original.alphas)
        np.testing.assert_array_equal(copy.betas, original.betas)
        assert copy.num_steps == original.num_steps == 7


@pytest.mark.parametrize("damage", ["truncate", "delete", "wrong_size", "zeroed", "scaled"])
def test_damaged_basis_rows_are_refused(tmp_path, damage):
    saver = checkpoints.SLQCheckpointer(str(tmp_path), fingerprint="f")
    saver.save(group_state(3))
    row = tmp_path / checkpoints.BASIS_SUBDIR / "draw3_row2.npy"
    if damage == "truncate":
        row.write_bytes(row.read_bytes()[:50])
    elif damage == "delete":
        os.remove(row)
    elif damage == "wrong_size":
        np.save(row, np.ones(DIM + 1))
    else:  # of the right size, damaged in place: it had been taken
        vector = np.load(row)
        np.save(row, vector * (0.0 if damage == "zeroed" else 1.01))
    with pytest.raises(checkpoints.CheckpointError, match="--restart"):
        checkpoints.SLQCheckpointer(str(tmp_path), fingerprint="f").restore(
            lanczos_steps=STEPS, dim=DIM)


@pytest.mark.parametrize("damage, products", [
    ("garbage", 15), ("index_deleted", 15), ("latest_deleted", 9),
    # The newest's own index cut short (a save stopped while it merged): the one before.
    ("latest_index_cut_short", 9)])
def test_an_index_naming_no_checkpoint_that_exists_takes_the_newest_complete_one(
        tmp_path, damage, products):
    """TensorFlow reads a missing index, or one naming deleted files, as no checkpoint:
    the run started over without a word. A save cut short between a checkpoint's files
    and the index leaves the same state."""
    saver = checkpoints.SLQCheckpointer(str(tmp_path), fingerprint="f")
    saver.save(group_state(3))
    saver.save(group_state(5))
    index = tmp_path / "checkpoint"
    if damage == "garbage":
        index.write_text("garbage\n")
    elif damage == "index_deleted":
        index.unlink()
    elif damage == "latest_index_cut_short":
        index.unlink()
        own = tmp_path / "ckpt-15.index"
        own.write_bytes(own.read_bytes()[: own.stat().st_size // 2])
    else:
        for path in tmp_path.glob("ckpt-15.*"):
            path.unlink()
    restored = checkpoints.SLQCheckpointer(str(tmp_path), fingerprint="f").restore(
        lanczos_steps=STEPS, dim=DIM)
    assert restored.num_products == products


@pytest.mark.parametrize("damage, told", [
    ("empty", "cannot be read"),
    ("all_deleted", "names checkpoints of which no file is left"),
])
def test_a_damaged_index_is_refused_not_taken_for_no_checkpoint(tmp_path, damage, told):
    saver = checkpoints.SLQCheckpointer(str(tmp_path), fingerprint="f")
    saver.save(group_state(3))
    if damage == "empty":
        (tmp_path / "checkpoint").write_text("")
    else:
        for path in tmp_path.glob("ckpt-*"):
            path.unlink()
    with pytest.raises(checkpoints.CheckpointError) as raised:
        checkpoints.SLQCheckpointer(str(tmp_path), fingerprint="f").restore(
            lanczos_steps=STEPS, dim=DIM)
    assert told in str(raised.value) and "--restart" in str(raised.value)


def test_a_save_that_tensorflow_cannot_write_is_an_os_error_and_leaves_no_temp(
        tmp_path, monkeypatch):
    import tensorflow as tf

    def full(manager, checkpoint_number=None):
        (tmp_path / f"ckpt-{checkpoint_number}_temp").mkdir()
        raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")

    monkeypatch.setattr(tf.train.CheckpointManager, "save", full)
    with pytest.raises(OSError, match="ResourceExhaustedError: No space left on device"):
        checkpoints.SLQCheckpointer(str(tmp_path), fingerprint="f").save(group_state(3))
    assert not list(tmp_path.glob("ckpt-*"))


def test_float32_rows_of_many_entries_are_unit_vectors_in_float64():
    # np.linalg.norm sums float32 squares in float32 (2e-4 to 5e-3 off here, by the BLAS).
    vector = np.full(6 * 10**7, 1 / np.sqrt(6e7), np.float32)
    assert abs(checkpoints._norm(vector) - 1) < 1e-6
    assert abs(float(np.linalg.norm(vector)) - 1) > 1e-4  # what it had used


def test_bfloat16_variables_are_fingerprinted():
    import ml_dtypes

    from hessian_tf import config as config_lib

    config = config_lib.default_config().to_dict()
    variables = [np.arange(4, dtype=np.float32).astype(ml_dtypes.bfloat16)]
    first = checkpoints.fingerprint(config, variables, np.ones((2, 2)), np.arange(2))
    variables[0][1] = 7
    assert checkpoints.fingerprint(config, variables, np.ones((2, 2)), np.arange(2)) != first


def test_no_checkpoint_and_a_first_save_cut_short_are_nothing_to_resume(tmp_path):
    saver = checkpoints.SLQCheckpointer(str(tmp_path / "absent"), fingerprint="f")
    assert saver.restore(lanczos_steps=STEPS, dim=DIM) is None
    rows = tmp_path / checkpoints.BASIS_SUBDIR  # rows written, then the process died
    rows.mkdir()
    np.save(rows / "draw0_row0.npy", np.ones(DIM))
    saver = checkpoints.SLQCheckpointer(str(tmp_path), fingerprint="f")
    assert saver.restore(lanczos_steps=STEPS, dim=DIM) is None


def test_a_group_larger_than_the_memory_is_refused_before_its_bases_are_taken(
        tmp_path, monkeypatch):
    from hessian_tf import host

    saver = checkpoints.SLQCheckpointer(str(tmp_path), fingerprint="f")
    saver.save(group_state(3))
    need = 3 * STEPS * DIM * 8  # three bases of float64
    taken = []
    monkeypatch.setattr(linalg, "zero_basis", lambda *args: taken.append(args))
    monkeypatch.setattr(host, "cgroup_memory_limit", lambda: need - 1)
    with pytest.raises(checkpoints.CheckpointError,
                       match=r"holds 3 draws in lockstep, whose Lanczos bases need .* more "
                             r"than the memory here .*whatever --lockstep_draws says.*--restart"):
        checkpoints.SLQCheckpointer(str(tmp_path), fingerprint="f").restore(
            lanczos_steps=STEPS, dim=DIM)
    assert not taken
    # In float32 they fit.
    monkeypatch.undo()
    monkeypatch.setattr(host, "cgroup_memory_limit", lambda: need - 1)
    restored = checkpoints.SLQCheckpointer(str(tmp_path), fingerprint="f").restore(
        lanczos_steps=STEPS, dim=DIM, basis_dtype=np.float32)
    assert len(restored.lanczos) == 3


def test_a_basis_the_host_cannot_hold_is_not_told_as_a_damaged_checkpoint(
        tmp_path, monkeypatch):
    saver = checkpoints.SLQCheckpointer(str(tmp_path), fingerprint="f")
    saver.save(group_state(3))

    def refused(rows, dim, dtype=np.float64):
        raise linalg.BasisMemoryError(f"a Lanczos basis of {rows} × {dim}")

    monkeypatch.setattr(linalg, "zero_basis", refused)
    # Not "corrupted or partial", nor the bases' flags, which a resume cannot change.
    with pytest.raises(checkpoints.CheckpointError) as raised:
        checkpoints.SLQCheckpointer(str(tmp_path), fingerprint="f").restore(
            lanczos_steps=STEPS, dim=DIM)
    assert str(raised.value) == (
        f"--output_dir={os.path.dirname(str(tmp_path))}: its checkpoint's Lanczos bases could "
        "not be given memory (a Lanczos basis of 12 × 40); they continue as checkpointed "
        "whatever the flags say: resume where there is more memory, or pass --restart to "
        "start over.")
    assert isinstance(raised.value.__cause__, linalg.BasisMemoryError)


def test_rows_of_finished_draws_are_deleted_once_a_checkpoint_counts_them(tmp_path):
    saver = checkpoints.SLQCheckpointer(str(tmp_path), fingerprint="f")
    saver.save(group_state(3, draw=2))  # draws 2-4 in progress
    rows = tmp_path / checkpoints.BASIS_SUBDIR
    (rows / "draw1_row0.npy.tmp").write_bytes(b"left by a crash mid-write")
    later = group_state(5, draw=5, members=2)  # draws 2-4 finished, 5-6 in progress
    saver.save(later)
    assert sorted({name.split("_")[0] for name in os.listdir(rows)}) == ["draw5", "draw6"]
    restored = checkpoints.SLQCheckpointer(str(tmp_path), fingerprint="f").restore(
        lanczos_steps=STEPS, dim=DIM)
    assert restored.draw == 5 and len(restored.completed) == 5
    for original, copy in zip(later.lanczos, restored.lanczos):
        np.testing.assert_array_equal(copy.basis, original.basis)
    saver.save(SLQState(draw=7, lanczos=None, completed=later.completed, num_products=40))
    assert os.listdir(rows) == []


def test_fingerprint_ignores_operational_options_only():
    from hessian_tf import config as config_lib

    x, y = np.ones((3, 2)), np.arange(3)
    variables = [np.ones(4)]

    def of(**changes):
        config = config_lib.default_config().to_dict()
        config.update(changes)
        return checkpoints.fingerprint(config, variables, x, y)

    base = of()
    # The same function, unrolled or looped: a run resumes across it (and runs
    # checkpointed before the option existed, whose configs lack it, resume too).
    assert of(unroll_steps=0) == of(unroll_steps=200) == base
    without = config_lib.default_config().to_dict()
    del without["unroll_steps"]
    assert checkpoints.fingerprint(without, variables, x, y) == base
    assert of(lockstep_draws=3) == base
    assert of(lanczos_steps=91) != base and of(method="forward_over_backward") != base


def test_the_fingerprint_is_what_it_was_and_its_details_come_from_the_same_pass():
    import hashlib
    import json

    from hessian_tf import config as config_lib

    config = config_lib.default_config().to_dict()
    variables = [np.arange(6.0).reshape(2, 3), np.ones(4, np.float32)]
    x, y = np.linspace(0, 1, 12).reshape(3, 4)[:, ::2], np.arange(3)  # x not contiguous
    digest = hashlib.sha256()  # as fingerprint() computed it before the details
    semantic = {k: v for k, v in sorted(config.items())
                if k not in checkpoints._OPERATIONAL_OPTIONS}
    digest.update(json.dumps(semantic, sort_keys=True, default=str).encode())
    for value in [*variables, x, y]:
        array = np.ascontiguousarray(value)
        digest.update(str((array.dtype.str, array.shape)).encode())
        digest.update(array.tobytes())
    fingerprint, details = checkpoints.fingerprint_and_details(config, variables, x, y)
    assert fingerprint == digest.hexdigest() == checkpoints.fingerprint(config, variables, x, y)
    assert json.loads(details)["config"]["lanczos_steps"] == config["lanczos_steps"]


def _saved_with(tmp_path, **changes):
    from hessian_tf import config as config_lib

    def parts(variables=(np.ones(3),), **options):
        config = config_lib.default_config().to_dict()
        config.update(options)
        return checkpoints.fingerprint_and_details(config, variables, np.ones((2, 2)),
                                                   np.arange(2))

    fingerprint, details = parts()
    checkpoints.SLQCheckpointer(str(tmp_path), fingerprint=fingerprint,
                                details=details).save(group_state(3))
    fingerprint, details = parts(**changes)
    return checkpoints.SLQCheckpointer(str(tmp_path), fingerprint=fingerprint,
                                       details=details)


def test_a_refused_resume_names_what_changed(tmp_path):
    # It had said only "the model, dataset or configuration changed".
    resumer = _saved_with(tmp_path, lanczos_steps=31, variables=(np.zeros(3),))
    with pytest.raises(checkpoints.CheckpointError) as raised:
        resumer.restore(lanczos_steps=STEPS, dim=DIM)
    assert ("its checkpoint is of another run; it differs in --lanczos_steps=31 (the "
            "checkpoint's run: 90), the model's variables; pass --restart") in str(raised.value)


def test_options_applied_after_the_steps_alone_do_not_refuse_a_resume(tmp_path):
    resumer = _saved_with(tmp_path, num_eigenpairs=3, kernel_width=0.5, trace=True)
    restored = resumer.restore(lanczos_steps=STEPS, dim=DIM)
    assert restored is not None and restored.num_products == 9
    assert resumer.resumed_across == [
        "--kernel_width=0.5 (the checkpoint's run: 0.0)",
        "--num_eigenpairs=3 (the checkpoint's run: 5)", "--trace=True (the checkpoint's run: "
        "False)"]


def test_the_fallback_is_the_checkpoint_messages_name_and_is_checked_when_restored(tmp_path):
    # Messages (Ctrl-C, a failed write) had named no checkpoint where a resume took one.
    from hessian_tf import job as job_lib

    directory = tmp_path / checkpoints.CHECKPOINT_SUBDIR
    saver = checkpoints.SLQCheckpointer(str(directory), fingerprint="f")
    saver.save(group_state(3, draw=2))
    saver.save(group_state(5, draw=5))  # draws 2-4's rows are deleted after this save
    (directory / "checkpoint").unlink()
    config = job_lib.config_lib.default_config()
    config.output_dir = str(tmp_path)
    assert job_lib.latest_checkpoint(config) == str(directory / "ckpt-15")
    for path in directory.glob("ckpt-15.*"):
        path.unlink()
    # The older one needs rows that are gone: refused, not resumed without them.
    assert checkpoints.latest_checkpoint(str(directory)) == str(directory / "ckpt-9")
    with pytest.raises(checkpoints.CheckpointError, match="corrupted or partial") as refused:
        checkpoints.SLQCheckpointer(str(directory), fingerprint="f").restore(
            lanczos_steps=STEPS, dim=DIM)
    # It says why a checkpoint that had been whole lacks files (it had named --restart
    # alone): the index is missing, or names a checkpoint that is gone.
    assert "the index (the file `checkpoint`) is missing" in str(refused.value)
    (directory / "checkpoint").write_text('model_checkpoint_path: "ckpt-15"\n')
    with pytest.raises(checkpoints.CheckpointError, match="corrupted or partial") as refused:
        checkpoints.SLQCheckpointer(str(directory), fingerprint="f").restore(
            lanczos_steps=STEPS, dim=DIM)
    assert "the index names ckpt-15, which is gone" in str(refused.value)
    # A checkpoint the index names is told as damaged, without that.
    assert "taken because" not in str(
        _refusal_of_a_named_damaged_checkpoint(tmp_path / "named"))


def _refusal_of_a_named_damaged_checkpoint(tmp_path):
    directory = tmp_path / checkpoints.CHECKPOINT_SUBDIR
    checkpoints.SLQCheckpointer(str(directory), fingerprint="f").save(group_state(3, draw=2))
    for row in (directory / "basis").glob("*.npy"):
        row.unlink()
    with pytest.raises(checkpoints.CheckpointError, match="corrupted or partial") as refused:
        checkpoints.SLQCheckpointer(str(directory), fingerprint="f").restore(
            lanczos_steps=STEPS, dim=DIM)
    return refused.value


def test_progress_counts_the_products_a_resume_leaves_without_the_bases(tmp_path):
    saver = checkpoints.SLQCheckpointer(str(tmp_path), fingerprint="f")
    state = group_state(5, draw=2, members=3)  # draws 3-5 at step 5 of 12; 8 draws
    exhausted = state.lanczos[1]._replace(exhausted=True)  # takes no more products
    saver.save(state._replace(lanczos=(state.lanczos[0], exhausted, state.lanczos[2])))
    reader = checkpoints.SLQCheckpointer(str(tmp_path), fingerprint="f")
    path, done, left = reader.progress(lanczos_steps=STEPS, num_draws=8)
    assert path == str(tmp_path / "ckpt-15") and done == 15
    assert left == 3 * STEPS + 2 * (STEPS - 5)  # draws 6-8 whole, 2 members' rest
    # The steps done: nothing left of them.
    saver.save(group_state(5, draw=8, members=0)._replace(lanczos=None, num_products=96))
    assert reader.progress(lanczos_steps=STEPS, num_draws=8)[1:] == (96, 0)
    # What the run would refuse, the dry run is told too: another run's, other steps.
    with pytest.raises(checkpoints.CheckpointError, match="of another run"):
        checkpoints.SLQCheckpointer(str(tmp_path), fingerprint="g").progress(
            lanczos_steps=STEPS, num_draws=8)
    saver.save(state)
    with pytest.raises(checkpoints.CheckpointError, match="has 12 Lanczos steps, not 5"):
        reader.progress(lanczos_steps=5, num_draws=8)
    assert checkpoints.SLQCheckpointer(str(tmp_path / "none"), fingerprint="f").progress(
        lanczos_steps=STEPS, num_draws=8) is None
