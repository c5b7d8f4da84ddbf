"""GroupNormalization by per-channel statistics or by Keras's layer: one full-data
Hessian-vector product of a GN CNN, per method.

`KerasModelFunction(model)` computes Keras's GroupNormalization through per-channel
means while it traces a product (hessian_tf/operators/group_norm.py);
`per_channel_group_norm=False` runs Keras's own layer. The network: the digits (8×8),
a 16-channel 3×3 convolution, two residual blocks of two, GroupNormalization(groups)
after each of the five convolutions, ReLU, global average pooling, Dense(10)
(untrained, seeded; 9,770 parameters with 4 groups), batches of 128. For each method,
the two operators' products are checked against each other, then timed in `--rounds`
interleaved rounds after a traced first one; medians.

Command (about 2 minutes on 2 CPU cores):
  .venv/bin/python benchmarks/group_norm.py [--groups 4] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from core import agreeing_medians  # noqa: E402  (benchmarks/core.py)
from machine import measure_rows  # noqa: E402  (benchmarks/machine.py)

BATCH_SIZE = 128
METHODS = ("reverse_over_reverse", "forward_over_backward")


def residual_gn_cnn(groups: int):
    import keras

    layers = keras.layers
    keras.utils.set_random_seed(0)

    def convolution(x):
        x = layers.Conv2D(16, 3, padding="same")(x)
        return layers.GroupNormalization(groups)(x)

    inputs = keras.Input((8, 8, 1))
    x = layers.ReLU()(convolution(inputs))
    for _ in range(2):
        y = convolution(layers.ReLU()(convolution(x)))
        x = layers.ReLU()(layers.Add()([x, y]))
    return keras.Model(inputs, layers.Dense(10)(layers.GlobalAveragePooling2D()(x)))


def measure(method: str, groups: int, rounds: int) -> list[str]:
    from hessian_tf import operators
    from hessian_tf.io.datasets import load_digits

    x, y = load_digits()
    x = x.reshape(-1, 8, 8, 1).astype(np.float32)
    model = residual_gn_cnn(groups)
    variants = {}
    for name, per_channel in (("Keras", False), ("per-channel", True)):
        variants[name] = operators.HessianOperator(
            operators.KerasModelFunction(model, per_channel_group_norm=per_channel), x, y,
            batch_size=BATCH_SIZE, method=method)
    median, error = agreeing_medians(variants, rounds, method)
    return [method, str(groups), f"{median['Keras'] * 1e3:.1f}",
            f"{median['per-channel'] * 1e3:.1f}",
            f"{median['per-channel'] / median['Keras']:.2f}", f"{error:.0e}"]


HEADER = ("method", "groups", "Keras GN ms", "per-channel ms", "per-channel ÷ Keras",
          "max rel. diff")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    if args.groups < 1 or 16 % args.groups or args.rounds < 1:
        print(f"group_norm.py: error: --groups={args.groups} (a divisor of 16) or "
              f"--rounds={args.rounds} (at least 1) is wrong", file=sys.stderr)
        return 2
    measure_rows(HEADER, [(method, args.groups, args.rounds) for method in METHODS], measure)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
