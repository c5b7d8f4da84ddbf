"""Keras's gelu, silu and mish with their derivatives written out, while products are
traced.

Keras's `gelu` (the activation "gelu", `keras.ops.gelu`) is, on the TensorFlow backend,
`tf.nn.gelu`: 0.5·x·erfc(−c·x) (`approximate=False`, the activation's default), or
0.5·x·(1 + tanh(0.79788…·(x + a·x³))) (`approximate=True`); its `silu` (the activations
"silu" and "swish", EfficientNet's) is `tf.nn.silu`, x·σ(x) with a custom gradient that
also sums a gradient for its β. A few element-wise ops each, which TensorFlow
differentiates one by one; a product differentiates that gradient again, op by op (and
forward accumulators ignore custom gradients: they differentiate the ops inside). On a
float32 MLP of three Dense(512, gelu) layers (batch 512, one thread per op) a
forward-over-backward product ran 225 ops, 100 of them `Mul`s, against 69 with linear
activations, and gelu's chain took about a quarter of its time.

Keras's `mish` is its own, x·tanh(softplus(x)) by three of the backend's ops, in
`Mish.static_call`.

Within `compact_activations()`, Keras's backend functions are replaced by `gelu` and
`silu`, and `Mish.static_call` by `mish`: the same values, by the same ops (TensorFlow's own, its constants rounded as
TensorFlow rounds them), recorded for tapes and forward accumulators as one op whose
derivative is written out, dy·f′(x), itself one recorded op whose derivatives (by dy and
by x, through f″) are written out too (written_out.py's `Elementwise`).
Products by either method then run f′ and f″ as a few element-wise ops each: 138 ops
per forward-over-backward product on that MLP. Full-data products (medians of 7
alternating runs, one thread per op; benchmarks/activations.py, one run): by forward
over backward 0.81 of the time on that MLP, 0.78 on its silu twin, 0.82 on ConvNeXt
blocks, 0.91 on a transformer block, 0.97 on EfficientNet-B0 (its convolutions
dominate), and 0.83 on a small causal language model (two gelu MLPs; ad hoc); by
reverse over reverse 0.89, 0.99 and 0.94 on the first two and the transformer block.
Values agree to float32 rounding (≤ 2e-7 relative).

Derivatives of order three and more through the replacements are not the activations'
(the written derivatives are constants to the tapes beyond the second order); products
need two. tests/operators/test_activations.py checks values, derivatives and float64
products against Keras's path, for each function and form, by both methods.
"""

from __future__ import annotations

import math

import tensorflow as tf
from keras.src.activations import activations as keras_activations
from keras.src.backend.tensorflow import nn as keras_tensorflow_nn
from tensorflow.python.eager import record

from hessian_tf.operators.shared_patch import SharedPatch
from hessian_tf.operators.written_out import Elementwise, float_tensor

_keras_gelu = keras_tensorflow_nn.gelu
_keras_silu = keras_tensorflow_nn.silu
# Keras's mish (the activation "mish") is its own: x·tanh(softplus(x)), by the backend's
# ops, in `Mish.static_call`, which `keras.activations.mish` looks up at each call.
_keras_mish_method = keras_activations.Mish.__dict__["static_call"]
_keras_mish = _keras_mish_method.__func__

# tf.nn.gelu's constants: the ones it casts are rounded to float32 first, whatever the
# dtype (the derivatives must be those of the function it computes).
_ERF_SCALE = 0.7071067811865476  # cast: 1/√2 rounded
_TANH_SCALE = 0.7978845608028654  # √(2/π), a Python float times a tensor: exact
_CUBIC = 0.044715  # cast


def _gelu_derivatives(x: tf.Tensor, approximate: bool):
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


def _silu_derivatives(x: tf.Tensor):
    """(silu′(x), a function giving silu″(x)) of tf.nn.silu: x·σ(x), σ the sigmoid:
    silu′ = σ·(1 + x·(1 − σ)), silu″ = σ·(1 − σ)·(2 + x·(1 − 2σ))."""
    sigmoid = tf.sigmoid(x)
    complement = 1.0 - sigmoid
    first = sigmoid * (1.0 + x * complement)
    return first, lambda: sigmoid * complement * (2.0 + x * (complement - sigmoid))


def _mish_derivatives(x: tf.Tensor):
    """(mish′(x), a function giving mish″(x)) of Keras's mish, x·t with t =
    tanh(softplus(x)), whose derivative is (1 − t²)·σ(x), σ the sigmoid (softplus′):
    mish′ = t + x·(1 − t²)·σ, mish″ = (1 − t²)·σ·(2 + x·(1 − σ − 2·t·σ))."""
    t = keras_tensorflow_nn.tanh(keras_tensorflow_nn.softplus(x))
    sigmoid = tf.sigmoid(x)
    slope = (1.0 - tf.square(t)) * sigmoid  # t′
    first = t + x * slope
    return first, lambda: slope * (2.0 + x * (1.0 - sigmoid - 2.0 * t * sigmoid))


def _recorded(name: str, value, derivatives, x) -> tf.Tensor:
    """value(x), an element-wise function, recorded as one op whose derivative is
    written out (written_out.Elementwise); a non-float x goes to `value` alone
    (TensorFlow's error), and so do ragged and sparse tensors."""
    dense = float_tensor(x)
    if dense is None:
        return value(x)  # as Keras computes it, differentiated op by op
    with record.stop_recording():
        result = value(dense)
    return Elementwise(dense, derivatives, name).value(result)


def gelu(x, approximate=True):
    """Keras's backend gelu (same arguments, same default, same values), recorded with
    its derivatives written out."""
    return _recorded("HessianTfGelu", lambda t: _keras_gelu(t, approximate),
                     lambda t: _gelu_derivatives(t, approximate), x)


def silu(x):
    """Keras's backend silu (swish; same values), recorded with its derivatives
    written out."""
    return _recorded("HessianTfSilu", _keras_silu, _silu_derivatives, x)


def mish(x):
    """Keras's mish (same values), recorded with its derivatives written out. They
    compute tanh(softplus(x)) again: taking it from the forward pass measured the same
    within the noise (README.md, Speed), through more code."""
    return _recorded("HessianTfMish", _keras_mish, _mish_derivatives, x)


def _switch(on: bool) -> None:
    keras_tensorflow_nn.gelu = gelu if on else _keras_gelu
    keras_tensorflow_nn.silu = silu if on else _keras_silu
    keras_activations.Mish.static_call = staticmethod(mish) if on else _keras_mish_method


_patch = SharedPatch(lambda: _switch(True), lambda: _switch(False))


def compact_activations():
    """Within: Keras's gelu, silu and mish recorded with their first and second
    derivatives written out (`gelu`, `silu`, `mish`). Entries may nest and overlap (in
    threads)."""
    return _patch()
