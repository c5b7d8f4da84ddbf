"""The names a job's options choose among, and the checks of its numbers, without
TensorFlow: `config.validate` runs them before the programs import it, so a bad flag
is told in a fraction of a second instead of after TensorFlow's start-up (3-5 s).
The modules that use these names import them from here."""

from __future__ import annotations

import numbers

import numpy as np

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")
GRAPH_OPTIMIZATIONS = ("auto", "light", "full")
BN_MODES = ("inference", "train")
METHODS = ("auto", "forward_over_backward", "reverse_over_reverse")
PRECISIONS = ("model", "float32", "float64")
LOSS_NAMES = ("sparse_categorical_crossentropy", "categorical_crossentropy",
              "binary_crossentropy", "mean_squared_error")

# Sequences of at most this many steps are unrolled; benchmarks/recurrent.py measures
# the product and the trace against the loop at 8-256 steps.
MAX_UNROLL_STEPS = 64


# TensorFlow holds thread counts in 32-bit integers ("Value out of range" beyond).
MAX_CPU_THREADS = 2**31 - 1


def check_cpu_threads(intra_op_threads: int, inter_op_threads: int) -> None:
    """Raises ValueError for a number of threads that is negative or beyond 32 bits."""
    for name, value in (("intra_op_threads", intra_op_threads),
                        ("inter_op_threads", inter_op_threads)):
        if not 0 <= value <= MAX_CPU_THREADS:
            raise ValueError(
                f"--{name}={value}: pass a number of threads from 1 to {MAX_CPU_THREADS}, "
                "or 0 for the default (see --help)."
            )


def check_graph_optimization(mode: str) -> None:
    if mode not in GRAPH_OPTIMIZATIONS:
        raise ValueError(
            f"--graph_optimization={mode!r}: pass one of {GRAPH_OPTIMIZATIONS} (auto: light "
            "unless a GPU is visible or --strategy=tpu, else full).")


def is_integer(value) -> bool:
    """An integer, NumPy's too; not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real number, NumPy's too; not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def all_integers(array: np.ndarray) -> bool:
    """Whether every value of `array` is an integer: an integer dtype, or real values
    without a fraction (NaN has one)."""
    return np.issubdtype(array.dtype, np.integer) or bool(np.all(np.equal(np.mod(array, 1), 0)))


def check_steps(unroll_steps, name: str = "--unroll_steps") -> int:
    """`unroll_steps` as an int, or ValueError naming `name`, the value and the fix."""
    if not is_integer(unroll_steps) or unroll_steps < 0:
        raise ValueError(
            f"{name}={unroll_steps!r}: expected an integer number of time steps >= 0. "
            f"Fix: pass at least the sequences' length (default {MAX_UNROLL_STEPS}), or 0 to "
            "keep recurrent layers in their loop."
        )
    return int(unroll_steps)
