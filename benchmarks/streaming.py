"""A streamed product against the same product from memory.

The digits MLP (16,510 parameters, 1797 examples, batch 128), one product over the
whole data: from the in-memory operator, and from `StreamingHessianOperator` reading
a tf.data pipeline over the same arrays at every product, on the default strategy
and on a MirroredStrategy over two logical CPUs. Interleaved rounds, so that load
from other processes hits both alike; best and median of --repeats.

Command (about 30 s on 2 CPU cores):
  .venv/bin/python benchmarks/streaming.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from hessian_tf import operators  # noqa: E402
from hessian_tf.distribute.strategies import configure_cpu_devices  # noqa: E402
from hessian_tf.io.datasets import load_digits  # noqa: E402
from hessian_tf.models.mlp import mlp  # noqa: E402
from hessian_tf.operators.streaming import StreamingHessianOperator, array_dataset_fn  # noqa: E402
from core import interleaved_timings  # noqa: E402  (benchmarks/core.py)
from machine import load_average  # noqa: E402  (benchmarks/machine.py)

BATCH_SIZE = 128


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="rounds (default 10)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        print(f"--repeats={args.repeats}: pass at least 1.", file=sys.stderr)
        return 2
    configure_cpu_devices(2)
    x, y = load_digits()
    print(f"TensorFlow {tf.__version__}; digits MLP, batch {BATCH_SIZE}; {load_average()}")
    print(f"{'strategy':>22} {'memory ms':>10} {'stream ms':>10} {'stream/memory':>14}  (best; median)")
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    for name, strategy in [("default", tf.distribute.get_strategy()),
                           ("mirrored, 2 CPUs", tf.distribute.MirroredStrategy(devices))]:
        with strategy.scope():
            model_function = operators.KerasModelFunction(mlp())
        # One method on both sides (streamed data are not timed by method='auto').
        common = dict(batch_size=BATCH_SIZE, strategy=strategy, method="reverse_over_reverse")
        memory = operators.HessianOperator(model_function, x, y, **common)
        stream = StreamingHessianOperator(
            model_function, array_dataset_fn(x, y, BATCH_SIZE), num_examples=len(x),
            sample=(x[:2], y[:2]), **common)
        vector = np.random.default_rng(0).standard_normal(memory.dim)
        difference = np.max(np.abs(stream.matvec(vector) - memory.matvec(vector)))  # traces
        seconds = interleaved_timings(
            {label: (lambda op=operator: op.matvec(vector))
             for label, operator in (("memory", memory), ("stream", stream))}, args.repeats)
        best = {label: min(s) for label, s in seconds.items()}
        median = {label: float(np.median(s)) for label, s in seconds.items()}
        print(f"{name:>22} {best['memory'] * 1e3:>10.1f} {best['stream'] * 1e3:>10.1f} "
              f"{best['stream'] / best['memory']:>14.2f}  "
              f"({median['memory'] * 1e3:.1f}; {median['stream'] * 1e3:.1f} ms median); "
              f"max |stream - memory| {difference:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
