"""The training loop's periodic work, as Keras callbacks keyed on the optimizer's
update count (`model.optimizer.iterations`, the step TensorBoard shows)."""

from __future__ import annotations

import os
import time
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow.core.framework import summary_pb2

from hessian_tf.io import results
from hessian_tf.models import population_bn
from hessian_tf.training import models as models_lib

CHECKPOINT_FORMAT = "step-{step:08d}.keras"
TRAIN_SCALAR_TAGS = (
    "train/loss", "train/accuracy", "train/learning_rate", "train/steps_per_second"
)


def global_step(model: keras.Model) -> int:
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


def save_model(model: keras.Model, path: str) -> str:
    """Writes `path` whole (temporary file, then rename)."""
    directory, name = os.path.split(path)
    os.makedirs(directory or ".", exist_ok=True)
    return results.write_files(directory or ".", {name: model.save})[0]


class StopAtStep(keras.callbacks.Callback):
    """Ends `fit` once the optimizer has taken `num_steps` updates."""

    def __init__(self, num_steps: int):
        super().__init__()
        self.num_steps = int(num_steps)

    def on_train_batch_end(self, batch, logs=None):
        if global_step(self.model) >= self.num_steps:
            self.model.stop_training = True


class Checkpoints(keras.callbacks.Callback):
    """Saves DIRECTORY/step-XXXXXXXX.keras at the given steps (0: before training).

    Attributes:
      paths: {step: path} of the checkpoints written.
    """

    def __init__(self, directory: str, steps: Sequence[int]):
        super().__init__()
        self.directory = directory
        self.steps = frozenset(int(step) for step in steps)
        self.paths: dict[int, str] = {}

    def save(self, step: int) -> str:
        if step not in self.paths:
            path = os.path.join(self.directory, CHECKPOINT_FORMAT.format(step=step))
            self.paths[step] = save_model(self.model, path)
            logging.info("Saved checkpoint %s", path)
        return self.paths[step]

    def on_train_begin(self, logs=None):
        step = global_step(self.model)
        if step in self.steps:
            self.save(step)

    def on_train_batch_end(self, batch, logs=None):
        step = global_step(self.model)
        if step in self.steps:
            self.save(step)


class PopulationStatisticsUpdates(keras.callbacks.Callback):
    """Recomputes population-BN statistics on `x` before training and every
    `every_n_steps` steps. Put it before callbacks that read the model at a step."""

    def __init__(self, x: np.ndarray, *, every_n_steps: int, batch_size: int):
        super().__init__()
        self.x = x
        self.every_n_steps = int(every_n_steps)
        self.batch_size = int(batch_size)
        self.updater = None
        self.seconds = 0.0

    def _update(self):
        started = time.perf_counter()
        if self.updater is None or self.updater.model is not self.model:
            self.updater = population_bn.PopulationStatistics(
                self.model, batch_size=self.batch_size
            )
        self.updater.update(self.x)
        self.seconds += time.perf_counter() - started

    def on_train_begin(self, logs=None):
        self._update()
        logging.info(
            "Population BN: statistics of %d layers over %d examples (%.1f s)",
            len(self.updater.layers), self.x.shape[0], self.seconds,
        )

    def on_train_batch_end(self, batch, logs=None):
        if global_step(self.model) % self.every_n_steps == 0:
            self._update()


def _scalar_metadata() -> summary_pb2.SummaryMetadata:
    # TensorBoard's scalar plugin (plugin data version 0 serialises to no bytes).
    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
    )


class TrainingLog(keras.callbacks.Callback):
    """Every `every_n_steps` steps: the mean loss and accuracy of the steps since
    the last report, the learning rate and the speed, to TensorBoard (LOG_DIR,
    tags TRAIN_SCALAR_TAGS) and to the log.

    Keras reports running means over the epoch; differences of running sums give
    the window's mean (batches have equal sizes: the training batches drop the
    remainder).

    Attributes:
      last: the last values written, by tag.
    """

    def __init__(self, log_dir: str, *, every_n_steps: int):
        super().__init__()
        self.log_dir = log_dir
        self.every_n_steps = int(every_n_steps)
        self.last: dict[str, float] = {}
        self._writer = None

    def on_train_begin(self, logs=None):
        self._writer = tf.summary.create_file_writer(self.log_dir)
        self._reset()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_batches = 0
        self._epoch_sums = {"loss": 0.0, "accuracy": 0.0}

    def _reset(self):
        self._window = {"loss": 0.0, "accuracy": 0.0}
        self._window_batches = 0
        self._window_started = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        # Per-batch values from the epoch's running means.
        count = batch + 1
        for name in ("loss", "accuracy"):
            if name in logs:
                total = float(logs[name]) * count
                self._window[name] += total - self._epoch_sums[name]
                self._epoch_sums[name] = total
        self._window_batches += 1
        step = global_step(self.model)
        if step % self.every_n_steps == 0:
            self._report(step)

    def _report(self, step: int):
        seconds = time.perf_counter() - self._window_started
        values = {
            "train/loss": self._window["loss"] / self._window_batches,
            # Differences of Keras's float32 running means: a window of no correct
            # prediction came out as -1.5e-8; a fraction is kept within [0, 1].
            "train/accuracy": min(1.0, max(0.0, self._window["accuracy"] / self._window_batches)),
            "train/learning_rate": models_lib.learning_rate_at(self.model, step - 1),
            "train/steps_per_second": self._window_batches / max(seconds, 1e-9),
        }
        with self._writer.as_default(step=step), tf.summary.record_if(True):
            for tag, value in values.items():
                tf.summary.write(
                    tag, tf.constant(value, tf.float32), step=step, metadata=_scalar_metadata()
                )
        self._writer.flush()
        self.last = values
        logging.info(
            "step %d: loss %.4f, accuracy %.4f, learning rate %.4g, %.2f steps/s",
            step, values["train/loss"], values["train/accuracy"],
            values["train/learning_rate"], values["train/steps_per_second"],
        )
        self._reset()

    def on_train_end(self, logs=None):
        if self._window_batches:
            self._report(global_step(self.model))
        if self._writer is not None:
            self._writer.close()
            self._writer = None
