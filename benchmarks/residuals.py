"""Would caching each batch's forward and backward pass make Lanczos steps cheaper?

Every Lanczos step multiplies a new vector by the same Hessian: in a product, the
part that does not depend on the vector (the forward pass, the backward signals, the
activation masks) is the same at every step. This script splits one batch's
reverse-over-reverse product graph into that part and the rest (the tensors at the
boundary are the "residuals" a cache would hold), and times the full product against
the rest alone: what `--cache_residuals` saves per Lanczos step, and what it costs.

The split is `hessian_tf.operators.residuals.split`, which `--cache_residuals` runs:
`tf.compat.v1.wrap_function` traces the product with static shapes; the operations
that depend on the vector are those reachable from it; the residuals are their inputs
that do not depend on it; `prune` makes one function from the inputs to the residuals
and one from the residuals and the vector to the product. The product from the
residuals is checked against the full product before anything is timed.

Command (about 1 minute for resnet32-cifar on 2 CPU cores):
  .venv/bin/python benchmarks/residuals.py [--workload resnet32-cifar|mlp-digits] [--bn_mode inference|train]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from core import load_workload  # noqa: E402  (benchmarks/core.py)
from hessian_tf import operators  # noqa: E402
from hessian_tf.operators import flat_parameters as flatten_lib  # noqa: E402
from hessian_tf.operators import residuals as residuals_lib  # noqa: E402
from machine import best_of, load_average  # noqa: E402  (benchmarks/machine.py)


def split_product(operator, x, y):
    """(full, split): the one-batch product as one function, and split at its
    residuals as `--cache_residuals` splits it."""
    parts, specs, _ = operator.batch_product_function(
        tf.TensorSpec(x.shape, x.dtype), tf.TensorSpec(y.shape, y.dtype))
    primals = operator.model_function.primals()

    # One flat vector in and out: the split and join that the operator does once per
    # product are done here once per batch, so "from residuals" is a little slower than
    # a cached step's share of it; the residuals are the operator's.
    def product(*arguments):
        inputs, vector = arguments[:-1], arguments[-1]
        return flatten_lib.flatten(parts(*inputs, *flatten_lib.unflatten(vector, primals)))

    vector_spec = tf.TensorSpec([operator.dim], tf.float64)
    full = tf.function(tf.compat.v1.wrap_function(product, specs + [vector_spec]))
    return full, residuals_lib.split(product, specs, vector_spec)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="resnet32-cifar", help="resnet32-cifar | mlp-digits")
    parser.add_argument("--bn_mode", default="inference", help="inference | train")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.batch_size < 1:
        parser.error("--repeats and --batch_size must be >= 1.")
    if args.bn_mode not in ("inference", "train"):
        parser.error(f"--bn_mode={args.bn_mode!r}: use inference or train.")
    model, x, y = load_workload(args.workload)
    size = min(args.batch_size, x.shape[0])
    operator = operators.HessianOperator(
        operators.KerasModelFunction(model), x[:size], y[:size], batch_size=size,
        bn_mode=args.bn_mode, method="reverse_over_reverse")
    print(f"{args.workload}, BN {args.bn_mode}, one batch of {size}; at start {load_average()}",
          flush=True)
    full, split = split_product(operator, tf.constant(x[:size]), tf.constant(y[:size]))
    inputs = operator.model_function.primals() + operator.model_function.state() + [
        tf.constant(x[:size]), tf.constant(y[:size]),
        tf.constant(np.random.default_rng(0).standard_normal(operator.dim))]
    rest = split.residuals_of(*inputs[:-1]) + [inputs[i] for i in split.passed] + [inputs[-1]]
    reference, from_residuals = full(*inputs).numpy(), split.from_residuals(*rest).numpy()
    difference = np.max(np.abs(from_residuals - reference)) / np.max(np.abs(reference))
    if not difference <= 1e-5:
        print(f"ERROR: the split product differs from the full one by {difference:.2e}.")
        return 1
    seconds = {}
    for _ in range(2):  # the first round warms up
        seconds = {
            "full product": best_of(lambda: full(*inputs).numpy(), args.repeats),
            "from residuals": best_of(lambda: split.from_residuals(*rest).numpy(), args.repeats),
            "residuals alone": best_of(
                lambda: [t.numpy() for t in split.residuals_of(*inputs[:-1])], args.repeats),
        }
    for name, value in seconds.items():
        print(f"  {name:16s} {value:.4g} s")
    print(f"  from residuals ÷ full product: {seconds['from residuals'] / seconds['full product']:.2f}"
          f" (split equals full to {difference:.1e})")
    print(f"  residuals: {split.residual_bytes / 2**20:.1f} MiB per batch of {size} "
          f"({split.residual_bytes / size / 2**20:.2f} MiB per example); at end {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
