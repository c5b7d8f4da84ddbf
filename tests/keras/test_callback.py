"""SpectrumCallback: schedule, summaries, files, untouched training, strategies."""

import glob
import os
import random

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import config as tf_config

from hessian_tf import operators
from hessian_tf import spectrum as spectrum_lib
from hessian_tf.io.datasets import load_digits
from hessian_tf.keras import (
    IMAGE_TAG,
    SCALAR_TAGS,
    Schedule,
    SpectrumCallback,
    bulk_edge,
    materialize,
)

NUM_TRAIN = 256
TRAIN_BATCH = 32  # 8 steps per epoch
LANCZOS_STEPS = 6


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits()
    return x[:NUM_TRAIN], y[:NUM_TRAIN]


@pytest.fixture
def op_determinism():
    was_enabled = tf_config.is_op_determinism_enabled()
    tf.config.experimental.enable_op_determinism()
    yield
    if not was_enabled:
        tf_config.disable_op_determinism()


def bn_dropout_mlp(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.BatchNormalization(),
        keras.layers.Dropout(0.3),
        keras.layers.Dense(10),
    ])
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def spectrum_callback(data, log_dir, **kwargs):
    options = dict(every_n_steps=4, lanczos_steps=LANCZOS_STEPS, batch_size=64)
    options.update(kwargs)
    return SpectrumCallback(data, log_dir=str(log_dir), **options)


def read_events(log_dir):
    """{tag: {step: value}} from every event file in log_dir; images as PNG bytes."""
    found = {}
    for path in sorted(glob.glob(os.path.join(str(log_dir), "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                array = tf.make_ndarray(value.tensor)
                plugin = value.metadata.plugin_data.plugin_name
                found.setdefault(value.tag, {})[event.step] = (plugin, array)
    return found


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("kwargs, named", [
    ({}, "every_n_steps=None and every_n_epochs=None"),
    ({"every_n_steps": 5, "every_n_epochs": 1}, "every_n_steps=5 and every_n_epochs=1"),
    ({"every_n_steps": 0}, "every_n_steps=0"),
    ({"every_n_epochs": -2}, "every_n_epochs=-2"),
    ({"every_n_steps": 2.5}, "every_n_steps=2.5"),
    ({"every_n_steps": True}, "every_n_steps=True"),
])
def test_schedule_needs_exactly_one_positive_period(kwargs, named, tmp_path):
    x, y = np.zeros((4, 3), np.float32), np.zeros(4, np.int32)
    with pytest.raises(ValueError) as raised:
        SpectrumCallback((x, y), log_dir=str(tmp_path), **kwargs)
    message = str(raised.value)
    assert named in message and "expected" in message and "Fix:" in message


@pytest.mark.parametrize("kwargs, named", [
    ({"lanczos_steps": 0}, "lanczos_steps=0"),
    ({"num_draws": 0}, "num_draws=0"),
    ({"bn_mode": "eval"}, "bn_mode='eval'"),
    ({"loss": "hinge"}, "loss='hinge'"),
    ({"bulk_fraction": 1.0}, "bulk_fraction=1.0"),
    ({"log_dir": ""}, "log_dir=''"),
    ({"lockstep_draws": -1}, "lockstep_draws=-1"),
    ({"lockstep_draws": 2.5}, "lockstep_draws=2.5"),
    ({"lockstep_draws": True}, "lockstep_draws=True"),
    ({"cache_residuals": 1}, "cache_residuals=1"),
    ({"unroll_steps": -1}, "unroll_steps=-1"),
    ({"unroll_steps": 8.0}, "unroll_steps=8.0"),
    ({"graph_optimization": "fast"}, "graph_optimization='fast'"),
    ({"seed": -1}, "seed=-1"),
    ({"seed": 1.5}, "seed=1.5"),
    # They had passed through as TypeErrors, or been taken as truthy or infinite.
    ({"lanczos_steps": None}, "lanczos_steps=None"),
    ({"batch_size": None}, "batch_size=None"),
    ({"bulk_fraction": "abc"}, "bulk_fraction='abc'"),
    ({"kernel_width": "abc"}, "kernel_width='abc'"),
    ({"kernel_width": float("inf")}, "kernel_width=inf"),
    ({"regularization": "False"}, "regularization='False'"),
    ({"log_dir": 5}, "log_dir=5"),
])
def test_bad_options_are_named(kwargs, named, tmp_path):
    x, y = np.zeros((4, 3), np.float32), np.zeros(4, np.int32)
    options = dict(log_dir=str(tmp_path), every_n_steps=1)
    options.update(kwargs)
    with pytest.raises(ValueError, match="Fix:") as raised:
        SpectrumCallback((x, y), **options)
    assert named in str(raised.value)


def test_numpy_integers_are_integers_as_the_configs_are(tmp_path):
    # lockstep_draws took Python's int alone (np.int64 from a config was refused).
    x, y = np.zeros((4, 3), np.float32), np.zeros(4, np.int32)
    callback = SpectrumCallback((x, y), log_dir=str(tmp_path), every_n_steps=1,
                                lockstep_draws=np.int64(2), seed=np.int32(3))
    assert callback.lockstep_draws == 2 and type(callback.lockstep_draws) is int


def test_schedule_with_injected_steps():
    every_four = Schedule(every_n_steps=4)
    assert [s for s in range(1, 13) if every_four.due_after_step(s, (s - 1))] == [4, 8, 12]
    # Strides of 3 steps (steps_per_execution=3): the first step at or past each
    # multiple of 4 (4 → 6, 8 → 9, 12 → 12), and none between 12 and 15.
    assert [s for s in range(3, 16, 3) if every_four.due_after_step(s, s - 3)] == [6, 9, 12]
    assert not every_four.due_after_epoch(0)
    every_two_epochs = Schedule(every_n_epochs=2)
    assert [e for e in range(6) if every_two_epochs.due_after_epoch(e)] == [1, 3, 5]
    assert not every_two_epochs.due_after_step(4, 3)


def test_planned_evaluations_of_a_fit():
    # The one before training, then one per period; unknown without epochs or steps.
    assert Schedule(every_n_epochs=2).planned_evaluations(epochs=5, steps=None) == 3
    assert Schedule(every_n_steps=4).planned_evaluations(epochs=2, steps=8) == 5
    assert Schedule(every_n_steps=4).planned_evaluations(epochs=2, steps=None) is None
    assert Schedule(every_n_epochs=1).planned_evaluations(epochs=None, steps=8) is None


@pytest.mark.parametrize("batch_size, check", [(64, 1), (32, 0)])
def test_auto_method_is_timed_within_the_fits_products_under_light_graphs(
        digits, tmp_path, monkeypatch, batch_size, check):
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.eager import context

    seen = []
    choose = operators.HessianOperator.choose_method

    def recording(self, block_size=1, num_products=None, vectors=None):
        config = config_pb2.ConfigProto()
        config.ParseFromString(context.context().function_call_options.config_proto_serialized)
        seen.append((num_products, config.graph_options.rewrite_options.meta_optimizer_iterations))
        return choose(self, block_size, num_products, vectors)

    monkeypatch.setattr(operators.HessianOperator, "choose_method", recording)
    before = context.context().function_call_options
    x, y = digits
    callback = spectrum_callback((x, y), tmp_path, every_n_epochs=1, every_n_steps=None,
                                 graph_optimization="light", batch_size=batch_size)
    model = bn_dropout_mlp()
    model.fit(x, y, batch_size=TRAIN_BATCH, epochs=2, verbose=0, callbacks=[callback])
    # 3 evaluations (before training, after each epoch) of LANCZOS_STEPS products, and
    # the determinism check's where the data are at most 4 batches (else it runs over
    # the first batches: no product); timed in a light set-up; the training's untouched.
    assert seen == [(3 * LANCZOS_STEPS + check, 1)]  # RewriterConfig.ONE
    assert context.context().function_call_options is before
    assert len(callback.evaluations) == 3


def test_bulk_edge_is_a_quantile_of_the_pooled_measure():
    nodes = np.array([1.0, 2.0, 3.0, 4.0])
    weights = np.array([0.5, 0.3, 0.19, 0.01])
    assert bulk_edge(nodes, weights, fraction=0.99) == 3.0
    assert bulk_edge(nodes, weights, fraction=0.995) == 4.0
    assert bulk_edge(nodes, weights, fraction=0.5) == 1.0
    # Two draws, the second padded after 2 nodes: each draw carries half the mass.
    pooled_nodes = np.array([[1.0, 2.0, 3.0], [0.0, 10.0, 0.0]])
    pooled_weights = np.array([[0.25, 0.25, 0.5], [0.9, 0.1, 0.0]])
    # Sorted: 0 (.45), 1 (.125), 2 (.125), 3 (.25), 10 (.05).
    assert bulk_edge(pooled_nodes, pooled_weights, [3, 2], fraction=0.9) == 3.0
    assert bulk_edge(pooled_nodes, pooled_weights, [3, 2], fraction=0.96) == 10.0


def test_dataset_is_read_once_into_arrays(digits):
    x, y = digits
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(100)
    got_x, got_y = materialize(dataset)
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_y, y)
    with pytest.raises(ValueError, match="repeats forever"):
        materialize(dataset.repeat())
    with pytest.raises(ValueError, match="3-tuple"):
        materialize(tf.data.Dataset.from_tensor_slices((x, y, y)).batch(100))
    with pytest.raises(ValueError, match=r"\.batch\(N\)"):
        materialize(tf.data.Dataset.from_tensor_slices((x[:, 0], y)))


# -------------------------------------------------------------- summaries, files


def test_events_and_files_at_the_scheduled_steps(digits, tmp_path):
    x, y = digits
    model = bn_dropout_mlp()
    dataset = tf.data.Dataset.from_tensor_slices((x[:150], y[:150])).batch(50)
    callback = spectrum_callback(dataset, tmp_path, every_n_steps=None, every_n_epochs=1)
    model.fit(x, y, batch_size=TRAIN_BATCH, epochs=2, verbose=0, callbacks=[callback])

    expected_steps = [0, 8, 16]  # before training, after each epoch of 8 steps
    assert [e.step for e in callback.evaluations] == expected_steps
    events = read_events(tmp_path)
    for tag in SCALAR_TAGS:
        assert sorted(events[tag]) == expected_steps, tag
        for step, (plugin, value) in events[tag].items():
            assert plugin == "scalars" and value.shape == () and np.isfinite(value), (tag, step)
    for evaluation in callback.evaluations:
        statistics = evaluation.spectrum.statistics
        _, value = events["hessian/lambda_max"][evaluation.step]
        assert value == pytest.approx(statistics.lambda_max, rel=1e-6)
        _, value = events["hessian/lambda_max_over_bulk_edge"][evaluation.step]
        assert value == pytest.approx(statistics.lambda_max / evaluation.bulk_edge, rel=1e-6)
    assert sorted(events[IMAGE_TAG]) == expected_steps
    plugin, image = events[IMAGE_TAG][0]
    assert plugin == "images" and image.shape == (3,)
    width, height = int(image[0]), int(image[1])
    assert tf.io.decode_png(image[2]).shape[:2] == (height, width)

    files = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "*.npz")))
    assert files == [f"spectrum-step{step:08d}.npz" for step in expected_steps]
    num_parameters = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    with np.load(tmp_path / "spectrum-step00000016.npz") as arrays:
        assert int(arrays["step"]) == 16
        for key in ("alphas", "nodes", "weights", "ritz_residuals"):
            assert arrays[key].shape == (1, LANCZOS_STEPS), key
        assert arrays["betas"].shape == (1, LANCZOS_STEPS - 1)
        np.testing.assert_allclose(arrays["weights"].sum(axis=1), 1.0, atol=1e-12)
        assert np.trapezoid(arrays["density"], arrays["grid"]) == pytest.approx(1.0)
        assert float(arrays["bulk_edge"]) == callback.evaluations[-1].bulk_edge
        # The same start vector at every evaluation, so it matches a fresh run by the
        # method the callback's method='auto' chose (the two differ by float32 rounding).
        fresh = spectrum_lib.stochastic_lanczos_quadrature(
            operators.HessianOperator(operators.KerasModelFunction(model), x[:150], y[:150],
                                      batch_size=64, method=callback._operator.method).matvec,
            num_parameters, lanczos_steps=LANCZOS_STEPS, seed=0)
        np.testing.assert_allclose(arrays["alphas"], fresh.alphas, rtol=1e-9)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]

    # Training on: step 16 is not evaluated twice; the new epoch ends at step 24.
    model.fit(x, y, batch_size=TRAIN_BATCH, epochs=1, verbose=0, callbacks=[callback])
    assert [e.step for e in callback.evaluations] == [0, 8, 16, 24]
    assert sorted(read_events(tmp_path)["hessian/trace_estimate"]) == [0, 8, 16, 24]


def test_cached_residuals_follow_training_and_are_freed(digits, tmp_path):
    x, y = digits
    model = bn_dropout_mlp()
    data = (x[:150], y[:150])  # batches of 64, 64 and an uneven 22
    ordinary = spectrum_callback(data, tmp_path / "ordinary")
    cached = spectrum_callback(data, tmp_path / "cached", cache_residuals=True)
    model.fit(x, y, batch_size=TRAIN_BATCH, epochs=1, verbose=0, callbacks=[ordinary, cached])
    assert [e.step for e in cached.evaluations] == [0, 4, 8]
    for plain, fast in zip(ordinary.evaluations, cached.evaluations):
        np.testing.assert_allclose(fast.spectrum.alphas, plain.spectrum.alphas, rtol=1e-4)
    # Training changed the spectrum, so residuals kept from step 0 would show.
    first, last = (e.spectrum.alphas for e in (cached.evaluations[0], cached.evaluations[-1]))
    assert np.max(np.abs(last - first)) > 1e-2 * np.max(np.abs(first))
    assert cached._operator.cache_residuals and cached._operator._cache is None


def test_random_inference_is_an_error_at_the_first_evaluation(digits, tmp_path):
    x, y = digits
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(8, activation="tanh"),
        # Noise even at inference: the operator is not a fixed matrix.
        keras.layers.Lambda(lambda t: t + 0.1 * tf.random.normal(tf.shape(t))),
        keras.layers.Dense(10),
    ])
    model.compile(optimizer="sgd",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback = spectrum_callback((x, y), tmp_path)
    with pytest.raises(operators.NonDeterministicError, match="training step 0.*differ"):
        model.fit(x, y, batch_size=TRAIN_BATCH, epochs=1, verbose=0, callbacks=[callback])
    assert int(model.optimizer.iterations.numpy()) == 0


def test_unbuilt_model_is_an_error_before_training(digits, tmp_path):
    x, y = digits
    model = keras.Sequential([keras.layers.Dense(10)])
    model.compile(optimizer="sgd",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match="not built.*Fix:"):
        model.fit(x, y, batch_size=TRAIN_BATCH, epochs=1, verbose=0,
                  callbacks=[spectrum_callback((x, y), tmp_path)])


def test_bases_beyond_the_hosts_memory_are_an_error_before_training(
        digits, tmp_path, monkeypatch):
    x, y = digits
    model = bn_dropout_mlp()
    monkeypatch.setattr(spectrum_lib, "host_memory_bytes", lambda: 2**10)
    with pytest.raises(ValueError, match=r"^SpectrumCallback: lanczos_steps=\d+: the Lanczos "
                       r"basis .* more than the memory here"):
        model.fit(x, y, batch_size=TRAIN_BATCH, epochs=1, verbose=0,
                  callbacks=[spectrum_callback((x, y), tmp_path)])
    assert int(model.optimizer.iterations.numpy()) == 0


def test_a_mixed_precision_model_is_warned_of(digits, tmp_path):
    from absl import logging as absl_logging

    x, y = digits
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)),
                              keras.layers.Dense(8, activation="tanh", dtype="mixed_float16"),
                              keras.layers.Dense(10, dtype="float32")])
    model.compile(optimizer="sgd",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    warnings = []
    handler = type("Handler", (__import__("logging").Handler,), {
        "emit": lambda self, record: warnings.append(record.getMessage())})()
    absl_logging.get_absl_logger().addHandler(handler)
    try:
        model.fit(x, y, batch_size=TRAIN_BATCH, epochs=1, verbose=0, steps_per_epoch=1,
                  callbacks=[spectrum_callback((x, y), tmp_path)])
    finally:
        absl_logging.get_absl_logger().removeHandler(handler)
    expected = ("SpectrumCallback: 1 layer(s) of the model compute in float16 or bfloat16 "
                f"({model.layers[0].name}), and so do the products")
    assert sum(message.startswith(expected) for message in warnings) == 1


def test_a_model_compiled_with_another_loss_is_warned_of(digits, tmp_path):
    # The training loss (with label smoothing) is not the callback's: the spectrum had
    # been of the callback's loss without a word.
    from absl import logging as absl_logging

    x, y = digits
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])
    model.compile(optimizer="sgd", loss=keras.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=0.1))
    warnings = []
    handler = type("Handler", (__import__("logging").Handler,), {
        "emit": lambda self, record: warnings.append(record.getMessage())})()
    absl_logging.get_absl_logger().addHandler(handler)
    try:
        model.fit(x, keras.utils.to_categorical(y, 10), batch_size=TRAIN_BATCH, epochs=1,
                  verbose=0, steps_per_epoch=1, callbacks=[spectrum_callback(
                      (x, keras.utils.to_categorical(y, 10)), tmp_path,
                      loss="categorical_crossentropy")])
    finally:
        absl_logging.get_absl_logger().removeHandler(handler)
    assert [m for m in warnings if "compiled with" in m] == [
        "SpectrumCallback: the model was compiled with loss=CategoricalCrossentropy "
        "(label_smoothing=0.1); the spectrum is of the callback's "
        "loss='categorical_crossentropy', without label_smoothing=0.1"]


# ------------------------------------------------------------ untouched training


class _TrainsOnce(keras.callbacks.Callback):
    """A callback that does disturb training: it calls the model in training mode."""

    def __init__(self, x):
        super().__init__()
        self.x = x

    def on_train_batch_end(self, batch, logs=None):
        if batch == 3:
            self.model(self.x, training=True)


def train_and_record(x, y, callbacks):
    model = bn_dropout_mlp(seed=3)
    model.fit(x, y, batch_size=TRAIN_BATCH, epochs=2, verbose=0, shuffle=True,
              callbacks=callbacks)
    return {
        # Lists in creation order (paths carry per-process counters): a variable the
        # callback created would show up here as an extra entry.
        "model": [(v.path, v.numpy()) for v in model.variables],
        "optimizer": [(v.path, v.numpy()) for v in model.optimizer.variables],
        # Every random source training or a later user could draw from.
        "tf_random": tf.random.uniform([4]).numpy(),
        "keras_random": keras.random.uniform([4]).numpy(),
        "numpy_random": np.random.random(4),
        "python_random": random.random(),
    }


def assert_same_record(first, second):
    for part in ("model", "optimizer"):
        assert len(first[part]) == len(second[part]), part
        for (path, value), (_, other) in zip(first[part], second[part]):
            assert other.shape == value.shape and other.dtype == value.dtype, path
            np.testing.assert_array_equal(other, value, err_msg=path)
    for source in ("tf_random", "keras_random", "numpy_random", "python_random"):
        np.testing.assert_array_equal(second[source], first[source], err_msg=source)


@pytest.mark.parametrize("bn_mode", ["inference", "train"])
def test_training_is_bit_identical_with_the_callback(bn_mode, digits, tmp_path, op_determinism):
    x, y = digits
    without = train_and_record(x, y, [])
    callback = spectrum_callback((x[:128], y[:128]), tmp_path, bn_mode=bn_mode, every_n_steps=5)
    with_callback = train_and_record(x, y, [callback])
    assert [e.step for e in callback.evaluations] == [0, 5, 10, 15]
    # BN moving statistics, seed-generator states, weights, Adam moments, iterations.
    assert any("moving_mean" in path for path, _ in without["model"])
    assert any("seed_generator_state" in path for path, _ in without["model"])
    assert any("momentum" in path for path, _ in without["optimizer"])
    assert_same_record(without, with_callback)
    # The comparison does see a callback that disturbs training.
    disturbed = train_and_record(x, y, [_TrainsOnce(x[:8])])
    with pytest.raises(AssertionError):
        assert_same_record(without, disturbed)


# ------------------------------------------------------------------- strategies


def test_model_built_under_a_strategy_scope(digits, tmp_path):
    x, y = digits
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    assert len(devices) == 4
    strategy = tf.distribute.MirroredStrategy(devices)
    with strategy.scope():
        model = bn_dropout_mlp()
    callback = spectrum_callback((x[:160], y[:160]), tmp_path, every_n_steps=4, batch_size=32)
    model.fit(x, y, batch_size=TRAIN_BATCH, epochs=1, verbose=0, callbacks=[callback])
    assert callback._operator.strategy is strategy
    assert [e.step for e in callback.evaluations] == [0, 4, 8]
    assert sorted(read_events(tmp_path)["hessian/lambda_max"]) == [0, 4, 8]
    # Each replica trained its own copy of the BN moving statistics ...
    moving_mean = next(v for v in model.non_trainable_variables if "moving_mean" in v.path)
    copies = [c.numpy() for c in strategy.experimental_local_results(moving_mean.value)]
    assert max(np.max(np.abs(c - copies[0])) for c in copies) > 1e-4
    # ... yet the spectrum is that of the model Keras saves: on one device, as the
    # first replica's copies read outside the strategy.
    single_device = spectrum_lib.stochastic_lanczos_quadrature(
        operators.HessianOperator(operators.KerasModelFunction(model), x[:160], y[:160],
                                  batch_size=32).matvec,
        callback._operator.dim, lanczos_steps=LANCZOS_STEPS, seed=0)
    final = callback.evaluations[-1].spectrum
    np.testing.assert_allclose(final.alphas, single_device.alphas, rtol=1e-5)
    np.testing.assert_allclose(final.nodes, single_device.nodes, rtol=1e-5, atol=1e-7)
    # The residual cache is for one device: refused before training begins.
    cached = spectrum_callback((x[:160], y[:160]), tmp_path / "cached", cache_residuals=True)
    steps = int(model.optimizer.iterations.numpy())
    with pytest.raises(ValueError, match="cache_residuals=True for a model on 4 replicas"):
        model.fit(x, y, batch_size=TRAIN_BATCH, epochs=1, verbose=0, callbacks=[cached])
    assert int(model.optimizer.iterations.numpy()) == steps


class absl_messages:
    """The messages hessian_tf logs through absl while the block runs."""

    def __enter__(self):
        from absl import logging as absl_logging

        self.messages = []
        self.handler = type("Handler", (__import__("logging").Handler,), {
            "emit": lambda handler, record: self.messages.append(record.getMessage())})()
        absl_logging.get_absl_logger().addHandler(self.handler)
        self.verbosity = absl_logging.get_verbosity()
        absl_logging.set_verbosity(absl_logging.INFO)
        return self.messages

    def __exit__(self, *exc):
        from absl import logging as absl_logging

        absl_logging.set_verbosity(self.verbosity)
        absl_logging.get_absl_logger().removeHandler(self.handler)


def test_a_callback_that_fails_leaves_no_log_dir_it_made(digits, tmp_path):
    x, y = digits
    with pytest.raises(ValueError, match="same number"):
        SpectrumCallback((x[:5], y[:3]), log_dir=str(tmp_path / "made" / "logs"),
                         every_n_epochs=1)
    assert not (tmp_path / "made").exists()
    model = keras.Sequential([keras.layers.Dense(10)])  # not built: fails at fit
    model.compile(optimizer="sgd",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match="not built"):
        model.fit(x, y, batch_size=TRAIN_BATCH, epochs=1, verbose=0,
                  callbacks=[spectrum_callback((x, y), tmp_path / "made" / "logs")])
    assert not (tmp_path / "made").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"log_dir=.*cannot be created or written \(Not a "
                                         r"directory\).*Fix:"):
        SpectrumCallback((x, y), log_dir=str(tmp_path / "file" / "logs"), every_n_epochs=1)
    with pytest.raises(ValueError) as raised:
        SpectrumCallback((x, y), log_dir=str(tmp_path / "file"), every_n_epochs=1)
    assert str(raised.value) == (
        f"SpectrumCallback: received log_dir='{tmp_path / 'file'}', which cannot be created or "
        "written (a file, not a directory); expected a writable directory. Fix: pass a "
        "writable local directory.")


def test_the_operators_messages_name_the_callbacks_arguments(digits, tmp_path):
    x, y = digits
    model = bn_dropout_mlp()
    labels = y.copy()
    labels[0] = 12  # beyond the model's 10 outputs
    with pytest.raises(ValueError) as raised:
        model.fit(x, y, batch_size=TRAIN_BATCH, epochs=1, verbose=0,
                  callbacks=[spectrum_callback((x, labels), tmp_path)])
    message = str(raised.value)
    assert message.startswith("SpectrumCallback: data: labels range over [0, 12]"), message
    assert "--" not in message, message


def test_regularizers_the_headline_and_an_earlier_runs_files_are_told(digits, tmp_path):
    x, y = digits
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)),
                              keras.layers.Dense(8, activation="tanh", kernel_regularizer="l2"),
                              keras.layers.Dense(10)])
    model.compile(optimizer="sgd",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    fit = dict(batch_size=TRAIN_BATCH, epochs=1, verbose=0, steps_per_epoch=1)
    with absl_messages() as messages:
        model.fit(x, y, callbacks=[spectrum_callback((x, y), tmp_path)], **fit)
    assert ("SpectrumCallback: the model has 1 regularizer(s) (of weights or activity), whose "
            "losses are left out; regularization=True adds them") in messages
    [headline] = [m for m in messages if m.startswith("SpectrumCallback at step 0:")]
    assert "negative_mass_tolerance=" in headline and "the bulk's noise near 0 included" in headline
    assert not [m for m in messages if "already holds" in m]
    with absl_messages() as messages:
        model.fit(x, y, callbacks=[spectrum_callback((x, y), tmp_path, regularization=True)],
                  **fit)
    assert not [m for m in messages if "regularizer(s)" in m]
    assert any("sparse_categorical_crossentropy + the model's own losses (regularizers)" in m
               for m in messages)
    [warning] = [m for m in messages if "already holds" in m]
    assert warning.startswith(f"SpectrumCallback: log_dir={tmp_path} already holds 1 "
                              "spectrum file(s) of an earlier run")


def test_regularizers_are_counted_in_custom_layers_and_nested_models():
    class Wrapper(keras.layers.Layer):  # a plain layer holding a regularized one
        def __init__(self):
            super().__init__()
            self.inner = keras.layers.Dense(3, activity_regularizer="l2",
                                            kernel_regularizer="l1")

        def call(self, x):
            return self.inner(x)

    inputs = keras.Input((4,))
    nested = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, bias_regularizer="l2")])
    model = keras.Model(inputs, nested(Wrapper()(inputs)))
    assert len(model.losses) == 2  # the weights' (kernel, bias); activity losses need a call
    assert operators.KerasModelFunction(model).regularizers == 3
    assert operators.KerasModelFunction(bn_dropout_mlp()).regularizers == 0
