"""Exact second derivatives through normalisation statistics.

`tf.nn.moments` computes the variance as mean((x − stop_gradient(mean))²). Its value
and its gradient are exact (the variance's derivative with respect to the mean,
−2·mean(x − mean), is zero), but its second derivative is not: the stop_gradient
drops the −2/n² coupling of the inputs, so a product of the Hessian with v misses
−(∂L/∂var)·(2/n)·mean(v) on every normalised input. Keras's TensorFlow backend
computes the statistics of LayerNormalization, GroupNormalization and
BatchNormalization on batch statistics (bn_mode=train) with `tf.nn.moments`. On the
float64 networks of tests/operators/test_moments.py the products through them were
off by 2.2% (LN), 7.4% (GN), 27% (train-mode BN) and 3.8% (a layer calling
tf.nn.moments itself) of the largest entry, against central differences of the
exact gradient.

`exact_moments()`, entered around the traces of products and gradients (the model
function's mode context) and of the exported functions, replaces Keras's backend
moments and `tf.nn.moments` with the same arithmetic without the stop_gradient: the
same values bit for bit, the same gradient, and exact second derivatives. Not
covered: `tf.compat.v1.nn.moments` and a `moments` bound by name at import time
(`from tensorflow.nn import moments`).
"""

from __future__ import annotations

import tensorflow as tf
from keras.src.backend.tensorflow import nn as keras_tensorflow_nn

from hessian_tf.operators.shared_patch import SharedPatch


def moments(x, axes, shift=None, keepdims=False, name=None):
    """`tf.nn.moments` (same arguments, same values) without the stop_gradient."""
    del shift  # unused by tf.nn.moments as well
    with tf.name_scope(name or "moments"):
        y = tf.cast(x, tf.float32) if x.dtype == tf.float16 else x
        mean = tf.reduce_mean(y, axes, keepdims=True, name="mean")
        variance = tf.reduce_mean(
            tf.math.squared_difference(y, mean), axes, keepdims=True, name="variance")
        if not keepdims:
            mean, variance = tf.squeeze(mean, axes), tf.squeeze(variance, axes)
        if x.dtype == tf.float16:
            return tf.cast(mean, tf.float16), tf.cast(variance, tf.float16)
        return mean, variance


def _keras_compute_moments(x, axes, keepdims):
    return moments(x, axes, keepdims=keepdims)


if not hasattr(keras_tensorflow_nn, "_compute_moments"):
    raise ImportError(
        "hessian_tf: this Keras has no keras.src.backend.tensorflow.nn._compute_moments, "
        "through which hessian_tf differentiates normalisation statistics exactly "
        "(hessian_tf/operators/moments.py); install the Keras that TensorFlow 2.21 "
        "installs (3.15), or update moments.py and its tests for this one."
    )

# (module, attribute, replacement): Keras's TensorFlow backend looks its helper up at
# each call, and so does code that calls tf.nn.moments (tf.compat.v2.nn is another
# module object with its own attribute).
_PATCHES = (
    (keras_tensorflow_nn, "_compute_moments", _keras_compute_moments),
    (tf.nn, "moments", moments),
    (tf.compat.v2.nn, "moments", moments),
)
_originals = []  # (module, attribute, original) while any is open


def _install() -> None:
    for module, attribute, replacement in _PATCHES:
        _originals.append((module, attribute, getattr(module, attribute)))
        setattr(module, attribute, replacement)


def _remove() -> None:
    while _originals:
        module, attribute, original = _originals.pop()
        setattr(module, attribute, original)


_patch = SharedPatch(_install, _remove)


def exact_moments():
    """Within: Keras's normalisation statistics and tf.nn.moments differentiate
    exactly to second order. Entries may nest and overlap (in threads): the patches
    are installed by the first and removed when the last exits."""
    return _patch()
