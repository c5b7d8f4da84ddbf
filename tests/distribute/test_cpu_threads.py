"""TensorFlow's CPU thread pools (--intra_op_threads, --inter_op_threads): set before
TensorFlow starts (automatically one thread per op on a CPU-only host of at most 2
cores), reported in summary.json, and a clear error once it has started.

Each case runs in a fresh process: the pools are fixed when TensorFlow starts, and
this test process has started it."""

import json
import subprocess
import sys

from tests.processes import environment


def run_python(code: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env or environment())


def test_make_strategy_sets_the_pools_before_tensorflow_starts():
    result = run_python(
        "import json\n"
        "from hessian_tf.distribute import cpu_threads, make_strategy\n"
        "make_strategy('default', intra_op_threads=1, inter_op_threads=3)\n"
        "import tensorflow as tf\n"
        "tf.constant(1.0) + 1.0\n"
        "print(json.dumps(cpu_threads()))\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {"intra_op": 1, "inter_op": 3}


def test_automatic_one_thread_per_op_on_a_small_cpu_host_unless_the_environment_says():
    code = ("import json\n"
            "from hessian_tf.distribute import cpu_threads, make_strategy\n"
            "from hessian_tf.distribute.strategies import AUTOMATIC_MAX_CORES\n"
            "from hessian_tf.host import usable_cores\n"
            "make_strategy('default')\n"
            "import tensorflow as tf\n"
            "tf.constant(1.0) + 1.0\n"
            "gpus = len(tf.config.list_physical_devices('GPU'))\n"
            "print(json.dumps([cpu_threads(), not gpus and usable_cores() <= AUTOMATIC_MAX_CORES]))\n")
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    threads, applies = json.loads(result.stdout.splitlines()[-1])
    assert threads == {"intra_op": 1 if applies else 0, "inter_op": 0}
    env = environment()
    env["TF_NUM_INTRAOP_THREADS"] = "2"  # the environment's choice stands, and is reported
    result = run_python(code, env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1])[0] == {"intra_op": 2, "inter_op": 0}


def test_setting_the_pools_after_tensorflow_started_names_the_flags():
    result = run_python(
        "import tensorflow as tf\n"
        "from hessian_tf.distribute import configure_cpu_threads\n"
        "tf.constant(1.0) + 1.0\n"
        "configure_cpu_threads(0, 0)  # TensorFlow's choice: nothing to set\n"
        "try:\n"
        "    configure_cpu_threads(1, 0)\n"
        "except ValueError as error:\n"
        "    print(error)\n")
    assert result.returncode == 0, result.stderr[-2000:]
    line = result.stdout.splitlines()[-1]
    assert line.startswith("--intra_op_threads=1 --inter_op_threads=0: TensorFlow has already started")


def test_the_binary_reports_the_pools_it_ran_with(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "hessian_tf.bin.spectrum", "--intra_op_threads=1",
         "--inter_op_threads=2", "--lanczos_steps=3", "--default_model_epochs=0",
         "--num_eigenpairs=1", f"--output_dir={tmp_path}"],
        capture_output=True, text=True, timeout=300, env=environment())
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["cpu_threads"] == {"intra_op": 1, "inter_op": 2}
