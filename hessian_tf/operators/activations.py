"""Keras's gelu with its derivatives written out, while products are traced.

Keras's `gelu` (the activation "gelu", `keras.ops.gelu`) is, on the TensorFlow backend,
`tf.nn.gelu`: 0.5·x·erfc(−c·x) (`approximate=False`, the activation's default), or
0.5·x·(1 + tanh(0.79788…·(x + a·x³))) (`approximate=True`), a few element-wise ops
that TensorFlow differentiates one by one. A product differentiates that gradient
again, op by op: on a float32 MLP of three Dense(512, gelu) layers (batch 512, one
thread per op) a forward-over-backward product ran 225 ops, 100 of them `Mul`s, against
69 with linear activations, and gelu's chain took about a quarter of its time.

Within `compact_gelu()`, Keras's gelu is replaced by `gelu`: the same value, by the same
ops (tf.nn.gelu's own, its constants rounded as TensorFlow rounds them), recorded for
tapes and forward accumulators as one op whose derivative is written out,
dy·gelu′(x), itself one recorded op whose derivatives (by dy and by x, through gelu″)
are written out too. Products by either method then run gelu′ and gelu″ as a few
element-wise ops each: on that MLP 138 ops per forward-over-backward product and 0.85
of its time, 0.92 by reverse over reverse (benchmarks/gelu.py). Forward accumulators
ignore `tf.custom_gradient` (they differentiate the ops inside it), so the ops are
recorded by hand, as second_order.py records the resizes' gradients
(`record.record_operation`, TensorFlow's own mechanism for its functions).

Derivatives of order three and more through the replacement are not those of gelu (the
written derivatives are constants to the tapes beyond the second order); products need
two. tests/operators/test_activations.py checks values and float64 products against
Keras's path, for both forms, by both methods.
"""

from __future__ import annotations

import math

import tensorflow as tf
from keras.src.backend.tensorflow import nn as keras_tensorflow_nn
from tensorflow.python.eager import record

from hessian_tf.operators.shared_patch import SharedPatch

_keras_gelu = keras_tensorflow_nn.gelu

# tf.nn.gelu's constants: the ones it casts are rounded to float32 first, whatever the
# dtype (the derivatives must be those of the function it computes).
_ERF_SCALE = 0.7071067811865476  # cast: 1/√2 rounded
_TANH_SCALE = 0.7978845608028654  # √(2/π), a Python float times a tensor: exact
_CUBIC = 0.044715  # cast


def _derivatives(x: tf.Tensor, approximate: bool):
    """(gelu′(x), a function giving gelu″(x)) of tf.nn.gelu's function."""
    if not approximate:
        # 0.5·x·erfc(−z), z = c·x: gelu′ = Φ + x·p, gelu″ = p·(2 − 2z²), where
        # Φ = 0.5·erfc(−z) and p = c/√π·exp(−z²) is Φ's derivative.
        scale = tf.cast(_ERF_SCALE, x.dtype)
        z = scale * x
        density = (scale * tf.constant(1.0 / math.sqrt(math.pi), x.dtype)) * tf.exp(
            -tf.square(z))
        first = 0.5 * tf.math.erfc(-z) + x * density
        return first, lambda: density * (2.0 - 2.0 * tf.square(z))
    # 0.5·x·(1 + t), t = tanh(u), u = s·(x + a·x³): gelu′ = 0.5·(1 + t) + 0.5·x·(1 − t²)·u′,
    # gelu″ = (1 − t²)·(u′ + 0.5·x·(u″ − 2·t·u′²)), u′ = s·(1 + 3a·x²), u″ = 6a·s·x.
    cubic = tf.cast(_CUBIC, x.dtype)
    square = tf.square(x)
    t = tf.tanh(_TANH_SCALE * (x + cubic * square * x))
    sech2 = 1.0 - tf.square(t)
    slope = _TANH_SCALE * (1.0 + 3.0 * cubic * square)
    half_x = 0.5 * x
    first = 0.5 * (1.0 + t) + half_x * sech2 * slope
    return first, lambda: sech2 * (slope + half_x * ((6.0 * _TANH_SCALE) * cubic * x
                                                      - 2.0 * t * tf.square(slope)))


def _scaled_derivative(dy: tf.Tensor, x: tf.Tensor, approximate: bool) -> tf.Tensor:
    """dy·gelu′(x), recorded as one op: its gradient by (dy, x) is
    (g·gelu′(x), g·dy·gelu″(x)), its JVP dẏ·gelu′(x) + dy·gelu″(x)·ẋ."""
    with record.stop_recording():
        first, second_of = _derivatives(x, approximate)
        result = dy * first
    built = []  # gelu″(x), built once, when a derivative first needs it

    def second() -> tf.Tensor:
        if not built:
            with record.stop_recording():
                built.append(second_of())
        return built[0]

    def backward(upstream):
        return [upstream * first, upstream * dy * second()]

    def forward(dy_tangent, x_tangent):  # an input without a tangent gives None
        terms = [term for term in (None if dy_tangent is None else dy_tangent * first,
                                   None if x_tangent is None else dy * second() * x_tangent)
                 if term is not None]
        return [tf.add_n(terms) if terms else tf.zeros_like(result)]

    record.record_operation("HessianTfGeluGrad", [result], [dy, x], backward, forward)
    return result


def gelu(x, approximate=True):
    """Keras's backend gelu (same arguments, same default, same values), recorded with
    its derivatives written out."""
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        return _keras_gelu(x, approximate)  # TensorFlow's error
    with record.stop_recording():
        result = tf.nn.gelu(x, approximate=approximate)
    record.record_operation(
        "HessianTfGelu", [result], [x],
        lambda upstream: [_scaled_derivative(upstream, x, approximate)],
        lambda tangent: [_scaled_derivative(tangent, x, approximate)])
    return result


def _switch(on: bool) -> None:
    keras_tensorflow_nn.gelu = gelu if on else _keras_gelu


_patch = SharedPatch(lambda: _switch(True), lambda: _switch(False))


def compact_gelu():
    """Within: Keras's gelu recorded with its first and second derivatives written
    out (`gelu`). Entries may nest and overlap (in threads)."""
    return _patch()
