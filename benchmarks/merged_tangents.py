"""Would one convolution kernel per pair of a product's tangent kernels be faster?

An exact Hessian-vector product through a convolution y = conv(x, W), with tangents
(dx, vW) and the gradient's tangent ddy, runs its tangent kernels in three pairs of sums:

- forward:         conv(x, vW) + conv(dx, W)
- input gradient:  conv_input(W, ddy) + conv_input(vW, dy)
- filter gradient: conv_filter(x, ddy) + conv_filter(dx, dy)

Each pair is also one kernel call of twice the size: the forward pair a convolution of
the inputs concatenated along channels by the filters concatenated along input
channels; the input-gradient pair one of the output gradients concatenated along
channels by the filters concatenated along output channels; the filter-gradient pair one
over the batch doubled. The arithmetic is the same; the question is whether oneDNN runs
one larger kernel faster than two, and whether that beats the two streams that
TensorFlow's inter-op pool now runs on two cores at once (one thread per op).

This times both formulations at ImageNet ResNet-18's four 3×3 stages (batch 32,
stride 1, "same"), each in its own process with one or two threads per op (inter-op 2),
medians of --repeats calls after one warm-up, and checks that the merged results equal
the split ones (float32 rounding). Command (about a minute on 2 CPU cores):
  .venv/bin/python benchmarks/merged_tangents.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import load_average, median_seconds  # noqa: E402

SHAPES = ((56, 64), (28, 128), (14, 256), (7, 512))  # (height = width, channels)
BATCH = 32
CASES = (("split", 1), ("split", 2), ("merged", 1), ("merged", 2))


def time_case(formulation: str, threads: int, repeats: int) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    generator = tf.random.Generator.from_seed(0)
    rows = {}
    for size, channels in SHAPES:
        shape = [BATCH, size, size, channels]
        x, dx, dy, ddy = (generator.normal(shape) for _ in range(4))
        w, vw = (generator.normal([3, 3, channels, channels]) for _ in range(2))
        strides = [1, 1, 1, 1]

        def conv(inputs, filters):
            return tf.nn.conv2d(inputs, filters, 1, "SAME")

        def conv_input(filters, gradient):
            return tf.raw_ops.Conv2DBackpropInput(
                input_sizes=shape, filter=filters, out_backprop=gradient, strides=strides,
                padding="SAME")

        def conv_filter(inputs, gradient):
            return tf.raw_ops.Conv2DBackpropFilter(
                input=inputs, filter_sizes=[3, 3, channels, channels], out_backprop=gradient,
                strides=strides, padding="SAME")

        def split():
            return (conv(x, vw) + conv(dx, w), conv_input(w, ddy) + conv_input(vw, dy),
                    conv_filter(x, ddy) + conv_filter(dx, dy))

        def merged():
            return (conv(tf.concat([x, dx], -1), tf.concat([vw, w], 2)),
                    conv_input(tf.concat([w, vw], 3), tf.concat([ddy, dy], -1)),
                    conv_filter(tf.concat([x, dx], 0), tf.concat([ddy, dy], 0)))

        pairs = [tf.function(lambda i=i: split()[i]) for i in range(3)]
        if formulation == "merged":
            reference = [pair().numpy() for pair in pairs]
            pairs = [tf.function(lambda i=i: merged()[i]) for i in range(3)]
            for pair, expected in zip(pairs, reference):
                error = abs(pair().numpy() - expected).max() / abs(expected).max()
                if error > 1e-5:
                    raise SystemExit(f"merged_tangents: the merged kernels differ from the "
                                     f"split ones by {error:.2e} at {size}x{size}x{channels}")
        rows[f"{size}x{size}x{channels}"] = [
            median_seconds(lambda pair=pair: pair().numpy(), repeats) for pair in pairs]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats}: pass at least 1.")
    if args.child:
        formulation, threads = args.child.split(":")
        print("RESULT " + json.dumps(time_case(formulation, int(threads), args.repeats)))
        return 0
    print(f"load before: {load_average()}")
    results = {}
    for formulation, threads in CASES:
        done = subprocess.run(
            [sys.executable, __file__, f"--child={formulation}:{threads}",
             f"--repeats={args.repeats}"], capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"merged_tangents: {formulation} with {threads} threads failed: {last}",
                  file=sys.stderr)
            return 2
        results[(formulation, threads)] = json.loads(lines[0][len("RESULT "):])
    print(f"load after: {load_average()}")
    print(f"Batch {BATCH}, 3×3 'same', stride 1; median ms of {args.repeats} calls of a "
          "pair's sum (split: two kernels and an add; merged: the concatenations and one "
          "kernel).\n")
    print("| shape (H×W×C) | pair | split, 1 thread/op | split, 2 | merged, 1 | merged, 2 |")
    print("|---|---|--:|--:|--:|--:|")
    for shape in results[CASES[0]]:
        for index, pair in enumerate(("forward", "input gradient", "filter gradient")):
            cells = " | ".join(f"{results[case][shape][index] * 1e3:.1f}" for case in CASES)
            print(f"| {shape} | {pair} | {cells} |")
    totals = {case: sum(sum(times) for times in results[case].values()) for case in CASES}
    cells = " | ".join(f"{totals[case] * 1e3:.0f}" for case in CASES)
    print(f"| all | all | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
