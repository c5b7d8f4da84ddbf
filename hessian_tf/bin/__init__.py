"""Command-line programs (absl): thin wrappers around one library call each."""

import contextlib
import os
import sys


@contextlib.contextmanager
def quiet_native_stderr():
    """TensorFlow's C++ start-up chatter (oneDNN, CUDA stubs) is written to file
    descriptor 2 before any log level applies; hide it while TF is imported, so a
    bad input gets one line. `--verbose` keeps it."""
    if "--verbose" in sys.argv or "--verbose=true" in sys.argv:
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


def import_tensorflow_quietly():
    """Imports TensorFlow and Keras with their start-up chatter hidden; returns tf."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with quiet_native_stderr():
        import keras  # noqa: F401  (its import loads TensorFlow's libraries too)
        import tensorflow as tf

        tf.config.list_physical_devices()
    return tf
