"""Command-line programs (absl): thin wrappers around one library call each."""

import atexit
import contextlib
import gc
import os
import sys

from hessian_tf.messages import first_line


def verbose_requested(argv) -> bool:
    """Whether `argv` asks for --verbose, read before absl parses it (the last of
    --verbose, --verbose=VALUE and --noverbose wins, as in absl)."""
    wanted = False
    for argument in argv[1:]:
        name, given, value = argument.lstrip("-").partition("=")
        if name == "verbose":
            wanted = not given or value.lower() in ("true", "t", "1")
        elif name == "noverbose":
            wanted = False
    return wanted


@contextlib.contextmanager
def quiet_native_stderr():
    """TensorFlow's C++ start-up chatter (oneDNN, CUDA stubs) is written to file
    descriptor 2 before any log level applies; hide it while TF is imported, so a
    bad input gets one line. `--verbose` keeps it."""
    if verbose_requested(sys.argv):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def skip_final_collection():
    """Spares a program's exit Python's last garbage collection.

    At exit Python collects every object it still holds; after TensorFlow's import
    that walk took 0.9-1.1 s of each run (a job of 17 s on the wide MLP of
    benchmarks/PYHESSIAN.md, and a trivial `tf.function` program alike; ad hoc),
    against 0.04-0.15 s frozen. Registered by each binary's `run`, `gc.freeze()` runs
    as an exit handler (before those registered earlier, TensorFlow's, absl's and
    logging's, which still run) and takes every object there is then out of that
    collection: objects still alive at exit, or in reference cycles, are not
    finalised (a file left open and unflushed by code loaded with --import_modules
    would lose what it buffered). hessian_tf writes, flushes and closes its own files
    explicitly (results, checkpoints, summaries; logging flushes every record), and
    TensorFlow's context is still torn down at exit."""
    atexit.register(gc.freeze)


def log_own_progress():
    """Logs at INFO, where only hessian_tf's own records pass below WARNING: the INFO
    lines of TensorFlow and tfds (a strategy's devices, a dataset that failed to load
    before its error is told) would come before a bad input's one line. Warnings and
    errors of every library are kept; `--verbose` keeps everything."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.INFO)
    if verbose_requested(sys.argv):
        return
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep

    def keep(record) -> bool:
        return (record.levelno >= absl_logging.converter.STANDARD_WARNING
                or os.path.abspath(record.pathname).startswith(package))

    absl_logging.get_absl_handler().addFilter(keep)


def _with_integer_fix(message) -> str:
    """absl's line for an integer flag given as `1e3` or `2.0` ("invalid literal for
    int()"), with the fix: the value in digits where it is a whole number."""
    import decimal
    import re

    text = str(message)
    found = re.search(r"flag (--[\w.]+)=(\S+): invalid literal for int\(\)", text)
    if not found:
        return text
    name, value = found.groups()
    try:  # exact (a float would round 12345678901234567.0)
        number = decimal.Decimal(value)
    except decimal.InvalidOperation:
        return f"{text}; give a whole number in digits"
    if number.is_finite() and number == number.to_integral_value() and abs(number) < 2 ** 63:
        return f"{text}; write it in digits: {name}={int(number)}"
    return f"{text}; give a whole number in digits"


def run_program(program: str, module_name: str, usage: str, main, *,
                log_progress: bool = True):
    """A console script's entry point: absl runs `main` on the parsed flags
    (flags_parser) and exits with its status; Python's last collection at exit is
    skipped; with `log_progress`, hessian_tf's INFO lines are logged."""
    from absl import app

    skip_final_collection()
    if log_progress:
        log_own_progress()
    try:
        app.run(lambda argv: sys.exit(main(argv)),
                flags_parser=flags_parser(program, module_name, usage))
    except KeyboardInterrupt:  # where `main` did not tell it (its start-up, say)
        if verbose_requested(sys.argv):
            raise
        sys.exit(interrupted_line(program))


def import_tensorflow_quietly():
    """Imports TensorFlow and Keras with their start-up chatter hidden; returns tf."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with quiet_native_stderr():
        import keras  # noqa: F401  (its import loads TensorFlow's libraries too)
        import tensorflow as tf

        tf.config.list_physical_devices()
    return tf


def innermost_message(error: BaseException) -> str:
    """`Type: text` of the innermost of errors wrapped as their first argument
    (ml_collections raises AttributeError(KeyError(...)) for an unknown option), the
    text without the quotes a KeyError's str puts around it."""
    while len(error.args) == 1 and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) \
        else str(error)
    return f"{type(error).__name__}: {text}"


INTERRUPTED_STATUS = 130  # 128 + SIGINT, as a shell reports a process Ctrl-C stopped


def interrupted_line(program: str, message: str = "") -> int:
    """Prints `program: interrupted (Ctrl-C)[; message]` as one line on stderr (not
    Python's traceback); returns INTERRUPTED_STATUS."""
    print(f"{program}: interrupted (Ctrl-C){'; ' + message if message else ''}",
          file=sys.stderr)
    return INTERRUPTED_STATUS


def error_line(program: str, message) -> int:
    """Prints `program: error: message` as one line on stderr; returns exit status 2."""
    print(f"{program}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def job_error_message(error: BaseException) -> str:
    """The one line a job's failure is told in: the error's own text, or for running
    out of memory and for lost workers, what happened and the ways out."""
    import tensorflow as tf

    from hessian_tf.linalg.lanczos import BasisMemoryError

    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, tf.errors.ResourceExhaustedError):
        first = first_line(error)
        return (
            f"out of device memory ({first}); data kept in memory live on the devices "
            "(--stream reads them at every product instead), and a product holds one "
            "batch's activations: pass --stream, a smaller --batch_size, or more replicas."
        )
    bases = ("fewer --lanczos_steps shorten them, --basis_dtype=float32 halves them, "
             "--lockstep_draws=1 keeps one")
    if isinstance(error, BasisMemoryError):
        return f"out of host memory ({message}); the Lanczos bases live on the host: {bases}."
    if isinstance(error, MemoryError):  # data, model, activations or bases: not known which
        return (
            f"out of host memory ({message}); the data kept in memory, one batch's "
            "activations and the Lanczos bases live on the host: --stream reads a tfds "
            "dataset at every product instead, a smaller --batch_size shrinks the "
            f"activations, and of the bases {bases}."
        )
    if isinstance(error, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError)) or (
        isinstance(error, RuntimeError) and "waiting for the cluster" in message
    ):
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return (
            f"a worker did not answer or was lost ({type(error).__name__}: "
            f"{lines[-1][:200] if lines else ''}); check that every worker runs and "
            "reaches the others, or raise --worker_timeout."
        )
    return message


HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "-?")


def define_config_file(program: str, help_text: str):
    """The program's --config flag (ml_collections). Defining it reads the command
    line's --flagfile files already: one that cannot be read is one line, exit 2."""
    from absl import flags
    from ml_collections import config_flags

    try:
        return config_flags.DEFINE_config_file("config", None, help_text)
    except flags.CantOpenFlagFileError as error:
        sys.exit(error_line(program, error))


def loaded_config(holder):
    """The ml_collections.ConfigDict that a --config file's get_config() returned
    (None when no --config was given); else ValueError in one line: ml_collections
    keeps a failure to load the file until the value is first used."""
    import ml_collections
    from absl import flags
    from ml_collections import config_flags

    if not holder.present:
        return None
    value = holder.value
    if isinstance(value, ml_collections.ConfigDict):
        return value
    path = config_flags.get_config_filename(flags.FLAGS[holder.name]).split(":")[0]
    if not os.path.isfile(path):
        raise ValueError(f"--config={path}: no such file; pass a config file (see the "
                         "files in configs/).")
    try:
        value.keys()  # ml_collections' stand-in for a file that failed to load raises it
    except OSError as error:
        cause = error.__cause__ or error
        raise ValueError(f"--config={path}: cannot be loaded ({cause})") from error
    except AttributeError:
        pass  # None, a list, ...: what get_config() returned
    raise ValueError(
        f"--config={path}: the file's get_config() returned "
        f"{'None' if value is None else 'a ' + type(value).__name__}; return an "
        "ml_collections.ConfigDict (see the files in configs/).")


def without_traceback(error) -> str:
    """The text of a flag error without the traceback ml_collections puts into it when
    a config file's get_config() raises (a misspelt variant): the flag, then the
    config's own error line."""
    message = str(error)
    head, marker, trace = message.partition("Traceback (most recent call last):")
    if not marker:
        return message
    lines = [line.strip() for line in trace.splitlines() if line.strip()]
    return f"{head.strip()} {lines[-1]}" if lines else head.strip()


def flags_parser(program: str, module_name: str, usage: str):
    """absl's flag parser for `program`, made a command-line program's: --help prints
    `usage` and the flags the program defines (in `module_name`) and exits 0; a bad
    flag, flag value or config override is one line on stderr and exit status 2."""
    from absl import flags
    from absl import logging as absl_logging

    def parse(argv):
        if any(argument in HELP_FLAGS for argument in argv[1:]):
            print(usage.strip() + "\n")
            print(flags.FLAGS.module_help(module_name))
            print("\n--helpfull lists absl's own flags too.")
            sys.exit(0)
        # The flags named (--config.train.steps=5: "config.train.steps").
        names = [argument.lstrip("-").split("=")[0] for argument in argv[1:]]
        loads_python = any(name.split(".")[0] in ("config", "flagfile") for name in names)
        if loads_python:
            # A config file (given directly or in a flag file) is Python that may import
            # TensorFlow (configs/ import hessian_tf.training): quietly, before it loads.
            import_tensorflow_quietly()
        # ml_collections warns through absl's logging while it loads a config (a
        # get_config() returning None, which the program then tells in its one line).
        verbosity = absl_logging.get_verbosity()
        absl_logging.set_verbosity(absl_logging.ERROR)
        try:
            return flags.FLAGS(argv)
        except flags.Error as error:
            message = error if verbose_requested(argv) else without_traceback(error)
            message = _with_integer_fix(message)
            if "flag 'workdir'" in str(error) and program == "hessian-spectrum":
                message = (f"{message} (an experiment's workdir is --config.workdir, with "
                           "its --config)")
            sys.exit(error_line(program, message))
        except Exception as error:  # noqa: BLE001  (a config file's own failure)
            if not loads_python or verbose_requested(argv):
                raise
            if "FrozenConfigDict is immutable" in str(error):  # ml_collections locks it
                sys.exit(error_line(program, "--config: the file's get_config() returned "
                                             "a FrozenConfigDict; return an "
                                             "ml_collections.ConfigDict (see configs/)"))
            if "has no attribute 'get_config'" in str(error):
                sys.exit(error_line(program, f"--config: the file defines no get_config() "
                                             f"({error}); see the files in configs/"))
            if isinstance(error, (AttributeError, KeyError)) and any(
                    name.startswith("config.") for name in names):
                # ml_collections raises these for an override of an option that does not
                # exist (or the config file's own code for its own mistakes).
                sys.exit(error_line(
                    program,
                    f"a --config.* override names no option of the config, or the config "
                    f"file fails ({innermost_message(error)}); check the override's "
                    "spelling against the config file",
                ))
            sys.exit(error_line(program, f"--config: {type(error).__name__}: {error}"))
        finally:
            absl_logging.set_verbosity(verbosity)

    return parse
