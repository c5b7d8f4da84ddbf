"""Keras's LayerNormalization with its derivatives written out, while products are traced.

Keras computes LayerNormalization (the layer, `keras.ops.layer_normalization`) in
`keras.src.ops.nn._layer_normalization`: the mean μ and variance of x over the
normalised axes, r = rsqrt(variance + ε), then x·(r·γ) + (β − μ·r·γ), about ten ops
(after moments.py's exact statistics). TensorFlow differentiates them one by one, and a
product differentiates that gradient again, op by op, broadcasting gradients included;
on the causal language model of benchmarks/PYHESSIAN.md LayerNormalization's whole
chain was about 11% of a product's time.

The normalised value n = (x − μ)·r has the Jacobian J = r·(I − 11ᵀ/d − n·nᵀ/d) over each
normalised row of d values: symmetric, so its gradient and its JVP are one map,
J(v) = r·(v − mean(v) − n·mean(n·v)). The derivative of J(g) with respect to x is the
Hessian of gᵀn, again symmetric:
S_g(v) = −r·(o·mean(n·v) + n·mean(o·v) + mean(g·n)·J(v)), o = J(g).

Within `compact_layer_normalization()`, Keras's `_layer_normalization` is replaced by
`layer_normalization`: the same values by the same ops (Keras's own moments, then its
arithmetic in its order), recorded for tapes and forward accumulators as one op of
(x, γ, β) whose gradient is J(γ·u) for x, the sums of u·n and of u for γ and β, and
whose JVP is γ·J(ẋ) + n·γ̇ + β̇. J(g) is itself one recorded op of (g, x) whose
derivatives are J (by g) and S_g (by x), and n one recorded op of x whose derivative
is J (written_out.py's `SymmetricDerivatives`). RMS scaling (`rms_scaling=True`),
ragged and sparse tensors and non-float inputs take Keras's path.

Derivatives of order three and more through the replacement are not LayerNorm's (the
written derivatives are constants to the tapes beyond the second order); products
need two. tests/operators/test_layer_norm.py checks values, first and second
derivatives and float64 products against Keras's path, by both methods.
"""

from __future__ import annotations

import tensorflow as tf
from keras.src import backend as keras_backend
from keras.src.ops import nn as keras_ops_nn
from tensorflow.python.eager import record

from hessian_tf.operators.shared_patch import SharedPatch
from hessian_tf.operators.written_out import SymmetricDerivatives, float_tensor

if not hasattr(keras_ops_nn, "_layer_normalization"):
    raise ImportError(
        "hessian_tf: this Keras has no keras.src.ops.nn._layer_normalization, which "
        "hessian_tf replaces while it traces products (hessian_tf/operators/layer_norm.py); "
        "install the Keras that TensorFlow 2.21 installs (3.15), or update layer_norm.py "
        "and its tests for this one.")

_keras_layer_normalization = keras_ops_nn._layer_normalization


class _Rows(SymmetricDerivatives):
    """The normalisation n = (x − μ)·r over the normalised axes (r = rsqrt(variance + ε)):
    J(v) = r·(v − mean(v) − n·mean(n·v)), and with o = J(g),
    S_g(v) = −r·(o·mean(n·v) + n·mean(o·v) + mean(g·n)·J(v))."""

    name = "HessianTfLayerNormNormalised"

    def __init__(self, x: tf.Tensor, axes, mean: tf.Tensor, inverse: tf.Tensor):
        super().__init__(x)
        self.axes, self.r = axes, inverse
        with record.stop_recording():
            self.n = (x - mean) * inverse

    def mean(self, v: tf.Tensor) -> tf.Tensor:
        return tf.reduce_mean(v, self.axes, keepdims=True)

    def jacobian(self, v):
        return self.r * (v - self.mean(v) - self.n * self.mean(self.n * v))

    def hessian(self, g, o):
        correlation = self.mean(g * self.n)
        return lambda v: -self.r * (o * self.mean(self.n * v) + self.n * self.mean(o * v)
                                    + correlation * self.jacobian(v))

    def normalised(self) -> tf.Tensor:
        """n, recorded as an op of x whose derivative is J (a new tensor each call)."""
        with record.stop_recording():
            n = tf.identity(self.n)
        return self.value(n)


def _sum_to(u: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    """u summed over the axes along which `like` (of static shape) was broadcast to it."""
    lead = u.shape.rank - like.shape.rank
    axes = list(range(lead)) + [lead + i for i, size in enumerate(like.shape) if size == 1]
    return tf.reshape(tf.reduce_sum(u, axes), tf.shape(like))


def _recorded(x: tf.Tensor, gamma, beta, axes, epsilon) -> tf.Tensor:
    """Keras's x·(r·γ) + (β − μ·r·γ) of x in its compute dtype and γ, β broadcastable
    (or None), recorded as one op with its derivatives written out."""
    with record.stop_recording():
        mean, variance = keras_ops_nn.moments(x, axes=axes, keepdims=True)
        inverse = tf.math.rsqrt(variance + epsilon)
        scale = inverse * gamma if gamma is not None else inverse
        shift = -mean * scale
        if beta is not None:
            shift = shift + beta
        result = x * scale + shift
    rows = _Rows(x, axes, mean, inverse)
    inputs = [x] + [t for t in (gamma, beta) if t is not None]

    def backward(upstream):
        grads = [rows.jacobian_of(upstream * gamma if gamma is not None else upstream)]
        if gamma is not None:
            grads.append(_sum_to(upstream * rows.normalised(), gamma))
        if beta is not None:
            grads.append(_sum_to(upstream, beta))
        return grads

    def forward(x_tangent, *tangents):  # an input without a tangent gives None
        tangents = list(tangents)
        gamma_tangent = tangents.pop(0) if gamma is not None else None
        beta_tangent = tangents.pop(0) if beta is not None else None
        # Recorded, as the gradient is: a tape around an accumulator differentiates it.
        terms = []
        if x_tangent is not None:
            n_tangent = rows.jacobian_of(x_tangent)
            terms.append(n_tangent * gamma if gamma is not None else n_tangent)
        if gamma_tangent is not None:
            terms.append(rows.normalised() * gamma_tangent)
        if beta_tangent is not None:
            terms.append(tf.broadcast_to(beta_tangent, tf.shape(result)))
        return [tf.add_n(terms) if terms else tf.zeros_like(result)]

    record.record_operation("HessianTfLayerNorm", [result], inputs, backward, forward)
    return result


def layer_normalization(x, gamma=None, beta=None, axis=-1, epsilon=None, rms_scaling=False):
    """Keras's `_layer_normalization` (same arguments, same values), recorded with its
    derivatives written out; RMS scaling and non-float, ragged or sparse x take Keras's."""
    dense = None if rms_scaling else float_tensor(x)
    if dense is None:
        return _keras_layer_normalization(x, gamma, beta, axis, epsilon, rms_scaling)
    x = dense
    # Keras's preparation, as _layer_normalization does it (recorded as usual).
    if epsilon is None:
        epsilon = keras_backend.epsilon()
    original_dtype = keras_backend.standardize_dtype(x.dtype)
    x = keras_backend.convert_to_tensor(x, dtype=keras_backend.result_type(x.dtype, "float32"))
    gamma = None if gamma is None else keras_backend.convert_to_tensor(gamma, x.dtype)
    beta = None if beta is None else keras_backend.convert_to_tensor(beta, x.dtype)
    rank = x.shape.rank
    axes = sorted([axis] if isinstance(axis, int) else axis)
    broadcast_shape = [1] * rank
    for dim in axes:
        broadcast_shape[dim] = x.shape[dim]

    def broadcast(v):
        if v is not None and v.shape.rank != rank and axes != [rank - 1]:
            return tf.reshape(v, broadcast_shape)
        return v

    result = _recorded(x, broadcast(gamma), broadcast(beta), axes, epsilon)
    return keras_backend.cast(result, original_dtype)


def _switch(on: bool) -> None:
    keras_ops_nn._layer_normalization = (
        layer_normalization if on else _keras_layer_normalization)


_patch = SharedPatch(lambda: _switch(True), lambda: _switch(False))


def compact_layer_normalization():
    """Within: Keras's LayerNormalization recorded with its first and second derivatives
    written out (`layer_normalization`). Entries may nest and overlap (in threads)."""
    return _patch()
