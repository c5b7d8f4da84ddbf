"""`train(config, workdir)`: a config's model trained with spectra along the way.

WORKDIR/
  config.json                        the resolved configuration
  spectrum_data.npz                  x, y: the examples whose Hessian the callback takes
  train/                             TensorBoard: train/loss, train/accuracy, ...
  spectrum/                          TensorBoard: hessian/* scalars and density images,
                                     and spectrum-stepXXXXXXXX.npz per evaluation
  checkpoints/step-XXXXXXXX.keras    at train.checkpoint_steps and the last step
  model.keras                        the final model (what the config's `spectrum`
                                     section reads; its results go to spectrum_final/)
  summary.json                       timings, final metrics, one line per spectrum

A workdir that holds an earlier run is written over (a warning says so) once the
data, the model and the options have been accepted; a run refused before that writes
nothing there. Files the new run does not write stay: the old TensorBoard event files
beside the new ones, spectrum_final/, and checkpoints and spectra of other steps.

`tensorboard --logdir=WORKDIR` shows the train and spectrum runs side by side.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from typing import Optional

import keras
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow.python.framework import config as tf_config

import hessian_tf
from hessian_tf.io import results
from hessian_tf.keras import SpectrumCallback
from hessian_tf.training import callbacks as callbacks_lib
from hessian_tf.training import config as config_lib
from hessian_tf.training import data as data_lib
from hessian_tf.training import models as models_lib

SPECTRUM_DATA_FILE = "spectrum_data.npz"
MODEL_FILE = "model.keras"
CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"


def resolve(config: ml_collections.ConfigDict, workdir: Optional[str] = None):
    """A resolved, validated copy of the config, with `workdir` applied (the
    spectrum section's paths follow it); the given config is not changed."""
    # A deep copy keeps the references between fields, within the copy.
    config = copy.deepcopy(config)
    if workdir is not None:
        if "workdir" not in config:
            config_lib.validate(config)  # which names the missing section
        config.workdir = workdir
    config = config.copy_and_resolve_references()
    config_lib.validate(config)
    return config


@contextlib.contextmanager
def _mock_data(num_examples: int):
    if not num_examples:
        yield
        return
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=num_examples):
        yield


@contextlib.contextmanager
def _op_determinism(enabled: bool):
    was_enabled = tf_config.is_op_determinism_enabled()
    if enabled and not was_enabled:
        tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        if enabled and not was_enabled:
            tf_config.disable_op_determinism()


def _write_json(directory: str, name: str, value: dict) -> None:
    results.write_files(directory, {name: results.json_writer(value)})


def train(config: ml_collections.ConfigDict, workdir: Optional[str] = None) -> dict:
    """Trains `config.train`'s model in `workdir` (default: config.workdir).

    Returns the summary also written to WORKDIR/summary.json. Raises ValueError
    for bad options, before any work.
    """
    started = time.perf_counter()
    config = resolve(config, workdir)
    train_config = config.train
    workdir = config.workdir
    created = results.check_writable(workdir, flag="--workdir")
    try:
        with _mock_data(train_config.mock_data), _op_determinism(train_config.deterministic):
            summary = _train(config, train_config, workdir, started)
    except BaseException:
        # A run refused before training (its data, model or options) leaves no new
        # directory; an earlier run's files were not touched (_train writes first at fit).
        results.remove_empty_directories(created)
        raise
    return summary


def _train(config, train_config, workdir, started) -> dict:
    keras.utils.set_random_seed(train_config.seed)
    dataset = data_lib.training_dataset(train_config)
    input_shape = data_lib.input_shape(dataset)
    model = models_lib.build_model(train_config, input_shape)
    models_lib.compile_model(model, train_config)
    num_params = int(sum(np.prod(v.shape) for v in model.trainable_variables))
    logging.info(
        "%s (batch norm %s): %d trainable parameters, inputs %s",
        train_config.model, train_config.batch_norm, num_params, input_shape,
    )

    callbacks = [callbacks_lib.StopAtStep(train_config.num_steps)]
    population = None
    if train_config.batch_norm == "population":
        x_population, _ = data_lib.fixed_examples(
            train_config, split=train_config.split,
            num_examples=train_config.population_bn.num_examples,
        )
        population = callbacks_lib.PopulationStatisticsUpdates(
            x_population,
            every_n_steps=train_config.population_bn.update_every_steps,
            batch_size=train_config.population_bn.batch_size,
        )
        callbacks.append(population)  # before anything that reads the model at a step
    checkpoints = callbacks_lib.Checkpoints(
        os.path.join(workdir, "checkpoints"), train_config.checkpoint_steps
    )
    callbacks.append(checkpoints)
    spectrum_callback = None
    options = train_config.spectrum_callback
    if options.enabled:
        x, y = data_lib.fixed_examples(
            train_config, split=options.split or train_config.split,
            num_examples=options.num_examples,
        )
        spectrum_data = {"x": x, "y": y}
        spectrum_callback = SpectrumCallback(
            (x, y),
            log_dir=os.path.join(workdir, "spectrum"),
            every_n_steps=options.every_n_steps,
            lanczos_steps=options.lanczos_steps,
            num_draws=options.num_draws,
            bn_mode=options.bn_mode,
            batch_size=options.batch_size,
            seed=options.seed,
            cache_residuals=options.cache_residuals,
        )
        callbacks.append(spectrum_callback)
    training_log = callbacks_lib.TrainingLog(
        os.path.join(workdir, "train"), every_n_steps=train_config.log_every_steps
    )
    callbacks.append(training_log)

    # The first files, once the data, the model and the options have been accepted.
    if os.path.exists(os.path.join(workdir, SUMMARY_FILE)) or os.path.exists(
        os.path.join(workdir, CONFIG_FILE)
    ):
        logging.warning(
            "%s holds an earlier run: the files this run writes replace its, and the rest "
            "stay (its TensorBoard events, spectrum_final/, checkpoints and spectra of "
            "other steps); use a fresh --workdir for a clean one.", workdir,
        )
    _write_json(workdir, CONFIG_FILE, json.loads(config.to_json_best_effort()))
    if spectrum_callback is not None:
        results.write_files(workdir, {SPECTRUM_DATA_FILE: results.npz_writer(spectrum_data)})
    steps_per_epoch = train_config.steps_per_epoch or train_config.num_steps
    epochs = math.ceil(train_config.num_steps / steps_per_epoch)
    fit_started = time.perf_counter()
    model.fit(
        dataset, epochs=epochs, steps_per_epoch=steps_per_epoch, callbacks=callbacks, verbose=0,
        shuffle=False,  # the dataset shuffles itself, seeded
    )
    fit_seconds = time.perf_counter() - fit_started
    final_step = callbacks_lib.global_step(model)
    checkpoints.save(final_step)
    model_path = callbacks_lib.save_model(model, os.path.join(workdir, MODEL_FILE))

    evaluations = spectrum_callback.evaluations if spectrum_callback else []
    spectrum_seconds = sum(e.seconds for e in evaluations)
    population_seconds = population.seconds if population else 0.0
    summary = {
        "version": hessian_tf.__version__,
        "model": train_config.model,
        "batch_norm": train_config.batch_norm,
        "num_params": num_params,
        "input_shape": list(input_shape),
        "num_steps": final_step,
        "final_loss": training_log.last.get("train/loss"),
        "final_accuracy": training_log.last.get("train/accuracy"),
        "final_learning_rate": models_lib.learning_rate_at(model, max(final_step - 1, 0)),
        "seconds": time.perf_counter() - started,
        "fit_seconds": fit_seconds,
        "spectrum_seconds": spectrum_seconds,
        "population_bn_seconds": population_seconds,
        "training_seconds": fit_seconds - spectrum_seconds - population_seconds,
        "checkpoints": {str(step): path for step, path in sorted(checkpoints.paths.items())},
        "model_file": model_path,
        "spectra": [
            {
                "step": e.step,
                "lambda_max": e.spectrum.statistics.lambda_max,
                "lambda_min": e.spectrum.statistics.lambda_min,
                "negative_mass": e.spectrum.statistics.negative_mass,
                "bulk_edge": e.bulk_edge,
                "lambda_max_over_bulk_edge": e.lambda_max_over_bulk_edge,
                "seconds": e.seconds,
                "path": e.path,
            }
            for e in evaluations
        ],
    }
    _write_json(workdir, SUMMARY_FILE, summary)
    logging.info(
        "Trained %d steps in %.1f s (%.1f s of it for spectra); wrote %s",
        final_step, summary["seconds"], spectrum_seconds, workdir,
    )
    return summary
