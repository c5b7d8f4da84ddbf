"""Speed and agreement of `hessian-spectrum` against PyHessian on the same Hessian.

For each workload the script builds a Keras model and its data, saves them (a `.keras` file
and an `.npz` with arrays x, y) in a temporary directory, and builds a PyTorch twin of the
model with the same weights (conv kernels HWIO → OIHW, dense kernels transposed, BN
γ/β/moving mean/variance and the same ε). The twin is checked first: logits on the whole
data within 1e-4 (relative to max |logit|) and equal mean losses, else the workload fails
and the script exits 1. Then, on the Hessian of the mean loss over the whole dataset with
inference BN:

- ours: the `hessian-spectrum` binary in a subprocess, as a user runs it
  (`--num_draws=1 --bn_mode=inference`; `python -m hessian_tf.bin.spectrum` on this
  script's checkout), timed wall clock; seconds per Lanczos step from
  its summary.json (`seconds_per_step` when present, else `lanczos_seconds` / steps, which
  includes the first product's tracing and the determinism check);
- PyHessian 0.1 (an installed package, not copied here): `hessian(model, criterion,
  dataloader=..., cuda=False).density(iter=m, n_v=1)` in this process, timed; seconds per
  step = density time / m. Its first product is also timed separately.

PyHessian 0.1 calls `torch.eig`, which PyTorch 2 removed; this script sets `torch.eig` at
run time to a replacement built on `torch.linalg.eigh` (returns what the old API returned).
Missing `torch` / `pyhessian` are installed with this interpreter's pip unless --no_install.

Workloads: `mlp-digits` (hessian_tf.models.mlp on scikit-learn digits, batch 1797, m = 90),
`cnn-bn` (a 24,346-parameter BN CNN on 1024 seeded random 32×32×3 images, batch 128,
m = 20), `resnet32-cifar` (hessian_tf.models.resnet32 on 512 random images, batch 128,
m = 5; only with --workload=resnet32-cifar or all).

Your own network instead: `--model=NET.keras --data=DATA.npz [--batch_size=B]` (m = 90
unless --lanczos_steps). The model is a Sequential or functional model of one input and one
output (keras.applications' EfficientNet, MobileNetV2/V3, ResNet-V2 and ConvNeXt among
them), branches and skip connections included, whose layers the twin mirrors (Conv1D,
Conv2D and Conv3D (grouped and dilated too), DepthwiseConv2D, SeparableConv2D, Conv2DTranspose, Dense (also on
images' and volumes' channels), BatchNormalization (also of sequences), LayerNormalization,
GroupNormalization, MultiHeadAttention as torch's nn.MultiheadAttention (use_causal_mask=True
as its attn_mask), LSTM, GRU and
SimpleRNN as torch's nn.LSTM, nn.GRU and nn.RNN, also in Bidirectional, activation layers (hard sigmoid and hard swish as torch's),
pooling, global pooling (keepdims too), ZeroPadding2D/3D, Cropping2D/3D, UpSampling2D/3D, Flatten,
Rescaling, Normalization, Add and the other merges (broadcasting within one rank),
Concatenate, `keras.ops` arithmetic of a tensor and a number (MobileNetV3's hard sigmoid)
or of two tensors (+, -, *), keras.applications.convnext's LayerScale, nested Sequential
and functional models (ConvNeXt's stem), and dropout, noise, stochastic depth and random
augmentation as the identity; see `twin_step`); the data are arrays x and y (integer labels, one per example,
or one per pixel or token of a segmentation model's or tagger's outputs, their loss the
mean over positions as Keras's; 0/1 for a classifier of one logit, compared by binary
cross-entropy, `--loss=binary_crossentropy` on our side; with `--loss=mean_squared_error`,
a regression's real targets shaped as the outputs, compared by the mean squared error,
torch's MSELoss, which averages over every output as Keras does). Embedding layers read integer
x (tokens) as torch's nn.Embedding. Images are
NCHW in the twin (volumes NCDHW), sequences (batch, length, features) as in Keras (Conv1D, BN and
pooling of sequences transpose around torch's).

Usage (not part of CI; benchmarks/PYHESSIAN.md has a measured run):
  .venv/bin/python benchmarks/pyhessian_compare.py [--workload mlp-digits,cnn-bn|all]
      [--model NET.keras --data DATA.npz [--batch_size B] [--loss mean_squared_error]]
      [--lanczos_steps M] [--threads N] [--no_install] [--keep_dir] [--our_flags=...]

Exit status: 0 when every workload ran and its twin matched; 1 when a twin check failed;
2 for bad input or a failure of either side (one line on stderr).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from machine import cpu_name, load_average  # noqa: E402  (benchmarks/machine.py)

TORCH_REQUIREMENT = "torch==2.13.0"
PYHESSIAN_REQUIREMENT = "pyhessian==0.1"
WORKLOADS = ("mlp-digits", "cnn-digits", "cnn-bn", "resnet32-cifar")
DEFAULT_WORKLOADS = ("mlp-digits", "cnn-digits", "cnn-bn")
DEFAULT_STEPS = {"mlp-digits": 90, "cnn-digits": 90, "cnn-bn": 20, "resnet32-cifar": 5}
TWIN_RTOL = 1e-4  # logits (relative to max |logit|) and mean loss
# Activations the twin mirrors (Keras names; torch functions in torch_twin).
TWIN_ACTIVATIONS = ("linear", "tanh", "relu", "sigmoid", "elu", "gelu", "silu", "swish",
                    "mish", "softplus", "leaky_relu", "hard_sigmoid", "hard_silu",
                    "hard_swish")
LAMBDA_MAX_WARN = 1e-3  # relative difference of λmax above which a warning is printed
BUSY_CORES = 0.1  # others' cores on either side above which a ratio is marked ‡


class Failure(Exception):
    """A one-line error; `status` is the exit status."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints the usage too; one line is enough
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def first_line(error: BaseException, limit: int) -> str:
    """The first line of an error's text (its type's name if it has none), cut to `limit`
    (hessian_tf.messages, this checkout's)."""
    from hessian_tf.messages import first_line as package_first_line

    return package_first_line(error, limit, type(error).__name__)


def usable_cores() -> int:
    from hessian_tf.host import usable_cores as package_usable_cores  # no TensorFlow

    return package_usable_cores()


def numpy_of(variable) -> np.ndarray:
    import keras

    return np.asarray(keras.ops.convert_to_numpy(variable))


class OtherLoad:
    """Mean number of cores busy with other processes between start() and stop(): all busy
    CPU time (Linux /proc/stat) minus this process's and its waited-for children's; None
    where /proc/stat is unavailable."""

    def start(self) -> "OtherLoad":
        self._begin = self._sample()
        return self

    def stop(self) -> Optional[float]:
        end = self._sample()
        if end[0] is None or self._begin[0] is None:
            return None
        others = (end[0] - self._begin[0]) - (end[1] - self._begin[1])
        return max(0.0, others) / (end[2] - self._begin[2])

    @staticmethod
    def _sample() -> tuple[Optional[float], float, float]:
        try:
            with open("/proc/stat", encoding="ascii") as stat:
                fields = stat.readline().split()  # cpu user nice system idle iowait irq softirq steal
            busy = sum(int(fields[i]) for i in (1, 2, 3, 6, 7, 8)) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            busy = None
        times = os.times()
        ours = times.user + times.system + times.children_user + times.children_system
        return busy, ours, time.perf_counter()


# ------------------------------------------------------------------------------ the peer


def ensure_peer(no_install: bool) -> None:
    """Installs torch and pyhessian (pinned) with this interpreter's pip when they are not
    installed. They are imported later, timed, as part of PyHessian's cost."""
    import importlib.util

    missing = [requirement for module, requirement in
               (("torch", TORCH_REQUIREMENT), ("pyhessian", PYHESSIAN_REQUIREMENT))
               if importlib.util.find_spec(module) is None]
    if not missing:
        return
    if no_install:
        raise Failure(
            f"--no_install: {' and '.join(missing)} not installed; install with "
            f"`{sys.executable} -m pip install {' '.join(missing)}` or drop --no_install."
        )
    command = [sys.executable, "-m", "pip", "install", *missing]
    print(f"Installing the peer: {shlex.join(command)}", flush=True)
    status = subprocess.call(command)
    if status != 0:
        raise Failure(f"`{shlex.join(command)}` exited with status {status}; see pip's output above.")
    importlib.invalidate_caches()


def import_peer() -> float:
    """Imports torch and pyhessian; returns the seconds it took."""
    started = time.perf_counter()
    for module in ("torch", "pyhessian"):
        try:
            importlib.import_module(module)
        except ImportError as error:
            requirement = TORCH_REQUIREMENT if module == "torch" else PYHESSIAN_REQUIREMENT
            raise Failure(f"`import {module}` failed ({error}); reinstall it with "
                          f"`{sys.executable} -m pip install --force-reinstall {requirement}`.") from error
    return time.perf_counter() - started


def shim_torch_eig() -> str:
    """Sets torch.eig (removed in PyTorch 2) to what PyHessian 0.1's density() expects:
    (eigenvalues [n, 2] as real and imaginary parts, eigenvectors [n, n] as columns)."""
    import torch

    def eig(input: "torch.Tensor", eigenvectors: bool = False):
        if torch.equal(input, input.mT):
            values, vectors = torch.linalg.eigh(input)
            values = torch.stack([values, torch.zeros_like(values)], dim=1)
        else:
            complex_values, complex_vectors = torch.linalg.eig(input)
            if bool((complex_values.imag != 0).any()):
                raise NotImplementedError(
                    "torch.eig shim: complex eigenvalues (PyHessian only passes symmetric T)."
                )
            values = torch.stack([complex_values.real, complex_values.imag], dim=1).to(input.dtype)
            vectors = complex_vectors.real.to(input.dtype)
        return values, (vectors if eigenvectors else input.new_empty(0))

    torch.eig = eig
    return (
        "torch.eig shim: PyHessian 0.1 calls torch.eig, which PyTorch 2 removed; this run sets "
        "torch.eig to torch.linalg.eigh on PyHessian's symmetric Lanczos matrix T, returning the "
        "old API's (eigenvalues [m, 2] real/imaginary, eigenvectors [m, m] columns)."
    )


# ------------------------------------------------------------------------------ workloads


@dataclass
class Workload:
    name: str
    keras_model: Any
    x: np.ndarray
    y: np.ndarray
    batch_size: int
    lanczos_steps: int
    # hessian-spectrum's --loss, one of LOSSES: the cross-entropy of class logits; for one
    # logit (a binary classifier) binary cross-entropy of logits on 0/1 labels (torch's
    # BCEWithLogitsLoss); or the squared error of a regression's outputs (torch's MSELoss:
    # the mean over every output, as Keras's mean over an example's outputs, then examples).
    loss: str = "sparse_categorical_crossentropy"

    @property
    def binary(self) -> bool:
        return self.loss == "binary_crossentropy"

    @property
    def regression(self) -> bool:
        return self.loss == "mean_squared_error"


# Losses of both sides; --loss=auto takes binary cross-entropy for a model of one logit,
# else the cross-entropy of class logits (LOSS_CHOICES: --loss's values).
LOSSES = ("sparse_categorical_crossentropy", "binary_crossentropy", "mean_squared_error")
LOSS_CHOICES = ("auto", "mean_squared_error")


def calibrate_batch_norm(keras_model, x: np.ndarray, seed: int) -> None:
    """Non-trivial inference BN: random γ ∈ [0.5, 1.5), β ~ N(0, 0.1²), then moving
    statistics set to the statistics of the whole data (one training-mode pass with
    momentum 0, so each BN sees the output of the calibrated layers before it)."""
    import keras

    rng = np.random.default_rng(seed)
    layers = [layer for layer in keras_model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = []
    for layer in layers:
        channels = layer.gamma.shape[0]
        layer.gamma.assign(rng.uniform(0.5, 1.5, channels).astype(np.float32))
        layer.beta.assign(rng.normal(0.0, 0.1, channels).astype(np.float32))
        momenta.append(layer.momentum)
        layer.momentum = 0.0
    before = [numpy_of(layer.moving_variance) for layer in layers]
    keras_model(x, training=True)
    for layer, momentum, variance in zip(layers, momenta, before):
        layer.momentum = momentum
        if np.array_equal(numpy_of(layer.moving_variance), variance):
            raise Failure(f"BN calibration did not update {layer.name}'s moving statistics.")


def cnn_bn(seed: int = 0):
    """Conv3×3(16)→BN→ReLU→Conv3×3(32, /2)→BN→ReLU→Conv3×3(64, /2)→BN→ReLU→GAP→
    Dense(10); 'same' padding (Keras pads strided convolutions bottom/right); 24,346
    parameters."""
    import keras

    keras.utils.set_random_seed(seed)
    layers = [keras.Input((32, 32, 3))]
    for index, (filters, strides) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
        layers += [
            keras.layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False,
                                name=f"conv{index}"),
            keras.layers.BatchNormalization(name=f"bn{index}"),  # epsilon 1e-3 (Keras default)
            keras.layers.ReLU(name=f"relu{index}"),
        ]
    layers += [keras.layers.GlobalAveragePooling2D(name="pool"), keras.layers.Dense(10, name="logits")]
    return keras.Sequential(layers, name="cnn_bn")


def cnn_digits(seed: int = 0):
    """Conv3×3(8)→ReLU→Conv3×3(16, /2)→ReLU→Flatten→Dense(10) on 8×8×1 digits, 'same'
    padding, no BN; 3,818 parameters."""
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1"),
        keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="conv2"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(10, name="logits"),
    ], name="cnn_digits")


def random_images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(count, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, count).astype(np.int32)
    return x, y


def build_workload(name: str, lanczos_steps: Optional[int]) -> Workload:
    from hessian_tf.models import mlp, resnet32

    steps = lanczos_steps or DEFAULT_STEPS.get(name, 0)
    if name == "mlp-digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = (digits.data / 16.0).astype(np.float32)
        y = digits.target.astype(np.int32)
        return Workload(name, mlp(), x, y, len(x), steps)
    if name == "cnn-digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = (digits.data / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
        y = digits.target.astype(np.int32)
        return Workload(name, cnn_digits(seed=0), x, y, 200, steps)
    if name == "cnn-bn":
        x, y = random_images(1024, seed=0)
        model = cnn_bn(seed=0)
        calibrate_batch_norm(model, x, seed=1)
        return Workload(name, model, x, y, 128, steps)
    if name == "resnet32-cifar":
        x, y = random_images(512, seed=0)
        model = resnet32(seed=0)
        calibrate_batch_norm(model, x, seed=1)
        return Workload(name, model, x, y, 128, steps)
    raise Failure(f"--workload={name!r} is not known; use one of {', '.join(WORKLOADS)} or all.")


def workload_from_files(model_path: str, data_path: str, batch_size: int,
                        lanczos_steps: Optional[int], loss: str = "auto") -> Workload:
    """A user's own network and data: a `.keras` file (a model the twin mirrors, see
    `twin_graph`) and an `.npz` with arrays x and y: for `loss` auto, integer class
    labels, one per example or per position of the outputs, for the cross-entropy of
    logits (binary for one logit); for mean_squared_error, real targets shaped as the
    model's outputs."""
    import keras

    if loss not in LOSS_CHOICES:
        raise Failure(f"--loss={loss}: pass auto (the cross-entropy of logits) or "
                      "mean_squared_error.")

    for flag, path in (("--model", model_path), ("--data", data_path)):
        if not os.path.isfile(path):
            hint = (" (the npz: prefix is for hessian-spectrum's --dataset; pass the path)"
                    if path.startswith("npz:") else "")
            raise Failure(f"{flag}={path}: no such file{hint}.")
    if not model_path.endswith(".keras"):
        raise Failure(f"--model={model_path}: pass a .keras file (the twin needs its layers).")
    try:
        model = keras.saving.load_model(model_path, safe_mode=True)
    except Exception as error:  # Keras raises many types for unreadable files
        raise Failure(f"--model={model_path}: cannot be loaded ({first_line(error, 500)}).") from error
    unreadable = (f"--data={data_path}: cannot read arrays x and y from it; pass an .npz "
                  "saved with np.savez(path, x=..., y=...)")
    try:
        data = np.load(data_path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # an .npy holds one array
            raise Failure(f"{unreadable} (it holds a single array).")
        with data:
            x, y = data["x"], data["y"]
    except (OSError, ValueError, KeyError) as error:
        raise Failure(f"{unreadable} ({error}).") from error
    if loss == "mean_squared_error":
        # Targets shaped as the outputs, (N,) for one output as Keras takes them.
        outputs = tuple(model.output_shape[1:])
        if y.ndim == len(outputs) and outputs[-1] == 1:
            y = y[..., np.newaxis]
        if (y.ndim != len(outputs) + 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0
                or any(o is not None and o != n for o, n in zip(outputs, y.shape[1:]))):
            raise Failure(f"--data={data_path}: x {x.shape} and y {y.shape}: pass targets "
                          f"shaped as the model's outputs {outputs} for each example, and "
                          "at least one example.")
    else:
        # One class per example, or per position of the outputs (a segmentation model's
        # pixels, a tagger's tokens), with an optional trailing axis of 1.
        positions = tuple(model.output_shape[1:-1])
        if y.ndim == len(positions) + 2 and y.shape[-1] == 1:
            y = y[..., 0]
        if (y.ndim != len(positions) + 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0
                or any(p is not None and p != n for p, n in zip(positions, y.shape[1:]))):
            per = f"per position {positions} of the model's outputs" if positions else "per example"
            raise Failure(f"--data={data_path}: x {x.shape} and y {y.shape}: pass one integer "
                          f"label {per} and at least one example.")
    if not (np.issubdtype(x.dtype, np.number) and np.issubdtype(y.dtype, np.number)):
        raise Failure(f"--data={data_path}: x ({x.dtype}) and y ({y.dtype}) must be numeric.")
    if loss == "mean_squared_error":
        if not np.all(np.isfinite(y)):
            raise Failure(f"--data={data_path}: y holds NaN or infinite targets.")
    elif not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise Failure(f"--data={data_path}: y of dtype {y.dtype} is not integer class labels; "
                          "both sides use the cross-entropy of logits with class indices (for a "
                          "regression's targets pass --loss=mean_squared_error).")
    expected = tuple(model.input_shape[1:])
    # As Keras (and so hessian-spectrum) does: a trailing axis of size 1 is added or dropped.
    if x.ndim == len(expected) and expected and expected[-1] == 1:
        x = x[..., np.newaxis]
    elif x.ndim == len(expected) + 2 and x.shape[-1] == 1:
        x = x[..., 0]
    if len(expected) != x.ndim - 1 or any(
            e is not None and e != a for e, a in zip(expected, x.shape[1:])):
        raise Failure(f"--data={data_path}: inputs of shape {x.shape[1:]}, but --model takes "
                      f"{expected}; reshape x to (N, {', '.join(map(str, expected))}) "
                      "or pass the model for these inputs.")
    if loss == "auto":
        classes = model.output_shape[-1]
        binary = classes == 1  # one logit: labels 0 and 1
        loss = "binary_crossentropy" if binary else "sparse_categorical_crossentropy"
        if binary and positions:
            raise Failure(f"--model={model_path}: one logit per position {positions}; the "
                          "comparison takes the binary cross-entropy of a classifier's one "
                          "logit only: give the model two class logits per position.")
        if binary and getattr(getattr(model.layers[-1], "activation", None), "__name__", "") == "sigmoid":
            raise Failure(f"--model={model_path}: its last layer applies a sigmoid; both sides "
                          "take the binary cross-entropy of logits: save it with "
                          "activation=None there.")
        if y.min() < 0 or y.max() >= max(classes, 2):
            raise Failure(f"--data={data_path}: labels range over [{y.min():g}, {y.max():g}], "
                          f"but --model has {classes} outputs; labels must lie in "
                          f"[0, {max(classes - 1, 1)}]"
                          + (" (binary cross-entropy of its one logit)." if binary else "."))
    try:  # a layer the twin cannot mirror is refused before any install
        twin_graph(model)
    except Failure as failure:
        raise Failure(f"--model={model_path}: {failure}") from failure
    name = os.path.splitext(os.path.basename(model_path))[0]
    tokens = str(model.inputs[0].dtype) in ("int32", "int64")  # an Embedding's input
    if tokens and len(model.inputs[0].shape) in CHANNELS_FIRST_RANKS:  # channels first
        raise Failure(f"--model={model_path}: integer images or volumes "
                      f"{tuple(model.inputs[0].shape[1:])}; "
                      "the twin takes integer inputs as token sequences (batch, length).")
    if tokens and not np.issubdtype(x.dtype, np.integer):
        raise Failure(f"--data={data_path}: x of dtype {x.dtype}, but --model takes integer "
                      "inputs (tokens); save x as integers.")
    return Workload(name, model, x.astype(np.int32 if tokens else np.float32),
                    y.astype(np.float32 if loss == "mean_squared_error" else np.int32),
                    min(batch_size, x.shape[0]), lanczos_steps or 90, loss)


# ------------------------------------------------------------------------------ the twin


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Keras/TF 'same': the total padding split with the odd pixel at the end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def activation_name(layer) -> str:
    """The name of a Keras layer's activation, checked against what the twin mirrors."""
    name = getattr(layer.activation, "__name__", str(layer.activation))
    if name == "softmax":
        raise Failure(f"twin: activation 'softmax' of {layer.name}: both sides take the "
                      "cross-entropy of logits; remove the final softmax so the model outputs "
                      "logits.")
    if name not in TWIN_ACTIVATIONS:
        raise Failure(f"twin: activation {name!r} of {layer.name} is not supported; use one "
                      f"of {', '.join(TWIN_ACTIVATIONS)}.")
    return name


def check_twin_layer(layer) -> None:
    """Raises Failure for a layer with weights (a convolution, Dense, a normalisation,
    MultiHeadAttention, a recurrent layer) in a setting the twin cannot mirror (torch-free, so
    that it runs before any install)."""
    import keras

    if isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv3D)):  # groups, dilation
        if layer.data_format != "channels_last":  # too, as torch's
            raise Failure(f"twin: {type(layer).__name__} {layer.name} must be channels_last.")
        activation_name(layer)
    elif isinstance(layer, keras.layers.Dense):
        if len(layer.input.shape) > 5:  # images, volumes: on their channels (ConvNeXt's)
            raise Failure(f"twin: Dense {layer.name} takes a {len(layer.input.shape)}-D input; "
                          "the twin's Dense takes vectors, sequences, images or volumes.")
        activation_name(layer)
    elif isinstance(layer, keras.layers.BatchNormalization):
        rank = len(layer.input.shape)
        if layer.axis not in (-1, rank - 1) or rank not in (2, 3, 4, 5):
            raise Failure(f"twin: BN {layer.name} must normalise the last axis of a 2-D to "
                          "5-D input.")
    elif isinstance(layer, (keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)):
        if layer.data_format != "channels_last":
            raise Failure(f"twin: {type(layer).__name__} {layer.name} must be channels_last.")
        activation_name(layer)
    elif isinstance(layer, keras.layers.GroupNormalization):
        rank = len(layer.input.shape)
        # torch's GroupNorm takes axis 1 as the channels: the last axis of an image or a
        # volume (NCHW, NCDHW in the twin) or of a vector, not of a sequence (batch,
        # length, features).
        if layer.axis not in (-1, rank - 1) or rank == 3:
            raise Failure(f"twin: GroupNormalization {layer.name} must normalise groups of "
                          "the last axis of images, volumes or vectors.")
    elif isinstance(layer, keras.layers.LayerNormalization):
        rank = len(layer.input.shape)
        axes = [axis % rank for axis in layer.axis]
        if axes != [rank - 1] or layer.rms_scaling:
            raise Failure(f"twin: LayerNormalization {layer.name} must normalise the last "
                          "axis only, without rms_scaling.")
    elif isinstance(layer, keras.layers.Conv1D):  # dilation too, as torch's nn.Conv1d's
        if layer.data_format != "channels_last" or layer.groups != 1:
            raise Failure(f"twin: Conv1D {layer.name} must be channels_last, without groups.")
        activation_name(layer)
    elif isinstance(layer, keras.layers.Conv2DTranspose):
        small = any(k < s for k, s in zip(layer.kernel_size, layer.strides))
        if (layer.data_format != "channels_last" or tuple(layer.dilation_rate) != (1, 1)
                or layer.output_padding is not None or small):
            raise Failure(f"twin: Conv2DTranspose {layer.name} must be channels_last, without "
                          "dilation or output_padding, with kernel_size ≥ strides.")
        activation_name(layer)
    elif isinstance(layer, keras.layers.MultiHeadAttention):
        # Kernels: query, key [features, heads, key_dim], value [features, heads,
        # value_dim], output [heads, value_dim, features].
        dense = (layer._query_dense, layer._key_dense, layer._value_dense, layer._output_dense)
        query, key, value, output = (tuple(part.kernel.shape) for part in dense)
        width = layer.num_heads * layer.key_dim
        plain = (query[0] == key[0] == value[0] == output[-1] == width
                 and layer.value_dim == layer.key_dim and layer.use_bias
                 and layer._output_shape is None and not getattr(layer, "_use_gate", False)
                 and getattr(layer, "_sliding_window", None) is None
                 and len(layer._build_shapes_dict["query_shape"]) == 3
                 and tuple(layer._attention_axes) == (1,))
        if not plain:
            raise Failure(f"twin: MultiHeadAttention {layer.name} must be torch's "
                          "nn.MultiheadAttention: sequences (batch, length, features) whose "
                          "query, key and value features all equal num_heads × key_dim, "
                          "value_dim = key_dim, with biases, without output_shape, gate or "
                          "sliding window.")
    elif isinstance(layer, keras.layers.Embedding):
        if layer.mask_zero or getattr(layer, "lora_enabled", False) or \
                getattr(layer, "quantization_mode", None):
            raise Failure(f"twin: Embedding {layer.name} must be torch's nn.Embedding: "
                          "without mask_zero (a mask the later layers would read), LoRA "
                          "or quantization.")
        if layer.input.dtype not in ("int32", "int64") or len(layer.input.shape) != 2:
            raise Failure(f"twin: Embedding {layer.name} must read the model's integer "
                          "input of token sequences (batch, length) (keras.Input((length,), "
                          f"dtype='int32')), not {layer.input.dtype} of shape "
                          f"{tuple(layer.input.shape)}.")
    elif type(layer).__name__ == "LayerScale":
        if type(layer).__module__ != "keras.src.applications.convnext":
            raise Failure(f"twin: LayerScale {layer.name} is not keras.applications.convnext's "
                          "(x times a vector γ of the last axis); the twin mirrors that one.")
    elif isinstance(layer, recurrent_types()):
        check_recurrent_layer(layer)
    elif isinstance(layer, keras.layers.Bidirectional):
        forward, backward = layer.forward_layer, layer.backward_layer
        if (type(forward).__name__ not in RECURRENT_NAMES or type(backward) is not type(forward)
                or _recurrent_settings(backward) != _recurrent_settings(forward)
                or not backward.go_backwards or layer.merge_mode not in BIDIRECTIONAL_MERGES
                or layer.return_state):
            raise Failure(f"twin: Bidirectional {layer.name} must wrap an LSTM, GRU or "
                          "SimpleRNN (torch's bidirectional=True, one setting for both "
                          "directions), its backward layer the same (units, activations, "
                          f"biases), merge_mode one of {', '.join(BIDIRECTIONAL_MERGES)}, "
                          "without return_state.")
        check_recurrent_layer(forward, backward=False)
        check_recurrent_layer(backward, backward=True)


# Recurrent layers the twin mirrors (torch's nn.LSTM, nn.GRU, nn.RNN), alone or in a
# Bidirectional wrapper, whose merges of the two directions' outputs it mirrors too.
RECURRENT_NAMES = ("LSTM", "GRU", "SimpleRNN")
BIDIRECTIONAL_MERGES = ("concat", "sum", "mul", "ave")


def recurrent_types() -> tuple:
    """The Keras classes of RECURRENT_NAMES."""
    import keras

    return tuple(getattr(keras.layers, name) for name in RECURRENT_NAMES)


def _recurrent_settings(layer) -> tuple:
    """What torch's bidirectional layer shares between its directions."""
    cell = layer.cell
    return (layer.units, getattr(cell.activation, "__name__", ""),
            getattr(getattr(cell, "recurrent_activation", None), "__name__", ""),
            cell.use_bias, getattr(cell, "reset_after", None), layer.return_sequences)


def check_recurrent_layer(layer, backward: bool = False) -> None:
    """Raises Failure for an LSTM, GRU or SimpleRNN that is not torch's nn.LSTM, nn.GRU
    or nn.RNN (`backward`: the reversed half of a Bidirectional, which goes backwards)."""
    kind = type(layer).__name__
    cell = layer.cell
    activation = getattr(cell.activation, "__name__", "")
    if kind == "SimpleRNN":
        plain = activation in ("tanh", "relu")
        settings = "tanh or relu activation"
    else:
        plain = (activation == "tanh"
                 and getattr(cell.recurrent_activation, "__name__", "") == "sigmoid"
                 and getattr(cell, "reset_after", True))
        settings = "tanh and sigmoid activations" + (", reset_after=True" if kind == "GRU" else "")
    plain = (plain and cell.use_bias and layer.go_backwards == backward and not layer.stateful
             and not layer.return_state)
    if not plain:
        torch_name = "RNN" if kind == "SimpleRNN" else kind
        raise Failure(f"twin: {kind} {layer.name} must be torch's nn.{torch_name}: {settings}, "
                      "with biases, not go_backwards (but in Bidirectional), stateful or "
                      "return_state.")


# Ranks of the tensors the twin holds channels first: images (NHWC in Keras, NCHW in the
# twin) and volumes (NDHWC, NCDHW).
CHANNELS_FIRST_RANKS = (4, 5)


def tensor_axis(axis: int, rank: int) -> int:
    """The torch axis of a Keras axis: images and volumes are channels last in Keras and
    channels first in the twin."""
    axis = axis % rank
    if rank not in CHANNELS_FIRST_RANKS or axis == 0:
        return axis
    return 1 if axis == rank - 1 else axis + 1


def _inference_identities() -> tuple:
    """Layers that compute the identity at inference (the twin runs in eval mode, and
    hessian-spectrum's inference BN mode calls the model with training=False): dropout
    and noise, and random augmentation."""
    import keras

    layers = keras.layers
    from keras.src.applications.convnext import StochasticDepth  # ConvNeXt's drop path

    return (layers.Dropout, layers.SpatialDropout1D, layers.SpatialDropout2D,
            layers.GaussianDropout, layers.GaussianNoise, layers.AlphaDropout,
            layers.ActivityRegularization, layers.RandomFlip, layers.RandomTranslation,
            layers.RandomRotation, layers.RandomZoom, layers.RandomContrast,
            layers.RandomBrightness, StochasticDepth)


# Merging layers the twin mirrors: Keras class name → the twin's step kind.
TWIN_MERGES = {"Add": "add", "Subtract": "subtract", "Multiply": "multiply",
               "Average": "average", "Maximum": "maximum", "Minimum": "minimum"}
# Layers with weights the twin mirrors, each by one torch module.
TWIN_MODULES = ("Conv1D", "Conv2D", "Conv3D", "DepthwiseConv2D", "SeparableConv2D", "Conv2DTranspose",
                "Dense", "BatchNormalization", "LayerNormalization", "GroupNormalization",
                "MultiHeadAttention", *RECURRENT_NAMES, "Bidirectional", "Embedding",
                "LayerScale")  # keras.applications.convnext's: x times a vector γ
SUPPORTED_LAYERS = (
    ", ".join(TWIN_MODULES) + ", Activation, ReLU, LeakyReLU, ELU, "
    "MaxPooling1D/2D/3D, AveragePooling1D/2D/3D, GlobalAveragePooling1D/2D/3D, "
    "GlobalMaxPooling1D/2D/3D, "
    "ZeroPadding2D/3D, Cropping2D/3D, UpSampling2D (nearest, bilinear), UpSampling3D, Flatten, "
    "Reshape, Permute, "
    "Rescaling, Normalization (the last axis), "
    + ", ".join(TWIN_MERGES)
    + ", Concatenate, keras.ops +, -, * (and / by a number) and, as the identity at "
    "inference, dropout, noise, stochastic depth and random augmentation layers, "
    "InceptionResNetV2's CustomScaleLayer, in nested Sequential or functional models too")


def mergeable(shapes: list[tuple]) -> bool:
    """Whether Keras shapes (without the batch) are equal, or of one rank and broadcast:
    then so do the twin's, whose images (and volumes) are all channels first alike."""
    if len(set(shapes)) == 1:
        return True
    if len({len(shape) for shape in shapes}) != 1 or any(None in shape for shape in shapes):
        return False
    try:
        np.broadcast_shapes(*shapes)
    except ValueError:
        return False
    return True


def twin_step(layer, input_shapes: list[tuple], call: Any = None) -> tuple[str, Any]:
    """(kind, value) of the twin's step for one call of a Keras layer; raises Failure
    naming a layer (or a setting of it) the twin cannot mirror. Kinds: "module" (a
    layer with weights, one of TWIN_MODULES, its activation included; value: the
    layer's name), "activation" (name), "leaky_relu" (slope), "clamp" (ReLU's max_value),
    "rescale" ((scale, offset)), "normalize" ((mean, max(√variance, ε))),
    "pool" ((kind, size, strides[, (before, after) per axis of "same" padding])),
    "global" ((kind, keepdims)), "flatten", "pad" ((left, right,
    top, bottom[, front, back]): F.pad's order, the last axis first), "crop" ((top,
    bottom, left, right), or (front, back, top, bottom, left, right) of a volume),
    "upsample" (((rows, columns), interpolation), or ((depth, rows, columns), "nearest")),
    "reshape" (Keras's target_shape), "permute" (Keras's dims, from 1), a
    merge of TWIN_MERGES, "scalar" (a keras.ops call: `operation_step`), "scaled_add"
    (InceptionResNetV2's CustomScaleLayer: its scale), "concatenate" (torch axis) or "identity". `call` is the
    node's arguments (keras.src.ops.symbolic_arguments.SymbolicArguments), read for
    MultiHeadAttention: query, value and key by position, no mask but the causal one
    (kind "causal_attention", value: the layer's name)."""
    import keras

    merge = TWIN_MERGES.get(type(layer).__name__)
    if isinstance(layer, (keras.layers.InputLayer,) + _inference_identities()):
        return "identity", None
    module = "module"
    if isinstance(layer, keras.layers.MultiHeadAttention):
        arguments = call.args if call is not None else ()
        options = {name: value for name, value in (call.kwargs if call is not None else {}).items()
                   if name != "training" and value is not None and value is not False}
        causal = options.pop("use_causal_mask", False) is True
        if options or len(arguments) not in (2, 3):
            raise Failure(f"twin: MultiHeadAttention {layer.name} must be called as "
                          "layer(query, value[, key]) without masks or other options but "
                          f"use_causal_mask=True; got {len(arguments)} positional arguments "
                          f"and {sorted(options)}.")
        if causal:  # torch's attn_mask over the later positions
            module = "causal_attention"
    if type(layer).__name__ in TWIN_MODULES:
        if len(input_shapes) != 1 and not isinstance(layer, keras.layers.MultiHeadAttention):
            raise Failure(f"twin: {type(layer).__name__} {layer.name} is called on "
                          f"{len(input_shapes)} tensors (an initial state or a mask?); the "
                          "twin mirrors it on its one input.")
        check_twin_layer(layer)
        return module, layer.name
    if type(layer).__name__ == "CustomScaleLayer":  # InceptionResNetV2's a + b·scale
        if (type(layer).__module__ != "keras.src.applications.inception_resnet_v2"
                or len(input_shapes) != 2 or len(set(input_shapes)) != 1):
            raise Failure(f"twin: CustomScaleLayer {layer.name} must be keras.applications."
                          "inception_resnet_v2's, on two tensors of one shape.")
        return "scaled_add", float(layer.scale)
    if isinstance(layer, keras.layers.Flatten):
        if layer.data_format != "channels_last":
            raise Failure(f"twin: Flatten {layer.name} must be channels_last.")
        return "flatten", None
    if isinstance(layer, keras.layers.Reshape):
        return "reshape", tuple(int(size) for size in layer.target_shape)
    if isinstance(layer, keras.layers.Rescaling):  # inputs * scale + offset
        scale, offset = (np.asarray(value, np.float64).reshape(-1)
                         for value in (layer.scale, layer.offset))
        return "rescale", (tuple(scale.tolist()), tuple(offset.tolist()))
    if isinstance(layer, keras.layers.Normalization):
        rank = len(input_shapes[0]) + 1
        if layer.invert or tuple(axis % rank for axis in layer.axis) != (rank - 1,):
            raise Failure(f"twin: Normalization {layer.name} must normalise the last axis "
                          "and not invert.")
        mean = np.asarray(layer.mean, np.float64).reshape(-1)
        # Keras divides by max(√variance, ε).
        deviation = np.maximum(np.sqrt(np.asarray(layer.variance, np.float64).reshape(-1)),
                               keras.config.epsilon())
        return "normalize", (tuple(mean.tolist()), tuple(deviation.tolist()))
    if isinstance(layer, keras.layers.Permute):
        return "permute", tuple(int(axis) for axis in layer.dims)
    if isinstance(layer, keras.layers.Activation):
        return "activation", activation_name(layer)
    if isinstance(layer, keras.layers.ReLU):
        if not (float(layer.negative_slope) == 0.0 and float(layer.threshold) == 0.0):
            raise Failure(f"twin: ReLU {layer.name} has negative_slope or threshold set; "
                          "only ReLU and ReLU with max_value (e.g. ReLU6) are supported.")
        if layer.max_value is not None:  # MobileNet's ReLU(6.)
            return "clamp", float(layer.max_value)
        return "activation", "relu"
    if isinstance(layer, keras.layers.LeakyReLU):
        return "leaky_relu", float(layer.negative_slope)
    if isinstance(layer, keras.layers.ELU):
        return "elu", float(layer.alpha)
    if isinstance(layer, (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D,
                          keras.layers.MaxPooling1D, keras.layers.AveragePooling1D,
                          keras.layers.MaxPooling3D, keras.layers.AveragePooling3D)):
        if layer.data_format != "channels_last":
            raise Failure(f"twin: pooling {layer.name} must be channels_last.")
        kind = "max" if "Max" in type(layer).__name__ else "average"
        size, strides = tuple(layer.pool_size), tuple(layer.strides)
        if layer.padding == "valid":
            return "pool", (kind, size, strides)
        # "same": TensorFlow's padding of each spatial axis, the odd entry after.
        spatial = input_shapes[0][:len(size)]
        if any(n is None for n in spatial):
            raise Failure(f"twin: pooling {layer.name} has padding='same' over inputs of "
                          f"unknown size {tuple(spatial)}; give the model's input a fixed "
                          "size.")
        totals = [max((-(-int(n) // s) - 1) * s + k - int(n), 0)
                  for n, k, s in zip(spatial, size, strides)]
        return "pool", (kind, size, strides, tuple((t // 2, t - t // 2) for t in totals))
    if isinstance(layer, (keras.layers.GlobalAveragePooling1D, keras.layers.GlobalMaxPooling1D,
                          keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D,
                          keras.layers.GlobalAveragePooling3D, keras.layers.GlobalMaxPooling3D)):
        if layer.data_format != "channels_last":
            raise Failure(f"twin: {layer.name} must be channels_last.")
        return "global", ("max" if "Max" in type(layer).__name__ else "average",
                          bool(layer.keepdims))
    if isinstance(layer, keras.layers.UpSampling2D):
        if layer.data_format != "channels_last" or layer.interpolation not in ("nearest",
                                                                               "bilinear"):
            raise Failure(f"twin: UpSampling2D {layer.name} must be channels_last with "
                          "interpolation='nearest' or 'bilinear'.")
        return "upsample", (tuple(int(size) for size in layer.size), layer.interpolation)
    if isinstance(layer, keras.layers.UpSampling3D):  # repeats entries: nearest
        if layer.data_format != "channels_last":
            raise Failure(f"twin: UpSampling3D {layer.name} must be channels_last.")
        return "upsample", (tuple(int(size) for size in layer.size), "nearest")
    if isinstance(layer, keras.layers.ZeroPadding3D):
        if layer.data_format != "channels_last":
            raise Failure(f"twin: ZeroPadding3D {layer.name} must be channels_last.")
        return "pad", tuple(int(side) for pair in reversed(layer.padding) for side in pair)
    if isinstance(layer, keras.layers.Cropping3D):
        if layer.data_format != "channels_last":
            raise Failure(f"twin: Cropping3D {layer.name} must be channels_last.")
        return "crop", tuple(int(side) for pair in layer.cropping for side in pair)
    if isinstance(layer, keras.layers.ZeroPadding2D):
        if layer.data_format != "channels_last":
            raise Failure(f"twin: ZeroPadding2D {layer.name} must be channels_last.")
        (top, bottom), (left, right) = layer.padding
        return "pad", (int(left), int(right), int(top), int(bottom))
    if isinstance(layer, keras.layers.Cropping2D):
        if layer.data_format != "channels_last":
            raise Failure(f"twin: Cropping2D {layer.name} must be channels_last.")
        (top, bottom), (left, right) = layer.cropping
        return "crop", (int(top), int(bottom), int(left), int(right))
    if merge or isinstance(layer, keras.layers.Concatenate):
        if merge and not mergeable(input_shapes):
            raise Failure(f"twin: {type(layer).__name__} {layer.name} takes inputs of shapes "
                          f"{', '.join(map(str, input_shapes))}; the twin merges equal shapes, "
                          "or shapes of one rank that broadcast (a squeeze-and-excitation "
                          "block's [H, W, C] and [1, 1, C]).")
        if merge:
            return merge, None
        return "concatenate", tensor_axis(layer.axis, len(input_shapes[0]) + 1)
    raise Failure(f"twin: layer {layer.name} ({type(layer).__name__}) is not supported; a "
                  f"--model may use these layers: {SUPPORTED_LAYERS}.")


# keras.ops arithmetic between layers the twin mirrors: of a tensor and a number
# (MobileNetV3's hard sigmoid, ReLU6(x + 3) * (1 / 6)), and of two tensors as the merges
# (ConvNeXt's residual `inputs + x`). Keras's operation class → the step's operator.
SCALAR_OPERATIONS = {"Add": "add", "Subtract": "subtract", "Multiply": "multiply",
                     "Divide": "divide", "TrueDivide": "divide"}


def operation_step(operation, arguments) -> Optional[tuple[str, Any]]:
    """The step of a keras.ops call of SCALAR_OPERATIONS: ("scalar", (operator, number,
    tensor first)) on one tensor and one number; (operator, None), a merge, on two
    `mergeable` tensors (not a division); else None."""
    import keras

    operator = SCALAR_OPERATIONS.get(type(operation).__name__)
    args = tuple(arguments.args) if arguments is not None else ()
    if (operator is None or type(operation).__module__ != "keras.src.ops.numpy"
            or len(args) != 2 or arguments.kwargs):
        return None
    tensors = [isinstance(a, keras.KerasTensor) for a in args]
    if all(tensors):
        fits = mergeable([tuple(a.shape[1:]) for a in args])
        return (operator, None) if fits and operator != "divide" else None
    number = args[tensors.index(False)] if tensors.count(True) == 1 else None
    if not isinstance(number, (int, float)) or isinstance(number, bool):
        return None
    return "scalar", (operator, float(number), tensors[0])


def twin_graph(keras_model) -> tuple[list[tuple[str, Any, tuple[int, ...], int]], int]:
    """The twin's forward: (steps, output). Each step is (kind, value, inputs, output)
    (see `twin_step`) over numbered tensors, 0 being the model's input, in an order
    where every step's inputs are computed before it; `output` numbers the logits.
    Works on a `keras.Sequential` built with an input shape and on any functional
    model of one input and one output (branches, skip connections, shared layers).
    Raises Failure naming the first layer it cannot mirror."""
    import keras

    steps: list = []

    def walk(model, input_number: int) -> int:
        """Appends the steps of `model`'s graph read from tensor `input_number`; returns
        the number of its output. A nested model's steps are walked in place."""
        graph = model._functional if isinstance(model, keras.Sequential) else model
        nodes_by_depth = getattr(graph, "_nodes_by_depth", None)
        if nodes_by_depth is None:
            raise Failure(f"twin: the model {model.name} has no graph of layers; build it "
                          "with keras.Input (a Sequential model needs its input shape).")
        if len(graph.inputs) != 1 or len(graph.outputs) != 1:
            raise Failure(f"twin: the model has {len(graph.inputs)} inputs and "
                          f"{len(graph.outputs)} outputs; the twin takes one of each.")
        numbers = {id(graph.inputs[0]): input_number}
        for depth in sorted(nodes_by_depth, reverse=True):  # a node's inputs are deeper
            for node in nodes_by_depth[depth]:
                layer = node.operation
                if isinstance(layer, keras.layers.InputLayer):
                    continue
                if len(node.output_tensors) != 1:
                    raise Failure(f"twin: layer {layer.name} has {len(node.output_tensors)} "
                                  "outputs; the twin mirrors layers of one output.")
                inputs = tuple(numbers[id(t)] for t in node.input_tensors)
                if isinstance(layer, keras.Model):
                    if len(inputs) != 1:
                        raise Failure(f"twin: the nested model {layer.name} is called on "
                                      f"{len(inputs)} tensors; the twin takes one.")
                    numbers[id(node.output_tensors[0])] = walk(layer, inputs[0])
                    continue
                if not isinstance(layer, keras.layers.Layer):  # a keras.ops call
                    step = operation_step(layer, node.arguments)
                    if step is None:
                        raise Failure(f"twin: operation {layer.name} ({type(layer).__name__})"
                                      " is not a layer the twin mirrors; use these "
                                      f"layers: {SUPPORTED_LAYERS}.")
                    kind, value = step
                else:
                    kind, value = twin_step(
                        layer, [tuple(t.shape[1:]) for t in node.input_tensors], node.arguments)
                if kind == "identity":
                    numbers[id(node.output_tensors[0])] = inputs[0]
                    continue
                numbers[id(node.output_tensors[0])] = len(steps) + 1
                steps.append((kind, value, inputs, len(steps) + 1))
        return numbers[id(graph.outputs[0])]

    output = walk(keras_model, 0)
    return steps, output


def flat_layers(keras_model) -> dict[str, Any]:
    """{name: layer} of the model's layers, those of nested models included (a nested
    model itself is no entry); two layers of one name are a Failure."""
    import keras

    layers: dict[str, Any] = {}
    for layer in keras_model.layers:
        inner = flat_layers(layer) if isinstance(layer, keras.Model) else {layer.name: layer}
        for name, found in inner.items():
            if layers.setdefault(name, found) is not found:
                raise Failure(f"twin: two layers are named {name!r}; the twin names its "
                              "modules by the Keras layers' names.")
    return layers


def fold_paddings(keras_model, steps: list, output: int) -> tuple[list, dict[str, tuple[int, int]]]:
    """A symmetric ZeroPadding2D read only by a 'valid' Conv2D (called once) becomes that
    convolution's own padding, as PyTorch's ResNets write it. Returns the steps without
    the folded pads (the convolution reads the pad's input) and {conv name: (height,
    width) padding}."""
    import keras

    layers = flat_layers(keras_model)
    producers = {out: (kind, value, inputs) for kind, value, inputs, out in steps}
    readers = [i for _, _, inputs, _ in steps for i in inputs]
    calls = [value for kind, value, _, _ in steps if kind == "module"]
    steps = list(steps)
    folded: dict[str, tuple[int, int]] = {}
    for index, (kind, value, inputs, out) in enumerate(steps):
        producer = producers.get(inputs[0]) if kind == "module" else None
        layer = layers[value] if producer else None
        if (producer and producer[0] == "pad" and isinstance(layer, keras.layers.Conv2D)
                and layer.padding == "valid" and calls.count(value) == 1
                and readers.count(inputs[0]) == 1 and inputs[0] != output):
            left, right, top, bottom = producer[1]
            if (left, top) == (right, bottom):
                folded[value] = (top, left)
                steps[index] = (kind, value, producer[2], out)
    kept_inputs = {i for _, _, inputs, _ in steps for i in inputs} | {output}
    return [step for step in steps if step[0] != "pad" or step[3] in kept_inputs], folded


def torch_twin(keras_model):
    """A torch.nn.Module computing the same logits as keras_model (NCHW images, NCDHW
    volumes), with one submodule per Keras layer with weights (convolutions, Dense,
    normalisations), named as the layer, and the weights copied; its forward runs `twin_graph`'s steps.
    Returns (module, number of trainable parameters)."""
    import keras
    import torch
    import torch.nn.functional as F
    from torch import nn

    steps, output = twin_graph(keras_model)  # refuses what it cannot mirror, first

    def span(kernel_size, dilation):
        """A dilated kernel's extent along each axis."""
        return [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]

    class KerasPadding:
        """Keras's padding for a torch convolution (1-D to 3-D), by torch's own padding
        (as a PyTorch user writes it) wherever that pads the same: Keras's 'same' puts an
        odd pixel at the end (bottom/right), and 'causal' pads the start only, which only
        a separate F.pad can (one more op each way). A dilated kernel pads as one of its
        span, (kernel − 1) · dilation + 1."""

        def keras_padding(self, layer, padding=None):
            rank = len(layer.kernel_size)
            self.asymmetric = None  # F.pad's (left, right[, top, bottom])
            self.dynamic = False  # 'same' on an input of unknown size
            padding = padding or (0,) * rank
            if layer.padding == "causal":
                self.asymmetric = ((layer.kernel_size[0] - 1) * layer.dilation_rate[0], 0)
            elif layer.padding == "same":
                # Every call's input size (a shared layer may see several).
                calls = {tuple(node.input_tensors[0].shape[1:1 + rank])
                         for node in layer._inbound_nodes}
                self.dynamic = len(calls) != 1 or None in next(iter(calls))
                if not self.dynamic:
                    [sizes] = calls
                    pairs = [same_padding(size, kernel, stride) for size, kernel, stride
                             in zip(sizes, span(layer.kernel_size, layer.dilation_rate),
                                    layer.strides)]
                    if all(first == last for first, last in pairs):
                        padding = tuple(first for first, _ in pairs)
                    else:  # F.pad's order: the last axis first
                        self.asymmetric = tuple(p for pair in reversed(pairs) for p in pair)
            return padding

        def pad(self, x):
            if self.dynamic:
                pairs = [same_padding(size, kernel, stride) for size, kernel, stride
                         in zip(x.shape[2:], span(self.kernel_size, self.dilation),
                                self.stride)]
                x = F.pad(x, tuple(p for pair in reversed(pairs) for p in pair))
            elif self.asymmetric:
                x = F.pad(x, self.asymmetric)
            return x

    class KerasConv2d(KerasPadding, nn.Conv2d):
        def __init__(self, layer, padding=None, *, in_channels, out_channels, groups=1,
                     bias=True):
            padding = self.keras_padding(layer, padding)
            super().__init__(in_channels, out_channels, tuple(layer.kernel_size),
                             stride=tuple(layer.strides), padding=padding,
                             dilation=tuple(layer.dilation_rate), groups=groups, bias=bias)

        def forward(self, x):
            return super().forward(self.pad(x))

    class KerasConv3d(KerasPadding, nn.Conv3d):  # volumes NCDHW
        def __init__(self, layer):
            padding = self.keras_padding(layer)
            super().__init__(layer.kernel.shape[3] * layer.groups, layer.filters,
                             tuple(layer.kernel_size), stride=tuple(layer.strides),
                             padding=padding, dilation=tuple(layer.dilation_rate),
                             groups=layer.groups, bias=layer.use_bias)

        def forward(self, x):
            return super().forward(self.pad(x))

    class KerasConv1d(KerasPadding, nn.Conv1d):
        """Sequences stay (batch, length, features), as in Keras and as Dense,
        attention and recurrent layers take them: transposed for the convolution."""

        def __init__(self, layer):
            padding = self.keras_padding(layer)
            super().__init__(layer.kernel.shape[1], layer.filters, tuple(layer.kernel_size),
                             stride=tuple(layer.strides), padding=padding,
                             dilation=tuple(layer.dilation_rate), bias=layer.use_bias)

        def forward(self, x):
            return super().forward(self.pad(x.transpose(1, 2))).transpose(1, 2)

    class SequenceBatchNorm(nn.BatchNorm1d):
        """BN of sequences (batch, length, features): torch's BatchNorm1d normalises
        axis 1, so transposed around it, as around the Conv1D."""

        def forward(self, x):
            return super().forward(x.transpose(1, 2)).transpose(1, 2)

    class KerasConvTranspose2d(nn.ConvTranspose2d):
        """Keras's 'same' output (input size × stride) is the full transposed
        convolution from row (kernel − stride) // 2 on: torch's padding drops the
        leading rows (and as many trailing ones), a slice the rest."""

        def __init__(self, layer):
            self.same = layer.padding == "same"
            crop = tuple((k - s) // 2 if self.same else 0
                         for k, s in zip(layer.kernel_size, layer.strides))
            super().__init__(layer.kernel.shape[3], layer.filters, tuple(layer.kernel_size),
                             stride=tuple(layer.strides), padding=crop, bias=layer.use_bias)

        def forward(self, x):
            y = super().forward(x)
            if self.same:
                y = y[:, :, :x.shape[2] * self.stride[0], :x.shape[3] * self.stride[1]]
            return y

    class KerasAttention(nn.MultiheadAttention):
        """Keras's call order (query, value[, key]); the output without the weights.
        Called as a PyTorch user calls it (need_weights at its default): the explicit
        softmax path, which torch differentiates twice on the CPU."""

        def forward(self, query, value, key=None, causal=False):
            # Keras's use_causal_mask: query i sees value positions j <= i.
            mask = (torch.ones(query.shape[1], value.shape[1], dtype=torch.bool,
                               device=query.device).triu(1) if causal else None)
            return super().forward(query, value if key is None else key, value,
                                   attn_mask=mask)[0]

    class KerasRecurrent(nn.Module):
        """nn.LSTM, nn.GRU or nn.RNN on (batch, length, features); Keras's output: the
        last step's state, or every step's with return_sequences. Bidirectional (`merge`
        one of BIDIRECTIONAL_MERGES): torch's outputs hold the forward direction's
        features, then the backward's, both in time order as Keras's with
        return_sequences; the backward direction's last state is its output at the first
        step."""

        def __init__(self, rnn, return_sequences: bool, merge: Optional[str] = None):
            super().__init__()
            self.rnn, self.return_sequences, self.merge = rnn, return_sequences, merge

        def forward(self, x):
            outputs, _ = self.rnn(x)
            if self.merge is None:
                return outputs if self.return_sequences else outputs[:, -1]
            forward, backward = torch.split(outputs, self.rnn.hidden_size, dim=-1)
            if not self.return_sequences:
                forward, backward = forward[:, -1], backward[:, 0]
            if self.merge == "concat":
                return torch.cat([forward, backward], dim=-1)
            if self.merge == "sum":
                return forward + backward
            if self.merge == "mul":
                return forward * backward
            return (forward + backward) / 2  # ave

    class ChannelsLast:
        """Keras's layer acts on an image's (or a volume's) channels, its last axis:
        NCHW → NHWC (NCDHW → NDHWC) and back around the torch module's forward."""

        def forward(self, x):
            if x.ndim not in CHANNELS_FIRST_RANKS:
                return super().forward(x)
            return super().forward(x.movedim(1, -1)).movedim(-1, 1)

    class ChannelsLastLayerNorm(ChannelsLast, nn.LayerNorm):
        pass

    class ChannelsLastLinear(ChannelsLast, nn.Linear):  # Dense on images: pointwise
        pass

    def along_channels(tensor, x):
        """A vector of Keras's last axis, to broadcast against x (images NCHW, volumes
        NCDHW: along axis 1)."""
        if x.ndim not in CHANNELS_FIRST_RANKS:
            return tensor
        return tensor.reshape(1, -1, *(1,) * (x.ndim - 2))

    class ChannelScale(nn.Module):
        """ConvNeXt's LayerScale: x times γ, a vector of Keras's last axis (an image's
        channels, axis 1 in the twin)."""

        def __init__(self, channels: int):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(channels))

        def forward(self, x):
            return x * along_channels(self.weight, x)

    # One entry per name of TWIN_ACTIVATIONS, which activation_name checks against.
    functions = {"linear": lambda t: t, "tanh": torch.tanh, "relu": torch.relu,
                 "sigmoid": torch.sigmoid, "elu": F.elu, "gelu": F.gelu, "silu": F.silu,
                 "swish": F.silu, "mish": F.mish, "softplus": F.softplus,
                 # keras.activations.leaky_relu's default slope
                 "leaky_relu": lambda t: F.leaky_relu(t, 0.2),
                 # Keras 3's: relu6(x + 3) / 6, and x times it (MobileNetV3's)
                 "hard_sigmoid": F.hardsigmoid, "hard_silu": F.hardswish,
                 "hard_swish": F.hardswish}

    steps, folded = fold_paddings(keras_model, steps, output)

    modules = nn.ModuleDict()
    activations: dict[str, Callable] = {}
    depthwise = (keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)
    layers = flat_layers(keras_model)
    for layer in layers.values():
        if isinstance(layer, keras.layers.Conv2D):
            # A grouped kernel [h, w, C / groups, filters] is torch's grouped weight
            # [filters, C / groups, h, w] transposed, as an ungrouped one.
            modules[layer.name] = KerasConv2d(
                layer, folded.get(layer.name), in_channels=layer.kernel.shape[2] * layer.groups,
                out_channels=layer.filters, groups=layer.groups, bias=layer.use_bias)
        elif isinstance(layer, keras.layers.Conv1D):
            modules[layer.name] = KerasConv1d(layer)
        elif isinstance(layer, keras.layers.Conv3D):
            modules[layer.name] = KerasConv3d(layer)
        elif isinstance(layer, keras.layers.Conv2DTranspose):
            modules[layer.name] = KerasConvTranspose2d(layer)
        elif isinstance(layer, keras.layers.MultiHeadAttention):
            modules[layer.name] = KerasAttention(
                layer.num_heads * layer.key_dim, layer.num_heads, batch_first=True)
        elif isinstance(layer, recurrent_types() + (keras.layers.Bidirectional,)):
            bidirectional = isinstance(layer, keras.layers.Bidirectional)
            inner = layer.forward_layer if bidirectional else layer
            if isinstance(inner, keras.layers.SimpleRNN):
                rnn = functools.partial(
                    nn.RNN, nonlinearity=getattr(inner.cell.activation, "__name__", ""))
            else:
                rnn = nn.LSTM if isinstance(inner, keras.layers.LSTM) else nn.GRU
            modules[layer.name] = KerasRecurrent(
                rnn(inner.cell.kernel.shape[0], inner.units, batch_first=True,
                    bidirectional=bidirectional),
                inner.return_sequences, layer.merge_mode if bidirectional else None)
            if not isinstance(inner, keras.layers.GRU):
                # Keras's LSTM and SimpleRNN have one bias, torch's two: the second is 0.
                for suffix in ("", "_reverse") if bidirectional else ("",):
                    getattr(modules[layer.name].rnn, "bias_hh_l0" + suffix).requires_grad_(False)
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            channels, multiplier = layer.kernel.shape[2:]
            modules[layer.name] = KerasConv2d(
                layer, in_channels=channels, out_channels=channels * multiplier,
                groups=channels, bias=layer.use_bias)
        elif isinstance(layer, keras.layers.SeparableConv2D):
            channels, multiplier = layer.depthwise_kernel.shape[2:]
            modules[layer.name] = nn.Sequential(
                KerasConv2d(layer, in_channels=channels, out_channels=channels * multiplier,
                            groups=channels, bias=False),
                nn.Conv2d(channels * multiplier, layer.filters, 1, bias=layer.use_bias))
        elif isinstance(layer, keras.layers.GroupNormalization):
            modules[layer.name] = nn.GroupNorm(layer.groups, layer.input.shape[-1],
                                               eps=layer.epsilon)
        elif isinstance(layer, keras.layers.BatchNormalization):
            norm = {5: nn.BatchNorm3d, 4: nn.BatchNorm2d,
                    3: SequenceBatchNorm}.get(len(layer.input.shape), nn.BatchNorm1d)
            modules[layer.name] = norm(layer.moving_mean.shape[0], eps=layer.epsilon)
        elif isinstance(layer, keras.layers.LayerNormalization):
            modules[layer.name] = ChannelsLastLayerNorm(layer.input.shape[-1], eps=layer.epsilon)
        elif isinstance(layer, keras.layers.Embedding):
            modules[layer.name] = nn.Embedding(layer.input_dim, layer.output_dim)
        elif type(layer).__name__ == "LayerScale":  # checked: keras.applications.convnext's
            modules[layer.name] = ChannelScale(layer.gamma.shape[0])
        elif isinstance(layer, keras.layers.Dense):
            modules[layer.name] = ChannelsLastLinear(layer.kernel.shape[0], layer.units,
                                                     bias=layer.use_bias)
        elif layer.weights and not isinstance(layer, keras.layers.Normalization):
            # (Normalization's statistics, not trained, are constants of its step.)
            raise Failure(f"twin: layer {layer.name} ({type(layer).__name__}) has weights but no twin.")
        if isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
                              keras.layers.Dense, keras.layers.Conv2DTranspose) + depthwise):
            activations[layer.name] = functions[activation_name(layer)]

    # Copy the weights, by layer name.
    assigned = set()

    def put(parameter, value: np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        if tuple(parameter.shape) != tuple(value.shape):
            raise Failure(f"twin: shape {tuple(value.shape)} for a parameter of shape "
                          f"{tuple(parameter.shape)}.")
        with torch.no_grad():
            parameter.copy_(value)
        assigned.add(id(parameter))

    def depthwise_weight(kernel: np.ndarray) -> np.ndarray:
        """[h, w, C, multiplier] → torch's grouped [C·multiplier, 1, h, w]: output
        channel c·multiplier + m filters input channel c in both."""
        h, w, channels, multiplier = kernel.shape
        return np.transpose(kernel, (2, 3, 0, 1)).reshape(channels * multiplier, 1, h, w)

    def gates(array: np.ndarray, order: tuple[int, ...]) -> np.ndarray:
        """The gate blocks of a recurrent kernel or bias (last axis) in torch's order."""
        return np.concatenate([np.split(array, len(order), axis=-1)[i] for i in order], axis=-1)

    for name, module in modules.items():
        layer = layers[name]
        if isinstance(layer, keras.layers.MultiHeadAttention):
            width = layer.num_heads * layer.key_dim
            parts = (layer._query_dense, layer._key_dense, layer._value_dense)
            put(module.in_proj_weight, np.concatenate(
                [numpy_of(part.kernel).reshape(width, width).T for part in parts]))
            put(module.in_proj_bias, np.concatenate(
                [numpy_of(part.bias).reshape(width) for part in parts]))
            put(module.out_proj.weight, numpy_of(layer._output_dense.kernel).reshape(width, width).T)
            put(module.out_proj.bias, numpy_of(layer._output_dense.bias))
            continue
        if isinstance(layer, recurrent_types() + (keras.layers.Bidirectional,)):
            # Gates: Keras's LSTM i, f, c, o = torch's i, f, g, o; Keras's GRU z, r, h,
            # torch's r, z, n (SimpleRNN: one). GRU's bias is [input; recurrent], as
            # torch's two. A Bidirectional's backward layer is torch's "_reverse".
            directions = ([(layer.forward_layer, ""), (layer.backward_layer, "_reverse")]
                          if isinstance(layer, keras.layers.Bidirectional) else [(layer, "")])
            for inner, suffix in directions:
                order = ((0, 1, 2, 3) if isinstance(inner, keras.layers.LSTM)
                         else (1, 0, 2) if isinstance(inner, keras.layers.GRU) else (0,))
                cell, rnn = inner.cell, module.rnn
                put(getattr(rnn, "weight_ih_l0" + suffix), gates(numpy_of(cell.kernel), order).T)
                put(getattr(rnn, "weight_hh_l0" + suffix),
                    gates(numpy_of(cell.recurrent_kernel), order).T)
                bias = numpy_of(cell.bias)
                if bias.ndim == 1:
                    put(getattr(rnn, "bias_ih_l0" + suffix), gates(bias, order))
                    put(getattr(rnn, "bias_hh_l0" + suffix), np.zeros_like(bias))
                else:
                    put(getattr(rnn, "bias_ih_l0" + suffix), gates(bias[0], order))
                    put(getattr(rnn, "bias_hh_l0" + suffix), gates(bias[1], order))
            continue
        if isinstance(layer, keras.layers.Conv1D):
            put(module.weight, np.transpose(numpy_of(layer.kernel), (2, 1, 0)))  # WIO → OIW
            if layer.use_bias:
                put(module.bias, numpy_of(layer.bias))
            continue
        if isinstance(layer, keras.layers.Conv3D):  # DHWIO → OIDHW
            put(module.weight, np.transpose(numpy_of(layer.kernel), (4, 3, 0, 1, 2)))
            if layer.use_bias:
                put(module.bias, numpy_of(layer.bias))
            continue
        if isinstance(layer, keras.layers.Conv2DTranspose):  # HW(out)(in) → (in)(out)HW
            put(module.weight, np.transpose(numpy_of(layer.kernel), (3, 2, 0, 1)))
            if layer.use_bias:
                put(module.bias, numpy_of(layer.bias))
            continue
        if isinstance(layer, keras.layers.Conv2D):
            put(module.weight, np.transpose(numpy_of(layer.kernel), (3, 2, 0, 1)))  # HWIO → OIHW
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            put(module.weight, depthwise_weight(numpy_of(layer.kernel)))
        elif isinstance(layer, keras.layers.SeparableConv2D):
            put(module[0].weight, depthwise_weight(numpy_of(layer.depthwise_kernel)))
            put(module[1].weight, np.transpose(numpy_of(layer.pointwise_kernel), (3, 2, 0, 1)))
        if isinstance(layer, (keras.layers.Conv2D,) + depthwise):
            if layer.use_bias:
                put((module[1] if isinstance(module, nn.Sequential) else module).bias,
                    numpy_of(layer.bias))
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm,
                                 nn.GroupNorm)):
            # γ and β; where Keras has none (scale=False, center=False: Inception's BN),
            # 1 and 0 held fixed, which PyHessian leaves out as it takes the parameters
            # that require gradients.
            for parameter, value, fixed in ((module.weight, layer.gamma, 1.0),
                                            (module.bias, layer.beta, 0.0)):
                if value is None:
                    parameter.requires_grad_(False)
                    put(parameter, np.full(tuple(parameter.shape), fixed))
                else:
                    put(parameter, numpy_of(value))
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                put(module.running_mean, numpy_of(layer.moving_mean))
                put(module.running_var, numpy_of(layer.moving_variance))
        elif isinstance(module, nn.Embedding):  # [vocabulary, features] in both
            put(module.weight, numpy_of(layer.embeddings))
        elif isinstance(module, ChannelScale):
            put(module.weight, numpy_of(layer.gamma))
        else:
            put(module.weight, numpy_of(layer.kernel).T)
            if layer.use_bias:
                put(module.bias, numpy_of(layer.bias))
    unassigned = [name for name, p in modules.named_parameters() if id(p) not in assigned]
    if unassigned:
        raise Failure(f"twin: parameters without a Keras value: {unassigned}.")

    # By the rank of the twin's tensor: sequences (transposed), images, volumes.
    pools = {3: {"max": F.max_pool1d, "average": F.avg_pool1d},
             4: {"max": F.max_pool2d, "average": F.avg_pool2d},
             5: {"max": F.max_pool3d, "average": F.avg_pool3d}}

    def same_pool(functions, value, x):
        """A pooling of channels-first x, "valid" or, with padding in `value`, "same" as
        TensorFlow's: a max over the window's entries (padded by −∞), a mean over its
        entries in the image (the padded window's sum over its count of real entries)."""
        kind, size, strides = value[:3]
        pool = functools.partial(functions[kind], kernel_size=size, stride=strides)
        if len(value) == 3:
            return pool(x)
        pads = [side for before_after in reversed(value[3]) for side in before_after]
        if kind == "max":
            return pool(F.pad(x, pads, value=float("-inf")))
        return pool(F.pad(x, pads)) / pool(F.pad(torch.ones_like(x[:1, :1]), pads))
    merges = {"add": lambda ts: functools.reduce(torch.add, ts),
              "subtract": lambda ts: ts[0] - ts[1],
              "multiply": lambda ts: functools.reduce(torch.mul, ts),
              "average": lambda ts: functools.reduce(torch.add, ts) / len(ts),
              "maximum": lambda ts: functools.reduce(torch.maximum, ts),
              "minimum": lambda ts: functools.reduce(torch.minimum, ts)}

    arithmetic = {"add": lambda a, b: a + b, "subtract": lambda a, b: a - b,
                  "multiply": lambda a, b: a * b, "divide": lambda a, b: a / b}

    def channel_values(values, x):
        """A tensor of Keras's last-axis values (one: a scalar) to broadcast against x
        (images and volumes: the channel axis)."""
        tensor = torch.tensor(values, dtype=x.dtype)
        return tensor.reshape(()) if tensor.numel() == 1 else along_channels(tensor, x)

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = modules

        def forward(self, x):
            values = {0: x}
            for kind, value, inputs, out in steps:
                args = [values[i] for i in inputs]
                x = args[0]
                if kind == "module":
                    x = activations.get(value, lambda t: t)(self.layers[value](*args))
                elif kind == "causal_attention":
                    x = self.layers[value](*args, causal=True)
                elif kind == "activation":
                    x = functions[value](x)
                elif kind == "leaky_relu":
                    x = F.leaky_relu(x, value)
                elif kind == "elu":  # the ELU layer's alpha
                    x = F.elu(x, value)
                elif kind == "clamp":  # ReLU(max_value), e.g. ReLU6 as torch's nn.ReLU6
                    x = torch.clamp(x, 0.0, value)
                elif kind == "rescale":  # Keras: x * scale + offset, per last-axis entry
                    x = x * channel_values(value[0], x) + channel_values(value[1], x)
                elif kind == "normalize":  # Keras: (x − mean) / max(√variance, ε)
                    x = (x - channel_values(value[0], x)) / channel_values(value[1], x)
                elif kind == "pool" and x.ndim == 3:  # sequences (batch, length, features)
                    x = same_pool(pools[3], value, x.transpose(1, 2)).transpose(1, 2)
                elif kind == "pool":
                    x = same_pool(pools[x.ndim], value, x)
                elif kind == "global":  # images, volumes channels first; sequences (batch,
                    # length, features)
                    dims = (tuple(range(2, x.ndim)) if x.ndim in CHANNELS_FIRST_RANKS
                            else (1,))
                    reduce = torch.amax if value[0] == "max" else torch.mean
                    x = reduce(x, dim=dims, keepdim=value[1])
                elif kind == "pad":
                    x = F.pad(x, value)
                elif kind == "crop":  # (before, after) per spatial axis, in order
                    x = x[(slice(None), slice(None)) + tuple(
                        slice(before, size - after) for before, after, size
                        in zip(value[::2], value[1::2], x.shape[2:]))]
                elif kind == "upsample":  # nearest: Keras's repeated pixels; bilinear:
                    # TensorFlow's half-pixel centres, torch's align_corners=False
                    x = F.interpolate(x, scale_factor=value[0], mode=value[1],
                                      **({"align_corners": False} if value[1] == "bilinear"
                                         else {}))
                elif kind == "concatenate":
                    x = torch.cat(args, dim=value)
                elif kind == "scaled_add":  # InceptionResNetV2's residual a + b·scale
                    x = args[0] + args[1] * value
                elif kind == "scalar":  # a keras.ops call of a tensor and a number
                    name, number, tensor_first = value
                    x = arithmetic[name](*((x, number) if tensor_first else (number, x)))
                elif kind in merges:
                    x = merges[kind](args)
                elif kind in ("reshape", "permute"):  # on Keras's layout, images NHWC
                    x = keras_layout(x)
                    x = (x.reshape(x.shape[0], *value) if kind == "reshape"
                         else x.permute(0, *value))
                    # back to channels first
                    x = x.movedim(-1, 1) if x.ndim in CHANNELS_FIRST_RANKS else x
                else:  # flatten; Keras flattens channels-last images: H, W, C
                    x = keras_layout(x).flatten(1)
                values[out] = x
            return values[output]

    twin = Twin()
    num_params = sum(p.numel() for p in twin.parameters() if p.requires_grad)
    return twin, num_params


def keras_layout(x):
    """A twin's torch tensor in Keras's layout: images NCHW → NHWC, volumes NCDHW →
    NDHWC, other ranks as they are."""
    return x.movedim(1, -1) if x.ndim in CHANNELS_FIRST_RANKS else x


def to_torch_inputs(x: np.ndarray) -> np.ndarray:
    """Images NHWC → NCHW, volumes NDHWC → NCDHW; integer inputs (an Embedding's tokens)
    as torch's int64."""
    if np.issubdtype(x.dtype, np.integer):
        return x.astype(np.int64)
    return channels_first(x)


def channels_first(array: np.ndarray) -> np.ndarray:
    """Keras's images and volumes (channels last) in the twin's layout; other ranks as
    they are."""
    if array.ndim not in CHANNELS_FIRST_RANKS:
        return array
    return np.ascontiguousarray(np.moveaxis(array, -1, 1))


def torch_criterion(workload: Workload):
    """The mean loss over every example (and position) as Keras's: torch's
    CrossEntropyLoss takes classes on axis 1, where the twin's images have them (NCHW)
    but its sequences (batch, length, classes) do not."""
    import torch

    if workload.binary:
        return torch.nn.BCEWithLogitsLoss()
    if workload.regression:
        return torch.nn.MSELoss()

    class CrossEntropy(torch.nn.CrossEntropyLoss):
        def forward(self, logits, targets):
            return super().forward(logits.transpose(1, 2) if logits.ndim == 3 else logits,
                                   targets)

    return CrossEntropy()


def torch_targets(workload: Workload):
    """Class indices (int64); for one logit 0/1 labels as float [N, 1]; a regression's
    targets as the twin's outputs (images' NCHW, volumes' NCDHW)."""
    import torch

    if workload.binary:
        return torch.from_numpy(workload.y.astype(np.float32).reshape(-1, 1))
    if workload.regression:
        return torch.from_numpy(np.ascontiguousarray(channels_first(workload.y)))
    return torch.from_numpy(workload.y).long()


def check_twin(workload: Workload, twin, num_params: int) -> tuple[bool, str]:
    """Logits of both models on the whole data (inference BN) and their mean losses."""
    import keras
    import torch

    keras_params = int(sum(np.prod(v.shape) for v in workload.keras_model.trainable_variables))
    keras_logits = workload.keras_model.predict(workload.x, batch_size=workload.batch_size, verbose=0)
    keras_criterion = (keras.losses.BinaryCrossentropy(from_logits=True) if workload.binary
                       else keras.losses.MeanSquaredError() if workload.regression
                       else keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    keras_loss = float(keras_criterion(workload.y.reshape(len(workload.y), -1) if workload.binary
                                       else workload.y, keras_logits))
    twin.eval()
    inputs = torch.from_numpy(to_torch_inputs(workload.x))
    try:
        with torch.no_grad():
            torch_logits = torch.cat([twin(batch) for batch in torch.split(inputs, workload.batch_size)])
            torch_loss = float(torch_criterion(workload)(torch_logits, torch_targets(workload)))
    except RuntimeError as error:  # a twin that does not compute (shapes, dtypes)
        return False, f"twin check: the twin's forward failed ({first_line(error, 300)}): FAILED"
    # Images' (volumes') logits per pixel (voxel): channels first → Keras's channels last.
    torch_logits = keras_layout(torch_logits).numpy()
    logit_error = float(np.max(np.abs(torch_logits - keras_logits)) / np.max(np.abs(keras_logits)))
    loss_error = abs(torch_loss - keras_loss) / max(abs(keras_loss), np.finfo(np.float32).tiny)
    ok = keras_params == num_params and logit_error <= TWIN_RTOL and loss_error <= TWIN_RTOL
    message = (
        f"twin check: params {keras_params:,} (Keras) vs {num_params:,} (torch); "
        f"max|Δlogit|/max|logit| = {logit_error:.1e}; mean loss {keras_loss:.6f} vs {torch_loss:.6f} "
        f"(rel {loss_error:.1e}); tolerance {TWIN_RTOL:g}: {'OK' if ok else 'FAILED'}"
    )
    return ok, message


# ------------------------------------------------------------------------------ the two sides


@dataclass
class Side:
    seconds_per_step: float
    wall: float
    lambda_max: float
    lambda_min: float
    other_load: Optional[float]  # mean cores busy with other processes while timed
    note: str = ""


# The checkout this script belongs to: its hessian_tf is the one timed, whatever
# version the interpreter has installed.
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spectrum_command() -> list[str]:
    """`hessian-spectrum`, as `python -m` (the same main) on this checkout's package."""
    return [sys.executable, "-m", "hessian_tf.bin.spectrum"]


def spectrum_environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [CHECKOUT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def run_ours(workload: Workload, directory: str, threads: int, extra_flags: list[str]) -> tuple[Side, int]:
    model_path = os.path.join(directory, f"{workload.name}.keras")
    data_path = os.path.join(directory, f"{workload.name}.npz")
    output_dir = os.path.join(directory, f"{workload.name}-spectrum")
    workload.keras_model.save(model_path)
    np.savez(data_path, x=workload.x, y=workload.y)
    command = spectrum_command() + [
        f"--model={model_path}", f"--dataset=npz:{data_path}", f"--batch_size={workload.batch_size}",
        f"--lanczos_steps={workload.lanczos_steps}", "--num_draws=1", "--bn_mode=inference",
        f"--output_dir={output_dir}",
        *([f"--loss={workload.loss}"] if workload.loss != LOSSES[0] else []), *extra_flags,
    ]
    env = spectrum_environment()
    if threads != usable_cores():
        env["TF_NUM_INTRAOP_THREADS"] = str(threads)
        env["OMP_NUM_THREADS"] = str(threads)
    print(f"  ours: {shlex.join(command)}", flush=True)
    log_path = os.path.join(directory, f"{workload.name}-spectrum.log")
    with open(log_path, "w", encoding="utf-8") as log:
        meter = OtherLoad().start()
        started = time.perf_counter()
        status = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        wall = time.perf_counter() - started
        other_load = meter.stop()
    if status != 0:
        with open(log_path, encoding="utf-8", errors="replace") as log:
            lines = [line.strip() for line in log if line.strip()]
        last = lines[-1] if lines else "(no output)"
        raise Failure(f"hessian-spectrum exited with status {status} on {workload.name}: {last} "
                      f"(log: {log_path})")
    with open(os.path.join(output_dir, "summary.json"), encoding="utf-8") as file:
        summary = json.load(file)
    per_step = summary.get("seconds_per_step")
    if isinstance(per_step, (int, float)) and math.isfinite(per_step):
        note = "seconds_per_step"
    else:
        per_step = float(summary["lanczos_seconds"]) / int(summary["lanczos_steps_completed"][0])
        note = "lanczos_seconds/steps"
    note += f"; {summary['method'].replace('_', ' ')} products"
    if summary.get("method_seconds"):
        note += " (--method=auto, timed)"
    pools = summary.get("cpu_threads")  # as the job ran (0: TensorFlow's choice)
    if pools:
        note += (f"; TensorFlow threads intra-op {pools['intra_op'] or 'default'}, "
                 f"inter-op {pools['inter_op'] or 'default'}")
    side = Side(per_step, wall, float(summary["lambda_max"]), float(summary["lambda_min"]),
                other_load, note)
    return side, int(summary["num_params"])


def run_pyhessian(workload: Workload, import_seconds: float, seed: int = 0):
    """Builds the twin, checks it, runs PyHessian's density. Returns (Side or None, check
    message, number of parameters, first-step seconds, seconds per step after the first,
    share of those steps spent in products)."""
    import torch
    from pyhessian import hessian

    started = time.perf_counter()
    twin, num_params = torch_twin(workload.keras_model)
    setup = time.perf_counter() - started
    ok, message = check_twin(workload, twin, num_params)
    if not ok:
        return None, message, num_params, 0.0, 0.0, 0.0

    started = time.perf_counter()
    dataset = torch.utils.data.TensorDataset(
        torch.from_numpy(to_torch_inputs(workload.x)), torch_targets(workload)
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=workload.batch_size, shuffle=False)
    computer = hessian(twin, torch_criterion(workload), dataloader=loader, cuda=False)
    # Time stamps of the products: the first Lanczos step apart, and the products' share.
    product_ends: list[float] = []
    product_seconds: list[float] = []
    product = computer.dataloader_hv_product

    def timed_product(v):
        start = time.perf_counter()
        result = product(v)
        product_ends.append(time.perf_counter())
        product_seconds.append(product_ends[-1] - start)
        return result

    computer.dataloader_hv_product = timed_product
    torch.manual_seed(seed)
    setup += time.perf_counter() - started
    meter = OtherLoad().start()
    started = time.perf_counter()
    eigenvalues, weights = computer.density(iter=workload.lanczos_steps, n_v=1)
    finished = time.perf_counter()
    other_load = meter.stop()
    density_seconds = finished - started
    nodes = np.asarray(eigenvalues[0], dtype=np.float64)
    weight_sum = float(np.sum(np.asarray(weights[0], dtype=np.float64)))
    if abs(weight_sum - 1.0) > 1e-3:  # the squared first row of T's eigenvector matrix
        raise Failure(f"{workload.name}: PyHessian's quadrature weights sum to {weight_sum:.6f}, "
                      "not 1: the torch.eig shim does not give what PyHessian expects.")
    first_step = product_ends[0] - started
    after_first = (finished - product_ends[0]) / max(1, workload.lanczos_steps - 1)
    product_share = sum(product_seconds[1:]) / max(finished - product_ends[0], 1e-12)
    side = Side(density_seconds / workload.lanczos_steps, import_seconds + setup + density_seconds,
                float(nodes.max()), float(nodes.min()), other_load)
    return side, message, num_params, first_step, after_first, product_share


# ------------------------------------------------------------------------------ report


HEADER = (
    "workload", "params", "examples", "batch", "m", "ours s/step", "PyHessian s/step",
    "ours/PyHessian", "PyH 1st step s", "PyH s/step after 1st", "PyH HVP share", "ours wall s",
    "PyH wall s",
    "λmax ours", "λmax PyH", "λmax rel diff", "λmin ours", "λmin PyH", "others' cores ours/PyH",
)


def format_load(load: Optional[float]) -> str:
    return "?" if load is None else f"{load:.2f}"


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def print_tables(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in [list(HEADER), *rows]) for i in range(len(HEADER))]
    for row in [list(HEADER), *rows]:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
    print()
    print("| " + " | ".join(HEADER) + " |")
    print("|---|" + "--:|" * (len(HEADER) - 1))
    for row in rows:
        print("| " + " | ".join(row) + " |")


# hessian-spectrum's flags that set what the two sides must share.
SHARED_FLAGS = frozenset((
    "model", "dataset", "split", "data_dir", "stream", "preprocessing", "batch_size",
    "lanczos_steps", "num_draws", "bn_mode", "loss", "operator", "variables",
    "regularization", "precision", "output_dir", "config", "flagfile"))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = OneLineParser(
        prog="pyhessian_compare.py",
        description="Time hessian-spectrum against PyHessian 0.1 on the same Hessian (see the docstring).",
    )
    parser.add_argument("--workload", default=None,
                        help=f"comma-separated of {', '.join(WORKLOADS)}, or all (default: "
                        f"{','.join(DEFAULT_WORKLOADS)})")
    parser.add_argument("--model", default=None,
                        help="instead of --workload: your own network, a .keras file (one input, "
                        "one output; skip connections allowed) of Conv1D, Conv2D (also depthwise, "
                        "separable, transposed), Conv3D, Dense, BN, Layer/GroupNormalization, "
                        "MultiHeadAttention, LSTM, GRU, SimpleRNN, Bidirectional, activations, pooling, padding, "
                        "cropping, upsampling (of images and volumes too), Flatten, Reshape, Permute, Dropout, merges and "
                        "Concatenate; needs --data")
    parser.add_argument("--data", default=None,
                        help="with --model: an .npz with arrays x (inputs) and y (integer labels; "
                        "real targets with --loss=mean_squared_error)")
    parser.add_argument("--loss", default="auto", choices=LOSS_CHOICES,
                        help="with --model: auto, the cross-entropy of class logits (binary for "
                        "a model of one logit, with 0/1 labels); mean_squared_error, a "
                        "regression's (y real, shaped as the outputs)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="with --model: batch size of both sides (default: 128)")
    parser.add_argument("--lanczos_steps", type=int, default=None,
                        help="m for every workload (default: " +
                        ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()) + ")")
    parser.add_argument("--threads", type=int, default=usable_cores(),
                        help="torch.set_num_threads (default: usable cores, %(default)s); other values "
                        "also set TF_NUM_INTRAOP_THREADS and OMP_NUM_THREADS for hessian-spectrum")
    parser.add_argument("--no_install", action="store_true",
                        help="fail instead of pip-installing torch/pyhessian")
    parser.add_argument("--keep_dir", action="store_true",
                        help="keep the temporary directory (models, data, outputs)")
    parser.add_argument("--our_flags", default="",
                        help="extra flags for hessian-spectrum, e.g. --our_flags=--checkpoint_every=0 "
                             "(not those that set what both sides share: --bn_mode, --operator, "
                             "--variables, --precision, --regularization, the data and steps)")
    args = parser.parse_args(argv)
    if args.model is not None or args.data is not None:
        if args.model is None or args.data is None:
            parser.error("--model and --data go together: pass both (a .keras file and an .npz)")
        if args.workload is not None:
            parser.error(f"--workload={args.workload} with --model: pass one or the other")
        if args.batch_size is None:
            args.batch_size = 128
        if args.batch_size < 1:
            parser.error(f"--batch_size={args.batch_size}: pass at least 1")
        names = ()
    else:
        if args.batch_size is not None:
            parser.error(f"--batch_size={args.batch_size} goes with --model; the workloads "
                         "have their own batch sizes")
        if args.loss != "auto":
            parser.error(f"--loss={args.loss} goes with --model; the workloads have their own "
                         "losses")
        workload = args.workload or ",".join(DEFAULT_WORKLOADS)
        names = (WORKLOADS if workload == "all"
                 else tuple(n.strip() for n in workload.split(",") if n.strip()))
        unknown = [n for n in names if n not in WORKLOADS]
        if unknown or not names:
            parser.error(f"--workload={workload}: unknown {unknown or '(empty)'}; "
                         f"use {', '.join(WORKLOADS)} or all")
    args.workloads = names
    if args.lanczos_steps is not None and args.lanczos_steps < 2:
        parser.error(f"--lanczos_steps={args.lanczos_steps}: pass at least 2")
    if args.threads < 1:
        parser.error(f"--threads={args.threads}: pass at least 1")
    try:
        args.extra_flags = shlex.split(args.our_flags)
    except ValueError as error:
        parser.error(f"--our_flags={args.our_flags!r}: {error}")
    for flag in args.extra_flags:
        name = flag.lstrip("-").split("=")[0]
        if name.startswith("no") and name[2:] in SHARED_FLAGS:
            name = name[2:]
        if flag.startswith("-") and name in SHARED_FLAGS:  # absl takes -flag too
            # Added after the script's own, it would win on our side alone: another
            # Hessian (or data, or arithmetic) than PyHessian's, timed as the same.
            parser.error(f"--our_flags: {flag} sets what both sides share (the network, the "
                         "data and its batches, the steps, the operator and its arithmetic), "
                         "which the script sets for both; drop it (--model, --data, "
                         "--batch_size, --loss and --lanczos_steps are the script's own)")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # A timeout's or a scheduler's SIGTERM ends the script through its `finally`s, which
    # remove its temporary directory (it was left behind).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    print(f"Start: {load_average()}", flush=True)
    sys.path.insert(0, CHECKOUT)  # this checkout's hessian_tf, here and in the subprocess
    print(f"Timing the hessian_tf of {CHECKOUT} (python -m hessian_tf.bin.spectrum, the "
          "main of hessian-spectrum)", flush=True)
    meter = OtherLoad().start()
    time.sleep(1.0)
    busy = meter.stop()
    if busy is not None and busy > 0.5:
        print(f"WARNING: other processes are using {busy:.1f} cores; PyTorch's OpenMP threads "
              "are very sensitive to that (see benchmarks/PYHESSIAN.md). Rerun on a quiet "
              "machine.")
    # TensorFlow's start-up chatter (a CUDA "error" on machines without a GPU, among
    # others) hidden, as the binary hides it.
    from hessian_tf.bin import import_tensorflow_quietly

    import_tensorflow_quietly()
    # A user's own files are checked before anything is installed or timed.
    own = (workload_from_files(args.model, args.data, args.batch_size, args.lanczos_steps,
                               args.loss) if args.model else None)
    ensure_peer(args.no_install)

    import_seconds = import_peer()  # counted in PyHessian's wall time
    import torch

    warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
    print(shim_torch_eig())
    torch.set_num_threads(args.threads)

    import keras
    import tensorflow as tf
    from importlib.metadata import version

    cores = usable_cores()
    tf_threads = ("as the binary sets them (intra-op 0: automatic, one thread per op on a "
                  "CPU-only host of at most 2 cores; the `ours:` lines say what it ran with)"
                  if args.threads == cores
                  else f"TF_NUM_INTRAOP_THREADS={args.threads}, OMP_NUM_THREADS={args.threads}")
    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, torch {torch.__version__}, "
        f"PyHessian {version('pyhessian')}, NumPy {np.__version__}, Python {platform.python_version()}; "
        f"{cpu_name()}, {cores} usable cores"
    )
    print(f"Threads: torch intra-op {torch.get_num_threads()} (set), "
          f"inter-op {torch.get_num_interop_threads()}; "
          f"hessian-spectrum TensorFlow {tf_threads}; "
          f"OMP_NUM_THREADS in the environment: {os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"torch + pyhessian import: {import_seconds:.2f} s (added to each PyHessian wall time)",
          flush=True)

    directory = tempfile.mkdtemp(prefix="pyhessian_compare_")
    rows, twin_failures, keep = [], [], args.keep_dir
    try:
        # Built one at a time, as they are measured.
        workloads = ((own,) if own is not None else
                     (build_workload(name, args.lanczos_steps) for name in args.workloads))
        for workload in workloads:
            name = workload.name
            print(f"{name}: {len(workload.x)} examples, batch {workload.batch_size}, "
                  f"m = {workload.lanczos_steps}", flush=True)
            theirs, message, num_params, first_step, after_first, product_share = run_pyhessian(
                workload, import_seconds)
            print(f"  {message}", flush=True)
            if theirs is None:
                twin_failures.append(name)
                continue
            print(f"  PyHessian: density {theirs.seconds_per_step * workload.lanczos_steps:.2f} s, "
                  f"first step {first_step:.3f} s, λmax {theirs.lambda_max:.6g}; other processes "
                  f"used {format_load(theirs.other_load)} cores meanwhile", flush=True)
            ours, our_params = run_ours(workload, directory, args.threads, args.extra_flags)
            if our_params != num_params:
                raise Failure(f"{name}: hessian-spectrum has {our_params:,} parameters, "
                              f"the twin {num_params:,}.")
            print(f"  ours: {ours.seconds_per_step:.4g} s/step ({ours.note}), wall {ours.wall:.2f} s, "
                  f"λmax {ours.lambda_max:.6g}; other processes used {format_load(ours.other_load)} "
                  "cores meanwhile", flush=True)
            gap = relative_difference(ours.lambda_max, theirs.lambda_max)
            if gap > LAMBDA_MAX_WARN:
                print(f"  WARNING: λmax differs by {gap:.1e} (relative); m = "
                      f"{workload.lanczos_steps} may be too few steps for the extreme Ritz values of "
                      "different start vectors to converge.")
            busy = any(load is not None and load > BUSY_CORES
                       for load in (ours.other_load, theirs.other_load))
            if busy:
                print(f"  WARNING: other processes used more than {BUSY_CORES} cores while a "
                      "side was timed; this ratio is marked ‡: rerun on a quiet machine.")
            rows.append([
                name, f"{num_params:,}", f"{len(workload.x):,}", str(workload.batch_size),
                str(workload.lanczos_steps),
                f"{ours.seconds_per_step:.4g}" + ("" if ours.note.startswith("seconds_per_step") else "†"),
                f"{theirs.seconds_per_step:.4g}",
                f"{ours.seconds_per_step / theirs.seconds_per_step:.2f}" + ("‡" if busy else ""),
                f"{first_step:.3g}", f"{after_first:.4g}", f"{100 * product_share:.0f}%",
                f"{ours.wall:.1f}", f"{theirs.wall:.1f}",
                f"{ours.lambda_max:.6g}", f"{theirs.lambda_max:.6g}", f"{gap:.1e}",
                f"{ours.lambda_min:.4g}", f"{theirs.lambda_min:.4g}",
                f"{format_load(ours.other_load)}/{format_load(theirs.other_load)}",
            ])
    except Failure:
        keep = True
        raise
    finally:
        if keep:
            print(f"Kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    print()
    if rows:
        print_tables(rows)
        if any("†" in row[5] for row in rows):
            print("† summary.json has no seconds_per_step: lanczos_seconds / steps, which "
                  "includes the first product's tracing and the determinism check's extra product.")
        if any("‡" in row[7] for row in rows):
            print(f"‡ other processes used more than {BUSY_CORES} cores while one side was "
                  "timed (the last column): not a ratio to quote.")
    print(f"End: {load_average()}")
    if twin_failures:
        print(f"error: twin check failed for {', '.join(twin_failures)}; no timing for them.",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except Failure as failure:
        print(f"error: {failure}", file=sys.stderr)
        sys.exit(failure.status)
