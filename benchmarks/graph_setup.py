"""The set-up of the product and gradient graphs under `--graph_optimization` light
against full (TensorFlow's Grappler configuration): seconds to trace, seconds of the
first run (Grappler's optimisation, the executor's set-up and one run), and the median
of later runs, over the whole data, each variant in its own process (each starts
cold, as a job does).

Workloads: `densenet121` (keras.applications.DenseNet121, untrained, 32×32×3, 10
classes, 6,964,106 trainable parameters; 128 of the digits upscaled, batch 64: a deep graph of
121 convolutions), `resnet32` (hessian_tf.models.resnet32 on 256 random images, batch
128), or `--model=NET.keras --data=DATA.npz [--batch_size=B]`.

Command (about 4 minutes on 2 CPU cores for densenet121):
  .venv/bin/python benchmarks/graph_setup.py [--workload densenet121|resnet32]
      [--model NET.keras --data DATA.npz --batch_size B] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from machine import load_average  # benchmarks/machine.py

VARIANTS = ("full", "light")


def workload_data(args):
    import numpy as np

    if args.model:
        import keras

        data = np.load(args.data)
        return keras.models.load_model(args.model), data["x"], data["y"], args.batch_size
    if args.workload == "resnet32":
        from hessian_tf.models import resnet32

        rng = np.random.default_rng(0)
        return (resnet32(), rng.uniform(size=(256, 32, 32, 3)).astype(np.float32),
                rng.integers(0, 10, 256).astype(np.int32), 128)
    import keras

    from hessian_tf.io.datasets import load_digits

    x, y = load_digits()
    images = np.kron(x[:128].reshape(-1, 8, 8), np.ones((4, 4), np.float32))
    images = np.repeat(images[..., None], 3, axis=-1) * 2.0 - 1.0
    keras.utils.set_random_seed(0)
    model = keras.applications.DenseNet121(input_shape=(32, 32, 3), weights=None, classes=10,
                                           classifier_activation=None)
    return model, images.astype(np.float32), y[:128].astype(np.int32), 64


def child(variant: str, args) -> dict:
    import time

    import numpy as np
    import tensorflow as tf

    from hessian_tf import operators
    from hessian_tf.distribute import automatic_cpu_threads, graph_optimization

    automatic_cpu_threads("default")  # as the binary sets the threads
    model, x, y, batch_size = workload_data(args)
    result = {}
    with graph_optimization(variant):
        operator = operators.HessianOperator(
            operators.KerasModelFunction(model), x, y, batch_size=batch_size,
            method="reverse_over_reverse")
        result["params"] = operator.dim
        vector = np.random.default_rng(0).standard_normal((1, operator.dim))
        vector = tf.constant(vector / np.linalg.norm(vector), operator._device_dtype)
        gradient = tf.function(operator._loss_gradient_graph)
        for name, trace, call in (
            ("product", lambda: operator._product_function.get_concrete_function(
                *operator._product_spec(1)),
             lambda function: function(vector, operator._all_batches)),
            ("gradient", gradient.get_concrete_function, lambda function: function()),
        ):
            started = time.perf_counter()
            function = trace()
            result[f"{name}_trace"] = time.perf_counter() - started
            seconds = []
            for _ in range(1 + args.runs):
                started = time.perf_counter()
                operator._combined(call(function))
                seconds.append(time.perf_counter() - started)
            result[f"{name}_first_run"] = seconds[0]
            result[f"{name}_run"] = float(np.median(seconds[1:]))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="densenet121", choices=["densenet121", "resnet32"])
    parser.add_argument("--model", default="")
    parser.add_argument("--data", default="")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.runs < 1 or bool(args.model) != bool(args.data) or args.batch_size < 1:
        parser.error(f"--runs={args.runs} --model={args.model!r} --data={args.data!r} "
                     f"--batch_size={args.batch_size}: runs >= 1, --model and --data together, "
                     "batch size >= 1.")
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)), flush=True)
        return 0
    label = args.model or args.workload
    print(f"{label}: set-up of the product (reverse over reverse) and gradient graphs over "
          f"the whole data, median of {args.runs} later runs; at start {load_average()}",
          flush=True)
    rows = {}
    for variant in VARIANTS:
        command = [sys.executable, __file__, f"--child={variant}", f"--workload={args.workload}",
                   f"--runs={args.runs}", f"--batch_size={args.batch_size}"]
        if args.model:
            command += [f"--model={args.model}", f"--data={args.data}"]
        environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        done = subprocess.run(command, capture_output=True, text=True, env=environment)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"{variant}: failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return 2
        rows[variant] = json.loads(lines[-1][len("RESULT "):])
    keys = [key for key in rows["full"] if key != "params"]
    print(f"params {rows['full']['params']:,}")
    print("| seconds | " + " | ".join(VARIANTS) + " | light / full |")
    print("|---|" + "--:|" * (len(VARIANTS) + 1))
    for key in keys:
        values = [rows[variant][key] for variant in VARIANTS]
        print(f"| {key} | " + " | ".join(f"{v:.3f}" for v in values)
              + f" | {values[1] / values[0]:.2f} |")
    setup = {variant: sum(rows[variant][key] for key in keys
                          if key.endswith(("_trace", "_first_run"))) for variant in VARIANTS}
    print(f"set-up (traces and first runs): full {setup['full']:.2f} s, light "
          f"{setup['light']:.2f} s ({setup['light'] / setup['full']:.2f}); at end {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
