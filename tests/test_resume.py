"""Long jobs survive: kill -9 and SIGTERM mid-Lanczos, then resume to the same
tridiagonal; damaged checkpoints and changed models are refused with one line.

The two draws run in lockstep by default (one progress line per step of both)."""

import json
import os
import random
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.processes import LOCAL_LAUNCHER, environment, kill_worker

STEPS = 30


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    directory = tmp_path_factory.mktemp("resume")
    from hessian_tf import models
    model = models.mlp(hidden_units=40)
    model.save(str(directory / "mlp.keras"))
    changed = models.mlp(hidden_units=40, seed=1)
    changed.save(str(directory / "changed.keras"))
    return directory


def arguments(job, output, model="mlp.keras", method="reverse_over_reverse"):
    # A fixed method: runs compared bit for bit must not each time --method=auto.
    return [f"--model={job / model}", "--dataset=digits", "--batch_size=256",
            f"--lanczos_steps={STEPS}", "--num_draws=2", "--checkpoint_every=2",
            "--checkpoint_seconds=0", f"--method={method}",
            f"--output_dir={output}"]


def run(*args, launcher=None):
    command = launcher or [sys.executable, "-m", "hessian_tf.bin.spectrum"]
    return subprocess.run(command + list(args), capture_output=True, text=True,
                          timeout=600, env=environment())


def run_until_step(args, step, sig, marker="Lanczos step"):
    """Starts the job, waits for the `step`th line holding `marker` (by default the
    progress line of `step`, a global count), sends sig."""
    process = subprocess.Popen([sys.executable, "-m", "hessian_tf.bin.spectrum", *args],
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                               text=True, env=environment())
    seen = 0
    lines = []
    for line in process.stderr:
        lines.append(line)
        if marker in line:
            seen += 1
            if seen == step:
                process.send_signal(sig)
                break
    rest = process.stderr.read()
    process.wait(timeout=300)
    return process.returncode, "".join(lines) + rest


@pytest.fixture(scope="module")
def uninterrupted(job):
    output = job / "uninterrupted"
    result = run(*arguments(job, output))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (output / "checkpoints").exists()  # removed once the results are whole
    with np.load(output / "spectrum.npz") as spectrum:
        return {key: spectrum[key] for key in ("alphas", "betas", "nodes", "weights")}


def assert_identical(output, reference):
    with np.load(output / "spectrum.npz") as spectrum:
        for key, value in reference.items():
            np.testing.assert_array_equal(spectrum[key], value, err_msg=key)


def test_kill_9_then_resume_is_bit_identical(job, uninterrupted, tmp_path):
    step = random.Random(os.getpid()).randint(5, STEPS - 5)
    code, log = run_until_step(arguments(job, tmp_path), step, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not (tmp_path / "spectrum.npz").exists()
    result = run(*arguments(job, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming draws 1-2 at Lanczos step" in result.stderr
    assert_identical(tmp_path, uninterrupted)
    summary = json.loads((tmp_path / "summary.json").read_text())
    # Products over the data are counted across sessions: 2 draws x 30 (the determinism
    # check ran over the first 3 of the digits' 8 batches, no product of its own).
    assert summary["num_hvps"] == 2 * STEPS
    assert summary["lockstep_draws"] == 2 and summary["resumed_lockstep_draws"] == 2


def test_sigterm_checkpoints_exits_75_and_resumes(job, uninterrupted, tmp_path):
    # One draw at a time: the products and the tridiagonals equal the lockstep run's.
    sequential = arguments(job, tmp_path) + ["--lockstep_draws=1"]
    code, log = run_until_step(sequential, STEPS + 7, signal.SIGTERM)
    assert code == 75, log[-3000:]
    assert "preempted (SIGTERM) in draw 2 at Lanczos step" in log
    assert (tmp_path / "checkpoints" / "checkpoint").exists()
    result = run(*sequential)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming draw 2 at Lanczos step" in result.stderr
    assert_identical(tmp_path, uninterrupted)


def test_sigterm_during_start_up_is_one_line_and_75(job, tmp_path):
    # It was TensorFlow's default: status 143 and no line.
    output = tmp_path / "out"
    code, log = run_until_step(arguments(job, output), 1, signal.SIGTERM, marker="Dataset digits")
    assert code == 75, log[-3000:]
    assert [l for l in log.splitlines() if l.startswith("hessian-spectrum")] == [
        "hessian-spectrum: preempted (SIGTERM) during start-up, before the first Lanczos "
        "step; nothing was computed yet: run the same command to start."]
    assert not output.exists()  # the directory it created, empty, is removed


def test_sigterm_during_the_trace_resumes_after_the_steps(job, uninterrupted, tmp_path):
    # The steps' checkpoint is saved before the analyses: the resume does not take them
    # again (it took the run from the last regular checkpoint, and gave status 143).
    args = arguments(job, tmp_path) + ["--trace", "--trace_matvecs=3000"]
    code, log = run_until_step(args, 1, signal.SIGTERM,
                               marker="(the Lanczos steps, before the analyses)")
    assert code == 75, log[-3000:]
    [line] = [l for l in log.splitlines() if l.startswith("hessian-spectrum")]
    assert re.fullmatch(r"hessian-spectrum: preempted \(SIGTERM\) after the Lanczos steps, "
                        r"during --trace or --gradient_overlap; the checkpoint \S+/ckpt-60 "
                        r"holds the steps: run the same command to resume \(the analyses start "
                        r"again\)\.", line), line
    assert not list(tmp_path.glob("*.npz")) and not list(tmp_path.glob(".tmp-*"))
    result = run(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming after the Lanczos steps (2 draw(s), 60 products done)" in result.stderr
    assert "Lanczos step" not in result.stderr.replace("after the Lanczos steps", "")
    assert_identical(tmp_path, uninterrupted)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["trace_estimate"] is not None and summary["num_hvps_this_session"] == 3000
    assert not (tmp_path / "checkpoints").exists()


def test_sigterm_while_the_results_are_written_is_noted_and_they_are_finished(job):
    from hessian_tf import job as job_lib

    config = job_lib.config_lib.default_config()
    with job_lib._sigterm_outside_the_steps(config):
        for phase in ("steps", "results", "writing"):
            job_lib._PHASE.update(name=phase, deferred=False)
            os.kill(os.getpid(), signal.SIGTERM)
            assert job_lib._PHASE["deferred"], phase
        job_lib._PHASE.update(name="analyses", deferred=False)
        with pytest.raises(job_lib.Preempted, match="during --trace"):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_write_that_fails_is_one_line_naming_what_holds_the_run(job, tmp_path):
    # A file-size limit below one basis row (3,010 float64): the first checkpoint fails.
    # It had been NumPy's "24208 requested and 10000 written" alone, with status 2.
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (10000, 10000))

    result = subprocess.run(
        [sys.executable, "-m", "hessian_tf.bin.spectrum", *arguments(job, tmp_path)],
        capture_output=True, text=True, timeout=600, env=environment(), preexec_fn=limit)
    assert result.returncode == 74, result.stderr[-3000:]
    [line] = [l for l in result.stderr.splitlines() if l.startswith("hessian-spectrum")]
    assert line.startswith(f"hessian-spectrum: error: --output_dir={tmp_path}: writing a "
                           "checkpoint failed ("), line
    assert line.endswith("no checkpoint holds the run: free space (or raise the file-size "
                         "limit, or fix the path), then run the same command."), line


def test_a_second_job_on_a_running_jobs_output_dir_is_refused(job, tmp_path):
    # It had resumed from the live job's checkpoints, which the first then deleted.
    args = arguments(job, tmp_path)
    args[args.index(f"--lanczos_steps={STEPS}")] = "--lanczos_steps=3000"
    first = subprocess.Popen([sys.executable, "-m", "hessian_tf.bin.spectrum", *args],
                             stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                             env=environment())
    try:
        for line in first.stderr:
            if "Lanczos step" in line:
                break
        second = run(*args)
        assert second.returncode == 2, second.stderr[-3000:]
        [line] = [l for l in second.stderr.splitlines() if l.startswith("hessian-spectrum")]
        assert line == (f"hessian-spectrum: error: --output_dir={tmp_path}: another "
                        f"hessian-spectrum job is running there (process {first.pid}); wait "
                        "for it to end (or stop it), or pass another --output_dir."), line
    finally:
        first.kill()
        first.communicate(timeout=120)
    result = run(*arguments(job, tmp_path), "--restart")  # the lock died with its holder
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "density.png", "spectrum.npz", "summary.json"]


def test_ctrl_c_is_one_line_naming_the_checkpoint_that_resumes(job, uninterrupted, tmp_path):
    code, log = run_until_step(arguments(job, tmp_path), 7, signal.SIGINT)
    assert code == 130, log[-3000:]
    assert "Traceback" not in log and "KeyboardInterrupt" not in log
    [line] = [l for l in log.splitlines() if l.startswith("hessian-spectrum: ")]
    assert re.fullmatch(r"hessian-spectrum: interrupted \(Ctrl-C\); no results were written; "
                        r"the checkpoint \S+/checkpoints/ckpt-\d+ resumes the run \(the same "
                        r"command\)", line), line
    assert not (tmp_path / "spectrum.npz").exists()
    result = run(*arguments(job, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming draws 1-2 at Lanczos step" in result.stderr
    assert_identical(tmp_path, uninterrupted)


@pytest.mark.parametrize("program", ["spectrum", "train"])
def test_ctrl_c_during_start_up_is_one_line(program, tmp_path):
    # While TensorFlow is imported (seconds), before a job runs.
    args = ([f"--output_dir={tmp_path / 'out'}"] if program == "spectrum" else
            ["--config=configs/cnn_digits.py:no_bn,smoke", f"--workdir={tmp_path / 'out'}"])
    process = subprocess.Popen([sys.executable, "-m", f"hessian_tf.bin.{program}", *args],
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                               env=environment(), cwd=os.path.dirname(os.path.dirname(__file__)))
    import time
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert [l for l in stderr.splitlines() if l.startswith("hessian-")] == [
        f"hessian-{program}: interrupted (Ctrl-C)" + (
            "; no results were written (SIGTERM instead writes a checkpoint before it stops, "
            "which the same command resumes from)" if "no results" in stderr else "")]


def test_a_resumed_auto_run_keeps_the_method_it_began_with(job, tmp_path):
    code, log = run_until_step(arguments(job, tmp_path, method="auto"), 9, signal.SIGTERM)
    assert code == 75, log[-3000:]
    assert "--method=auto: reverse over reverse" in log  # timed at the start
    [chosen] = re.findall(r"parameters, (\w+) products", log)
    result = run(*arguments(job, tmp_path, method="auto"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming" in result.stderr
    assert "--method=auto: reverse over reverse" not in result.stderr  # not timed again
    with open(tmp_path / "summary.json", encoding="utf-8") as file:
        summary = json.load(file)
    assert summary["method"] == chosen and summary["method_seconds"] is None


@pytest.fixture
def interrupted(job, tmp_path):
    code, log = run_until_step(arguments(job, tmp_path), 9, signal.SIGTERM)
    assert code == 75, log[-3000:]
    return tmp_path


def one_error_line(stderr):
    errors = [l for l in stderr.splitlines() if l.startswith("hessian-spectrum: error:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def test_corrupted_checkpoint_is_refused_then_restart_works(job, uninterrupted, interrupted):
    for data in (interrupted / "checkpoints").glob("*.data-*"):
        data.write_bytes(data.read_bytes()[: len(data.read_bytes()) // 3])
    result = run(*arguments(job, interrupted))
    assert result.returncode == 2
    assert "corrupted or partial" in one_error_line(result.stderr)
    assert "--restart" in one_error_line(result.stderr)
    assert not (interrupted / "spectrum.npz").exists()
    result = run(*arguments(job, interrupted), "--restart")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_identical(interrupted, uninterrupted)


def test_the_checkpoints_lockstep_group_continues_whatever_lockstep_draws_says(
        job, uninterrupted, interrupted):
    # Its draws' bases are all in the checkpoint, at one step: they go on together.
    result = run(*arguments(job, interrupted), "--lockstep_draws=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming draws 1-2 at Lanczos step" in result.stderr
    assert "The checkpoint's 2 draw(s) in lockstep continue together\n" in result.stderr
    assert_identical(interrupted, uninterrupted)
    # The summary tells both: the group that ran (it had said only the flag's 1).
    summary = json.loads((interrupted / "summary.json").read_text())
    assert summary["resumed_lockstep_draws"] == 2 and summary["lockstep_draws"] == 1


def test_a_dry_run_tells_the_products_a_resume_would_leave(job, interrupted):
    # It had counted every product of the job, as if it started over.
    names = sorted(p.name for p in (interrupted / "checkpoints").iterdir())
    result = run(*arguments(job, interrupted), "--dry_run")
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = [l for l in result.stdout.splitlines() if "Lanczos products done" in l]
    done = int(re.search(r"ckpt-(\d+): this run resumes it, (\d+) of the 60 Lanczos "
                         r"products done", line)[2])
    assert 0 < done < 2 * STEPS
    assert f"at most {2 * STEPS - done} products are left" in line
    assert sorted(p.name for p in (interrupted / "checkpoints").iterdir()) == names
    restarted = run(*arguments(job, interrupted), "--dry_run", "--restart")
    assert "Lanczos products done" not in restarted.stdout
    # A checkpoint the run would refuse is told so, not counted.
    other = run(*arguments(job, interrupted), "--dry_run", "--num_draws=1")
    [line] = [l for l in other.stdout.splitlines() if "would be refused" in l]
    assert "its checkpoint is of another run; it differs in --num_draws=1 (the " in line
    assert "--dry_run" not in line  # the run's options, not the dry run's


def test_changed_model_is_refused(job, interrupted):
    result = run(*arguments(job, interrupted, model="changed.keras"))
    assert result.returncode == 2
    assert "another run" in one_error_line(result.stderr)
    result = run(*arguments(job, interrupted), "--lanczos_steps=31")
    assert result.returncode == 2
    assert "another run" in one_error_line(result.stderr)


def test_two_workers_resume_after_a_lost_worker(job, uninterrupted, tmp_path):
    local = LOCAL_LAUNCHER
    args = arguments(job, tmp_path) + ["--worker_timeout=60"]
    process = subprocess.Popen(["bash", str(local), "2", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=environment())
    seen = 0
    for line in process.stderr:
        if "Lanczos step" in line:
            seen += 1
            if seen == 2 * 12:  # both workers log; step 12
                break
    assert kill_worker(tmp_path, 1), "worker 1 is not running"
    stderr = process.stderr.read()
    assert process.wait(timeout=300) != 0
    assert (tmp_path / "checkpoints" / "checkpoint").exists()
    # The chief's line names what resumes the run (it had not).
    [line] = [l for l in stderr.splitlines() if l.startswith("hessian-spectrum: error:")]
    assert re.search(r"; the checkpoint \S+/ckpt-\d+ resumes the run\.$", line), line
    result = run(*args, launcher=["bash", str(local), "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming draw" in result.stderr
    with np.load(tmp_path / "spectrum.npz") as spectrum:
        scale = np.max(np.abs(uninterrupted["alphas"]))
        assert np.max(np.abs(spectrum["alphas"] - uninterrupted["alphas"])) <= 1e-6 * scale
        assert np.max(np.abs(spectrum["betas"] - uninterrupted["betas"])) <= 1e-6 * scale


def test_a_preempted_line_of_a_restart_says_to_resume_without_it(tmp_path):
    # "run the same command" would have deleted the checkpoint it named.
    from hessian_tf import job as job_lib
    from hessian_tf.io import checkpoints
    from tests.io.test_checkpoints import group_state

    checkpoints.SLQCheckpointer(str(tmp_path / "checkpoints"), fingerprint="f").save(
        group_state(3))
    config = job_lib.config_lib.default_config()
    config.output_dir, config.restart = str(tmp_path), True
    job_lib._PHASE.update(name="analyses", deferred=False)
    message = str(job_lib._preempted_outside_the_steps(config))
    assert "holds the steps: run the same command without --restart to resume" in message
    job_lib._PHASE.update(name="start-up")
    assert str(job_lib._preempted_outside_the_steps(config)).endswith(
        "nothing was computed yet: run the same command to start.")


@pytest.mark.parametrize("raised, told", [
    # pybind11 replaces TensorFlow's error with Ctrl-C's in this text.
    ("tf.errors.UnavailableError(None, None, 'Socket closed (REPLACED BY "
     "KeyboardInterrupt: <EMPTY MESSAGE>)')", "interrupted (Ctrl-C)"),
    ("RuntimeError('KeyboardInterrupt: while the collective ran')", "interrupted (Ctrl-C)"),
    # Only TensorFlow's and runtime errors: a bad input that names the word is an error.
    ("ValueError('--dataset=npz:KeyboardInterrupt.npz: no such file')", "error: --dataset"),
])
def test_a_ctrl_c_that_tensorflows_error_replaced_is_the_interrupted_line(
        tmp_path, raised, told):
    script = ("import sys\n"
              "import tensorflow as tf\n"
              "from hessian_tf import job\n"
              "from hessian_tf.bin import spectrum\n"
              "def run(config):\n"
              f"    raise {raised}\n"
              "job.run = run\n"
              f"sys.argv = ['hessian-spectrum', '--output_dir={tmp_path / 'out'}']\n"
              "spectrum.run()\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env=environment())
    lines = [l for l in result.stderr.splitlines() if l.startswith("hessian-spectrum")]
    assert len(lines) == 1 and lines[0].startswith(f"hessian-spectrum: {told}"), \
        result.stderr[-3000:]
    assert result.returncode == (130 if "Ctrl-C" in told else 2)
