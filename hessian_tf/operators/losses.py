"""Per-example losses, written with twice-differentiable ops.

TensorFlow's fused `sparse_softmax_cross_entropy_with_logits` refuses second
derivatives, so cross-entropy is spelled out with `log_softmax`.
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

from hessian_tf.choices import LOSS_NAMES

PerExampleLoss = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def sparse_categorical_crossentropy(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """−log softmax(logits)[label], averaged over an example's positions as Keras averages
    it. logits [batch, *positions, classes]; labels [batch, *positions] integers (or with
    a trailing axis of 1): one class per example for a classifier, one per pixel or
    token for a segmentation or tagging model."""
    log_probabilities = tf.nn.log_softmax(logits, axis=-1)
    if logits.shape.rank == 2:  # one class per example
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        return -tf.gather(log_probabilities, labels, axis=1, batch_dims=1)
    batch, classes = tf.shape(logits)[0], tf.shape(logits)[-1]
    log_probabilities = tf.reshape(log_probabilities, [batch, -1, classes])
    labels = tf.cast(tf.reshape(labels, [batch, -1]), tf.int32)
    return -tf.reduce_mean(
        tf.gather(log_probabilities, labels, axis=2, batch_dims=2), axis=-1)


def categorical_crossentropy(targets: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """−Σ_c targets_c log softmax(logits)_c, averaged over an example's positions as Keras
    averages it. targets shaped as the logits [batch, *positions, classes] (one-hot or
    soft)."""
    log_probabilities = tf.nn.log_softmax(logits, axis=-1)
    targets = tf.cast(tf.reshape(targets, tf.shape(logits)), logits.dtype)
    losses = -tf.reduce_sum(targets * log_probabilities, axis=-1)
    if logits.shape.rank == 2:
        return losses
    return tf.reduce_mean(tf.reshape(losses, [tf.shape(losses)[0], -1]), axis=-1)


def binary_crossentropy(targets: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Mean over output dimensions of softplus(z) − t·z = −t log σ(z) − (1 − t) log(1 − σ(z)),
    as Keras's binary_crossentropy(from_logits=True) averages it. targets shaped as the
    logits, in [0, 1] (0/1 labels or probabilities). In closed form, softplus(z) − t·z,
    whose derivatives σ(z) − t and σ(z)(1 − σ(z)) TensorFlow differentiates exactly."""
    targets = tf.cast(tf.reshape(targets, tf.shape(logits)), logits.dtype)
    losses = tf.nn.softplus(logits) - targets * logits
    return tf.reduce_mean(tf.reshape(losses, [tf.shape(losses)[0], -1]), axis=-1)


def mean_squared_error(targets: tf.Tensor, predictions: tf.Tensor) -> tf.Tensor:
    """Mean over output dimensions of (prediction − target)², as Keras defines it."""
    difference = predictions - tf.cast(tf.reshape(targets, tf.shape(predictions)), predictions.dtype)
    return tf.reduce_mean(tf.reshape(tf.square(difference), [tf.shape(difference)[0], -1]), axis=-1)


# Each loss under its function's name: the names the job's --loss is checked against
# before TensorFlow is imported (choices.LOSS_NAMES).
LOSSES: dict[str, PerExampleLoss] = {name: globals()[name] for name in LOSS_NAMES}


def get_loss(name: str) -> PerExampleLoss:
    if name not in LOSSES:
        raise ValueError(
            f"--loss={name!r} is not a known loss; use one of {sorted(LOSSES)}."
        )
    return LOSSES[name]
