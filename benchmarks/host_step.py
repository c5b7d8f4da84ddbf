"""A Lanczos step's work beside its product, on models of millions of parameters.

A Dense model (64 inputs → Dense(2048, tanh) → Dense(W)) on 8 examples: its products
touch every parameter but cost little, so what a step adds to its product shows: the
vector handed to TensorFlow, the products read back and averaged, and `lanczos_step`
(the three-term recurrence, full reorthogonalisation, the new basis row's pages, which
the OS gives at its first write; from 4 MiB rows on, since 2026-12-01, a thread takes
them while the product runs, and this product is short). On ResNet-sized models that
was a tenth of a step.

For each output width W: `product ms`, the median of 7 `HessianOperator.matmat`s of
one vector (their host work included, into one reused array where matmat takes `out=`,
as the SLQ driver then calls it); `step ms`, the best of 2 SLQ runs of m steps
(`Spectrum.seconds_per_step`, one draw, the job's `matmat`); `beside ms`, the
difference. λmax is printed so that runs of two checkouts can be compared.

Command (about 1 minute on 2 CPU cores; W = 11400 needs ~3 GB):
  .venv/bin/python benchmarks/host_step.py [--outputs 3400,11400] [--lanczos_steps 10]
Two checkouts: PYTHONPATH=OTHER_CHECKOUT .venv/bin/python benchmarks/host_step.py
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

# benchmarks/machine.py
from machine import load_average, median_seconds, positive_integers  # noqa: E402

EXAMPLES = 8


def operator_of(outputs: int):
    import keras

    from hessian_tf import operators

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(2048, activation="tanh"),
                              keras.layers.Dense(outputs)])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((EXAMPLES, 64)).astype(np.float32)
    y = rng.integers(0, outputs, EXAMPLES).astype(np.int32)
    return operators.HessianOperator(operators.KerasModelFunction(model), x, y,
                                     batch_size=EXAMPLES, method="reverse_over_reverse")


def measure(outputs: int, lanczos_steps: int) -> tuple[int, float, float, float]:
    """(parameters, product seconds, step seconds, λmax) for one output width."""
    from hessian_tf import spectrum
    from hessian_tf.distribute import graph_optimization

    operator = operator_of(outputs)
    vectors = np.random.default_rng(1).standard_normal((1, operator.dim))
    # As the driver calls it: into one array where it can (a new array's pages would
    # count in the product here and not in the step).
    takes_out = "out" in inspect.signature(operator.matmat).parameters  # older checkouts: no
    reused = {"out": np.empty_like(vectors)} if takes_out else {}
    with graph_optimization("auto"):
        operator.matmat(vectors, **reused)  # traced
        product = median_seconds(lambda: operator.matmat(vectors, **reused), 7)
        runs = [spectrum.stochastic_lanczos_quadrature(
            operator.matvec, operator.dim, lanczos_steps=lanczos_steps, num_draws=1, seed=0,
            matmat=operator.matmat) for _ in range(2)]
    step = min(run.seconds_per_step for run in runs)
    return operator.dim, product, step, runs[0].statistics.lambda_max


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", default="3400,11400",
                        help="comma-separated output widths W (default 3400,11400: about 7.1M "
                             "and 23.5M parameters, DenseNet-121's and ResNet50-V2's sizes)")
    parser.add_argument("--lanczos_steps", type=int, default=10, help="m (default 10)")
    args = parser.parse_args(argv)
    widths = positive_integers("outputs", args.outputs, "3400,11400")
    if widths is None:
        return 2
    if args.lanczos_steps < 2:
        print(f"--lanczos_steps={args.lanczos_steps}: pass at least 2 (a step after the "
              "first is timed).", file=sys.stderr)
        return 2
    from hessian_tf.distribute import automatic_cpu_threads

    automatic_cpu_threads("default")
    print(f"m = {args.lanczos_steps}; {load_average()}")
    print(f"{'params':>10} {'product ms':>10} {'step ms':>9} {'beside ms':>9}  λmax")
    for width in widths:
        dim, product, step, lambda_max = measure(width, args.lanczos_steps)
        print(f"{dim:>10} {product * 1e3:>10.1f} {step * 1e3:>9.1f} "
              f"{(step - product) * 1e3:>9.1f}  {lambda_max:.12g}", flush=True)
    print(f"End: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
