"""Mirrored and multi-worker spectra against one device; lost and missing workers.

Each job runs the real binary in fresh processes (logical CPU devices and
TF_CONFIG must be set before TensorFlow starts).
"""

import json
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from tests.processes import LOCAL_LAUNCHER, environment, free_ports, kill_worker

LOCAL = LOCAL_LAUNCHER
STEPS = 25


def spectrum(*args, launcher=(), env=None, timeout=600):
    command = list(launcher) or [sys.executable, "-m", "hessian_tf.bin.spectrum"]
    return subprocess.run(command + list(args), capture_output=True, text=True,
                          timeout=timeout, env=env or environment())


@pytest.fixture(scope="module")
def bn_job(tmp_path_factory):
    """A BN model whose moving statistics differ from the batch statistics, and
    53 examples: batches of 8 leave an uneven last batch and uneven shards."""
    directory = tmp_path_factory.mktemp("bn_job")
    keras.utils.set_random_seed(3)
    model = keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(10, activation="tanh"),
        keras.layers.BatchNormalization(), keras.layers.Dense(4)])
    model.layers[1].moving_mean.assign(np.full(10, 0.2, np.float32))
    model.layers[1].moving_variance.assign(np.full(10, 1.7, np.float32))
    model.save(str(directory / "bn.keras"))
    rng = np.random.default_rng(3)
    np.savez(directory / "data.npz", x=rng.standard_normal((53, 6)).astype(np.float32),
             y=rng.integers(0, 4, 53))
    return directory


def job_args(directory, bn_mode, output):
    # One product method for every strategy: --method=auto times both on one device and
    # mirrored ones (not on several workers), and two methods' float32 rounding moves
    # 25 Lanczos steps' alphas by ~1e-6, the tolerance below.
    return [f"--model={directory / 'bn.keras'}", f"--dataset=npz:{directory / 'data.npz'}",
            "--batch_size=8", f"--lanczos_steps={STEPS}", f"--bn_mode={bn_mode}",
            "--method=reverse_over_reverse", f"--output_dir={output}"]


def assert_same_tridiagonal(reference_dir, other_dir):
    with np.load(reference_dir / "spectrum.npz") as a, np.load(other_dir / "spectrum.npz") as b:
        scale = np.max(np.abs(a["alphas"]))
        assert np.max(np.abs(a["alphas"] - b["alphas"])) <= 1e-6 * scale
        assert np.max(np.abs(a["betas"] - b["betas"])) <= 1e-6 * scale
        for index in (0, -1):  # extreme Ritz values
            assert b["nodes"][0, index] == pytest.approx(a["nodes"][0, index], rel=1e-6)


@pytest.fixture(scope="module")
def single_device(bn_job):
    outputs = {}
    for bn_mode in ("inference", "train"):
        output = bn_job / f"single-{bn_mode}"
        result = spectrum(*job_args(bn_job, bn_mode, output))
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[bn_mode] = output
    return outputs


@pytest.mark.parametrize("bn_mode", ["inference", "train"])
def test_mirrored_four_devices_equals_one_device(bn_job, single_device, bn_mode, tmp_path):
    result = spectrum(*job_args(bn_job, bn_mode, tmp_path),
                      "--strategy=mirrored", "--num_cpu_devices=4")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_replicas"] == 4 and summary["num_examples"] == 53
    assert_same_tridiagonal(single_device[bn_mode], tmp_path)


@pytest.mark.parametrize("bn_mode", ["inference", "train"])
def test_two_workers_equal_one_device(bn_job, single_device, bn_mode, tmp_path):
    result = spectrum(*job_args(bn_job, bn_mode, tmp_path), "--worker_timeout=120",
                      launcher=["bash", str(LOCAL), "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_replicas"] == 2 and summary["num_examples"] == 53
    assert_same_tridiagonal(single_device[bn_mode], tmp_path)
    # Only the chief wrote, and it wrote once.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "density.png", "spectrum.npz", "summary.json"]


@pytest.mark.parametrize("moment, marker, count", [
    ("start-up", "Dataset digits", 2),  # in the first all-reduce
    ("lanczos", "Lanczos step", 6),
])
def test_killed_worker_ends_the_job_with_a_clear_error(tmp_path, moment, marker, count):
    """Worker 1 is killed; the chief must exit non-zero, soon, with ONE line (the
    dead worker's own watchdog must not speak for it)."""
    digits_model = tmp_path / "mlp.keras"
    from hessian_tf import models
    models.mlp().save(str(digits_model))
    process = subprocess.Popen(
        ["bash", str(LOCAL), "2", f"--model={digits_model}", "--dataset=digits",
         "--batch_size=4", "--lanczos_steps=1000", "--worker_timeout=15",
         f"--output_dir={tmp_path / 'out'}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment())
    seen = 0
    for line in process.stderr:
        seen += marker in line
        if seen == count:
            break
    assert kill_worker(tmp_path / "out", 1), "worker 1 is not running"
    killed = time.monotonic()
    stderr = process.stderr.read()
    process.wait(timeout=300)
    assert process.returncode != 0
    assert time.monotonic() - killed < 90
    # read() returned at EOF: every process that held the pipe, orphans included, is done.

    errors = [l for l in stderr.splitlines() if l.startswith("hessian-spectrum: error:")]
    assert len(errors) == 1 and "worker" in errors[0], stderr[-3000:]
    assert not (tmp_path / "out" / "spectrum.npz").exists()


def test_ctrl_c_to_the_local_launcher_stops_its_workers(tmp_path):
    """SIGINT to launch/local.sh (a terminal's Ctrl-C, forwarded): the workers, which a
    non-interactive shell starts with SIGINT ignored, must stop with the interrupted
    line and status 130 (they ran on to the end)."""
    digits_model = tmp_path / "mlp.keras"
    from hessian_tf import models
    models.mlp().save(str(digits_model))
    process = subprocess.Popen(
        ["bash", str(LOCAL), "2", f"--model={digits_model}", "--dataset=digits",
         "--batch_size=4", "--lanczos_steps=1000", f"--output_dir={tmp_path / 'out'}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment())
    seen = 0
    for line in process.stderr:
        seen += "Lanczos step" in line
        if seen == 4:
            break
    process.send_signal(signal.SIGINT)
    interrupted = time.monotonic()
    stderr = process.stderr.read()
    process.wait(timeout=300)
    assert time.monotonic() - interrupted < 60, stderr[-3000:]
    assert process.returncode == 130, stderr[-3000:]
    lines = [l for l in stderr.splitlines() if l.startswith("hessian-spectrum: interrupted")]
    assert len(lines) == 2, stderr[-3000:]
    assert not (tmp_path / "out" / "spectrum.npz").exists()


def lone_worker_environment() -> dict:
    """The environment of worker 0 of a TF_CONFIG of two workers on free local ports,
    worker 1 never started."""
    env = environment()
    env["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": [f"127.0.0.1:{p}" for p in free_ports(2)]},
        "task": {"type": "worker", "index": 0}})
    return env


def test_worker_that_never_starts_times_out(bn_job, tmp_path):
    """TF_CONFIG names two workers; only worker 0 runs. It ends as other errors do
    (one line, exit status 2: the watchdog's SIGINT, not a SIGKILL's 137), and the
    output directories it created are gone."""
    env = lone_worker_environment()
    output = tmp_path / "new" / "out"
    started = time.monotonic()
    result = spectrum(*job_args(bn_job, "inference", output), "--strategy=multi_worker",
                      "--worker_timeout=10", env=env, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert time.monotonic() - started < 60
    errors = [l for l in result.stderr.splitlines() if l.startswith("hessian-spectrum: error:")]
    assert len(errors) == 1 and "--worker_timeout=10" in errors[0], result.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_an_address_in_use_is_named(bn_job, tmp_path):
    """Worker 0's port is taken by another process: TensorFlow says only "Could not
    start gRPC server"; the line names the address and TF_CONFIG."""
    import socket

    env = lone_worker_environment()
    address = json.loads(env["TF_CONFIG"])["cluster"]["worker"][0]
    host, port = address.split(":")
    with socket.socket() as taken:
        taken.bind((host, int(port)))
        taken.listen()
        result = spectrum(*job_args(bn_job, "inference", tmp_path / "out"),
                          "--strategy=multi_worker", env=env, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [l for l in result.stderr.splitlines() if l.startswith("hessian-spectrum: error:")]
    assert errors == [
        f"hessian-spectrum: error: TF_CONFIG: this process (worker 0) could not serve at "
        f"{address} (Could not start gRPC server): the port is in use by another process, "
        "or the host is not this machine's; free the port or give the task another address "
        "in TF_CONFIG's cluster."], result.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_a_watchdog_of_a_wait_without_end_answers_at_once():
    """--worker_timeout=1e12 ("forever"): more seconds than select takes; the watchdog
    waits the most it can instead of failing with a traceback."""
    script = ("from hessian_tf import job\n"
              "with job._deadline(1e12, 'never'):\n"
              "    pass\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, env=environment())
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_ctrl_c_while_waiting_for_the_cluster_ends_the_job_and_leaves_no_directory(
        bn_job, tmp_path):
    """Worker 0 of two waits for worker 1 (never started); SIGINT while it waits (its
    watchdog running) ends it at once, and the directories it created go."""
    env = lone_worker_environment()
    command = [sys.executable, "-m", "hessian_tf.bin.spectrum",
               *job_args(bn_job, "inference", tmp_path / "new" / "out"),
               "--strategy=multi_worker", "--worker_timeout=300"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, env=env)
    waited = time.monotonic()
    # The watchdog by its script: the job's imports run other short-lived children
    # (platform.processor()'s `uname -p`) before the job creates its directories.
    from hessian_tf import job

    script = job._WATCHDOG.strip().splitlines()[0]  # its first line: "import os, ..."
    while not subprocess.run(["pgrep", "-P", str(process.pid), "-f", script],
                             capture_output=True).stdout:
        if process.poll() is not None or time.monotonic() - waited > 120:
            process.kill()
            pytest.fail(f"no watchdog: {process.communicate()[1][-2000:]}")
        time.sleep(0.2)
    assert (tmp_path / "new" / "out").is_dir()
    time.sleep(1)  # in the wait, the handler set
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode == 2, stderr[-2000:]
    assert time.monotonic() - waited < 100  # not the 300 s of --worker_timeout
    deadline = time.monotonic() + 10  # the watchdog removes them as the job ends
    while list(tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tf_config, expected", [
    ("{not json", "TF_CONFIG is malformed"),
    ('{"cluster": {"worker": ["127.0.0.1:5000"]}}', "TF_CONFIG is malformed (missing key 'task')"),
    ('{"cluster": {"worker": ["127.0.0.1:5000"]}, "task": {"type": "worker", "index": 3}}',
     "task index 3"),
    ('{"cluster": {"worker": ["nohostport"]}, "task": {"type": "worker", "index": 0}}',
     "not HOST:PORT"),
])
def test_malformed_tf_config(bn_job, tmp_path, tf_config, expected):
    env = environment()
    env["TF_CONFIG"] = tf_config
    result = spectrum(*job_args(bn_job, "inference", tmp_path), "--strategy=multi_worker",
                      env=env, timeout=120)
    assert result.returncode != 0
    errors = [l for l in result.stderr.splitlines() if l.startswith("hessian-spectrum: error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]


@pytest.mark.parametrize("flags, expected", [
    (["--tpu=my-tpu"], "--tpu=my-tpu needs --strategy=tpu"),
    (["--num_cpu_devices=-1"], "--num_cpu_devices=-1"),
    (["--intra_op_threads=-1"], "--intra_op_threads=-1"),
    (["--inter_op_threads=-2"], "--inter_op_threads=-2"),
    (["--worker_timeout=0"], "--worker_timeout=0"),
    (["--strategy=multi_worker", "--model="], "--strategy=multi_worker needs --model"),
])
def test_bad_distribution_flags(bn_job, tmp_path, flags, expected):
    result = spectrum(*job_args(bn_job, "inference", tmp_path), *flags, timeout=120)
    assert result.returncode != 0
    errors = [l for l in result.stderr.splitlines() if l.startswith("hessian-spectrum: error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]


def test_more_replicas_than_examples(tmp_path, bn_job):
    np.savez(tmp_path / "two.npz", x=np.zeros((2, 6), np.float32), y=np.zeros(2, np.int64))
    result = spectrum(f"--model={bn_job / 'bn.keras'}", f"--dataset=npz:{tmp_path / 'two.npz'}",
                      "--strategy=mirrored", "--num_cpu_devices=4",
                      f"--output_dir={tmp_path / 'out'}", timeout=120)
    assert result.returncode != 0
    assert "2 examples for 4 replicas" in result.stderr


def test_free_ports_lie_below_the_ephemeral_range_and_skip_busy_ones(monkeypatch):
    import socket

    from tests import processes

    with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as file:
        ephemeral_start = int(file.read().split()[0])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        sample = processes._ports._RANDOM.sample
        monkeypatch.setattr(processes._ports._RANDOM, "sample",
                            lambda span, k: [taken, taken] + sample(span, k))
        ports = free_ports(4)
    assert len(set(ports)) == 4 and taken not in ports
    if ephemeral_start > 10_000 + 8:  # else the kernel chooses them (free_ports.py)
        assert all(10_000 <= port < ephemeral_start for port in ports)
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_free_ports_do_not_follow_a_seeded_random_module():
    import random

    random.seed(3)
    first = free_ports(2)
    random.seed(3)
    assert free_ports(2) != first  # (1 in ~10⁸ alike by chance)


@pytest.mark.parametrize("args, line", [
    (["zero"], "local.sh: error: N=zero: pass the number of workers, an integer >= 1."),
    (["2", "--worker_timeout=abc"],
     "local.sh: error: --worker_timeout=abc: pass a positive number of seconds."),
    (["2", "--worker_timeout", "-5"],
     "local.sh: error: --worker_timeout=-5: pass a positive number of seconds."),
    (["2", "--strategy=mirrored"], "local.sh: error: --strategy=mirrored: the script runs "
     "every worker with --strategy=multi_worker; drop it."),
    # The binary's own check, once before any worker starts (not once per worker).
    (["2", "--lanczos_steps=0", "--worker_timeout=1e3"],
     "hessian-spectrum: error: --lanczos_steps=0: pass an integer >= 1."),
])
def test_local_launcher_tells_bad_input_in_one_line(args, line, tmp_path):
    result = subprocess.run(["bash", str(LOCAL), *args, f"--output_dir={tmp_path / 'out'}"],
                            capture_output=True, text=True, env=environment(), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [line]
    assert not (tmp_path / "out").exists()


def test_local_launcher_help_is_its_comment_alone():
    result = subprocess.run(["bash", str(LOCAL), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("Runs a multi-worker spectrum job")
    assert lines[-1] == '"python3 -m hessian_tf.bin.spectrum").'


_SIGINT_IN_AND_AFTER = """
import os, signal, threading, time
from hessian_tf import job
with job._exit_on_sigint():
    pass
# Python's handler is back, with its flags: a blocking read is interrupted at once
# (restarted, with the C library's signal() flags, it would wait for the data at 5 s).
read_end, write_end = os.pipe()
threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
threading.Timer(5, os.write, (write_end, b"x")).start()
started = time.monotonic()
try:
    os.read(read_end, 1)
except KeyboardInterrupt:
    print(f"python's handler is back: {time.monotonic() - started < 3}", flush=True)
with job._exit_on_sigint():
    os.kill(os.getpid(), signal.SIGINT)
    print("not reached", flush=True)
"""


def test_sigint_ends_a_waiting_job_with_status_2_and_python_handles_it_after():
    """What the watchdog relies on: in the block SIGINT ends the process at once with
    status 2 (no Python code runs); after it, Python's handler is back."""
    result = subprocess.run([sys.executable, "-c", _SIGINT_IN_AND_AFTER],
                            capture_output=True, text=True, timeout=120, env=environment())
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["python's handler is back: True"], result.stdout
