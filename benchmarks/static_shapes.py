"""Static against dynamic batch shapes: one product over the whole data.

The operator traces each batch size that occurs (the full batch and the uneven last
one) with a static batch dimension. This script builds two operators on the same
model and data, one as shipped and one whose batches run with the batch dimension
unknown to the graph (what the operator did before), and times their products in
interleaved rounds in one process, so that load from other processes inflates both
alike. On the MLP it also times XLA (`jit_compile=True`) on the static traces, the
alternative that static shapes made moot.

Command (about 3 minutes on 2 CPU cores):
  .venv/bin/python benchmarks/static_shapes.py [--workload mlp-digits|resnet32-cifar|all]
      [--repeats 50]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from core import interleaved_timings, load_workload  # noqa: E402  (benchmarks/core.py)
from machine import load_average  # noqa: E402  (benchmarks/machine.py)
from hessian_tf import operators  # noqa: E402
from hessian_tf.operators import hessian as hessian_lib  # noqa: E402

CASES = {
    "mlp-digits": [("inference", 1797), ("inference", 128)],
    "resnet32-cifar": [("inference", 128), ("train", 128)],
}


def _jit_batch_value(batch_fn, *args, **kwargs):
    return _BATCH_VALUE(tf.function(batch_fn, jit_compile=True), *args, **kwargs)


_BATCH_VALUE = hessian_lib.batch_value


def measure(workload: str, bn_mode: str, batch_size: int, repeats: int) -> dict:
    model, x, y = load_workload(workload)
    model_function = operators.KerasModelFunction(model)
    variants = ["static", "dynamic"] + (["static + XLA"] if workload == "mlp-digits" else [])
    built = {}
    vector = None
    first = {}
    for name in variants:
        # One method for every variant (auto could choose differently for each).
        operator = operators.HessianOperator(
            model_function, x, y, batch_size=batch_size, bn_mode=bn_mode,
            method="reverse_over_reverse")
        if name == "dynamic":
            operator._batch_sizes = ()  # every batch with an unknown batch dimension
        vector = np.random.default_rng(0).standard_normal(operator.dim)
        # The product graph is traced at the first call: with XLA only for its variant.
        hessian_lib.batch_value = _jit_batch_value if name == "static + XLA" else _BATCH_VALUE
        try:
            start = time.perf_counter()
            operator.matvec(vector)
            first[name] = time.perf_counter() - start
        finally:
            hessian_lib.batch_value = _BATCH_VALUE
        built[name] = operator
    reference = built["static"].matvec(vector)
    differences = {
        name: float(np.max(np.abs(op.matvec(vector) - reference)) / np.max(np.abs(reference)))
        for name, op in built.items()
    }
    seconds = interleaved_timings(
        {name: functools.partial(operator.matvec, vector) for name, operator in built.items()},
        repeats)
    return {"seconds": seconds, "first": first, "differences": differences}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="all", choices=sorted(CASES) + ["all"])
    parser.add_argument("--repeats", type=int, default=0,
                        help="rounds (default: 50 for mlp-digits, 4 for resnet32-cifar)")
    args = parser.parse_args(argv)
    if args.repeats < 0:
        print(f"--repeats={args.repeats}: pass a number of rounds >= 1, or 0 for the default.",
              file=sys.stderr)
        return 2
    print(f"At start: {load_average()}", flush=True)
    names = sorted(CASES) if args.workload == "all" else [args.workload]
    rows = []
    for workload in names:
        for bn_mode, batch_size in CASES[workload]:
            repeats = args.repeats or (50 if workload == "mlp-digits" else 4)
            result = measure(workload, bn_mode, batch_size, repeats)
            seconds = result["seconds"]
            static_min, static_median = min(seconds["static"]), np.median(seconds["static"])
            for name in seconds:
                row = (f"| {workload} | {bn_mode} | {batch_size} | {name} | "
                       f"{min(seconds[name]):.4g} | {min(seconds[name]) / static_min:.3f} | "
                       f"{np.median(seconds[name]) / static_median:.3f} | "
                       f"{result['first'][name]:.2f} | {result['differences'][name]:.1e} |")
                rows.append(row)
                print(row, flush=True)
    print(f"\nAt end: {load_average()}; {args.workload}, one run\n")
    print("| workload | BN mode | batch | trace | product s (best) | ÷ static (best) | "
          "÷ static (median) | first call s | max relative difference |")
    print("|---|---|--:|---|--:|--:|--:|--:|--:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
