"""Grouped convolutions computed without XLA.

Keras's TensorFlow backend computes every grouped convolution (`Conv1D`/`2D`/`3D` with
`groups` > 1) in a function compiled by XLA (`jit_compile=True`), since TensorFlow's
convolution kernels have no groups. ConvNeXt (`keras.applications.ConvNeXt*`) writes its
7×7 depthwise convolutions that way, as `Conv2D(channels, 7, groups=channels)`, and
ResNeXt- and RegNet-style blocks group 3×3 convolutions. XLA's CPU code for them and
their derivatives is slow, and its second derivatives slower still. A full-data product
of 128 of the digits at 32×32 (`benchmarks/grouped_conv.py`, one run, 2 CPU cores) took
150 against 2,224 ms by reverse over reverse on a ConvNeXt-shaped network
(`example_networks.py`'s `convnext_blocks`) and 96 against 7,575 ms on a ResNeXt-shaped
one (`resnext_blocks`, 8 channels per group); on `keras.applications.ConvNeXtTiny` at
32×32, one batch of 128, a product took 1.7 against 16.0 s (ad hoc).

On a host whose devices are all CPUs, `grouped_convolutions()`, entered around the
traces of products and gradients (the Keras model function's mode context) and of the
functions `export_for_spectrum` saves, replaces Keras's backend `conv` for grouped
convolutions only (GPUs and TPUs keep Keras's path: not measured there):

- one input channel per group (depthwise, `filters / channels` outputs per channel),
  1-D or 2-D: Keras's own `depthwise_conv` (`tf.nn.depthwise_conv2d`), the kernel
  reshaped from [*window, 1, filters] to [*window, channels, filters / channels]
  (output channel c·m + k reads input channel c in both);
- otherwise: the inputs and the kernel's outputs split into the groups, one
  convolution each, the results concatenated (channels last; channels-first inputs
  are transposed around it).

The values are the grouped convolution's (tests/operators/test_grouped_conv.py), and so
are the derivatives: only TensorFlow's ordinary convolution ops are differentiated.
"""

from __future__ import annotations

import tensorflow as tf
from keras.src import backend as keras_backend
from keras.src.backend.tensorflow import nn as keras_tensorflow_nn

from hessian_tf.operators.shared_patch import SharedPatch

if not all(hasattr(keras_tensorflow_nn, name) for name in ("conv", "depthwise_conv")):
    raise ImportError(
        "hessian_tf: this Keras has no keras.src.backend.tensorflow.nn.conv or "
        "depthwise_conv, through which hessian_tf computes grouped convolutions without "
        "XLA (hessian_tf/operators/grouped_conv.py); install the Keras that TensorFlow "
        "2.21 installs (3.15), or update grouped_conv.py and its tests."
    )

_keras_conv = keras_tensorflow_nn.conv


def _as_tuple(value):
    """Keras's depthwise_conv joins tuples; layers pass lists."""
    return value if isinstance(value, int) or value is None else tuple(value)


def groups_of(inputs, kernel, data_format=None):
    """The number of groups of a convolution of `inputs` by `kernel` [*window,
    channels / groups, filters], when it is static and more than one; else None."""
    data_format = keras_backend.standardize_data_format(data_format)
    channels = inputs.shape[-1 if data_format == "channels_last" else 1]
    per_group, filters = kernel.shape[-2], kernel.shape[-1]
    if (channels is None or per_group is None or filters is None or per_group >= channels
            or channels % per_group):
        return None
    groups = channels // per_group
    return groups if filters % groups == 0 else None


def _cpu_only() -> bool:
    """Whether TensorFlow sees only CPU devices (no GPU, no TPU), where the replacement
    was measured."""
    return all(device.device_type == "CPU" for device in tf.config.list_logical_devices())


def conv(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
    """Keras's backend `conv` (same arguments, same values); grouped convolutions without
    XLA on a CPU-only host."""
    inputs, kernel = tf.convert_to_tensor(inputs), tf.convert_to_tensor(kernel)
    groups = groups_of(inputs, kernel, data_format)
    rank = len(inputs.shape)
    if groups is None or padding.lower() not in ("valid", "same") or not _cpu_only():
        return _keras_conv(inputs, kernel, strides, padding, data_format, dilation_rate)
    if kernel.shape[-2] == 1 and rank in (3, 4):  # depthwise
        channels, filters = groups, kernel.shape[-1]
        depthwise = tf.reshape(kernel, tuple(kernel.shape[:-2]) + (channels, filters // channels))
        return keras_tensorflow_nn.depthwise_conv(
            inputs, depthwise, _as_tuple(strides), padding, data_format,
            _as_tuple(dilation_rate))
    channels_first = keras_backend.standardize_data_format(data_format) == "channels_first"
    if channels_first:
        inputs = tf.transpose(inputs, [0, *range(2, rank), 1])
    outputs = tf.concat([
        tf.nn.convolution(part, part_kernel, strides, padding.upper(), dilations=dilation_rate)
        for part, part_kernel in zip(tf.split(inputs, groups, axis=-1),
                                     tf.split(kernel, groups, axis=-1))], axis=-1)
    if channels_first:
        outputs = tf.transpose(outputs, [0, rank - 1, *range(1, rank - 1)])
    return outputs


def _install() -> None:
    keras_tensorflow_nn.conv = conv


def _remove() -> None:
    keras_tensorflow_nn.conv = _keras_conv


_patch = SharedPatch(_install, _remove)


def grouped_convolutions():
    """Within: Keras's grouped convolutions run without XLA (as depthwise or split
    convolutions). Entries may nest and overlap (in threads), as
    moments.exact_moments'."""
    return _patch()
