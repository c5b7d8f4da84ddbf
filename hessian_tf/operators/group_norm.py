"""GroupNormalization's statistics through per-channel means while a product is traced.

Keras's GroupNormalization reshapes [B, ..., C] into [B, ..., G, C/G], takes the mean
and variance over every axis but the batch's and the group's, and broadcasts them back.
Its products spend most of their element-wise work in the derivatives of those strided
reductions and broadcasts. The same statistics, per channel:

    m_c = mean over the positions of x[b, ..., c]       ([B, C])
    μ_c = m_c P                                         (P: C×C, 1/(C/G) within a group)
    d = x − μ_c
    σ²_c = (mean over the positions of d²) P
    y = d · γ/√(σ²_c + ε) + β

Every group has the same number of positions and channels, so the mean of the
per-channel means over a group is the group's mean, and likewise for the variance:
the same function of the same parameters (rounding apart), and so the same Hessian.
P is a constant matrix (up to MAX_MATRIX_CHANNELS channels; beyond, a reshape into
groups, a mean and a broadcast back); the reductions run over the positions alone and
the broadcasts are plain ones over positions. On the digits residual CNN with
GroupNormalization(4) after each of its five 16-channel convolutions, a full-data
product took 0.76 (reverse over reverse) and 0.80 (forward over backward) of the time
with Keras's layer (benchmarks/group_norm.py).

Rewritten only where it is the same function: Keras's own GroupNormalization class
(not a subclass, which may change the helpers its `call` runs), normalising the last
axis, computing in its variables' dtype (mixed precision casts inside Keras's layer),
and not overridden on the instance.
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np
import tensorflow as tf


def _rewritable(layer) -> bool:
    spec = getattr(layer, "input_spec", None)
    rank = getattr(spec, "ndim", None)
    # Keras's own class: a subclass may change any of the helpers its call runs.
    return (type(layer) is keras.layers.GroupNormalization
            and "call" not in vars(layer) and layer.built and rank is not None
            and layer.axis in (-1, rank - 1)
            and layer.compute_dtype == layer.variable_dtype in ("float32", "float64"))


# Channels up to which the group average is a product with a constant C×C matrix (the
# measured form; 256 KiB in float32 at this bound); beyond, a reshape into groups, a
# mean and a broadcast back, whose constant does not grow as C².
MAX_MATRIX_CHANNELS = 256


def _group_average(channels: int, groups: int, dtype):
    """[B, C] → [B, C]: each channel's entry replaced by its group's mean."""
    size = channels // groups
    if channels <= MAX_MATRIX_CHANNELS:
        matrix = tf.constant(np.kron(np.eye(groups), np.full((size, size), 1.0 / size)), dtype)
        return lambda values: tf.matmul(values, matrix)

    def average(values):
        means = tf.reduce_mean(tf.reshape(values, [-1, groups, size]), 2, keepdims=True)
        return tf.reshape(tf.broadcast_to(means, [tf.shape(values)[0], groups, size]),
                          [-1, channels])

    return average


def group_norm_call(layer):
    """`layer`'s function by per-channel statistics (the module's docstring); inputs
    of another dtype than the layer's go through Keras's own call."""
    original = layer.call

    def call(inputs):
        x = tf.convert_to_tensor(inputs)
        if x.dtype.name != layer.compute_dtype:
            return original(inputs)
        channels = x.shape[-1]
        average = _group_average(channels, layer.groups, x.dtype)
        positions = list(range(1, x.shape.rank - 1))
        per_channel = tf.reduce_mean(x, positions) if positions else x
        mean = average(per_channel)
        shape = tf.concat([tf.shape(x)[:1], tf.ones([len(positions)], tf.int32),
                           [channels]], 0)
        centred = x - tf.reshape(mean, shape)
        squares = tf.square(centred)
        variance = average(tf.reduce_mean(squares, positions) if positions else squares)
        scale = tf.math.rsqrt(variance + layer.epsilon)
        if layer.scale:
            scale = scale * tf.cast(layer.gamma, x.dtype)
        outputs = centred * tf.reshape(scale, shape)
        if layer.center:
            outputs = outputs + tf.cast(layer.beta, x.dtype)
        return outputs

    return call


@contextlib.contextmanager
def per_channel_statistics(model: keras.Model):
    """Inside: every rewritable GroupNormalization of `model` computes by per-channel
    statistics. Enter around the whole trace (as the other mode overrides)."""
    layers = [layer for layer in model._flatten_layers(include_self=False, recursive=True)
              if _rewritable(layer)]
    for layer in layers:
        layer.call = group_norm_call(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.call
