"""Grouped convolutions of many groups: which formulation without XLA is fastest for a
Hessian-vector product.

hessian_tf.operators.convolutions computes a grouped convolution of several input
channels per group as one convolution per group, concatenated. Networks of the ResNeXt
and RegNet families have many such groups (ResNeXt-50 32×4d: 32 groups of 4 to 32
channels; RegNetX: groups of 8 to 56 channels, up to 46 of them at 200 MF), so splitting
makes many small convolutions. Here the split is timed against Keras's own grouped
convolution (compiled by XLA) and two other formulations by TensorFlow's ordinary ops:

- depthwise, summed: a depthwise convolution of every input channel by its group's
  kernels (`channels / groups` outputs each), then the sum over each group's inputs
  (the same multiplications, an output `channels / groups` times larger);
- block-diagonal kernel: one ordinary convolution by the kernel of all groups placed on
  the block diagonal of a [*window, channels, filters] kernel of zeros (`groups` times
  the multiplications, in one large convolution).

Each row is one network (seeded, untrained; one batch of 128 of the digits at 32×32):
a stride-(32 / size) 3×3 stem to `channels` channels, then a 3×3 `Conv2D(channels,
groups=groups)` at size×size, ReLUs, global average pooling and Dense(10). The products
(reverse over reverse) of the four are checked against Keras's, then timed in
`--rounds` interleaved rounds after a traced first one; medians.

Command (about 8 minutes on 2 CPU cores, most of it Keras's):
  .venv/bin/python benchmarks/grouped_conv_formulations.py [--rounds 3]
"""

from __future__ import annotations

import contextlib
import os
import sys
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from core import agreeing_medians, rounds_main, switched_off  # noqa: E402  (benchmarks/core.py)

BATCH_SIZE = 128
# (channels, groups, size): ResNeXt-50 32×4d's second and third stages' widths at 16×16
# and 8×8; RegNetX-200MF's last two (19 and 46 groups of 8) at 8×8 and 4×4.
CASES = ((128, 32, 16), (256, 32, 8), (152, 19, 8), (368, 46, 4))
KERAS = "Keras's (XLA)"
SPLIT = "split (hessian_tf)"
DEPTHWISE = "depthwise, summed"
BLOCK_DIAGONAL = "block-diagonal kernel"


def depthwise_summed(inputs, kernel, groups, padding):
    import tensorflow as tf

    *window, per_group, filters = kernel.shape
    outputs_per_group = filters // groups
    # [*window, per_group, groups, outputs_per_group] → input channel g·per_group + i
    # multiplied by its group's kernels, the outputs ordered (g, i, o).
    grouped = tf.reshape(kernel, (*window, per_group, groups, outputs_per_group))
    depthwise = tf.reshape(tf.transpose(grouped, (0, 1, 3, 2, 4)),
                           (*window, groups * per_group, outputs_per_group))
    products = tf.nn.depthwise_conv2d(inputs, depthwise, (1, 1, 1, 1), padding)
    shape = tf.shape(products)
    summed = tf.reduce_sum(
        tf.reshape(products, tf.concat([shape[:3], [groups, per_group, outputs_per_group]], 0)),
        axis=4)
    return tf.reshape(summed, tf.concat([shape[:3], [filters]], 0))


def block_diagonal(inputs, kernel, groups, padding):
    import tensorflow as tf

    *window, per_group, filters = kernel.shape
    grouped = tf.reshape(kernel, (*window, per_group, groups, filters // groups))
    # [*window, groups (input), per_group, groups (output), outputs_per_group]
    full = tf.einsum("hwigo,Gg->hwGigo", grouped, tf.eye(groups, dtype=kernel.dtype))
    return tf.nn.conv2d(inputs, tf.reshape(full, (*window, groups * per_group, filters)),
                        1, padding)


def formulation(grouped):
    """Traces made within compute grouped 2-D convolutions (stride 1, channels last) as
    `grouped(inputs, kernel, groups, padding)`, in place of hessian_tf's split."""
    from hessian_tf.operators import convolutions

    def replacement(inputs, kernel, groups, strides, padding, data_format, dilation_rate):
        return grouped(inputs, kernel, groups, padding.upper())

    return mock.patch.object(convolutions, "_grouped", replacement)


TRACING_CONTEXTS = {
    KERAS: lambda: switched_off("grouped_convolutions"),
    SPLIT: contextlib.nullcontext,
    DEPTHWISE: lambda: formulation(depthwise_summed),
    BLOCK_DIAGONAL: lambda: formulation(block_diagonal),
}


def build(channels: int, groups: int, size: int):
    import keras

    layers = keras.layers
    inputs = keras.Input((32, 32, 1))
    h = layers.Conv2D(channels, 3, strides=32 // size, padding="same", activation="relu")(inputs)
    h = layers.Conv2D(channels, 3, padding="same", groups=groups, activation="relu")(h)
    return keras.Model(inputs, layers.Dense(10)(layers.GlobalAveragePooling2D()(h)))


def measure(channels: int, groups: int, size: int, rounds: int, examples: int = BATCH_SIZE,
            variants=tuple(TRACING_CONTEXTS)):
    import keras

    from hessian_tf import operators
    from hessian_tf.io.datasets import load_digits

    import example_networks  # benchmarks/example_networks.py

    x, y = load_digits()
    images, _ = example_networks.pixel_digits(x[:examples].reshape(-1, 8, 8), y[:examples])
    keras.utils.set_random_seed(0)
    model = build(channels, groups, size)
    operators_by_name = {name: operators.HessianOperator(
        operators.KerasModelFunction(model), images, y[:examples], batch_size=BATCH_SIZE,
        method="reverse_over_reverse") for name in variants}
    median, error = agreeing_medians(
        operators_by_name, rounds, f"{channels} channels in {groups} groups",
        tracing_contexts=TRACING_CONTEXTS)
    return [f"{channels}/{groups} at {size}×{size}", f"{model.count_params():,}",
            *(f"{median[name] * 1e3:.1f}" for name in variants), f"{error:.0e}"]


HEADER = ("channels/groups", "params", *(f"{name} ms" for name in TRACING_CONTEXTS),
          "max rel. diff")


def main(argv: list[str]) -> int:
    return rounds_main(argv, script="grouped_conv_formulations.py",
                       description=__doc__.splitlines()[0], header=HEADER, cases=CASES,
                       measure=measure, rounds=3)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
