"""gelu, silu and mish with their derivatives written out against Keras's: one full-data
Hessian-vector product per network and method.

`KerasModelFunction` traces products within `hessian_tf.operators.activations`'s
`compact_activations`; here one operator of each pair is traced with Keras's own
activations (the ops of `tf.nn.gelu`, `tf.nn.silu` and Keras's mish, differentiated one
by one) instead. Networks (untrained, seeded, on the 1,797 digits): `gelu_mlp`,
`silu_mlp` and `mish_mlp`, the 64 pixels through three `Dense(512)` of that activation
to `Dense(10)` (batch 512);
`attention_seq` and `convnext_blocks` of benchmarks/example_networks.py (a transformer
block's gelu MLP; ConvNeXt's gelu MLPs, on the digits at 32×32; batch 128);
`efficientnet_b0`, keras.applications' EfficientNetB0 (swish) on the digits at 32×32×3
(weights=None, average pooling, Dense(10); batch 64).
One thread per op, as the spectrum binary runs on a host of at most 2 cores without GPU
(hessian_tf.distribute.automatic_cpu_threads). The two operators' products are checked
against each other, then timed in `--rounds` interleaved rounds after a traced first
one; medians.

Command (about 10 minutes on 2 CPU cores):
  .venv/bin/python benchmarks/activations.py [--rounds 7]
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from core import mending_cells, rounds_main  # noqa: E402  (benchmarks/core.py)

CASES = (("gelu_mlp", "forward_over_backward"), ("gelu_mlp", "reverse_over_reverse"),
         ("silu_mlp", "forward_over_backward"), ("silu_mlp", "reverse_over_reverse"),
         ("mish_mlp", "forward_over_backward"), ("mish_mlp", "reverse_over_reverse"),
         ("attention_seq", "forward_over_backward"),
         ("attention_seq", "reverse_over_reverse"),
         ("convnext_blocks", "forward_over_backward"),
         ("efficientnet_b0", "forward_over_backward"))
BATCH_SIZES = {"gelu_mlp": 512, "silu_mlp": 512, "mish_mlp": 512, "attention_seq": 128,
               "convnext_blocks": 128, "efficientnet_b0": 64}


def workload(network: str, examples: int | None = None):
    """(model, x, y) of `network` on the first `examples` digits (all: None)."""
    import keras

    from hessian_tf.io.datasets import load_digits

    import example_networks  # benchmarks/example_networks.py

    x, y = load_digits()
    x, y = x[:examples], y[:examples]
    keras.utils.set_random_seed(0)
    if network.endswith("_mlp"):
        layers = keras.layers
        activation = network[:-len("_mlp")]
        return keras.Sequential([keras.Input((64,))] + [
            layers.Dense(512, activation=activation) for _ in range(3)] + [
            layers.Dense(10)]), x, y
    if network == "attention_seq":
        return example_networks.build(network), x.reshape(-1, 8, 8), y
    images, _ = example_networks.pixel_digits(x.reshape(-1, 8, 8), y)
    if network == "efficientnet_b0":
        body = keras.applications.EfficientNetB0(
            weights=None, include_top=False, input_shape=(32, 32, 3), pooling="avg")
        model = keras.Sequential([body, keras.layers.Dense(10)])
        return model, np.repeat(images, 3, axis=-1), y
    return example_networks.build(network), images, y


def measure(network: str, method: str, rounds: int, examples: int | None = None):
    from hessian_tf.distribute import automatic_cpu_threads

    automatic_cpu_threads("default")  # before TensorFlow's first op; else left as it is
    model, x, y = workload(network, examples)
    return [network, method] + mending_cells(
        "compact_activations", model, x, y, batch_size=BATCH_SIZES[network], method=method,
        rounds=rounds, what=f"{network} {method}")


HEADER = ("network", "method", "Keras's activations ms", "written out ms", "written out ÷ Keras's",
          "max rel. diff")


def main(argv: list[str]) -> int:
    return rounds_main(argv, script="activations.py", description=__doc__.splitlines()[0],
                       header=HEADER, cases=CASES, measure=measure, rounds=7)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
