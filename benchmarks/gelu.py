"""gelu with its derivatives written out against Keras's: one full-data Hessian-vector
product per network and method.

`KerasModelFunction` traces products within `hessian_tf.operators.activations`'s
`compact_gelu`; here one operator of each pair is traced with Keras's own gelu (the ops
of `tf.nn.gelu`, differentiated one by one) instead. Networks (untrained, seeded, on the
1,797 digits): `gelu_mlp`, the 64 pixels through three `Dense(512, gelu)` to `Dense(10)`
(batch 512); `attention_seq` and `convnext_blocks` of benchmarks/example_networks.py (a
transformer block's gelu MLP; ConvNeXt's gelu MLPs, on the digits at 32×32; batch 128).
One thread per op, as the spectrum binary runs on a host of at most 2 cores without GPU
(hessian_tf.distribute.automatic_cpu_threads). The two operators' products are checked
against each other, then timed in `--rounds` interleaved rounds after a traced first
one; medians.

Command (about 4 minutes on 2 CPU cores):
  .venv/bin/python benchmarks/gelu.py [--rounds 7]
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from core import agreeing_medians, rounds_main, switched_off  # noqa: E402  (benchmarks/core.py)

KERAS = "Keras's"
CASES = (("gelu_mlp", "forward_over_backward"), ("gelu_mlp", "reverse_over_reverse"),
         ("attention_seq", "forward_over_backward"),
         ("attention_seq", "reverse_over_reverse"),
         ("convnext_blocks", "forward_over_backward"))
BATCH_SIZES = {"gelu_mlp": 512, "attention_seq": 128, "convnext_blocks": 128}


def workload(network: str, examples: int | None = None):
    """(model, x, y) of `network` on the first `examples` digits (all: None)."""
    import keras

    from hessian_tf.io.datasets import load_digits

    import example_networks  # benchmarks/example_networks.py

    x, y = load_digits()
    x, y = x[:examples], y[:examples]
    keras.utils.set_random_seed(0)
    if network == "gelu_mlp":
        layers = keras.layers
        return keras.Sequential([keras.Input((64,))] + [
            layers.Dense(512, activation="gelu") for _ in range(3)] + [layers.Dense(10)]), x, y
    if network == "attention_seq":
        return example_networks.build(network), x.reshape(-1, 8, 8), y
    images, _ = example_networks.pixel_digits(x.reshape(-1, 8, 8), y)
    return example_networks.build(network), images, y


# Traces made within take Keras's gelu, differentiated op by op.
keras_gelu = functools.partial(switched_off, "compact_gelu")


def measure(network: str, method: str, rounds: int, examples: int | None = None):
    from hessian_tf import operators
    from hessian_tf.distribute import automatic_cpu_threads

    automatic_cpu_threads("default")  # before TensorFlow's first op; else left as it is
    model, x, y = workload(network, examples)
    contexts = {KERAS: keras_gelu, "written out": contextlib.nullcontext}
    variants = {name: operators.HessianOperator(
        operators.KerasModelFunction(model), x, y, batch_size=BATCH_SIZES[network],
        method=method) for name in contexts}
    median, error = agreeing_medians(variants, rounds, f"{network} {method}",
                                     tracing_contexts=contexts)
    return [network, method, f"{median[KERAS] * 1e3:.1f}",
            f"{median['written out'] * 1e3:.1f}",
            f"{median['written out'] / median[KERAS]:.2f}", f"{error:.0e}"]


HEADER = ("network", "method", "Keras's gelu ms", "written out ms", "written out ÷ Keras's",
          "max rel. diff")


def main(argv: list[str]) -> int:
    return rounds_main(argv, script="gelu.py", description=__doc__.splitlines()[0],
                       header=HEADER, cases=CASES, measure=measure, rounds=7)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
