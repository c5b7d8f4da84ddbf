"""Exact second derivatives through normalisation statistics.

`tf.nn.moments` computes the variance as mean((x − stop_gradient(mean))²). Its value
and its gradient are exact (the variance's derivative with respect to the mean,
−2·mean(x − mean), is zero), but its second derivative is not: the stop_gradient
drops the −2/n² coupling of the inputs, so a product of the Hessian with v misses
−(∂L/∂var)·(2/n)·mean(v) on every normalised input. Keras's TensorFlow backend
computes the statistics of BatchNormalization (batch statistics: bn_mode=train),
LayerNormalization and GroupNormalization with `tf.nn.moments`; on small float64
examples the Hessian-vector products through them differed from central differences
of the exact gradient by 0.7%, 7.6% and 23% (tests/operators/test_moments.py).

`exact_moments()`, entered around the traces of products (the model function's mode
context) and of the exported functions, replaces Keras's backend moments and
`tf.nn.moments` with the same arithmetic without the stop_gradient: the same values
bit for bit, the same gradient, and exact second derivatives.
"""

from __future__ import annotations

import contextlib

import tensorflow as tf
from keras.src.backend.tensorflow import nn as keras_tensorflow_nn


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


moments.exact = _keras_compute_moments.exact = True

# (module, attribute, replacement): Keras's TensorFlow backend looks its helper up at
# each call, and so does code that calls tf.nn.moments.
_PATCHES = (
    (keras_tensorflow_nn, "_compute_moments", _keras_compute_moments),
    (tf.nn, "moments", moments),
)


@contextlib.contextmanager
def exact_moments():
    """Within: Keras's normalisation statistics and tf.nn.moments differentiate
    exactly to second order. Nested entries leave the outer one's patches alone;
    on exit only this entry's patches are removed."""
    installed = []
    try:
        for module, attribute, replacement in _PATCHES:
            original = getattr(module, attribute)
            if getattr(original, "exact", False):
                continue
            setattr(module, attribute, replacement)
            installed.append((module, attribute, original))
        yield
    finally:
        for module, attribute, original in reversed(installed):
            setattr(module, attribute, original)
