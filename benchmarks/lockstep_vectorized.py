"""Lockstep blocks: the operator's loop against a pfor-vectorised second backward pass.

A block of k products (lockstep draws) shares each batch's forward and backward pass;
the operator then differentiates the k inner products ⟨∇ℓ, vⱼ⟩ one after another
(reverse over reverse). The alternative timed here differentiates all k at once:
`tape.jacobian` of the stacked inner products with pfor, which turns each operation
of the second backward pass into one batched operation. Both operators run on the same
model and data; one block of k products and one single product are timed in
interleaved rounds in one process, and each block is reported ÷ k single products.

Command (about 1 minute for mlp-digits, 3 for resnet32-cifar, on 2 CPU cores):
  .venv/bin/python benchmarks/lockstep_vectorized.py [--workload mlp-digits|resnet32-cifar]
      [--rounds 5]
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
from machine import load_average  # noqa: E402  (benchmarks/machine.py)
from hessian_tf import operators  # noqa: E402

# (BN mode, batch size, examples used): ResNet-32 on 256 of its 512 images.
CASES = {"mlp-digits": ("inference", 1797, None), "resnet32-cifar": ("inference", 128, 256)}
BLOCK = 8


def vectorized_batch_products(self, primals, state, block, x, y, method=None):
    """[H_b v for v in block]: one pfor-vectorised backward pass over the block (the
    operators here have a fixed method, so `method` is never another one)."""
    if method not in (None, self.method):
        raise ValueError(f"vectorized_batch_products: method={method!r}; it is its own method.")
    zero = tf.UnconnectedGradients.ZERO
    with tf.GradientTape() as outer:
        outer.watch(primals)
        with tf.GradientTape() as inner:
            inner.watch(primals)
            objective = self._batch_objective(primals, state, x, y)
        gradients = inner.gradient(objective, primals, unconnected_gradients=zero)
        inner_products = tf.add_n([
            tf.reduce_sum(g[tf.newaxis] * tf.stack([tf.cast(t[i], g.dtype) for t in block]),
                          axis=list(range(1, g.shape.rank + 1)))
            for i, g in enumerate(gradients)])
    rows = outer.jacobian(inner_products, primals, unconnected_gradients=zero,
                          experimental_use_pfor=True)
    return [[row[j] for row in rows] for j in range(len(block))]


def operators_for(model, x, y, bn_mode, batch_size):
    built = {}
    for name in ("loop", "pfor"):
        operator = operators.HessianOperator(
            operators.KerasModelFunction(model), x, y, batch_size=batch_size, bn_mode=bn_mode,
            method="reverse_over_reverse")
        if name == "pfor":
            operator._batch_products = vectorized_batch_products.__get__(operator)
        built[name] = operator
    return built


def measure(workload: str, rounds: int, *, num_examples=None, block: int = BLOCK) -> dict:
    bn_mode, batch_size, default_examples = CASES[workload]
    model, x, y = load_workload(workload)
    count = num_examples or default_examples
    if count:
        x, y = x[:count], y[:count]
    built = operators_for(model, x, y, bn_mode, batch_size)
    vectors = np.random.default_rng(0).standard_normal((block, built["loop"].dim))
    reference = built["loop"].matmat(vectors)  # traces
    difference = float(np.max(np.abs(built["pfor"].matmat(vectors) - reference))
                       / np.max(np.abs(reference)))
    built["loop"].matvec(vectors[0])  # traces the single product
    seconds = {"loop": [], "pfor": [], "single": []}
    for _ in range(rounds):
        for name in ("loop", "pfor"):
            start = time.perf_counter()
            built[name].matmat(vectors)
            seconds[name].append(time.perf_counter() - start)
        start = time.perf_counter()
        built["loop"].matvec(vectors[0])
        seconds["single"].append(time.perf_counter() - start)
    single = min(seconds["single"])
    ratios = {name: min(seconds[name]) / (block * single) for name in ("loop", "pfor")}
    return {"seconds": seconds, "ratios": ratios, "difference": difference}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="mlp-digits", choices=sorted(CASES))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        print(f"--rounds={args.rounds}: pass a number of rounds >= 1.", file=sys.stderr)
        return 2
    print(f"At start: {load_average()}", flush=True)
    result = measure(args.workload, args.rounds)
    seconds = result["seconds"]
    print(f"At end: {load_average()}; {args.workload}, best of {args.rounds} rounds\n")
    print(f"| block of {BLOCK} | s (best) | ÷ {BLOCK} single products |")
    print("|---|--:|--:|")
    for name in ("loop", "pfor"):
        print(f"| {name} | {min(seconds[name]):.4g} | {result['ratios'][name]:.3f} |")
    print(f"| single product | {min(seconds['single']):.4g} | |")
    print(f"\nmax relative difference pfor vs loop: {result['difference']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
