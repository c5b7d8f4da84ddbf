"""Grouped convolutions without XLA (hessian_tf.operators.convolutions) against Keras's
own, compiled by XLA: one full-data Hessian-vector product per network and method.

`KerasModelFunction` computes Keras's grouped convolutions as depthwise or split
convolutions while it traces a product; here one operator of each pair is traced with
Keras's own grouped convolutions instead. Networks (untrained, seeded, one batch of 128
of the digits at 32×32): `convnext_blocks` (ConvNeXt's 7×7 depthwise convolutions) and
`resnext_blocks` (ResNeXt's grouped 3×3, 8 channels per group) of
benchmarks/example_networks.py. The two operators' products are checked against each
other, then timed in `--rounds` interleaved rounds after a traced first one; medians.

Command (about 5 minutes on 2 CPU cores):
  .venv/bin/python benchmarks/grouped_conv.py [--rounds 3]
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from core import agreeing_medians, rounds_main, switched_off  # noqa: E402  (benchmarks/core.py)

BATCH_SIZE = 128
KERAS = "Keras's (XLA)"
CASES = tuple((network, method) for network in ("convnext_blocks", "resnext_blocks")
              for method in ("reverse_over_reverse", "forward_over_backward"))


# Traces made within compute grouped convolutions as Keras does (XLA).
keras_grouped_convolutions = functools.partial(switched_off, "grouped_convolutions")


def measure(network: str, method: str, rounds: int, examples: int = BATCH_SIZE):
    import keras

    from hessian_tf import operators
    from hessian_tf.io.datasets import load_digits

    import example_networks  # benchmarks/example_networks.py

    x, y = load_digits()
    images, _ = example_networks.pixel_digits(x[:examples].reshape(-1, 8, 8), y[:examples])
    keras.utils.set_random_seed(0)
    model = example_networks.build(network)
    contexts = {KERAS: keras_grouped_convolutions, "ours": contextlib.nullcontext}
    variants = {name: operators.HessianOperator(
        operators.KerasModelFunction(model), images, y[:examples], batch_size=BATCH_SIZE,
        method=method) for name in contexts}
    median, error = agreeing_medians(variants, rounds, f"{network} {method}",
                                     tracing_contexts=contexts)
    return [network, f"{model.count_params():,}", method, f"{median[KERAS] * 1e3:.1f}",
            f"{median['ours'] * 1e3:.1f}", f"{median['ours'] / median[KERAS]:.3f}",
            f"{error:.0e}"]


HEADER = ("network", "params", "method", "Keras's grouped conv (XLA) ms",
          "depthwise / split ms", "ours ÷ Keras's", "max rel. diff")


def main(argv: list[str]) -> int:
    return rounds_main(argv, script="grouped_conv.py", description=__doc__.splitlines()[0],
                       header=HEADER, cases=CASES, measure=measure, rounds=3)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
