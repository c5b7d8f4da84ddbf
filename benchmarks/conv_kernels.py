"""TensorFlow's and PyTorch's convolution kernels alone, at ResNet-32's three shapes.

A Hessian-vector product of a convolution layer runs its forward convolution, the input
gradient and the filter gradient (and their tangents): this times each of the three
kernels, batch 128, 3×3 'same', stride 1, as each framework's CPU build runs it
(TensorFlow: NHWC with oneDNN, as `tf.function`s; PyTorch: NCHW, `torch.no_grad`), median
of --repeats calls after one warm-up. Each framework runs in its own process, one after
the other. PyTorch is timed only when it is installed (`make benchmark-pyhessian`
installs it); it is not installed here on demand.

Command (under a minute on 2 CPU cores):
  .venv/bin/python benchmarks/conv_kernels.py [--repeats 20] [--threads N]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import median_seconds  # noqa: E402

SHAPES = ((32, 16), (16, 32), (8, 64))  # (height = width, channels) of ResNet-32's stages
BATCH = 128


def time_tensorflow(repeats: int) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    rows = {}
    for size, channels in SHAPES:
        x = tf.random.normal([BATCH, size, size, channels])
        g = tf.random.normal([BATCH, size, size, channels])
        w = tf.random.normal([3, 3, channels, channels])
        forward = tf.function(lambda: tf.nn.conv2d(x, w, 1, "SAME"))
        input_gradient = tf.function(lambda: tf.nn.conv2d_transpose(
            g, w, [BATCH, size, size, channels], 1, "SAME"))
        filter_gradient = tf.function(lambda: tf.compat.v1.nn.conv2d_backprop_filter(
            x, [3, 3, channels, channels], g, [1, 1, 1, 1], "SAME"))
        rows[f"{size}x{size}x{channels}"] = [
            median_seconds(lambda f=f: f().numpy(), repeats)
            for f in (forward, input_gradient, filter_gradient)]
    return rows


def time_torch(repeats: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    rows = {}
    with torch.no_grad():
        for size, channels in SHAPES:
            x = torch.randn(BATCH, channels, size, size)
            g = torch.randn(BATCH, channels, size, size)
            w = torch.randn(channels, channels, 3, 3)
            functions = (
                lambda: torch.nn.functional.conv2d(x, w, padding=1),
                lambda: torch.nn.grad.conv2d_input(x.shape, w, g, padding=1),
                lambda: torch.nn.grad.conv2d_weight(x, w.shape, g, padding=1),
            )
            rows[f"{size}x{size}x{channels}"] = [median_seconds(f, repeats) for f in functions]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch.set_num_threads (TensorFlow: its default, one per core)")
    parser.add_argument("--child", choices=["tensorflow", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        parser.error(f"--repeats={args.repeats} --threads={args.threads}: pass at least 1 each.")
    if args.child == "tensorflow":
        print("RESULT " + json.dumps(time_tensorflow(args.repeats)))
        return 0
    if args.child == "torch":
        print("RESULT " + json.dumps(time_torch(args.repeats, args.threads)))
        return 0
    sides = ["tensorflow"] + (["torch"] if importlib.util.find_spec("torch") else [])
    results = {}
    for side in sides:
        done = subprocess.run(
            [sys.executable, __file__, f"--child={side}", f"--repeats={args.repeats}",
             f"--threads={args.threads}"], capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"conv_kernels: the {side} side failed: {last}", file=sys.stderr)
            return 2
        results[side] = json.loads(lines[0][len("RESULT "):])
    if "torch" not in results:
        print("PyTorch is not installed: TensorFlow's side only.")
    print(f"Batch {BATCH}, 3×3 'same', stride 1; median ms of {args.repeats} calls.\n")
    print("| shape (H×W×C) | kernel | TensorFlow ms | PyTorch ms | TensorFlow ÷ PyTorch |")
    print("|---|---|--:|--:|--:|")
    for shape, times in results["tensorflow"].items():
        for index, kernel in enumerate(("forward", "input gradient", "filter gradient")):
            ours = times[index] * 1e3
            if "torch" in results:
                theirs = results["torch"][shape][index] * 1e3
                print(f"| {shape} | {kernel} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.2f} |")
            else:
                print(f"| {shape} | {kernel} | {ours:.2f} | - | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
