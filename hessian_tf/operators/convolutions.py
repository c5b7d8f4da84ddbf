"""Convolutions computed by other TensorFlow ops on CPU-only hosts: grouped ones
without XLA, pointwise ones as matrix products, dilated ones by TensorFlow's dilated
kernel.

**Grouped convolutions.** Keras's TensorFlow backend computes every grouped convolution
(`Conv1D`/`2D`/`3D` with `groups` > 1) in a function compiled by XLA
(`jit_compile=True`), since TensorFlow's convolution kernels have no groups. ConvNeXt
(`keras.applications.ConvNeXt*`) writes its 7×7 depthwise convolutions that way, as
`Conv2D(channels, 7, groups=channels)`, and ResNeXt- and RegNet-style blocks group
3×3 convolutions. XLA's CPU code for them and their derivatives is slow, and its second
derivatives slower still. A full-data product of 128 of the digits at 32×32
(`benchmarks/grouped_conv.py`, one run, 2 CPU cores) took 150 against 2,224 ms by
reverse over reverse on a ConvNeXt-shaped network (`example_networks.py`'s
`convnext_blocks`) and 96 against 7,575 ms on a ResNeXt-shaped one (`resnext_blocks`, 8
channels per group); on `keras.applications.ConvNeXtTiny` at 32×32, one batch of 128,
a product took 1.7 against 16.0 s (ad hoc). Within `grouped_convolutions()`:

- one input channel per group (depthwise, `filters / channels` outputs per channel),
  1-D or 2-D: Keras's own `depthwise_conv` (`tf.nn.depthwise_conv2d`), the kernel
  reshaped from [*window, 1, filters] to [*window, channels, filters / channels]
  (output channel c·m + k reads input channel c in both);
- otherwise: the inputs and the kernel's outputs split into the groups, one
  convolution each, the results concatenated (channels last; channels-first inputs
  are transposed around it). Of the formulations by ordinary ops timed with many
  groups (`benchmarks/grouped_conv_formulations.py`: up to 46 groups), the split was
  the fastest.

**Pointwise convolutions and small maps.** TensorFlow's CPU convolutions (oneDNN) are
slower than its matrix products on a convolution that is one: computed as a matrix
product, a Hessian-vector product through a 1×1 convolution took 0.37 of the
convolution's time on 1×1 maps, 0.85–0.93 on 2×2 to 16×16 maps and as much (1.03) on
32×32 (ad hoc, one thread, batch 128, reverse over reverse); 0.82–1.02 on ImageNet
networks' 14×14 to 112×112 maps (batch 32). With strides, the subsampling's derivatives
cost more than that saves (1.2–2.1 times the convolution's time, ad hoc), so strided
1×1 convolutions with more than one output position keep TensorFlow's. Within
`pointwise_convolutions()`:

- a convolution of channels-last float32 or float64 inputs by a 1×1 window without
  strides is that matrix product at each position (`pointwise_matrix`);
- a convolution each of whose output positions reads every input position read (a
  3×3 window over a 1×1 or 2×2 map, any window with one output position: ImageNet
  networks at 32×32 end on such maps) is one matrix product of the inputs read,
  flattened, by a matrix whose blocks are taps of the kernel (`small_map_matrix`).
  Positions that only a zero padding fills are left out: "same" padding, and a
  `ZeroPadding*D` (or any `tf.pad` with zeros) traced just before a "valid"
  convolution, as ResNet-V2 pads. Through one 3×3 convolution of 128 inputs (ad hoc,
  one thread, reverse over reverse), a product took 0.08 of the convolution's time on a
  zero-padded 1×1 map of 512 channels, 0.42 on a zero-padded 2×2 map of 256 and 0.62
  with "same" padding there; on 3×3 maps, where the corners do not read each other and
  the matrix is 81/49 the convolution's multiplications, 1.55: such convolutions keep
  TensorFlow's.

Full-data products took 0.53–0.57 of the time on ResNet50-V2 at 32×32 (two runs),
0.86–0.91 on DenseNet121 and MobileNetV2 (`benchmarks/pointwise_conv.py`).

**Dilated convolutions.** tf.nn.convolution (Keras's backend `conv`) dilates a
convolution on the CPU by SpaceToBatchND, the convolution and BatchToSpaceND, whose
derivatives are ops of their own, because TensorFlow's Eigen kernels refuse dilations.
Its oneDNN kernels (x86 builds, TF_ENABLE_ONEDNN_OPTS on) run them, backprops and second
derivatives included. Within `dilated_convolutions()`, where a probe run once per
process finds them running (`_native_dilations_run`), a 2-D convolution of
channels-last float32 inputs with dilations and without strides is TensorFlow's Conv2D
with its `dilations` (`dilated_native`). A new user's context-module CNN (four
`Conv2D(32, 3)` of dilation 1, 2, 4, 8 on 32×32 digits, BN, batch 128; one run each,
`benchmarks/one_batch.py`): one batch's product 0.334 s against 0.470 s, its gradient
0.169-0.196 s against 0.253 s (PyTorch's: 0.156 s); a full-data product 0.727 of the
time (`benchmarks/pointwise_conv.py`). Dilated 1-D convolutions keep Keras's path: as
2-D ones of height 1 a temporal convolutional network's product took 0.983 of the time.

All three are entered around the traces of products and gradients (the Keras model
function's mode context), the first two also around the functions
`export_for_spectrum` saves (which may run where TensorFlow's dilated kernels do not),
and replace Keras's backend `conv` only on a host whose devices are all CPUs (GPUs and
TPUs keep Keras's path: not measured there). The values are the convolutions'
(tests/operators/test_convolutions.py), and so are the derivatives: only TensorFlow's
ordinary convolution, matrix-product, gather, transpose and reshape ops are differentiated
(tests/operators/test_layers.py checks products against central differences).
"""

from __future__ import annotations

import threading

import numpy as np
import tensorflow as tf
from absl import logging
from keras.src import backend as keras_backend
from keras.src.backend.tensorflow import nn as keras_tensorflow_nn

from hessian_tf.messages import first_line
from hessian_tf.operators.shared_patch import SharedPatch

if not all(hasattr(keras_tensorflow_nn, name) for name in ("conv", "depthwise_conv")):
    raise ImportError(
        "hessian_tf: this Keras has no keras.src.backend.tensorflow.nn.conv or "
        "depthwise_conv, through which hessian_tf computes grouped convolutions without "
        "XLA (hessian_tf/operators/convolutions.py); install the Keras that TensorFlow "
        "2.21 installs (3.15), or update convolutions.py and its tests."
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


def cpu_only() -> bool:
    """Whether TensorFlow sees only CPU devices (no GPU, no TPU), where the replacements
    were measured."""
    return all(device.device_type == "CPU" for device in tf.config.list_logical_devices())


def _per_axis(value, rank: int) -> tuple:
    return (value,) * rank if isinstance(value, int) else tuple(value)


def pointwise_matrix(inputs, kernel, strides=1, padding="valid", data_format=None,
                     dilation_rate=1):
    """(inputs, the [channels, filters] matrix) when the convolution of channels-last
    float32 or float64 inputs by `kernel` has a 1×1 window and no strides, so that it
    is a matrix product at each position; else None."""
    del padding, dilation_rate  # neither changes a 1×1 window without strides
    window = _matrix_window(inputs, kernel, data_format)
    if (window is None or any(k != 1 for k in window)
            or any(s != 1 for s in _per_axis(strides, len(window)))):
        # Strided, the subsampling's derivatives cost more than the convolution saves
        # (one output position: small_map_matrix).
        return None
    return inputs, tf.reshape(kernel, kernel.shape[-2:])


def _matrix_window(inputs, kernel, data_format):
    """The kernel's window when a convolution of `inputs` by `kernel` can be written as
    matrix products: channels-last float32 or float64 inputs, a kernel of the same
    dtype and static shape, the inputs' channels its input channels; else None."""
    window = tuple(kernel.shape[:-2])
    if (keras_backend.standardize_data_format(data_format) != "channels_last"
            or inputs.dtype not in (tf.float32, tf.float64) or kernel.dtype != inputs.dtype
            or len(inputs.shape) != len(window) + 2 or None in kernel.shape
            or kernel.shape[-2] != inputs.shape[-1]):
        return None
    return window


def _zero_padded(inputs):
    """(the tensor, its padding before each spatial axis) when `inputs` is traced as a
    zero padding (`tf.pad` with zeros: `ZeroPadding*D`, `keras.ops.pad`) of the spatial
    axes of a tensor of static spatial shape; else (inputs, zeros)."""
    rank = len(inputs.shape) - 2
    unpadded = inputs, (0,) * rank
    try:
        op = inputs.op  # symbolic tensors only
    except AttributeError:
        return unpadded
    if op.type not in ("Pad", "PadV2"):
        return unpadded
    paddings = tf.get_static_value(op.inputs[1])
    if (paddings is None or paddings.shape != (rank + 2, 2) or paddings[0].any()
            or paddings[-1].any() or (paddings < 0).any()):
        return unpadded
    if op.type == "PadV2":
        value = tf.get_static_value(op.inputs[2])
        if value is None or value != 0:
            return unpadded
    source = op.inputs[0]
    if source.shape.rank != rank + 2 or None in source.shape[1:]:
        return unpadded
    return source, tuple(int(before) for before in paddings[1:-1, 0])


def small_map_matrix(inputs, kernel, strides=1, padding="valid", data_format=None,
                     dilation_rate=1):
    """(the inputs read, [batch, positions read · channels], the matrix
    [positions read · channels, output positions · filters] of the convolution, the
    output's spatial shape) when every output position of the convolution of
    channels-last float32 or float64 inputs of static spatial shape reads every input
    position that any reads: a 3×3 window over a 1×1 or 2×2 map (not a 3×3 map, whose
    corners do not read each other), or any window with one output position. The
    matrix's blocks are taps of the kernel; it has as many entries as the convolution
    multiplies without its padding. Input positions read only as a zero padding (`_zero_padded`,
    before a "valid" convolution; "same" padding) are left out. Else None."""
    window = _matrix_window(inputs, kernel, data_format)
    if window is None or None in inputs.shape[1:]:
        return None
    rank = len(window)
    strides, dilations = _per_axis(strides, rank), _per_axis(dilation_rate, rank)
    if any(s != 1 for s in strides) and any(d != 1 for d in dilations):
        return None  # refused by TensorFlow's convolution: keep its error
    sizes = tuple(inputs.shape[1:-1])
    spans = [(k - 1) * d + 1 for k, d in zip(window, dilations)]
    if padding.lower() == "valid":
        if any(n < span for n, span in zip(sizes, spans)):
            return None
        outputs = [(n - span) // s + 1 for n, span, s in zip(sizes, spans, strides)]
        source, before = _zero_padded(inputs)
    elif padding.lower() == "same":  # TensorFlow's rule: the odd one after
        outputs = [-(-n // s) for n, s in zip(sizes, strides)]
        before = [max((o - 1) * s + span - n, 0) // 2
                  for n, o, s, span in zip(sizes, outputs, strides, spans)]
        source = inputs
    else:
        return None
    # tap_of[input position read, output position]: the tap (row-major over the
    # window) through which the output reads the input. Every output reads every
    # position read exactly when it does so along each axis.
    tap_of, read = np.zeros((1, 1), np.int64), np.zeros(1, np.int64)
    for k, d, s, pad, n, o in zip(window, dilations, strides, before, source.shape[1:-1],
                                  outputs):
        if (o - 1) * s >= (k - 1) * d + 1:
            # The first and last outputs' windows are apart: both read the same
            # positions only if neither reads any. (It also keeps n and o small below.)
            return None
        along = np.full((n, o), -1)
        for out in range(o):
            for t in range(k):
                position = out * s + t * d - pad
                if 0 <= position < n:
                    along[position, out] = t
        read_along = np.flatnonzero((along >= 0).any(axis=1))
        along = along[read_along]
        if not len(read_along) or (along < 0).any():
            return None  # some output does not read some input position read
        # Positions and outputs row-major over the axes so far, then this one.
        tap_of = (tap_of[:, np.newaxis, :, np.newaxis] * k
                  + along[np.newaxis, :, np.newaxis]).reshape(len(read) * len(read_along), -1)
        read = (read[:, np.newaxis] * n + read_along).reshape(-1)
    channels, filters = kernel.shape[-2:]
    flat_kernel = tf.reshape(kernel, (int(np.prod(window)), channels, filters))
    matrix = tf.reshape(tf.transpose(tf.gather(flat_kernel, tap_of), [0, 2, 1, 3]),
                        (len(read) * channels, tap_of.shape[1] * filters))
    flat = tf.reshape(source, (-1, int(np.prod(source.shape[1:-1])), channels))
    if len(read) < flat.shape[1]:
        flat = tf.gather(flat, read, axis=1)
    return tf.reshape(flat, (-1, len(read) * channels)), matrix, tuple(outputs)


def _native_dilations_run() -> bool:
    """Whether TensorFlow's own Conv2D kernel, its two backprops and their derivatives
    run with dilations here, and give tf.nn.convolution's second derivatives (probed
    once per process, in a graph as products run): the oneDNN kernels do; the Eigen
    kernels (TF_ENABLE_ONEDNN_OPTS=0, CPUs oneDNN does not build for) refuse dilations,
    which is why tf.nn.convolution dilates through space-to-batch. (TensorFlow's
    DepthwiseConv2dNative runs dilations too, but its second derivatives there differed
    from space-to-batch's by more than their size, ad hoc: depthwise convolutions are
    not replaced.)"""
    global _native_dilations
    with _probe_lock:
        if _native_dilations is None:
            @tf.function(autograph=False)
            def second_derivatives(inputs, kernel, native):
                with tf.GradientTape() as outer:
                    outer.watch([inputs, kernel])
                    with tf.GradientTape() as inner:
                        inner.watch([inputs, kernel])
                        if native:
                            outputs = tf.raw_ops.Conv2D(
                                input=inputs, filter=kernel, strides=[1, 1, 1, 1],
                                padding="SAME", dilations=[1, 2, 3, 1])
                        else:
                            outputs = tf.nn.convolution(inputs, kernel, padding="SAME",
                                                        dilations=[2, 3])
                        loss = tf.reduce_sum(tf.sin(outputs))
                    gradients = inner.gradient(loss, [inputs, kernel])
                    total = tf.add_n([tf.reduce_sum(g * g) for g in gradients])
                return outer.gradient(total, [inputs, kernel])

            def probe():
                global _native_dilations
                inputs = tf.reshape(tf.sin(tf.range(1.0, 101.0)), (2, 5, 5, 2))
                kernel = tf.reshape(tf.cos(tf.range(1.0, 25.0)), (2, 2, 2, 3))
                try:
                    with tf.device("/CPU:0"):
                        got = second_derivatives(inputs, kernel, True)
                        expected = second_derivatives(inputs, kernel, False)
                    _native_dilations = all(
                        np.allclose(a.numpy(), b.numpy(), rtol=0,
                                    atol=1e-5 * np.abs(b.numpy()).max())
                        for a, b in zip(got, expected))
                except Exception as error:  # refused (Eigen's kernels), or failing
                    logging.info("hessian_tf: dilated convolutions keep Keras's path: "
                                 "TensorFlow's dilated Conv2D failed here (%s).",
                                 first_line(error))
                    _native_dilations = False

            # In a thread of its own: eagerly, with tapes recording, also where this
            # is called while a product is traced (tf.init_scope would stop the tapes).
            thread = threading.Thread(target=probe, name="hessian_tf-dilations-probe")
            thread.start()
            thread.join()
            if _native_dilations is None:  # the probe failed otherwise: not taken
                _native_dilations = False
        return _native_dilations


_native_dilations = None
_probe_lock = threading.Lock()


def dilated_native(inputs, kernel, strides=1, padding="valid", data_format=None,
                   dilation_rate=1):
    """A dilated 2-D convolution without strides of channels-last float32 inputs by
    TensorFlow's own Conv2D kernel with its `dilations`, where that kernel runs them
    (`_native_dilations_run`); else None. tf.nn.convolution (Keras's path) dilates by
    SpaceToBatchND, the convolution and BatchToSpaceND, whose derivatives are ops of
    their own. 1-D convolutions keep it: as 2-D ones of height 1 by this kernel, a
    temporal convolutional network's product took 0.98 of the time
    (`benchmarks/pointwise_conv.py`)."""
    window = _matrix_window(inputs, kernel, data_format)
    if (window is None or len(window) != 2 or inputs.dtype != tf.float32
            or padding.lower() not in ("valid", "same")):
        return None
    dilations, strides = _per_axis(dilation_rate, len(window)), _per_axis(strides, len(window))
    if all(d == 1 for d in dilations) or any(s != 1 for s in strides):
        return None
    if not _native_dilations_run():
        return None
    return tf.raw_ops.Conv2D(input=inputs, filter=kernel, strides=[1, 1, 1, 1],
                             padding=padding.upper(), dilations=[1, *dilations, 1])


def _through_matrix(operand, matrix, spatial):
    outputs = tf.matmul(operand, matrix)
    outputs = tf.reshape(outputs, (-1, *spatial, matrix.shape[-1] // int(np.prod(spatial))))
    outputs.set_shape([operand.shape[0], *spatial, outputs.shape[-1]])
    return outputs


def _at_each_position(inputs, matrix):
    filters = matrix.shape[-1]
    shape = tf.shape(inputs)
    outputs = tf.reshape(tf.matmul(tf.reshape(inputs, (-1, matrix.shape[0])), matrix),
                         tf.concat([shape[:-1], [filters]], 0))
    outputs.set_shape(inputs.shape[:-1].concatenate([filters]))
    return outputs


def _grouped(inputs, kernel, groups, strides, padding, data_format, dilation_rate):
    rank = len(inputs.shape)
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


# Which replacements are entered ("grouped", "pointwise", "dilated"); `conv` is Keras's
# backend conv while any is.
_active: set = set()
_active_lock = threading.Lock()


def conv(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
    """Keras's backend `conv` (same arguments, same values); on a CPU-only host, grouped
    convolutions without XLA, pointwise ones and those of small maps as matrix
    products, and dilated ones by TensorFlow's own dilated kernel, as entered."""
    inputs, kernel = tf.convert_to_tensor(inputs), tf.convert_to_tensor(kernel)
    active = set(_active)
    if active and cpu_only():
        groups = groups_of(inputs, kernel, data_format) if "grouped" in active else None
        if groups is not None and padding.lower() in ("valid", "same"):
            return _grouped(inputs, kernel, groups, strides, padding, data_format,
                            dilation_rate)
        if "pointwise" in active:
            pointwise = pointwise_matrix(inputs, kernel, strides, padding, data_format,
                                         dilation_rate)
            if pointwise is not None:
                return _at_each_position(*pointwise)
            small = small_map_matrix(inputs, kernel, strides, padding, data_format,
                                     dilation_rate)
            if small is not None:
                return _through_matrix(*small)
        if "dilated" in active:
            dilated = dilated_native(inputs, kernel, strides, padding, data_format,
                                     dilation_rate)
            if dilated is not None:
                return dilated
    return _keras_conv(inputs, kernel, strides, padding, data_format, dilation_rate)


def _switch(name: str, on: bool) -> None:
    with _active_lock:
        (_active.add if on else _active.discard)(name)
        keras_tensorflow_nn.conv = conv if _active else _keras_conv


_grouped_patch = SharedPatch(lambda: _switch("grouped", True), lambda: _switch("grouped", False))
_pointwise_patch = SharedPatch(lambda: _switch("pointwise", True),
                               lambda: _switch("pointwise", False))
_dilated_patch = SharedPatch(lambda: _switch("dilated", True), lambda: _switch("dilated", False))


def grouped_convolutions():
    """Within: Keras's grouped convolutions run without XLA (as depthwise or split
    convolutions) on a CPU-only host. Entries may nest and overlap (in threads), as
    moments.exact_moments'."""
    return _grouped_patch()


def pointwise_convolutions():
    """Within: Keras's convolutions that are a matrix product at each position
    (`pointwise_matrix`) or of small maps (`small_map_matrix`) run as matrix products on
    a CPU-only host. Entries may nest and overlap."""
    return _pointwise_patch()


def dilated_convolutions():
    """Within: Keras's dilated 2-D convolutions of float32 inputs run by
    TensorFlow's own dilated Conv2D kernel (`dilated_native`) on a CPU-only host where
    it runs them. Not in saved functions (io/export.py), which may run where it does
    not. Entries may nest and overlap."""
    return _dilated_patch()
