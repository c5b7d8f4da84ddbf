"""Flat views of a list of parameters.

θ is the concatenation of the model's trainable variables, each flattened in
row-major (C) order, in the order of `model.trainable_variables`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf


def flatten(tensors: Sequence[tf.Tensor], dtype=tf.float64) -> tf.Tensor:
    """Concatenates tensors into one flat vector of `dtype`. [sum of sizes]"""
    return tf.concat([tf.reshape(tf.cast(t, dtype), [-1]) for t in tensors], axis=0)


def unflatten(vector: tf.Tensor, like: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    """Splits a flat vector into tensors shaped and typed like `like`."""
    sizes = [int(np.prod(t.shape)) for t in like]
    parts = tf.split(vector, sizes) if len(sizes) > 1 else [vector]
    return [tf.cast(tf.reshape(p, t.shape), t.dtype) for p, t in zip(parts, like)]


def dense(gradients: Sequence) -> list:
    """Gradients with respect to the parameters as dense tensors. A gather's gradient
    (an Embedding's, say) comes as a tf.IndexedSlices, which forward mode cannot
    differentiate (an AttributeError inside TensorFlow) and which is summed into a
    dense vector anyway; None (no path) stays None."""
    return [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
            for g in gradients]


def num_parameters(tensors: Sequence[tf.Tensor]) -> int:
    return int(sum(np.prod(t.shape) for t in tensors))
