"""How well `--method=auto` chooses: on each network of `example_networks.py`, the
choice (both methods' product graphs timed over the first batches, as
hessian-spectrum does at start-up) against full-data products by each method.

For each network (its data, batch 128, inference BN, one draw): an operator with
method='auto' chooses (its timings and the seconds the choice took, tracing
included); then one operator per method computes full-data products, `--rounds`
interleaved rounds after a traced first one, medians. `full FoB/RoR` < 1 means
forward over backward is faster over the whole data; `right` says whether auto chose
the faster one (within AUTO_MARGIN counts as either).

Usage (about 5 minutes on 2 CPU cores for the first eight networks; more with the
embedding and binary ones):
  .venv/bin/python benchmarks/example_networks.py OUT_DIR
  .venv/bin/python benchmarks/methods.py OUT_DIR [--rounds 5] [--networks a,b]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from core import SHORT, interleaved_timings  # noqa: E402  (benchmarks/core.py)
from machine import measure_rows  # noqa: E402  (benchmarks/machine.py)
import example_networks  # noqa: E402

BATCH_SIZE = 128


def measure(name: str, directory: str, rounds: int) -> list[str]:
    import keras

    from hessian_tf import operators
    from hessian_tf.operators import hessian as hessian_lib

    with np.load(os.path.join(directory, example_networks.NETWORKS[name] + ".npz")) as data:
        x, y = data["x"], data["y"]
    model = keras.models.load_model(os.path.join(directory, f"{name}.keras"))
    model_function = operators.KerasModelFunction(model)

    loss = example_networks.loss(name)
    auto = operators.HessianOperator(model_function, x, y, batch_size=BATCH_SIZE, loss=loss)
    started = time.perf_counter()
    chosen = auto.choose_method(1)
    choice_seconds = time.perf_counter() - started
    timed = auto.method_seconds

    fixed = {}
    for method in hessian_lib.METHODS[1:]:
        operator = operators.HessianOperator(
            model_function, x, y, batch_size=BATCH_SIZE, method=method, loss=loss)
        try:
            operator.matvec(np.ones(operator.dim))  # traces
        except ValueError as error:
            if "forward mode does not run" not in str(error):
                raise
            continue
        fixed[method] = operator
    vector = np.random.default_rng(0).standard_normal(auto.dim)
    seconds = interleaved_timings(
        {method: functools.partial(operator.matvec, vector) for method, operator in fixed.items()},
        rounds)
    full = {method: float(np.median(values)) for method, values in seconds.items()}
    forward, reverse = (timed[m] for m in hessian_lib.METHODS[1:])
    if "forward_over_backward" in full:
        full_ratio = full["forward_over_backward"] / full["reverse_over_reverse"]
        within = hessian_lib.AUTO_MARGIN <= full_ratio <= 1 / hessian_lib.AUTO_MARGIN
        faster = "forward_over_backward" if full_ratio < 1 else "reverse_over_reverse"
        right = "yes" if chosen == faster or within else "NO"
        ratio_cells = [f"{forward / reverse:.2f}", f"{full_ratio:.2f}"]
    else:
        right = "yes"  # reverse over reverse is the only method that runs
        ratio_cells = ["(FoB fails)", "(FoB fails)"]
    return [name, f"{auto.dim:,}", f"{len(x) // BATCH_SIZE + (len(x) % BATCH_SIZE > 0)}",
            *ratio_cells, SHORT[chosen], right,
            f"{full['reverse_over_reverse'] * 1e3:.1f}",
            f"{full.get('forward_over_backward', float('nan')) * 1e3:.1f}",
            f"{choice_seconds:.1f}"]


HEADER = ("network", "params", "batches", "timed FoB/RoR", "full FoB/RoR", "auto chose",
          "right", "full RoR ms", "full FoB ms", "choice s")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="the OUT_DIR of example_networks.py")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--networks", default=",".join(example_networks.NETWORKS))
    args = parser.parse_args(argv)
    names = [n for n in args.networks.split(",") if n]
    unknown = [n for n in names if n not in example_networks.NETWORKS]
    if unknown or args.rounds < 1:
        print(f"methods.py: error: --networks: unknown {unknown}, or --rounds={args.rounds} "
              "below 1", file=sys.stderr)
        return 2
    missing = [n for n in names if not os.path.exists(os.path.join(args.directory, f"{n}.keras"))]
    if missing:
        print(f"methods.py: error: {args.directory} has no {missing[0]}.keras; run "
              "example_networks.py on it first", file=sys.stderr)
        return 2
    measure_rows(HEADER, [(name, args.directory, args.rounds) for name in names], measure)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
