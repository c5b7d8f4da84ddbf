"""The Hessian operator against dense float64 Hessians of tiny Keras models."""

import numpy as np
import pytest
import tensorflow as tf
import keras

from hessian_tf import operators
from hessian_tf.operators import hessian
from hessian_tf.operators.moments import exact_moments

NUM_EXAMPLES = 11
BATCH_SIZE = 4  # batches of 4, 4 and an uneven 3


def tiny_model(*, batch_norm=True, regularizer=None, seed=0, dtype="float64"):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((5,), dtype=dtype),
              keras.layers.Dense(4, activation="tanh", kernel_regularizer=regularizer, dtype=dtype)]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization(dtype=dtype))
    layers.append(keras.layers.Dense(3, dtype=dtype))
    model = keras.Sequential(layers)
    if batch_norm:
        # Moving statistics away from (0, 1), so inference and train modes differ.
        bn = model.layers[1]
        bn.moving_mean.assign(np.full(4, 0.3))
        bn.moving_variance.assign(np.full(4, 2.0))
    return model


def tiny_data(dtype=np.float64):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((NUM_EXAMPLES, 5)).astype(dtype)
    y = rng.integers(0, 3, NUM_EXAMPLES).astype(np.int32)
    return x, y


def reference_hessian(model, x, y, *, bn_mode, regularization):
    """Dense Hessian by reverse-over-reverse jacobian on the variables themselves,
    batch by batch, with Keras' own training flag, and BN's batch statistics
    differentiated exactly to second order (moments.py: tf.nn.moments as TensorFlow
    writes it drops a term; tests/operators/test_moments.py checks the products against
    differences of the gradient instead). Restores the variables after."""
    saved = [v.numpy() for v in model.variables]
    variables = [v.value for v in model.trainable_variables]
    total = 0.0
    with exact_moments(), tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            for start in range(0, len(x), BATCH_SIZE):
                xb, yb = x[start:start + BATCH_SIZE], y[start:start + BATCH_SIZE]
                logits = model(xb, training=(bn_mode == "train"))
                one_hot = tf.one_hot(yb, 3, dtype=logits.dtype)
                total += -tf.reduce_sum(one_hot * tf.nn.log_softmax(logits)) / len(x)
            if regularization:
                total += tf.add_n(model.losses)
        gradient = tf.concat([tf.reshape(g, [-1]) for g in inner.gradient(total, variables)], 0)
    jacobians = outer.jacobian(gradient, variables)
    hessian = tf.concat([tf.reshape(j, [gradient.shape[0], -1]) for j in jacobians], 1).numpy()
    for variable, value in zip(model.variables, saved):
        variable.assign(value)
    return hessian


def operator_matrix(model, x, y, **kwargs):
    operator = operators.HessianOperator(
        operators.KerasModelFunction(model), x, y, batch_size=BATCH_SIZE, **kwargs)
    return operators.dense_matrix(operator.matvec, operator.dim), operator


@pytest.mark.parametrize("bn_mode", ["inference", "train"])
@pytest.mark.parametrize("method", ["forward_over_backward", "reverse_over_reverse"])
def test_matches_dense_hessian(bn_mode, method):
    model = tiny_model()
    x, y = tiny_data()
    matrix, operator = operator_matrix(model, x, y, bn_mode=bn_mode, method=method)
    expected = reference_hessian(model, x, y, bn_mode=bn_mode, regularization=False)
    assert operator.dim == 5 * 4 + 4 + 4 + 4 + 4 * 3 + 3
    np.testing.assert_allclose(matrix, expected, atol=1e-11, rtol=1e-9)
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-11)


def test_bn_modes_give_different_hessians():
    model = tiny_model()
    x, y = tiny_data()
    inference, _ = operator_matrix(model, x, y, bn_mode="inference")
    train, _ = operator_matrix(model, x, y, bn_mode="train")
    assert np.max(np.abs(inference - train)) > 1e-3


def test_uneven_last_batch_is_weighted_exactly():
    # Without BN the Hessian does not depend on the batching at all.
    model = tiny_model(batch_norm=False)
    x, y = tiny_data()
    batched, _ = operator_matrix(model, x, y)
    whole = operators.dense_matrix(
        operators.HessianOperator(operators.KerasModelFunction(model), x, y,
                                  batch_size=NUM_EXAMPLES).matvec, batched.shape[0])
    np.testing.assert_allclose(batched, whole, atol=1e-12)


@pytest.mark.parametrize("num_examples, batch_size, sizes", [
    (11, 4, [4, 3]),   # full batches and an uneven last one
    (8, 4, [4]),       # only full batches: no other trace
    (3, 8, [3]),       # fewer examples than a batch: one full batch of 3
])
def test_batches_run_with_static_shapes(num_examples, batch_size, sizes):
    # CPU kernels run faster on static shapes (benchmarks/static_shapes.py),
    # so each batch size that occurs gets its own trace, and no batch runs with an
    # unknown batch dimension.
    model = tiny_model()
    x, y = tiny_data()
    operator = operators.HessianOperator(
        operators.KerasModelFunction(model), x[:num_examples], y[:num_examples],
        batch_size=batch_size)
    traced = []
    objective = operator._batch_objective

    def recording(primals, state, x, y):
        traced.append(x.shape[0])
        return objective(primals, state, x, y)

    operator._batch_objective = recording
    operator.matvec(np.ones(operator.dim))
    assert sorted(set(traced), reverse=True) == sizes


def test_batch_value_runs_the_trace_of_each_size():
    x = tf.constant(np.arange(8.0).reshape(4, 2))

    def batch_fn(xb, yb):
        # The static batch dimension, or -1 when unknown, beside the sum.
        known = -1.0 if xb.shape[0] is None else float(xb.shape[0])
        return tf.stack([tf.reduce_sum(xb), tf.constant(known, tf.float64)])

    def value(count, static_sizes, dynamic):
        # In a graph, as the operators run it: the count is known only at run time.
        @tf.function(input_signature=[tf.TensorSpec([], tf.int32)])
        def run(count):
            return hessian.batch_value(batch_fn, x, x[:, 0], count, (), size=2,
                                       static_sizes=static_sizes, dynamic=dynamic)
        return run(tf.constant(count)).numpy().tolist()

    assert value(4, (4, 3), False) == [28.0, 4.0]
    assert value(3, (4, 3), False) == [15.0, 3.0]
    assert value(0, (4, 3), False) == [0.0, 0.0]
    assert value(2, (4,), True) == [6.0, -1.0]
    # A size without a trace fails rather than run another trace on padding rows.
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"assertion failed: \[2\] \[4 3\]"):
        value(2, (4, 3), False)
    with pytest.raises(ValueError, match="no trace can run"):
        value(2, (), False)


@pytest.mark.parametrize("regularization", [False, True])
def test_regularization_only_when_asked(regularization):
    model = tiny_model(regularizer=keras.regularizers.L2(0.05))
    x, y = tiny_data()
    matrix, _ = operator_matrix(model, x, y, regularization=regularization)
    expected = reference_hessian(model, x, y, bn_mode="inference", regularization=regularization)
    np.testing.assert_allclose(matrix, expected, atol=1e-11, rtol=1e-9)
    without = reference_hessian(model, x, y, bn_mode="inference", regularization=False)
    # L2(0.05) adds 2 * 0.05 on the diagonal of the first kernel's block.
    difference = np.diag(matrix - without)[:20]
    np.testing.assert_allclose(difference, 0.1 if regularization else 0.0, atol=1e-11)


@pytest.mark.parametrize("bn_mode", ["inference", "train"])
def test_products_leave_the_model_bit_identical(bn_mode):
    model = tiny_model(dtype="float32")
    x, y = tiny_data(np.float32)
    before = [v.numpy().copy() for v in model.variables]
    operator = operators.HessianOperator(
        operators.KerasModelFunction(model), x, y, batch_size=BATCH_SIZE, bn_mode=bn_mode)
    operator.matvec(np.ones(operator.dim))
    operator.loss_and_gradient()
    for variable, value in zip(model.variables, before):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)


@pytest.mark.parametrize("bn_mode", ["inference", "train"])
@pytest.mark.parametrize("num_devices", [2, 4])
def test_mirrored_equals_one_device(bn_mode, num_devices):
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:num_devices]
    assert len(devices) == num_devices
    model = tiny_model()
    x, y = tiny_data()
    single, _ = operator_matrix(model, x, y, bn_mode=bn_mode)
    mirrored, operator = operator_matrix(
        model, x, y, bn_mode=bn_mode, strategy=tf.distribute.MirroredStrategy(devices))
    assert operator.strategy.num_replicas_in_sync == num_devices
    np.testing.assert_allclose(mirrored, single, atol=1e-12)
    # Each replica's batches live on its own device (strategies place none by themselves).
    shards = operator.strategy.experimental_local_results(operator._data)
    assert len(shards) == num_devices
    for shard, device in zip(shards, devices):
        assert all(tensor.device.endswith(device) for tensor in shard), (shard, device)


def test_default_strategy_keeps_the_callers_device_scope():
    # Without a strategy's devices the data go where the caller's scope puts them.
    model = tiny_model()
    x, y = tiny_data()
    device = tf.config.list_logical_devices("CPU")[1].name
    with tf.device(device):
        operator = operators.HessianOperator(operators.KerasModelFunction(model), x, y,
                                             batch_size=BATCH_SIZE)
    assert all(tensor.device.endswith(device) for tensor in operator._data)


@pytest.mark.parametrize("method", ["forward_over_backward", "reverse_over_reverse"])
def test_synchronized_batch_norm_uses_each_batch_statistics(method):
    # Replicas run different batches (here 2 and 1 of sizes 4, 4, 3): a cross-replica
    # all-reduce of the statistics would mix batches, and under MirroredStrategy
    # fails to trace. The H of bn_mode=train is that of each batch on its own.
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    x, y = tiny_data()
    local, _ = operator_matrix(tiny_model(), x, y, bn_mode="train", method=method)
    model = tiny_model()
    bn = model.layers[1]
    bn.synchronized = True
    synchronized, _ = operator_matrix(
        model, x, y, bn_mode="train", method=method,
        strategy=tf.distribute.MirroredStrategy(devices))
    np.testing.assert_allclose(synchronized, local, atol=1e-12)
    assert bn.synchronized is True


def test_loss_and_gradient_match_keras():
    model = tiny_model()
    x, y = tiny_data()
    operator = operators.HessianOperator(
        operators.KerasModelFunction(model), x, y, batch_size=BATCH_SIZE)
    loss, gradient = operator.loss_and_gradient()
    variables = [v.value for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        logits = model(x, training=False)
        expected = -tf.reduce_mean(
            tf.reduce_sum(tf.one_hot(y, 3, dtype=logits.dtype) * tf.nn.log_softmax(logits), -1))
    expected_gradient = np.concatenate(
        [g.numpy().ravel() for g in tape.gradient(expected, variables)])
    assert loss == pytest.approx(float(expected), rel=1e-12)
    np.testing.assert_allclose(gradient, expected_gradient, atol=1e-13)


def test_saved_model_export_matches_keras(tmp_path):
    model = tiny_model()
    x, y = tiny_data()
    keras_matrix, _ = operator_matrix(model, x, y)
    model.export(str(tmp_path / "exported"), verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / "exported"))
    saved = operators.HessianOperator(
        operators.SavedModelFunction(loaded), x, y, batch_size=BATCH_SIZE)
    assert saved.method == "reverse_over_reverse"
    saved_matrix = operators.dense_matrix(saved.matvec, saved.dim)
    np.testing.assert_allclose(saved_matrix, keras_matrix, atol=1e-10)


def test_saved_model_without_train_function_refuses_train_mode(tmp_path):
    model = tiny_model()
    model.export(str(tmp_path / "exported"), verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / "exported"))
    x, y = tiny_data()
    with pytest.raises(ValueError, match="--bn_mode=train"):
        operators.HessianOperator(operators.SavedModelFunction(loaded), x, y, bn_mode="train")


class NoisyLayer(keras.layers.Layer):
    def call(self, inputs):
        return inputs + tf.random.normal(tf.shape(inputs), dtype=inputs.dtype)


def noisy_model():
    """A tiny MLP whose products differ from run to run (noise added to an activation)."""
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"),
                             NoisyLayer(), keras.layers.Dense(3)])


# With cached residuals, the noise of the first pass would be kept for the second.
@pytest.mark.parametrize("cache_residuals", [False, True])
def test_determinism_check_names_the_cause(cache_residuals):
    model = noisy_model()
    x, y = tiny_data(np.float32)
    operator = operators.HessianOperator(operators.KerasModelFunction(model), x, y,
                                         cache_residuals=cache_residuals)
    with pytest.raises(operators.NonDeterministicError, match="dropout.*a TensorFlow kernel"):
        operator.check_determinism(np.ones(operator.dim))


@pytest.mark.parametrize("cache_residuals", [False, True])
def test_deterministic_operator_passes_the_check(cache_residuals):
    model = tiny_model(dtype="float32")
    x, y = tiny_data(np.float32)
    operator = operators.HessianOperator(operators.KerasModelFunction(model), x, y,
                                         cache_residuals=cache_residuals)
    product = operator.check_determinism(np.ones(operator.dim))
    assert product.shape == (operator.dim,) and operator.num_products == 2


def _counting_runs(monkeypatch):
    """Counts products (matmat calls) and the check's runs over the first batches."""
    calls = {"products": 0, "first_batches": []}
    matmat = hessian.HessianOperator.matmat
    runs = hessian.HessianOperator._products_over_first_batches

    def counting_matmat(self, vectors, *args, **kwargs):
        calls["products"] += 1
        return matmat(self, vectors, *args, **kwargs)

    def counting_runs(self, vectors, batches):
        calls["first_batches"].append(batches)
        return runs(self, vectors, batches)

    monkeypatch.setattr(hessian.HessianOperator, "matmat", counting_matmat)
    monkeypatch.setattr(hessian.HessianOperator, "_products_over_first_batches", counting_runs)
    return calls


# 11 batches: two runs over the first 4; 6 batches: over the first 2 (less than a
# product together); 3 batches: two products over all of them.
@pytest.mark.parametrize("batch_size, runs", [(1, [4, 4]), (2, [2, 2]), (4, [])])
def test_determinism_check_over_the_first_batches(monkeypatch, batch_size, runs):
    model_function = operators.KerasModelFunction(tiny_model(batch_norm=False))
    x, y = tiny_data()
    operator = operators.HessianOperator(model_function, x, y, batch_size=batch_size,
                                         method="reverse_over_reverse")
    vectors = np.random.default_rng(5).standard_normal((2, operator.dim))
    calls = _counting_runs(monkeypatch)
    product = operator.check_determinism(vectors)
    assert calls["first_batches"] == runs
    assert calls["products"] == operator.num_products // 2 == (1 if runs else 2)
    assert operator.whole_determinism_check == (not runs)
    np.testing.assert_array_equal(product, operator.matmat(vectors))


def test_determinism_check_over_the_first_batches_finds_noise_before_the_product(monkeypatch):
    model = noisy_model()
    x, y = tiny_data(np.float32)
    operator = operators.HessianOperator(operators.KerasModelFunction(model), x, y,
                                         batch_size=1)
    calls = _counting_runs(monkeypatch)
    with pytest.raises(operators.NonDeterministicError, match="dropout"):
        operator.check_determinism(np.ones(operator.dim))
    assert calls == {"products": 0, "first_batches": [4, 4]}


def test_determinism_check_over_the_first_batches_names_a_non_finite_batch():
    model = tiny_model(batch_norm=False)
    x, y = tiny_data()
    x = x.copy()
    x[1, 2] = np.nan  # example 1 is batch 1, among the first 4 of 11
    operator = operators.HessianOperator(operators.KerasModelFunction(model), x, y, batch_size=1)
    with pytest.raises(operators.NonFiniteError, match=r"first in batch 1 \(examples 1-1\)"):
        operator.check_determinism(np.ones(operator.dim))


def test_labels_out_of_range():
    model = tiny_model()
    x, y = tiny_data()
    with pytest.raises(ValueError, match=r"labels range over \[0, 7\]"):
        operators.HessianOperator(operators.KerasModelFunction(model), x, np.where(y == 2, 7, y))


def test_real_targets_for_class_indices_name_the_regression_loss():
    model = tiny_model()
    x, y = tiny_data()
    with pytest.raises(ValueError, match=r"float32 are not integers.*"
                       r"pass --loss=mean_squared_error"):
        operators.HessianOperator(operators.KerasModelFunction(model), x,
                                  y.astype(np.float32) + 0.5)
    # Integral values of a real dtype are class indices.
    operators.HessianOperator(operators.KerasModelFunction(model), x, y.astype(np.float32))


def test_token_ids_with_a_fraction_are_refused_integral_reals_taken():
    # Keras casts real inputs to an integer Input's dtype: 1.7 would be token 1.
    model = keras.Sequential([keras.Input((4,), dtype="int32"), keras.layers.Embedding(10, 3),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    tokens = np.random.default_rng(0).integers(0, 10, (8, 4))
    y = np.arange(8) % 3
    with pytest.raises(ValueError, match=r"not integers \(dtype float32\).*takes int32 inputs"):
        operators.HessianOperator(operators.KerasModelFunction(model),
                                  tokens.astype(np.float32) + 0.25, y)
    for x in (tokens, tokens.astype(np.float32)):
        operators.HessianOperator(operators.KerasModelFunction(model), x, y)


def test_bool_inputs_take_zeros_and_ones_only():
    inputs = keras.Input((4,), dtype="bool")
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.ops.cast(inputs, "float32")))
    flags = np.random.default_rng(0).integers(0, 2, (8, 4))
    y = np.arange(8) % 3
    with pytest.raises(ValueError, match=r"other than 0 and 1 \(dtype float64\).*bool inputs"):
        operators.HessianOperator(operators.KerasModelFunction(model), flags * 2.0, y)
    with pytest.raises(ValueError, match=r"other than 0 and 1 \(dtype int64\).*bool inputs"):
        operators.HessianOperator(operators.KerasModelFunction(model), flags * 2, y)
    for x in (flags, flags.astype(np.float64), flags.astype(bool)):
        operators.HessianOperator(operators.KerasModelFunction(model), x, y)


def test_a_model_of_mixed_dtypes():
    # float64 and float32 variables: reverse over reverse summed the inner products'
    # terms in their own dtypes (AddN refused them).
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, dtype="float64"),
                              keras.layers.Dense(3, dtype="float32")])
    x = np.random.default_rng(0).standard_normal((8, 5))
    y = np.arange(8) % 3
    matrices = [hessian.dense_matrix(operator.matvec, operator.dim) for operator in (
        operators.HessianOperator(operators.KerasModelFunction(model), x, y, method=method)
        for method in ("forward_over_backward", "reverse_over_reverse"))]
    scale = np.max(np.abs(matrices[0]))
    assert scale > 0
    np.testing.assert_allclose(matrices[1], matrices[0], atol=1e-5 * scale)
    np.testing.assert_allclose(matrices[0], matrices[0].T, atol=1e-5 * scale)


def test_inputs_that_do_not_fit():
    model = tiny_model()
    with pytest.raises(ValueError, match="do not fit"):
        operators.HessianOperator(
            operators.KerasModelFunction(model), np.zeros((4, 6)), np.zeros(4, np.int32))


def test_inputs_of_another_length_are_refused_though_the_model_runs_on_them():
    # A sequence model declared for 6 tokens: Keras's call refuses 4, but its
    # stateless_call (products' path) runs on them (Embedding, causal convolution, a
    # Dense per position): the Hessian would silently be of other data.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,), dtype="int32")
    h = keras.layers.Conv1D(4, 2, padding="causal")(keras.layers.Embedding(11, 4)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(11)(h))
    tokens = np.random.default_rng(0).integers(0, 11, (8, 6)).astype(np.int32)
    with pytest.raises(ValueError, match="incompatible"):
        model(tokens[:, :4])
    outputs, _ = model.stateless_call(model.trainable_variables, model.non_trainable_variables,
                                      tokens[:, :4])
    assert outputs.shape == (8, 4, 11)
    model_function = operators.KerasModelFunction(model)
    with pytest.raises(ValueError, match=r"inputs of shape \(4,\).*takes inputs of shape \(6,\)"):
        operators.HessianOperator(model_function, tokens[:, :4], tokens[:, :4])
    operators.HessianOperator(model_function, tokens, tokens)


def test_no_trainable_variables():
    model = tiny_model()
    model.trainable = False
    x, y = tiny_data()
    with pytest.raises(ValueError, match="no trainable variables"):
        operators.HessianOperator(operators.KerasModelFunction(model), x, y)


def test_deal_batches_covers_every_example_once():
    x = np.arange(23)[:, None]
    shards = operators.deal_batches(x, x[:, 0], batch_size=5, num_replicas=3)
    seen = np.concatenate(
        [s.x[k, : s.sizes[k], 0] for s in shards for k in range(s.sizes.size)])
    assert sorted(seen.tolist()) == list(range(23))
    assert [s.sizes.tolist() for s in shards] == [[5, 5], [5, 3], [5, 0]]


def test_non_finite_names_the_batch():
    model = tiny_model(batch_norm=False)
    x, y = tiny_data()
    x = x.copy()
    x[9, 2] = np.nan  # example 9 is in batch 2 (examples 8-10)
    operator = operators.HessianOperator(
        operators.KerasModelFunction(model), x, y, batch_size=BATCH_SIZE)
    with pytest.raises(operators.NonFiniteError, match=r"first in batch 2 \(examples 8-10\)"):
        operator.loss_and_gradient()
    with pytest.raises(operators.NonFiniteError, match=r"first in batch 2 \(examples 8-10\)"):
        operator.matvec(np.ones(operator.dim))


@pytest.mark.parametrize("dtype, change, fails", [
    ("float32", 1e-5, False),  # kernel rounding: float32 convolutions differ by ~1e-6
    ("float32", 1e-3, True),
    ("float64", 1e-6, True),
])
def test_determinism_tolerance_follows_the_products_precision(dtype, change, fails):
    model = tiny_model(dtype=dtype, batch_norm=False)
    x, y = tiny_data(np.float64 if dtype == "float64" else np.float32)
    operator = operators.HessianOperator(operators.KerasModelFunction(model), x, y)
    calls = []
    exact = operator.matmat

    def drifting(vectors):  # each call a little different, as a noisy kernel would be
        calls.append(1)
        return exact(vectors) * (1.0 + change * len(calls))

    operator.matmat = drifting
    if fails:
        with pytest.raises(operators.NonDeterministicError):
            operator.check_determinism(np.ones(operator.dim))
    else:
        operator.check_determinism(np.ones(operator.dim))


def test_targets_of_another_shape_are_refused_with_the_fix():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
    x = np.zeros((6, 3), np.float32)
    with pytest.raises(ValueError, match=r"--loss=mean_squared_error: targets of shape \(2,\) "
                       r"do not match the model's outputs \(4,\); pass targets of that shape"):
        operators.HessianOperator(operators.KerasModelFunction(model), x,
                                  np.zeros((6, 2), np.float32), loss="mean_squared_error")


def _aligned(size, offset=0):
    """A float64 array of `size` at `offset` entries from a ROW_ALIGNMENT_BYTES boundary."""
    from hessian_tf.linalg.lanczos import aligned_array

    return aligned_array(1, size + offset)[0, offset:]


def test_host_tensor_shares_aligned_float64_memory_and_copies_the_rest():
    source = _aligned(4099)
    source[:] = np.arange(4099.0)
    readonly = source[np.newaxis]
    readonly.flags.writeable = False  # as a basis row's view comes (current_vectors)
    shared = hessian.host_tensor(readonly, tf.float64)
    np.testing.assert_array_equal(shared.numpy(), readonly)
    source[7] = -1.0  # seen through the tensor: its memory is the array's
    assert shared.numpy()[0, 7] == -1.0
    for array, dtype in [(_aligned(4099, offset=1)[np.newaxis], tf.float64),  # not aligned
                         (_aligned(4100)[np.newaxis, ::2], tf.float64),  # not contiguous
                         (_aligned(4099)[np.newaxis], tf.float32),  # converted
                         (np.frombuffer(bytes(8 * 4096), np.float64)[np.newaxis], tf.float64)]:
        array_copy = hessian.host_tensor(array, dtype)
        assert array_copy.dtype == dtype
        np.testing.assert_array_equal(array_copy.numpy(), array.astype(dtype.as_numpy_dtype))
        if array.flags.writeable:
            array[0, 0] = 5.0
            assert array_copy.numpy()[0, 0] != 5.0


@pytest.mark.parametrize("method", ["forward_over_backward", "reverse_over_reverse"])
def test_products_of_an_aligned_row_read_it_in_place_and_leave_it_unchanged(method, monkeypatch):
    model = tiny_model()  # float64 through: its products may reuse no input's memory
    x, y = tiny_data()
    operator = operators.HessianOperator(
        operators.KerasModelFunction(model), x, y, batch_size=BATCH_SIZE, method=method)
    imported = []
    from_dlpack = tf.experimental.dlpack.from_dlpack
    monkeypatch.setattr(tf.experimental.dlpack, "from_dlpack",
                        lambda capsule: imported.append(capsule) or from_dlpack(capsule))
    row = _aligned(operator.dim)
    row[:] = np.random.default_rng(1).standard_normal(operator.dim)
    kept = row.copy()
    in_place = operator.matmat(row[np.newaxis])
    assert len(imported) == 1
    misaligned = _aligned(operator.dim, offset=1)
    misaligned[:] = row
    copied = operator.matmat(misaligned[np.newaxis])
    assert len(imported) == 1
    np.testing.assert_array_equal(in_place, copied)
    np.testing.assert_array_equal(row, kept)


def test_a_basis_row_through_stride_1_max_pooling_is_left_unchanged(monkeypatch):
    # Stride-1 "same" max pooling's second derivative is the kernel known to write into
    # an input's memory (second_order.py); a product reads a basis row in place.
    import importlib

    from hessian_tf import linalg
    lanczos_module = importlib.import_module("hessian_tf.linalg.lanczos")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((6, 6, 2), dtype="float64"),
        keras.layers.Conv2D(3, 3, padding="same", activation="tanh", dtype="float64"),
        keras.layers.MaxPooling2D(2, strides=1, padding="same", dtype="float64"),
        keras.layers.Flatten(dtype="float64"),
        keras.layers.Dense(3, dtype="float64")])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((NUM_EXAMPLES, 6, 6, 2))
    y = rng.integers(0, 3, NUM_EXAMPLES).astype(np.int32)
    monkeypatch.setattr(lanczos_module, "SMALL_PAGES_FROM_BYTES", 1)  # a mapped basis
    imported = []
    from_dlpack = tf.experimental.dlpack.from_dlpack
    monkeypatch.setattr(tf.experimental.dlpack, "from_dlpack",
                        lambda capsule: imported.append(capsule) or from_dlpack(capsule))
    for method in ("forward_over_backward", "reverse_over_reverse"):
        operator = operators.HessianOperator(
            operators.KerasModelFunction(model), x, y, batch_size=BATCH_SIZE, method=method)
        state = linalg.lanczos_init(rng.standard_normal(operator.dim), 3)
        row = linalg.current_vectors([state])
        kept = np.array(row)
        shared = len(imported)
        in_place = operator.matmat(row)
        assert len(imported) == shared + 1  # read in place
        np.testing.assert_array_equal(row, kept)
        misaligned = _aligned(operator.dim, offset=1)
        misaligned[:] = kept[0]
        np.testing.assert_array_equal(in_place, operator.matmat(misaligned[np.newaxis]))
