"""Recurrent layers unrolled or looped: one full-data Hessian-vector product, and the
trace, against the sequence length.

`KerasModelFunction(model)` unrolls Keras RNN layers over sequences of at most
`recurrent.MAX_UNROLL_STEPS` steps while it traces a product graph
(hessian_tf/operators/recurrent.py); `unroll_steps=0` keeps Keras's `tf.while_loop`.
For each cell and length: Input(T, 8) → cell(32) → Dense(10) (untrained, seeded), 512
random sequences in batches of 128. One operator per variant and method; its first
product (trace and run) is timed once, then `--rounds` interleaved rounds, medians.
Forward over backward runs only unrolled (TensorFlow's forward mode does not go
through the loop). The unrolled products are checked against the looped ones.

Columns: `loop RoR ms`, `unrolled RoR ms` and `unrolled FoB ms` (medians of one
product), `unrolled ÷ loop` (reverse over reverse), `first s` (trace plus first
product, loop → unrolled by reverse over reverse).

Command (about 12 minutes on 2 CPU cores; --steps 8,64 about 2):
  .venv/bin/python benchmarks/recurrent.py [--cells lstm,gru,simple] [--steps 8,32,...]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from core import interleaved_timings  # noqa: E402  (benchmarks/core.py)
from machine import measure_rows  # noqa: E402  (benchmarks/machine.py)

CELLS = ("lstm", "gru", "simple")
EXAMPLES, FEATURES, UNITS, BATCH_SIZE = 512, 8, 32, 128


def build(cell: str, steps: int):
    import keras

    keras.utils.set_random_seed(0)
    layer = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU,
             "simple": keras.layers.SimpleRNN}[cell](UNITS)
    inputs = keras.Input((steps, FEATURES))
    model = keras.Model(inputs, keras.layers.Dense(10)(layer(inputs)))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((EXAMPLES, steps, FEATURES)).astype(np.float32)
    y = rng.integers(0, 10, EXAMPLES)
    return model, x, y


def measure(cell: str, steps: int, rounds: int) -> list[str]:
    from hessian_tf import operators

    model, x, y = build(cell, steps)
    vector = np.random.default_rng(1).standard_normal(
        sum(int(np.prod(v.shape)) for v in model.trainable_variables))
    variants = {"loop RoR": (0, "reverse_over_reverse"),
                "unrolled RoR": (steps, "reverse_over_reverse"),
                "unrolled FoB": (steps, "forward_over_backward")}
    calls, first, products = {}, {}, {}
    for name, (unroll_steps, method) in variants.items():
        operator = operators.HessianOperator(
            operators.KerasModelFunction(model, unroll_steps=unroll_steps), x, y,
            batch_size=BATCH_SIZE, method=method)
        started = time.perf_counter()
        products[name] = operator.matvec(vector)
        first[name] = time.perf_counter() - started
        calls[name] = functools.partial(operator.matvec, vector)
    scale = np.abs(products["loop RoR"]).max()
    error = max(np.abs(products[n] - products["loop RoR"]).max() for n in variants) / scale
    if error > 1e-5:
        raise RuntimeError(f"{cell} T={steps}: unrolled products differ by {error:.1e}")
    median = {n: float(np.median(s)) for n, s in interleaved_timings(calls, rounds).items()}
    return [cell, str(steps), *(f"{median[n] * 1e3:.1f}" for n in variants),
            f"{median['unrolled RoR'] / median['loop RoR']:.2f}",
            f"{first['loop RoR']:.1f} → {first['unrolled RoR']:.1f}", f"{error:.0e}"]


HEADER = ("cell", "T", "loop RoR ms", "unrolled RoR ms", "unrolled FoB ms",
          "unrolled ÷ loop", "first s", "max rel. diff")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default=",".join(CELLS))
    parser.add_argument("--steps", default="8,32,64,128,256")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    cells = [c for c in args.cells.split(",") if c]
    try:
        steps = [int(s) for s in args.steps.split(",") if s]
    except ValueError:
        steps = []
    if not cells or any(c not in CELLS for c in cells) or not steps or min(steps) < 1 \
            or args.rounds < 1:
        print(f"recurrent.py: error: --cells={args.cells!r} (of {','.join(CELLS)}), "
              f"--steps={args.steps!r} (positive integers) or --rounds={args.rounds} "
              "(at least 1) is wrong", file=sys.stderr)
        return 2
    measure_rows(HEADER, [(cell, length, args.rounds) for cell in cells for length in steps],
                 measure)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
