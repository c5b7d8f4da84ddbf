"""LayerNormalization with its derivatives written out against Keras's: one full-data
Hessian-vector product per network and method.

`KerasModelFunction` traces products within `hessian_tf.operators.layer_norm`'s
`compact_layer_normalization`; here one operator of each pair is traced with Keras's own
LayerNormalization (its ops differentiated one by one) instead. Networks (untrained,
seeded): `causal_lm`, the causal language model of benchmarks/PYHESSIAN.md
(example_networks.causal_language_model, five LayerNormalizations of 64 features) on
the 2,150 character windows of scikit-learn's dataset descriptions (batch 128);
`attention_seq` and `convnext_blocks` of benchmarks/example_networks.py (a transformer
block, two LayerNormalizations; ConvNeXt's blocks on the digits at 32×32, three
LayerNormalizations over the channels of its 8×8 maps) on the 1,797 digits (batch 128). One thread per op, as the spectrum binary
runs on a host of at most 2 cores without GPU. The two operators' products are checked
against each other, then timed in `--rounds` interleaved rounds after a traced first
one; medians.

Command (about 4 minutes on 2 CPU cores):
  .venv/bin/python benchmarks/layer_norm.py [--rounds 7]
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from core import mending_cells, rounds_main  # noqa: E402  (benchmarks/core.py)

METHODS = ("forward_over_backward", "reverse_over_reverse")
CASES = tuple((network, method) for network in ("causal_lm", "attention_seq", "convnext_blocks")
              for method in METHODS)


def workload(network: str, examples: int | None = None):
    """(model, x, y) of `network` on its first `examples` examples (all: None)."""
    import keras

    import activations  # benchmarks/activations.py
    import example_networks  # benchmarks/example_networks.py

    if network != "causal_lm":
        return activations.workload(network, examples)
    x, y, vocabulary = example_networks.character_windows()
    keras.utils.set_random_seed(0)
    return example_networks.causal_language_model(vocabulary), x[:examples], y[:examples]


def measure(network: str, method: str, rounds: int, examples: int | None = None):
    from hessian_tf.distribute import automatic_cpu_threads

    automatic_cpu_threads("default")  # before TensorFlow's first op; else left as it is
    model, x, y = workload(network, examples)
    return [network, method] + mending_cells(
        "compact_layer_normalization", model, x, y, batch_size=128, method=method,
        rounds=rounds, what=f"{network} {method}")


HEADER = ("network", "method", "Keras's LayerNorm ms", "written out ms",
          "written out ÷ Keras's", "max rel. diff")


def main(argv: list[str]) -> int:
    return rounds_main(argv, script="layer_norm.py", description=__doc__.splitlines()[0],
                       header=HEADER, cases=CASES, measure=measure, rounds=7)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
