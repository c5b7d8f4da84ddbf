"""Would caching each batch's forward and backward pass make Lanczos steps cheaper?

Every Lanczos step multiplies a new vector by the same Hessian: in a product, the
part that does not depend on the vector (the forward pass, the backward signals, the
activation masks) is the same at every step. This script splits one batch's
reverse-over-reverse product graph into that part and the rest (the tensors at the
boundary are the "residuals" a cache would hold), and times the full product against
the rest alone. It is the measurement behind NOT caching residuals in the operator.

The split: `tf.compat.v1.wrap_function` traces the product with static shapes; the
operations that depend on the vector are those reachable from it; the residuals are
their inputs that do not depend on it; `prune` makes one function from the inputs to
the residuals and one from the residuals and the vector to the product. The product
from the residuals is checked against the full product before anything is timed.

Command (about 1 minute for resnet32-cifar on 2 CPU cores):
  .venv/bin/python benchmarks/residuals.py [--workload resnet32-cifar|mlp-digits] [--bn_mode inference|train]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from core import load_workload  # noqa: E402  (benchmarks/core.py)
from hessian_tf import operators  # noqa: E402
from machine import load_average  # noqa: E402  (benchmarks/machine.py)


def split_product(operator, x, y):
    """(full, residuals_of, from_residuals, residual_bytes): the one-batch product as
    one function, and split at the tensors that do not depend on the vector."""
    model_function = operator.model_function
    primals, state = model_function.primals(), model_function.state()
    num_primals, num_state = len(primals), len(state)
    specs = [tf.TensorSpec(t.shape, t.dtype) for t in primals + state] + [
        tf.TensorSpec(x.shape, x.dtype), tf.TensorSpec(y.shape, y.dtype),
        tf.TensorSpec([operator.dim], tf.float64)]

    def product(*args):
        p = list(args[:num_primals])
        s = list(args[num_primals:num_primals + num_state])
        xb, yb, vector = args[-3:]
        with model_function.mode_context(operator.bn_mode):
            tangents = operators.unflatten(vector, p)
            return operators.flatten(operator._batch_product(p, s, tangents, xb, yb))

    wrapped = tf.compat.v1.wrap_function(product, specs)
    inputs = wrapped.inputs[:len(specs)]
    vector, output = inputs[-1], wrapped.outputs[0]
    consumers = {}
    for op in wrapped.graph.get_operations():
        for tensor in op.inputs:
            consumers.setdefault(tensor.op, []).append(op)
        for control in op.control_inputs:
            consumers.setdefault(control, []).append(op)
    depends, stack = set(), [vector.op]
    while stack:
        op = stack.pop()
        if op not in depends:
            depends.add(op)
            stack.extend(consumers.get(op, ()))
    needed, stack = set(), [output.op]
    while stack:
        op = stack.pop()
        if op not in needed:
            needed.add(op)
            stack.extend(t.op for t in op.inputs)
            stack.extend(op.control_inputs)
    boundary, seen = [], set()
    for op in needed & depends:
        for tensor in op.inputs:
            if tensor.op not in depends and tensor.op.type != "Const" and tensor.ref() not in seen:
                seen.add(tensor.ref())
                boundary.append(tensor)
    placeholders = {t.ref(): i for i, t in enumerate(inputs)}
    residuals = [t for t in boundary if t.ref() not in placeholders]
    passed = [t for t in boundary if t.ref() in placeholders and t.ref() != vector.ref()]
    residuals_of = tf.function(wrapped.prune(feeds=inputs[:-1], fetches=residuals))
    from_residuals = tf.function(wrapped.prune(feeds=residuals + passed + [vector], fetches=output))
    full = tf.function(wrapped.prune(feeds=inputs, fetches=output))
    residual_bytes = sum(t.shape.num_elements() * t.dtype.size for t in residuals)
    passed_index = [placeholders[t.ref()] for t in passed]
    return full, residuals_of, from_residuals, passed_index, residual_bytes


def best_of(function, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return min(seconds)


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
    full, residuals_of, from_residuals, passed_index, residual_bytes = split_product(
        operator, tf.constant(x[:size]), tf.constant(y[:size]))
    inputs = operator.model_function.primals() + operator.model_function.state() + [
        tf.constant(x[:size]), tf.constant(y[:size]),
        tf.constant(np.random.default_rng(0).standard_normal(operator.dim))]
    residuals = residuals_of(*inputs[:-1])
    residuals = list(residuals) if isinstance(residuals, (list, tuple)) else [residuals]
    rest = residuals + [inputs[i] for i in passed_index] + [inputs[-1]]
    reference, split = full(*inputs).numpy(), from_residuals(*rest).numpy()
    difference = np.max(np.abs(split - reference)) / np.max(np.abs(reference))
    if not difference <= 1e-5:
        print(f"ERROR: the split product differs from the full one by {difference:.2e}.")
        return 1
    seconds = {}
    for _ in range(2):  # the first round warms up
        seconds = {
            "full product": best_of(lambda: full(*inputs).numpy(), args.repeats),
            "from residuals": best_of(lambda: from_residuals(*rest).numpy(), args.repeats),
            "residuals alone": best_of(lambda: [t.numpy() for t in residuals_of(*inputs[:-1])],
                                       args.repeats),
        }
    for name, value in seconds.items():
        print(f"  {name:16s} {value:.4g} s")
    print(f"  from residuals ÷ full product: {seconds['from residuals'] / seconds['full product']:.2f}"
          f" (split equals full to {difference:.1e})")
    print(f"  residuals: {residual_bytes / 2**20:.1f} MiB per batch of {size} "
          f"({residual_bytes / size / 2**20:.2f} MiB per example); at end {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
