"""Batch normalisation with population statistics (Ghorbani et al. 2019, section 4).

The paper's last experiment asks whether BN suppresses the Hessian's outliers
because it normalises activations at all, or because it normalises them with the
statistics of each mini-batch (which makes the loss of an example depend on the
other examples of its batch, and the gradient ignore the directions that only
shift or scale a channel's batch). Population BN keeps the normalisation and
drops the batch dependence.

What is implemented here, precisely:

- `PopulationBatchNormalization` is a `keras.layers.BatchNormalization` that
  always normalises with its `moving_mean` and `moving_variance`,
  y = γ (x − μ) / sqrt(σ² + ε) + β, in training and in inference alike. Training
  never updates μ, σ² (Keras' momentum average is not used), and gradients do not
  flow through them: between two updates the layer is a per-channel affine map
  whose scale and shift are learned (γ, β) and whose centring is fixed.
- `PopulationStatistics.update(x)` sets μ and σ² of every such layer to the exact
  mean and biased variance of that layer's inputs over all of `x` (per channel:
  over examples and, for images, positions), with the network as it is now:
  layers are visited in topological order and each layer's inputs are computed
  with the statistics of the layers before it already updated, i.e. the network
  is normalised as "BN with the whole training set as one batch" would be at these
  weights. That costs one forward pass over `x` per layer, truncated at the layer
  (about L/2 full forward passes for L such layers). Moments are computed per batch
  on the device and combined exactly in float64.
- The training loop (`hessian_tf.training`) calls `update` before the first step
  and every `update_every_steps` steps, so the statistics are never more than that
  many steps old.

The Hessian of such a model is that of the loss with μ, σ² held fixed at their
current values (they are non-trainable state): in both `bn_mode`s of the
operators, because this layer ignores the `training` flag. That is the curvature
the optimiser sees between two updates.

Loading a `.keras` file that holds these layers needs this module imported (the
class registers itself as `hessian_tf>PopulationBatchNormalization`).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


@keras.saving.register_keras_serializable(package="hessian_tf")
class PopulationBatchNormalization(keras.layers.BatchNormalization):
    """BN that normalises with `moving_mean`/`moving_variance` in every mode.

    Same weights, arguments and saved form as `keras.layers.BatchNormalization`;
    the statistics are set by `PopulationStatistics.update`, never by training.
    """

    def call(self, inputs, training=None, mask=None):
        del training  # population statistics in training and inference alike
        return super().call(inputs, training=False, mask=mask)


def population_bn_layers(model: keras.Model) -> list[PopulationBatchNormalization]:
    """The model's PopulationBatchNormalization layers in topological order."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, PopulationBatchNormalization)
    ]


def convert_batch_norm(model: keras.Model) -> keras.Model:
    """A copy of a functional `model` with every BatchNormalization layer replaced
    by a PopulationBatchNormalization of the same configuration; all weights are
    copied (so the statistics start as the BN layers' moving statistics)."""

    def clone(layer):
        if isinstance(layer, keras.layers.BatchNormalization):
            return PopulationBatchNormalization.from_config(layer.get_config())
        return layer.__class__.from_config(layer.get_config())

    if not isinstance(model, keras.Model) or not hasattr(model, "inputs") or not model.inputs:
        raise ValueError(
            f"convert_batch_norm: received {type(model).__name__}; expected a built "
            "functional or Sequential keras.Model with an Input."
        )
    copy = keras.models.clone_model(model, clone_function=clone)
    if len(copy.weights) != len(model.weights):
        raise ValueError(
            f"convert_batch_norm: the copy has {len(copy.weights)} weights but the "
            f"model has {len(model.weights)}; nested models are not supported."
        )
    copy.set_weights(model.get_weights())
    return copy


def _combine_moments(counts, means, variances):
    """Exact mean and biased variance of a union of batches (float64)."""
    counts = np.asarray(counts, np.float64)[:, None]
    means = np.asarray(means, np.float64)
    variances = np.asarray(variances, np.float64)
    total = counts.sum()
    mean = (counts * means).sum(axis=0) / total
    variance = (counts * (variances + (means - mean) ** 2)).sum(axis=0) / total
    return mean, variance


class PopulationStatistics:
    """Recomputes the population statistics of a model's population-BN layers.

    Args:
      model: a functional keras.Model holding PopulationBatchNormalization layers.
      batch_size: examples per forward batch while computing the statistics.
    """

    def __init__(self, model: keras.Model, *, batch_size: int = 256):
        if batch_size < 1:
            raise ValueError(
                f"PopulationStatistics: received batch_size={batch_size}; expected an "
                "integer >= 1."
            )
        self.model = model
        self.batch_size = int(batch_size)
        self.layers = population_bn_layers(model)
        if not self.layers:
            raise ValueError(
                "PopulationStatistics: the model has no PopulationBatchNormalization "
                "layer; build it with batch_norm='population' (see convert_batch_norm)."
            )
        self._moments = [self._moments_function(layer) for layer in self.layers]
        self.num_updates = 0

    def _moments_function(self, layer):
        # A truncated copy of the graph up to the layer's inputs (sharing weights).
        inputs = self.model.inputs
        probe = keras.Model(inputs[0] if len(inputs) == 1 else inputs, layer.input)
        axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]

        @tf.function(reduce_retracing=True)
        def moments(x):
            activations = probe(x, training=False)
            rank = len(activations.shape)
            channel_axis = axis % rank
            axes = [a for a in range(rank) if a != channel_axis]
            mean, variance = tf.nn.moments(activations, axes=axes)
            count = tf.reduce_prod(tf.gather(tf.shape(activations), axes))
            return count, mean, variance

        return moments

    def update(self, x: np.ndarray) -> None:
        """Sets every layer's statistics to those of its inputs over all of x [N, ...]."""
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] == 0:
            raise ValueError(
                f"PopulationStatistics.update: received x of shape {x.shape}; expected "
                "at least one example."
            )
        for layer, moments in zip(self.layers, self._moments):
            counts, means, variances = [], [], []
            for start in range(0, x.shape[0], self.batch_size):
                count, mean, variance = moments(tf.constant(x[start : start + self.batch_size]))
                counts.append(int(count))
                means.append(mean.numpy())
                variances.append(variance.numpy())
            mean, variance = _combine_moments(counts, means, variances)
            layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
            layer.moving_variance.assign(variance.astype(layer.moving_variance.dtype))
        self.num_updates += 1

