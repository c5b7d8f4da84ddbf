"""Keras's dot-product attention by batched matrix products on CPU-only hosts.

Keras's `MultiHeadAttention` (without dropout or returned scores, the usual setting)
and `keras.ops.dot_product_attention` compute their core, on the TensorFlow backend,
by two `tf.einsum`s (`keras.src.backend.tensorflow.nn._dot_product_attention_xla`):
logits "BTNH,BSNH->BNTS" and the output "BNTS,BSNH->BTNH". On the CPU, TensorFlow runs
them by its oneDNN Einsum kernel, and their derivatives are Einsums again. The same
products written as transposes around `tf.matmul` (a BatchMatMul of [B, N, T, H]
operands) took 2.30 against 7.28 ms for the logits and 3.04 against 3.74 ms for the
output (ad hoc, one thread, 128 sequences of 64 positions, 4 heads of 16), and a
full-data Hessian-vector product of a small causal language model (two pre-LayerNorm
self-attention blocks, 128,412 parameters, 4 batches of 128 sequences of 64
characters) 0.90 of the time by forward over backward and 0.89 by reverse over reverse
(medians of 5 alternating runs, one thread per op; benchmarks/PYHESSIAN.md).

Within `matmul_attention()`, on a host whose devices are all CPUs
(`convolutions.cpu_only()`; graphs traced on a host with a GPU or TPU keep Keras's
path: not measured there; a function saved on a CPU-only host keeps the matrix products
wherever it is loaded), Keras's function is replaced by `attention_by_matmul`: the same
casts, scale, bias and masks (Keras's own `_apply_masks`, the causal mask included),
the two products as batched matrix products; what is differentiated is those ops,
transposes and softmax. Where the query is float32 or float64 (not half precision) the
scale multiplies the query, not the logits (S/H times fewer products), and Keras's
causal mask, when it is the only mask and bias, is a constant added to the logits (0, or
Keras's large negative where masked, to which a masked logit rounds), not a select: on
the causal language model of benchmarks/PYHESSIAN.md (the whole data,
medians of 5 alternating products, ad hoc) 0.95 of the time by forward over backward and
0.97 by reverse over reverse (tests/operators/test_attention.py checks values and products
against Keras's path). With one key and value head for several query heads, which
Keras does not repeat, Keras's einsum refuses the shapes and the matrix product
broadcasts the head.
"""

from __future__ import annotations

import tensorflow as tf
from keras.src import backend as keras_backend
from keras.src.backend.tensorflow import nn as keras_tensorflow_nn

from hessian_tf.operators import convolutions
from hessian_tf.operators.shared_patch import SharedPatch

if not all(hasattr(keras_tensorflow_nn, name)
           for name in ("_dot_product_attention_xla", "_apply_masks")):
    raise ImportError(
        "hessian_tf: this Keras has no keras.src.backend.tensorflow.nn."
        "_dot_product_attention_xla or _apply_masks, which hessian_tf replaces on CPU-only "
        "hosts (hessian_tf/operators/attention.py); install the Keras that TensorFlow 2.21 "
        "installs (3.15), or update attention.py and its tests."
    )

_keras_attention = keras_tensorflow_nn._dot_product_attention_xla

# [B, T, N, H] ↔ [B, N, T, H]: heads beside the batch, as BatchMatMul takes them.
_HEADS_FIRST = (0, 2, 1, 3)


def attention_by_matmul(query, key, value, bias, mask, is_causal, scale):
    """Keras's `_dot_product_attention_xla` (same arguments, same values): query
    [B, T, N, H], key and value [B, S, N, H] → [B, T, N, H]; on a CPU-only host the two
    einsums as batched matrix products."""
    if not convolutions.cpu_only():
        return _keras_attention(query, key, value, bias, mask, is_causal, scale)
    query, key, value = (tf.transpose(t, _HEADS_FIRST) for t in (query, key, value))
    logits_dtype = keras_backend.result_type(query.dtype, "float32")
    if query.dtype == logits_dtype:
        # The scale on the query [B, N, T, H], not on the logits [B, N, T, S]: S/H times
        # fewer products, here and in the derivatives (the same logits exactly when the
        # scale is a power of two, as 1/√16).
        query = tf.multiply(query, tf.cast(scale, query.dtype))
        logits = tf.matmul(query, key, transpose_b=True)  # [B, N, T, S]
    else:  # half-precision inputs: the logits cast up first, then scaled, as Keras does
        logits = tf.cast(tf.matmul(query, key, transpose_b=True), logits_dtype)
        logits = tf.multiply(logits, tf.cast(scale, logits.dtype))
    if bias is not None:
        logits = tf.add(logits, tf.cast(bias, logits.dtype))
    if is_causal and mask is None and bias is None:
        # The causal mask alone as a constant added (0, or Keras's large negative where
        # masked), not a select: an addition's derivative is the identity. A masked logit
        # rounds to the large negative, so the softmax is Keras's; and every query reads
        # at least one position, so no row is all masked, whose softmax (uniform) has
        # derivatives that Keras's select stops.
        zeros = tf.zeros(tf.concat([[1, 1], tf.shape(logits)[2:]], 0), logits.dtype)
        padded_logits = logits + keras_tensorflow_nn._apply_masks(zeros, None, True)
    else:
        padded_logits = keras_tensorflow_nn._apply_masks(logits, mask, is_causal)
    # In high precision, as Keras's.
    probs_dtype = keras_backend.result_type(padded_logits.dtype, "float32")
    probs = tf.cast(tf.nn.softmax(tf.cast(padded_logits, probs_dtype), axis=-1), key.dtype)
    return tf.transpose(tf.matmul(probs, value), _HEADS_FIRST)


def _switch(on: bool) -> None:
    keras_tensorflow_nn._dot_product_attention_xla = (attention_by_matmul if on
                                                      else _keras_attention)


_patch = SharedPatch(lambda: _switch(True), lambda: _switch(False))


def matmul_attention():
    """Within: Keras's dot-product attention computed by batched matrix products on a
    CPU-only host (`attention_by_matmul`). Entries may nest and overlap (in threads),
    as the convolutions'."""
    return _patch()
