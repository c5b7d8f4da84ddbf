"""The installed programs, as a user runs them: --help lists their own flags and
exits 0; a malformed or misspelt flag is one error line and exit status 2."""

import os
import subprocess
import sys

import pytest

PROGRAMS = {  # program -> one of its own flags
    "hessian-spectrum": "--lanczos_steps",
    "hessian-plot": "--runs",
    "hessian-train": "--workdir",
}


def run_installed(program, *args):
    path = os.path.join(os.path.dirname(sys.executable), program)
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_help_lists_the_programs_flags(program):
    result = run_installed(program, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert PROGRAMS[program] in result.stdout
    assert "Exit status" in result.stdout or "exit status" in result.stdout


# A config file of the repository (training and spectrum sections): it imports
# hessian_tf.training, so TensorFlow too.
CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "cnn_digits.py")


@pytest.mark.parametrize("arguments, expected", [
    (["--batch_size=abc"], "--batch_size=abc"),
    (["--lanczos_step=5"], "lanczos_steps"),
    (["--dataset=digits", "stray"], "unexpected arguments: stray"),
    # TensorFlow's start-up chatter stays hidden when a config file imports it.
    ([f"--config={CONFIG}", "--config.spectrum.lanczos_steps=0"], "--lanczos_steps=0"),
    (["--config", CONFIG, "--num_draws=0"], "--num_draws=0"),
    # tfds's and TensorFlow's INFO lines (a dataset not found, a strategy's devices)
    # stay off stderr: only hessian_tf's own progress is logged below warnings.
    (["--dataset=tfds:nosuchds"], "Dataset nosuchds not found"),
    (["--model=absent.keras", "--strategy=multi_worker"], "--model=absent.keras: no such file"),
    (["--kernel_width=inf"], "--kernel_width=inf: pass a finite number"),
    # absl's int() parse, with the fix.
    (["--lanczos_steps=1e3"], "'1e3'; write it in digits: --lanczos_steps=1000"),
    (["--num_draws=2.5"], "'2.5'; give a whole number in digits"),
    (["--seed=12345678901234567.0"], "write it in digits: --seed=12345678901234567"),
    ([f"--config={CONFIG}", "--config.spectrum.num_draws=4.0"],
     "'4.0'; write it in digits: --config.spectrum.num_draws=4"),
    (["--seed=-1"], "--seed=-1: pass an integer >= 0"),
    # They had been tracebacks (OverflowError), TensorFlow's "Value out of range", or
    # an out-of-memory kill.
    (["--num_draws=99999999999999999999"], "--num_draws=99999999999999999999: pass an "
     "integer below 2**63"),
    (["--inter_op_threads=99999999999999999999"], "--inter_op_threads=99999999999999999999"),
    (["--intra_op_threads=3000000000"], "--intra_op_threads=3000000000: pass a number of "
     "threads from 1 to 2147483647"),
    (["--num_grid_points=100000000000"], "--num_grid_points=100000000000: the density's "
     "arrays would need"),
    # The resolver's own errors ("Please provide a TPU Name", a failed URL lookup).
    (["--strategy=tpu"], "--strategy=tpu --tpu=: no TPU found or reached"),
    (["--strategy=tpu", "--tpu=nosuchtpu.invalid"], "--tpu=nosuchtpu.invalid: no TPU found"),
])
def test_bad_flags_are_one_line_and_exit_2(arguments, expected):
    assert_one_error_line(run_installed("hessian-spectrum", *arguments), expected)


def assert_one_error_line(result, expected):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hessian-spectrum: error: "), result.stderr
    assert expected in lines[0] and "Traceback" not in lines[0], lines[0]


@pytest.mark.parametrize("case, expected", [
    ("missing", "--config={config}: no such file"),
    ("syntax error", "--config: SyntaxError: invalid syntax"),
    ("no get_config", "--config: the file defines no get_config()"),
    ("returns None", "--config={config}: the file's get_config() returned None"),  # not
    # the default job
    ("returns a dict", "--config={config}: the file's get_config() returned a dict"),
    ("returns a FrozenConfigDict", "--config: the file's get_config() returned a "
                                   "FrozenConfigDict"),
    ("in a flag file", "--lanczos_steps=0"),  # its config file imports TensorFlow
    ("missing flag file", "Unable to open flagfile"),  # read when --config is defined
    # ml_collections lets a value of None into any option; validate checks the types.
    ("a None value", "--dataset=None: pass a string (the default is 'digits')"),
    # ml_collections puts the config's traceback into its flag error: the last line kept.
    ("misspelt variant", "Error whilst parsing config file: ValueError: --config argument "
                         "'nosuchvariant': unknown variant 'nosuchvariant'"),
])
def test_bad_config_files_are_one_line_and_exit_2(tmp_path, case, expected):
    config = tmp_path / "config.py"
    texts = {"syntax error": "def get_config(:\n", "no get_config": "x = 1\n",
             "returns None": "def get_config():\n    return None\n",
             "a None value": "import ml_collections\ndef get_config():\n    return "
                             "ml_collections.ConfigDict({'dataset': None})\n",
             "returns a dict": "def get_config():\n    return {'lanczos_steps': 3}\n",
             "returns a FrozenConfigDict": "import ml_collections\ndef get_config():\n    "
                                           "return ml_collections.FrozenConfigDict({})\n"}
    if case in texts:
        config.write_text(texts[case])
    arguments = [f"--config={config}"]
    if case == "misspelt variant":
        arguments = [f"--config={CONFIG}:nosuchvariant"]
    if case == "in a flag file":
        flag_file = tmp_path / "flags.txt"
        flag_file.write_text(f"--config={CONFIG}\n--config.spectrum.lanczos_steps=0\n")
        arguments = [f"--flagfile={flag_file}"]
    if case == "missing flag file":
        arguments = [f"--flagfile={tmp_path / 'absent.txt'}"]
    result = run_installed("hessian-spectrum", *arguments, f"--output_dir={tmp_path / 'out'}")
    assert_one_error_line(result, expected.format(config=config))
    assert not (tmp_path / "out").exists()


def stderr_at_exit(module, argv, *, report, before=()):
    """The stderr of hessian_tf.bin.<module>'s entry point run on `argv` in a fresh
    Python (after the lines `before`), ending with "exit CODE" and `report`'s values."""
    script = "\n".join([
        "import sys",
        f"from hessian_tf.bin import {module} as program",
        *before,
        f"sys.argv = {[module, *argv]!r}",
        "try:",
        "    program.run()",
        "except SystemExit as exit:",
        f"    print('exit', exit.code, {report}, file=sys.stderr)",
    ])
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")).stderr


@pytest.mark.parametrize("module", ["plot", "spectrum", "train"])
def test_programs_spare_their_exit_pythons_final_collection(module):
    # Python's last collection took about 1 s of each run after TensorFlow's import;
    # each program's entry point registers gc.freeze to run at exit instead.
    stderr = stderr_at_exit(module, ["--help"], report="'freeze', gc.freeze in registered",
                            before=["import atexit, gc", "registered = []",
                                    "atexit.register = lambda function, *a, **k: "
                                    "registered.append(function) or function"])
    assert "exit 0 freeze True" in stderr, stderr[-2000:]


@pytest.mark.parametrize("arguments, imported", [
    (["--loss=hinge"], False),
    (["--strategy=multi_worker"], False),
    (["--config.spectrum.lanczos_steps=0"], True),  # a config file may need TensorFlow
])
def test_bad_options_are_told_before_tensorflow_starts(tmp_path, arguments, imported):
    # The spectrum job's options are checked before TensorFlow's import (3-5 s), unless
    # a config file is loaded; nothing is written either way.
    argv = [*([f"--config={CONFIG}"] if imported else []), *arguments,
            f"--output_dir={tmp_path / 'out'}"]
    stderr = stderr_at_exit("spectrum", argv,
                            report="'tensorflow', 'tensorflow' in sys.modules")
    assert f"exit 2 tensorflow {imported}" in stderr, stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_a_fault_with_flags_alone_is_not_told_as_bad_input(tmp_path):
    # Only a config file's own failures are bad input: a fault of the program's shows
    # its traceback (an AttributeError put into the options' check here).
    stderr = stderr_at_exit("spectrum", [f"--output_dir={tmp_path / 'out'}"], report="''",
                            before=["from hessian_tf import config",
                                    "def fault(values): raise AttributeError('a fault')",
                                    "config.validate = fault"])
    assert "Traceback" in stderr and "AttributeError: a fault" in stderr, stderr[-2000:]
    assert "error: --config" not in stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, wanted", [
    ([], False), (["--verbose"], True), (["-verbose"], True), (["--verbose=1"], True),
    (["--verbose=True"], True), (["--verbose=false"], False), (["--verbose=f"], False),
    (["--verbose", "--noverbose"], False),
    (["--noverbose", "--verbose"], True), (["--verbose_other"], False),
])
def test_verbose_is_read_before_the_flags_are_parsed(argv, wanted):
    from hessian_tf.bin import verbose_requested

    assert verbose_requested(["program", *argv]) == wanted


@pytest.mark.parametrize("arguments, status", [(["--help"], 0), (["--nosuch"], 2), ([], 2)])
def test_hessian_train_answers_before_tensorflow_starts(arguments, status):
    # --help, an unknown flag and a missing --config need no TensorFlow (3-5 s).
    stderr = stderr_at_exit("train", arguments,
                            report="'tensorflow', 'tensorflow' in sys.modules")
    assert f"exit {status} tensorflow False" in stderr, stderr[-2000:]


@pytest.mark.parametrize("arguments, expected", [
    ([], None),
    (["--output_dir="], "--output_dir is empty; pass a directory"),
    (["--variables=("], "--variables='(' is not a valid regular expression"),
    (["--lanczos_steps=0"], "--lanczos_steps=0: pass an integer >= 1."),
])
def test_check_flags_refuses_what_the_run_would(arguments, expected, tmp_path):
    # --check_flags (launch/local.sh runs it once before its workers) had passed an
    # empty --output_dir and an invalid --variables, which every worker then refused.
    result = run_installed("hessian-spectrum", "--check_flags",
                           f"--output_dir={tmp_path / 'out'}", *arguments)
    if expected is None:
        assert result.returncode == 0 and not result.stderr.strip(), result.stderr[-2000:]
    else:
        assert_one_error_line(result, expected)
    assert not (tmp_path / "out").exists()
