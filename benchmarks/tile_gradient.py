"""Tile's gradient over static axes against TensorFlow's: one full-data Hessian-vector
product per network and method.

`KerasModelFunction` differentiates `Tile` by `hessian_tf.operators.second_order`'s
`tile_gradient` while it traces a product; here one operator of each pair is traced
with TensorFlow's own gradients instead. Networks (untrained, seeded, one batch of 128 of the digits):
`unet_pixels` of benchmarks/example_networks.py (UpSampling2D, whose `ops.repeat` tiles,
on the digits at 32×32 with a label per pixel) and `hessian_tf.models.resnet32` on the
digits padded to 32×32×3 (its global average pooling and, in train BN mode, BN's
statistics tile in their gradients). The two operators' products are checked against
each other, then timed in `--rounds` interleaved rounds after a traced first one;
medians.

Command (about 3 minutes on 2 CPU cores):
  .venv/bin/python benchmarks/tile_gradient.py [--rounds 5]
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from core import agreeing_medians, rounds_main, switched_off  # noqa: E402  (benchmarks/core.py)

BATCH_SIZE = 128
TENSORFLOWS = "TensorFlow's"
CASES = (("unet_pixels", "inference", "reverse_over_reverse"),
         ("unet_pixels", "inference", "forward_over_backward"),
         ("resnet32", "train", "reverse_over_reverse"),
         ("resnet32", "inference", "reverse_over_reverse"))


def workload(network: str, examples: int = BATCH_SIZE):
    """(model, x, y) of `network` on the first `examples` digits."""
    import keras

    from hessian_tf import models
    from hessian_tf.io.datasets import load_digits

    import example_networks  # benchmarks/example_networks.py

    x, y = load_digits()
    images, labels = example_networks.pixel_digits(x[:examples].reshape(-1, 8, 8), y[:examples])
    keras.utils.set_random_seed(0)
    if network == "unet_pixels":
        return example_networks.build(network), images, labels
    return models.resnet32(), np.repeat(images, 3, axis=-1), y[:examples]


# Traces made within differentiate Tile by TensorFlow's own gradient.
tensorflow_tile_gradient = functools.partial(switched_off, "second_order_gradients")


def measure(network: str, bn_mode: str, method: str, rounds: int, examples: int = BATCH_SIZE):
    from hessian_tf import operators

    model, x, y = workload(network, examples)
    contexts = {TENSORFLOWS: tensorflow_tile_gradient, "static": contextlib.nullcontext}
    variants = {name: operators.HessianOperator(
        operators.KerasModelFunction(model), x, y, batch_size=BATCH_SIZE, bn_mode=bn_mode,
        method=method) for name in contexts}
    # The first product traces, each within its context.
    median, error = agreeing_medians(variants, rounds, f"{network} {method}",
                                     tracing_contexts=contexts)
    return [network, bn_mode, method, f"{median[TENSORFLOWS] * 1e3:.1f}",
            f"{median['static'] * 1e3:.1f}", f"{median['static'] / median[TENSORFLOWS]:.2f}",
            f"{error:.0e}"]


HEADER = ("network", "BN", "method", "TensorFlow's Tile gradient ms", "static axes ms",
          "static ÷ TensorFlow's", "max rel. diff")


def main(argv: list[str]) -> int:
    return rounds_main(argv, script="tile_gradient.py", description=__doc__.splitlines()[0],
                       header=HEADER, cases=CASES, measure=measure, rounds=5)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
