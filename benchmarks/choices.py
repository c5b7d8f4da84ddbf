"""The implementation choices made by measurement: one batch's gradient and
Hessian-vector product (the operator's default method) under each alternative.

Variants (each in its own process, since some are environment variables read when
TensorFlow starts): baseline; XLA (`jit_compile=True`); XLA auto-clustering, of every
op or of the element-wise ops only (`--tf_xla_ops_to_cluster=FUSIBLE`); unfolded
inference BN (the operator folds BN into the convolution before it,
hessian_tf/operators/folding.py; this variant runs BN as Keras writes it); fused
inference BN (`tf.compat.v1.nn.fused_batch_norm` in place of Keras's unfused BN, and
unfolded); oneDNN off; TensorFlow inter-op threads 1 and 4. Gradient and product are
traced as the operator traces them, inside the model function's inference mode.

Command (about 5 minutes on 2 CPU cores):
  .venv/bin/python benchmarks/choices.py [--workload resnet32-cifar|mlp-digits] [--repeats 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from machine import load_average  # benchmarks/machine.py

VARIANTS = {
    "baseline": {},
    "xla": {},
    "xla-autoclustering": {"TF_XLA_FLAGS": "--tf_xla_auto_jit=2 --tf_xla_cpu_global_jit"},
    # Only element-wise ops clustered (BN, activations and their derivatives fused by
    # XLA); convolutions and matrix products stay with oneDNN.
    "xla-fusible": {"TF_XLA_FLAGS": "--tf_xla_auto_jit=2 --tf_xla_cpu_global_jit "
                                    "--tf_xla_ops_to_cluster=FUSIBLE"},
    "unfolded-bn": {},
    "fused-bn": {},
    "onednn-off": {"TF_ENABLE_ONEDNN_OPTS": "0"},
    "interop-1": {"TF_NUM_INTEROP_THREADS": "1"},
    "interop-4": {"TF_NUM_INTEROP_THREADS": "4"},
}


def child(variant: str, workload: str, repeats: int) -> dict:
    """Runs in the child process: times one batch's gradient and product."""
    import time

    import numpy as np
    import tensorflow as tf

    if variant == "fused-bn":
        from keras.src.backend.tensorflow import nn as keras_nn

        unfused = keras_nn.batch_normalization

        def fused(x, mean, variance, axis, offset=None, scale=None, epsilon=1e-3):
            if x.shape.rank == 4 and axis in (-1, 3) and offset is not None and scale is not None:
                y, _, _ = tf.compat.v1.nn.fused_batch_norm(
                    x, scale, offset, mean=mean, variance=variance, epsilon=epsilon,
                    is_training=False)
                return y
            return unfused(x, mean, variance, axis, offset, scale, epsilon)

        keras_nn.batch_normalization = fused

    from hessian_tf import operators
    from hessian_tf.io.datasets import load_digits
    from hessian_tf.models import mlp, resnet32

    if workload == "resnet32-cifar":
        model = resnet32()
        rng = np.random.default_rng(0)
        x = rng.uniform(size=(128, 32, 32, 3)).astype(np.float32)
        y = rng.integers(0, 10, 128).astype(np.int32)
        for variable in model.non_trainable_variables:  # inference BN is not the identity
            if "moving_variance" in variable.path:
                variable.assign(np.full(variable.shape, 1.7, np.float32))
            if "moving_mean" in variable.path:
                variable.assign(np.full(variable.shape, 0.1, np.float32))
    else:
        model = mlp()
        x, y = load_digits()
    model_function = operators.KerasModelFunction(
        model, fold_batch_norm=variant not in ("unfolded-bn", "fused-bn"))
    # Reverse over reverse, the method of the documented results (auto would time both).
    operator = operators.HessianOperator(model_function, x, y, batch_size=x.shape[0],
                                         method="reverse_over_reverse")
    xs, ys = tf.constant(x), tf.constant(y)
    primals, state = model_function.primals(), model_function.state()
    tangents = [tf.random.stateless_normal(p.shape, [1, i]) for i, p in enumerate(primals)]
    jit = variant == "xla"

    @tf.function(jit_compile=jit)
    def gradient():
        with tf.GradientTape() as tape:
            tape.watch(primals)
            objective = operator._batch_objective(primals, state, xs, ys)
        return tape.gradient(objective, primals)

    @tf.function(jit_compile=jit)
    def product():
        return operator._batch_product(primals, state, tangents, xs, ys)

    def best(function):
        [t.numpy() for t in function()]  # trace / compile
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            [t.numpy() for t in function()]
            seconds.append(time.perf_counter() - start)
        return min(seconds)

    times = {}
    with model_function.mode_context("inference"):  # traced as the operator traces
        for _ in range(2):  # interleaved rounds
            for name, function in (("gradient", gradient), ("product", product)):
                times[name] = min(times.get(name, float("inf")), best(function))
        values = np.concatenate([t.numpy().ravel() for t in product()])
    return {"gradient": times["gradient"], "product": times["product"],
            "method": operator.method, "product_norm": float(np.linalg.norm(values))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="resnet32-cifar", choices=["resnet32-cifar", "mlp-digits"])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.workload, args.repeats)), flush=True)
        return 0
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or args.repeats < 1:
        parser.error(f"--variants={args.variants} --repeats={args.repeats}: variants are "
                     f"{','.join(VARIANTS)}; repeats >= 1.")
    print(f"{args.workload}, one batch, best of {args.repeats}; at start {load_average()}", flush=True)
    rows = []
    for name in names:
        environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **VARIANTS[name]}
        result = subprocess.run(
            [sys.executable, __file__, f"--workload={args.workload}", f"--repeats={args.repeats}",
             f"--child={name}"], capture_output=True, text=True, env=environment)
        lines = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")]
        if result.returncode != 0 or not lines:
            print(f"{name}: failed ({result.stderr.strip().splitlines()[-1:]})", flush=True)
            continue
        row = json.loads(lines[0][len("RESULT "):])
        rows.append((name, row))
        print(f"{name:>20}: gradient {row['gradient']:.4f} s, product ({row['method']}) "
              f"{row['product']:.4f} s, product/gradient {row['product'] / row['gradient']:.2f}, "
              f"|Hv| {row['product_norm']:.6g}", flush=True)
    print(f"at end {load_average()}\n")
    print("| variant | gradient s | product s | product/gradient | product ÷ baseline product |")
    print("|---|--:|--:|--:|--:|")
    base = dict(rows).get("baseline")
    for name, row in rows:
        relative = f"{row['product'] / base['product']:.2f}" if base else "-"
        print(f"| {name} | {row['gradient']:.4f} | {row['product']:.4f} | "
              f"{row['product'] / row['gradient']:.2f} | {relative} |")
    return 0 if len(rows) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
