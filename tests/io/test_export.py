"""export_for_spectrum: SavedModels whose Hessians equal the Keras model's in both BN modes."""

import numpy as np
import pytest
import tensorflow as tf
import keras

from hessian_tf import config as config_lib
from hessian_tf import job
from hessian_tf import operators
from hessian_tf.io.export import export_for_spectrum
from hessian_tf.io.models import load_model_function
from hessian_tf.operators import HessianOperator, KerasModelFunction, SavedModelFunction
from tests.io.test_models import small_bn_model

NUM_EXAMPLES = 11
BATCH_SIZE = 4  # batches of 4, 4 and an uneven 3
BN_MODES = ("inference", "train")


def tiny_model(seed=0):
    """5 inputs → Dense(4, tanh) → BN → Dropout → Dense(3), float64: 24 + 8 + 15 = 47
    parameters; moving statistics away from (0, 1) so the two BN modes differ."""
    keras.utils.set_random_seed(seed)
    dtype = "float64"
    model = keras.Sequential([
        keras.Input((5,), dtype=dtype),
        keras.layers.Dense(4, activation="tanh", dtype=dtype),
        keras.layers.BatchNormalization(dtype=dtype),
        keras.layers.Dropout(0.5, dtype=dtype),
        keras.layers.Dense(3, dtype=dtype),
    ])
    bn = model.layers[1]
    bn.moving_mean.assign(np.full(4, 0.3))
    bn.moving_variance.assign(np.linspace(0.5, 2.0, 4))
    return model


def tiny_data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((NUM_EXAMPLES, 5))
    y = rng.integers(0, 3, NUM_EXAMPLES).astype(np.int32)
    return x, y


def snapshot(variables):
    return [np.array(v.numpy(), copy=True) for v in variables]


def assert_bit_identical(before, variables):
    after = snapshot(variables)
    assert len(before) == len(after)
    for a, b in zip(before, after):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, path, values of model.variables before export)."""
    model = tiny_model()
    before = snapshot(model.variables)
    path = str(tmp_path_factory.mktemp("export") / "tiny")
    assert export_for_spectrum(model, path) == path
    return model, path, before


def test_export_leaves_the_model_unchanged(exported):
    model, _, before = exported
    assert_bit_identical(before, model.variables)


def test_saved_model_carries_both_functions_and_the_variables_in_keras_order(exported):
    model, path, _ = exported
    loaded = tf.saved_model.load(path)
    assert hasattr(loaded, "serve") and hasattr(loaded, "serve_bn_train")
    assert len(loaded.trainable_variables) == len(model.trainable_variables) == 6
    for restored, original in zip(loaded.trainable_variables, model.trainable_variables):
        assert restored.shape == original.shape
        np.testing.assert_array_equal(restored.numpy(), original.numpy())
    # Moving mean, moving variance, dropout's seed state.
    assert len(loaded.non_trainable_variables) == len(model.non_trainable_variables) == 3
    assert len(loaded.variables) == len(model.variables) == 9
    (spec,) = loaded.serve.input_signature
    assert spec.shape.as_list() == [None, 5] and spec.dtype == tf.float64
    function = SavedModelFunction(loaded, path)
    assert function.has_bn_mode("inference") and function.has_bn_mode("train")


def test_functions_compute_the_keras_outputs_and_assign_nothing(exported):
    model, path, _ = exported
    loaded = tf.saved_model.load(path)
    before = snapshot(loaded.variables)
    x, _ = tiny_data()
    inference = loaded.serve(tf.constant(x)).numpy()
    train = loaded.serve_bn_train(tf.constant(x)).numpy()
    # Also through the traced product path (what a spectrum does).
    function = SavedModelFunction(loaded, path)
    HessianOperator(function, x, tiny_data()[1], batch_size=BATCH_SIZE,
                    bn_mode="train").matvec(np.ones(47))
    assert_bit_identical(before, loaded.variables)

    np.testing.assert_allclose(inference, model(x, training=False).numpy(), rtol=1e-12)
    keras_function = KerasModelFunction(model)
    with keras_function.mode_context("train"):
        expected, _ = keras_function(keras_function.primals(), keras_function.state(),
                                     tf.constant(x), bn_mode="train")
    np.testing.assert_allclose(train, expected.numpy(), rtol=1e-12)
    # Batch statistics, not the moving ones, and no dropout (deterministic).
    assert np.max(np.abs(train - inference)) > 1e-2
    np.testing.assert_array_equal(train, loaded.serve_bn_train(tf.constant(x)).numpy())


@pytest.mark.parametrize("bn_mode", BN_MODES)
def test_dense_hessian_equals_the_keras_models(exported, bn_mode):
    model, path, _ = exported
    x, y = tiny_data()
    saved = HessianOperator(SavedModelFunction(tf.saved_model.load(path), path), x, y,
                            batch_size=BATCH_SIZE, bn_mode=bn_mode)
    keras_operator = HessianOperator(KerasModelFunction(model), x, y,
                                     batch_size=BATCH_SIZE, bn_mode=bn_mode)
    assert saved.method == "reverse_over_reverse" and saved.dim == keras_operator.dim == 47
    expected = operators.dense_matrix(keras_operator.matvec, keras_operator.dim)
    actual = operators.dense_matrix(saved.matvec, saved.dim)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-10 * np.max(np.abs(expected)))
    np.testing.assert_allclose(actual, actual.T, atol=1e-12 * np.max(np.abs(actual)))


def test_product_under_mirrored_strategy_equals_one_device(exported):
    _, path, _ = exported
    x, y = tiny_data()
    vector = np.random.default_rng(1).standard_normal(47)
    products = []
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    # Loaded outside the strategy (the variables on one device, read by every replica)
    # and as the binary loads it, under the strategy's scope (a copy per replica).
    functions = [(None, SavedModelFunction(tf.saved_model.load(path), path)),
                 (mirrored, SavedModelFunction(tf.saved_model.load(path), path)),
                 (mirrored, load_model_function(path, mirrored))]
    assert all(isinstance(v, tf.distribute.DistributedValues) for v in functions[2][1].variables)
    assert not any(isinstance(v, tf.distribute.DistributedValues) for v in functions[1][1].variables)
    for strategy, function in functions:
        for bn_mode in ("train", "inference"):
            operator = HessianOperator(function, x, y, batch_size=BATCH_SIZE, bn_mode=bn_mode,
                                       strategy=strategy)
            products.append(operator.matvec(vector))
    # [train, inference] for each: the mirrored ones equal one device's.
    for index, product in enumerate(products[2:], start=2):
        np.testing.assert_allclose(product, products[index % 2], rtol=1e-12, atol=1e-13)
    assert not np.allclose(products[0], products[1])  # the two BN modes differ


def test_synchronized_batch_norm_exports_each_batch_statistics(exported, tmp_path):
    # The saved train function computes each batch's statistics on its own replica,
    # as the Keras model's operator does; the layer keeps its flag.
    model, _, _ = exported
    bn = model.layers[1]
    bn.synchronized = True
    try:
        path = str(tmp_path / "synchronized")
        export_for_spectrum(model, path)
        assert bn.synchronized is True
    finally:
        bn.synchronized = False
    x, y = tiny_data()
    vector = np.random.default_rng(1).standard_normal(47)
    keras_operator = HessianOperator(KerasModelFunction(model), x, y,
                                     batch_size=BATCH_SIZE, bn_mode="train")
    saved = HessianOperator(SavedModelFunction(tf.saved_model.load(path), path), x, y,
                            batch_size=BATCH_SIZE, bn_mode="train",
                            strategy=tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    np.testing.assert_allclose(saved.matvec(vector), keras_operator.matvec(vector),
                               rtol=1e-12, atol=1e-13)


def conv_model():
    """6×6×2 images → Conv2D(3, 3×3) → BN → relu → global average → Dense(2):
    57 + 6 + 8 = 71 parameters."""
    keras.utils.set_random_seed(4)
    model = keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(3, 3),
        keras.layers.BatchNormalization(),
        keras.layers.Activation("relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(2),
    ])
    model.layers[1].moving_mean.assign(np.full(3, 0.2, np.float32))
    return model


def test_saved_functions_keep_keras_dilated_convolutions(tmp_path):
    # TensorFlow's dilated kernel may not run where a saved model is loaded (its Eigen
    # kernels refuse dilations): the export keeps Keras's space-to-batch.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((7, 7, 2)), keras.layers.Conv2D(3, 3, dilation_rate=2),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
    path = str(tmp_path / "dilated")
    export_for_spectrum(model, path)
    loaded = tf.saved_model.load(path)
    graph = loaded.serve.get_concrete_function().graph
    ops = {node.op for function in graph.as_graph_def().library.function
           for node in function.node_def} | {op.type for op in graph.get_operations()}
    assert "SpaceToBatchND" in ops


def test_conv_model_exports_and_loads(tmp_path):
    model = conv_model()
    path = str(tmp_path / "conv")
    export_for_spectrum(model, path)
    loaded = tf.saved_model.load(path)
    (spec,) = loaded.serve.input_signature
    assert spec.shape.as_list() == [None, 6, 6, 2] and spec.dtype == tf.float32
    rng = np.random.default_rng(2)
    x = rng.standard_normal((7, 6, 6, 2)).astype(np.float32)
    y = rng.integers(0, 2, 7).astype(np.int32)
    np.testing.assert_allclose(loaded.serve(x).numpy(), model(x, training=False).numpy(),
                               rtol=1e-5, atol=1e-6)
    vector = rng.standard_normal(71)
    saved = HessianOperator(SavedModelFunction(loaded, path), x, y, batch_size=4,
                            bn_mode="train")
    keras_operator = HessianOperator(KerasModelFunction(model), x, y, batch_size=4,
                                     bn_mode="train")
    expected = keras_operator.matvec(vector)
    np.testing.assert_allclose(saved.matvec(vector), expected, rtol=0,
                               atol=1e-4 * np.max(np.abs(expected)))


def test_spectrum_job_in_bn_train_mode_matches_the_keras_file(tmp_path):
    model = small_bn_model()
    model.save(str(tmp_path / "model.keras"))
    export_for_spectrum(model, str(tmp_path / "exported"))
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((40, 4)).astype(np.float32),
             y=rng.integers(0, 3, 40).astype(np.int64))

    def run(model_path, name):
        config = config_lib.default_config()
        config.model = model_path
        config.dataset = f"npz:{tmp_path / 'data.npz'}"
        config.bn_mode = "train"
        config.batch_size = 16  # batches of 16, 16 and 8
        config.lanczos_steps = 5
        config.seed = 7
        config.output_dir = str(tmp_path / name)
        return job.run(config)

    saved = run(str(tmp_path / "exported"), "saved")
    keras_file = run(str(tmp_path / "model.keras"), "keras")
    assert saved["bn_mode"] == keras_file["bn_mode"] == "train"
    assert saved["method"] == "reverse_over_reverse"
    assert saved["num_params"] == keras_file["num_params"] == 53
    assert saved["lambda_max"] == pytest.approx(keras_file["lambda_max"], rel=1e-5)
    assert saved["loss"] == pytest.approx(keras_file["loss"], rel=1e-6)


def test_keras_export_refuses_bn_train_mode(tmp_path):
    model = small_bn_model()
    model.export(str(tmp_path / "exported"), verbose=False)
    function = SavedModelFunction(tf.saved_model.load(str(tmp_path / "exported")))
    x = np.zeros((4, 4), np.float32)
    y = np.zeros(4, np.int32)
    with pytest.raises(ValueError, match="--bn_mode"):
        HessianOperator(function, x, y, bn_mode="train")


def test_unbuilt_model_is_refused(tmp_path):
    model = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="not built"):
        export_for_spectrum(model, str(tmp_path / "unbuilt"))


def test_several_inputs_or_outputs_are_refused(tmp_path):
    first, second = keras.Input((2,)), keras.Input((2,))
    two_inputs = keras.Model([first, second], keras.layers.Add()([first, second]))
    with pytest.raises(ValueError, match="^export_for_spectrum: the model takes 2 inputs"):
        export_for_spectrum(two_inputs, str(tmp_path / "two_inputs"))
    inputs = keras.Input((2,))
    two_outputs = keras.Model(inputs, [keras.layers.Dense(1)(inputs), keras.layers.Dense(1)(inputs)])
    with pytest.raises(ValueError, match="^export_for_spectrum: the model has 2 outputs"):
        export_for_spectrum(two_outputs, str(tmp_path / "two_outputs"))


def test_explicit_input_signature_for_a_subclassed_model(tmp_path):
    class Linear(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    model = Linear()
    model(np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="input_signature"):
        export_for_spectrum(model, str(tmp_path / "no_signature"))
    path = str(tmp_path / "linear")
    export_for_spectrum(model, path, input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    loaded = tf.saved_model.load(path)
    x = np.ones((2, 3), np.float32)
    np.testing.assert_allclose(loaded.serve_bn_train(x).numpy(), model(x).numpy(), rtol=1e-6)


@pytest.mark.parametrize("unroll_steps, loops", [(None, False), (0, True)])
def test_recurrent_layers_export_unrolled(tmp_path, unroll_steps, loops):
    from hessian_tf.operators.graphs import graph_nodes

    keras.utils.set_random_seed(0)
    inputs = keras.Input((3, 2))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.GRU(3)(inputs)))
    path = str(tmp_path / "gru")
    options = {} if unroll_steps is None else {"unroll_steps": unroll_steps}
    export_for_spectrum(model, path, **options)
    loaded = tf.saved_model.load(path)
    graph = loaded.serve.concrete_functions[0].graph.as_graph_def()
    assert any(node.op in ("While", "StatelessWhile") for _, node in graph_nodes(graph)) == loops
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 3, 2)).astype(np.float32)
    y = rng.integers(0, 2, 5)
    vector = rng.standard_normal(sum(int(np.prod(v.shape)) for v in model.trainable_variables))
    expected = HessianOperator(KerasModelFunction(model), x, y, batch_size=4).matvec(vector)
    saved = HessianOperator(SavedModelFunction(loaded, path), x, y, batch_size=4)
    np.testing.assert_allclose(saved.matvec(vector), expected, rtol=0,
                               atol=1e-5 * np.max(np.abs(expected)))
    assert model.layers[1].unroll is False and "inner_loop" not in vars(model.layers[1])
