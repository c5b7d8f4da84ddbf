"""Pointwise convolutions and small maps as matrix products, and dilated convolutions by
TensorFlow's dilated kernel (hessian_tf.operators.convolutions), against Keras's
convolutions: one Hessian-vector product per network.

`KerasModelFunction` computes a convolution whose window is 1×1 without strides as the
matrix product at each position it is, and one each of whose output positions reads
every input position read (a 3×3 window over a 1×1 or 2×2 map, zero padding left out)
as one matrix product, while it traces a product; here one operator of each pair is
traced with TensorFlow's convolution instead. Networks (seeded, untrained,
inference-mode BN as the binary's default; one batch of the digits, each 8×8 image
repeated to the size and to 3 channels):

- `resnet50v2_32`: `keras.applications.ResNet50V2` at 32×32 (1×1 convolutions on maps of
  8×8 down to 1×1; zero-padded 3×3 ones on 2×2 and 1×1 maps), batch 128. At 224×224
  (batch 16; no maps smaller than 7×7) its float32 products by the two differ by
  1.6e-3 of the largest entry, more than the check below allows, and by 2.3e-15 in
  float64 (ad hoc): rounding decides the side of activations near zero, as at 32×32.
  It is not a row here; one layer's products at its map sizes took 0.82–1.02 of the
  convolution's time as matrix products (hessian_tf/operators/convolutions.py);
- `densenet121_32`: `keras.applications.DenseNet121` at 32×32 (1×1 bottlenecks and
  transitions; "same" 3×3 convolutions on 2×2 and 1×1 maps), batch 128;
- `mobilenetv2_32`: `keras.applications.MobileNetV2(alpha=0.35)` at 32×32 (1×1 expansions
  and projections), batch 128;
- `resnet32_cifar`: hessian_tf's ResNet-32 at 32×32, batch 128, and `resnet18_224`: its
  ImageNet ResNet-18 at 224×224, batch 32. Their only 1×1 convolutions are strided
  shortcuts, which keep TensorFlow's convolution (as matrix products they took 1.05
  and 1.02 of its time here in a first run; ad hoc, 1.2–2.1 on one layer): the two
  variants are the same graph, and their ratio is the timing's noise;
- `dilated_cnn_32`: a context-module CNN as a new user writes one (`Conv2D(32, 3)`, then
  three of dilation 2, 4 and 8, all "same" and ReLU, BN, global average pooling,
  `Dense(10)`), batch 128, and `tcn_64`: a temporal convolutional network (five residual
  blocks of two causal `Conv1D(32, 3)` of dilation 1, 2, 4, 8 and 16) on the 64 pixels
  of each digit as a sequence (three features), batch 128. Keras dilates by
  SpaceToBatchND and BatchToSpaceND around each convolution (tf.nn.convolution), whose
  derivatives are ops of their own; ours runs TensorFlow's Conv2D kernel with its
  dilations (oneDNN's): 0.727 of the time on `dilated_cnn_32` in a first run. The
  1-D convolutions of `tcn_64` ran the same kernel as 2-D ones of height 1 at 0.983 of
  the time there, so they keep Keras's path (the two variants are the same graph since).

Each variant runs in a process of its own, twice, alternating (TensorFlow's, ours,
TensorFlow's, ours): its first product (traced; reverse over reverse, the method
`--method=auto` chose on these), then `--rounds` timed ones; medians of the two
processes' timings. Timed in one process, interleaved, the two variants' ratio on
ResNet50-V2 moved between 0.80 and 1.09 in three runs, while in processes of their own
each variant's times agreed to 4% (ad hoc). The products are checked against each other
(to 1e-3 of the largest entry: on ResNet50-V2 at 32×32 they differ by 2.5e-4 in float32, where an
activation near zero takes the side its rounding gives it; built in float64 its two
products agree to 1.4e-15, ad hoc).

Command (about 10 minutes on 2 CPU cores):
  .venv/bin/python benchmarks/pointwise_conv.py [--rounds 5]
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from core import (interleaved_timings, products_difference, rounds_main,  # noqa: E402
                  switched_off)  # (benchmarks/core.py)

CASES = (("resnet50v2_32", 128), ("densenet121_32", 128), ("mobilenetv2_32", 128),
         ("resnet32_cifar", 128), ("resnet18_224", 32), ("dilated_cnn_32", 128),
         ("tcn_64", 128))
TENSORFLOW = "TensorFlow's conv"
OURS = "hessian_tf's"


@contextlib.contextmanager
def tensorflow_convolutions():
    """Traces made within compute pointwise and dilated convolutions as Keras does."""
    with switched_off("pointwise_convolutions"), switched_off("dilated_convolutions"):
        yield


def build(network: str, size: int):
    import keras

    from hessian_tf.models import resnet

    applications = {"resnet50v2": keras.applications.ResNet50V2,
                    "densenet121": keras.applications.DenseNet121,
                    "mobilenetv2": functools.partial(keras.applications.MobileNetV2,
                                                     alpha=0.35)}
    name = network.rsplit("_", 1)[0]
    layers = keras.layers
    if name == "dilated_cnn":
        return keras.Sequential(
            [keras.Input((size, size, 3))]
            + [layers.Conv2D(32, 3, dilation_rate=rate, padding="same", activation="relu")
               for rate in (1, 2, 4, 8)]
            + [layers.BatchNormalization(), layers.GlobalAveragePooling2D(), layers.Dense(10)])
    if name == "tcn":
        inputs = keras.Input((size, 3))
        h = inputs
        for rate in (1, 2, 4, 8, 16):
            block = h
            for _ in range(2):
                h = layers.Conv1D(32, 3, dilation_rate=rate, padding="causal",
                                  activation="relu")(h)
            h = h if rate == 1 else layers.Add()([h, block])
        return keras.Model(inputs, layers.Dense(10)(layers.GlobalAveragePooling1D()(h)))
    if name in applications:
        return applications[name](weights=None, input_shape=(size, size, 3), classes=10,
                                  classifier_activation=None)
    builder = resnet.resnet32 if name == "resnet32" else resnet.resnet18
    return builder(input_shape=(size, size, 3), num_classes=10)


def images(size: int, examples: int):
    """The first `examples` digits, each pixel repeated to size×size, 3 channels."""
    import numpy as np

    from hessian_tf.io.datasets import load_digits

    x, y = load_digits()
    x = x[:examples].reshape(-1, 8, 8)
    x = np.repeat(np.repeat(x, -(-size // 8), 1), -(-size // 8), 2)[:, :size, :size]
    return np.repeat(x[..., np.newaxis], 3, -1), y[:examples]


def time_variant(network: str, batch_size: int, variant: str, rounds: int, examples: int,
                 size: int, out: str) -> None:
    """In a process of its own: the variant's first product of one vector (traced) and
    the seconds of `rounds` more, saved to `out` (.npz: product, seconds, params)."""
    import keras
    import numpy as np

    from hessian_tf import operators
    from hessian_tf.distribute import automatic_cpu_threads

    automatic_cpu_threads("default")  # as hessian-spectrum sets them
    x, y = images(8, examples) if network.startswith("tcn") else images(size, examples)
    x = x.reshape(len(x), -1, 3) if network.startswith("tcn") else x
    keras.utils.set_random_seed(0)
    model = build(network, size)
    with (tensorflow_convolutions if variant == TENSORFLOW else contextlib.nullcontext)():
        operator = operators.HessianOperator(
            operators.KerasModelFunction(model), x, y, batch_size=batch_size,
            method="reverse_over_reverse")
        vector = np.random.default_rng(0).standard_normal(operator.dim)
        product = operator.matvec(vector)
    seconds = interleaved_timings({variant: functools.partial(operator.matvec, vector)},
                                  rounds)[variant]
    np.savez(out, product=product, seconds=seconds, params=model.count_params())


def measure(network: str, batch_size: int, rounds: int, examples: int = 0, size: int = 0,
            alternations: int = 2):
    import numpy as np

    if not size:  # the network's name ends with its input size (32: resnet32_cifar)
        size = int(network.rsplit("_", 1)[1]) if network[-1].isdigit() else 32
    runs = {TENSORFLOW: [], OURS: []}
    with tempfile.TemporaryDirectory() as directory:
        for alternation in range(alternations):
            for index, variant in enumerate(runs):
                out = os.path.join(directory, f"{alternation}-{index}.npz")
                done = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), "--child", network,
                     str(batch_size), variant, str(rounds), str(examples or batch_size),
                     str(size), out], capture_output=True, text=True)
                if done.returncode != 0:
                    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                    raise RuntimeError(f"{network}, {variant}: the process failed: {last}")
                with np.load(out) as saved:
                    runs[variant].append({key: saved[key] for key in saved.files})
    error = products_difference(
        [run["product"] for variant_runs in runs.values() for run in variant_runs], network,
        tolerance=1e-3)
    median = {variant: float(np.median(np.concatenate([run["seconds"] for run in variant_runs])))
              for variant, variant_runs in runs.items()}
    return [network, f"{int(runs[OURS][0]['params']):,}", str(batch_size),
            f"{median[TENSORFLOW] * 1e3:.1f}", f"{median[OURS] * 1e3:.1f}",
            f"{median[OURS] / median[TENSORFLOW]:.3f}", f"{error:.0e}"]


HEADER = ("network", "params", "batch", "TensorFlow's conv ms", "hessian_tf's ms",
          "ours ÷ TensorFlow's", "max rel. diff")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        network, batch_size, variant, rounds, examples, size, out = argv[1:]
        time_variant(network, int(batch_size), variant, int(rounds), int(examples), int(size),
                     out)
        return 0
    return rounds_main(argv, script="pointwise_conv.py", description=__doc__.splitlines()[0],
                       header=HEADER, cases=CASES, measure=measure, rounds=5)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
