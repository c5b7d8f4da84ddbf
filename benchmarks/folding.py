"""Inference BN folded or not: one full-data Hessian-vector product, folded ÷ unfolded.

`KerasModelFunction(model)` folds inference BN into the layer before it where it pays
(hessian_tf/operators/folding.py, `fold_here`); `fold_batch_norm=False` runs Keras's own
BN. Each workload builds both operators on the same model and data, checks that their
products agree, and times them in interleaved rounds (median of --rounds each), with
the pairs folded and the pairs whose BN runs inside the layer counted at the traced
batch size. Untrained networks with BN moving statistics set away from (0, 1).

Workloads (scikit-learn's digits unless said):
- `mlp-bn-1797`, `mlp-bn-128`: Dense 128-128-64 each followed by BN and ReLU, then
  Dense(10), on the 64 pixels, in one batch of 1797 or batches of 128;
- `conv-stack-bn`: five Conv2D(16, 3×3, same) each followed by BN and ReLU, global
  average pooling, Dense(10), on the 8×8 images, batches of 128;
- `conv-pool-bn`: benchmarks/example_networks.py's `conv_pool_bn` (one BN, after a
  16-channel convolution on 3×3 maps), batches of 128;
- `resnet32`: hessian_tf.models.resnet32 on 256 random 32×32×3 images, batches of 128
  (only when asked: about 2 minutes).

Command (about 1 minute on 2 CPU cores without resnet32):
  .venv/bin/python benchmarks/folding.py [--workloads mlp-bn-1797,...|all] [--rounds 40]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from machine import load_average  # noqa: E402  (benchmarks/machine.py)

WORKLOADS = ("mlp-bn-1797", "mlp-bn-128", "conv-stack-bn", "conv-pool-bn", "resnet32")
DEFAULT_WORKLOADS = WORKLOADS[:-1]


def build(name: str):
    """(model, x, y, batch size)."""
    import keras

    from hessian_tf.io.datasets import load_digits

    layers = keras.layers
    keras.utils.set_random_seed(0)
    x, y = load_digits()
    images = x.reshape(-1, 8, 8, 1)
    if name.startswith("mlp-bn"):
        stack = [keras.Input((64,))]
        for units in (128, 128, 64):
            stack += [layers.Dense(units), layers.BatchNormalization(), layers.ReLU()]
        model = keras.Sequential(stack + [layers.Dense(10)])
        batch = 1797 if name == "mlp-bn-1797" else 128
    elif name == "conv-stack-bn":
        stack = [keras.Input((8, 8, 1))]
        for _ in range(5):
            stack += [layers.Conv2D(16, 3, padding="same"), layers.BatchNormalization(),
                      layers.ReLU()]
        model = keras.Sequential(stack + [layers.GlobalAveragePooling2D(), layers.Dense(10)])
        x, batch = images, 128
    elif name == "conv-pool-bn":
        from example_networks import build as build_example  # benchmarks/example_networks.py

        model, x, batch = build_example("conv_pool_bn"), images, 128
    else:
        from hessian_tf.models import resnet32

        rng = np.random.default_rng(0)
        model = resnet32()
        x = rng.uniform(size=(256, 32, 32, 3)).astype(np.float32)
        y = rng.integers(0, 10, 256).astype(np.int32)
        batch = 128
    rng = np.random.default_rng(1)
    for variable in model.non_trainable_variables:
        if "moving_variance" in variable.path:
            variable.assign(rng.uniform(0.5, 2.0, variable.shape).astype(np.float32))
        if "moving_mean" in variable.path:
            variable.assign(rng.uniform(-0.5, 0.5, variable.shape).astype(np.float32))
    return model, x, y, batch


def pair_paths(model, batch: int) -> tuple[int, int]:
    """(pairs folded, pairs whose BN runs inside the layer) at this batch size."""
    from hessian_tf.operators import folding

    folded = 0
    pairs = folding.foldable_pairs(model)
    for layer, bn in pairs:
        shape = (batch,) + tuple(bn.input.shape[1:])  # the layer's output, read by BN only
        folded += folding.fold_here(shape, layer.kernel.shape)
    return folded, len(pairs) - folded


def run(name: str, rounds: int) -> dict:
    from hessian_tf import operators

    model, x, y, batch = build(name)
    # One method on both sides (auto could choose differently for each).
    sides = [operators.HessianOperator(
        operators.KerasModelFunction(model, fold_batch_norm=fold), x, y, batch_size=batch,
        method="reverse_over_reverse")
        for fold in (True, False)]
    vector = np.random.default_rng(0).standard_normal(sides[0].dim)
    folded, unfolded = (side.matvec(vector) for side in sides)  # traces, then checks
    difference = float(np.linalg.norm(folded - unfolded) / np.linalg.norm(unfolded))
    times = ([], [])
    for _ in range(rounds):
        for index, side in enumerate(sides):
            start = time.perf_counter()
            side.matvec(vector)
            times[index].append(time.perf_counter() - start)
    medians = [float(np.median(t)) for t in times]
    in_kernel, in_layer = pair_paths(model, batch)
    return {"params": sides[0].dim, "batch": batch, "folded_pairs": in_kernel,
            "in_layer_pairs": in_layer, "folded_s": medians[0], "unfolded_s": medians[1],
            "ratio": medians[0] / medians[1], "difference": difference}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                        help=f"comma-separated, of {','.join(WORKLOADS)}, or all")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args(argv)
    names = list(WORKLOADS) if args.workloads == "all" else args.workloads.split(",")
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown or args.rounds < 1:
        parser.error(f"--workloads={args.workloads} --rounds={args.rounds}: workloads are "
                     f"{','.join(WORKLOADS)} (or all); rounds >= 1.")
    print(f"One full-data product, folded ÷ unfolded, median of {args.rounds} interleaved "
          f"rounds; at start {load_average()}", flush=True)
    print("| workload | params | batch | pairs folded / BN in the layer | folded ms | "
          "unfolded ms | folded ÷ unfolded | products' relative difference |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    for name in names:
        row = run(name, args.rounds)
        print(f"| {name} | {row['params']:,} | {row['batch']} | {row['folded_pairs']} / "
              f"{row['in_layer_pairs']} | {1e3 * row['folded_s']:.2f} | "
              f"{1e3 * row['unfolded_s']:.2f} | {row['ratio']:.2f} | {row['difference']:.1e} |",
              flush=True)
    print(f"At end {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
