"""GGN and empirical Fisher operators against dense float64 forms of tiny models.

The references are built independently of the operators: full Jacobians of the
outputs (tape.jacobian through Keras' own call), the cross-entropy's Hessian on the
logits written out as diag(p) − ppᵀ, and per-example gradients one example at a time.
"""

import numpy as np
import pytest
import tensorflow as tf
import keras

from hessian_tf import operators
from hessian_tf.operators import gauss_newton

NUM_EXAMPLES = 11
BATCH_SIZE = 4  # batches of 4, 4 and an uneven 3
NUM_CLASSES = 3


def tiny_model(*, batch_norm=True, hidden=True, regularizer=None, seed=0):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((5,), dtype="float64")]
    if hidden:
        layers.append(keras.layers.Dense(4, activation="tanh", kernel_regularizer=regularizer,
                                          dtype="float64"))
    if batch_norm:
        layers.append(keras.layers.BatchNormalization(dtype="float64"))
    layers.append(keras.layers.Dense(NUM_CLASSES, kernel_regularizer=None if hidden else regularizer,
                                     dtype="float64"))
    model = keras.Sequential(layers)
    if batch_norm:
        bn = model.layers[1]
        bn.moving_mean.assign(np.full(4, 0.3))
        bn.moving_variance.assign(np.full(4, 2.0))
        bn.gamma.assign(np.linspace(0.5, 1.5, 4))
    return model


def tiny_data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((NUM_EXAMPLES, 5))
    y = rng.integers(0, NUM_CLASSES, NUM_EXAMPLES).astype(np.int32)
    return x, y


def flat_jacobian(tape, outputs, variables):
    """[outputs.size, dim] Jacobian."""
    jacobians = tape.jacobian(outputs, variables)
    size = int(np.prod(outputs.shape))
    return tf.concat([tf.reshape(j, [size, -1]) for j in jacobians], axis=1).numpy()


def reference_ggn(model, x, y, *, bn_mode="inference", loss="sparse_categorical_crossentropy"):
    """(1/N) Σ_b J_bᵀ H_b J_b, batch by batch. Restores every variable after."""
    saved = [v.numpy() for v in model.variables]
    variables = [v.value for v in model.trainable_variables]
    dim = sum(int(np.prod(v.shape)) for v in variables)
    total = np.zeros((dim, dim))
    for start in range(0, len(x), BATCH_SIZE):
        xb = x[start:start + BATCH_SIZE]
        with tf.GradientTape(persistent=True) as tape:
            logits = model(xb, training=(bn_mode == "train"))
        jacobian = flat_jacobian(tape, logits, variables)  # [b * C, dim]
        if loss == "sparse_categorical_crossentropy":
            p = tf.nn.softmax(logits).numpy()
            blocks = [np.diag(pi) - np.outer(pi, pi) for pi in p]
        else:  # mean over outputs of squared errors: 2/C on the diagonal
            blocks = [2.0 / NUM_CLASSES * np.eye(NUM_CLASSES)] * len(xb)
        loss_hessian = np.zeros((jacobian.shape[0],) * 2)
        for i, block in enumerate(blocks):
            loss_hessian[i * NUM_CLASSES:(i + 1) * NUM_CLASSES,
                         i * NUM_CLASSES:(i + 1) * NUM_CLASSES] = block
        total += jacobian.T @ loss_hessian @ jacobian
    for variable, value in zip(model.variables, saved):
        variable.assign(value)
    return total / len(x)


def reference_fisher(model, x, y):
    """(1/N) Σᵢ gᵢ gᵢᵀ from per-example gradients, one example at a time (BN inference)."""
    variables = [v.value for v in model.trainable_variables]
    gradients = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            logits = model(x[i:i + 1], training=False)
            loss = -tf.nn.log_softmax(logits)[0, y[i]]
        gradients.append(np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, variables)]))
    gradients = np.stack(gradients)
    return gradients.T @ gradients / len(x)


def dense(operator_class, model, x, y, **kwargs):
    operator = operator_class(operators.KerasModelFunction(model), x, y, batch_size=BATCH_SIZE,
                              **kwargs)
    return operators.dense_matrix(operator.matvec, operator.dim), operator


@pytest.mark.parametrize("method", ["forward_over_backward", "reverse_over_reverse"])
@pytest.mark.parametrize("bn_mode", ["inference", "train"])
def test_ggn_matches_dense_jacobian_form(method, bn_mode):
    model = tiny_model()
    x, y = tiny_data()
    matrix, operator = dense(gauss_newton.GaussNewtonOperator, model, x, y, method=method,
                             bn_mode=bn_mode)
    assert operator.dim == 5 * 4 + 4 + 4 + 4 + 4 * 3 + 3 and operator.num_examples == NUM_EXAMPLES
    expected = reference_ggn(model, x, y, bn_mode=bn_mode)
    np.testing.assert_allclose(matrix, expected, atol=1e-12, rtol=1e-9)
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-13)
    eigenvalues = np.linalg.eigvalsh(matrix)
    assert eigenvalues.min() > -1e-12 * eigenvalues.max()


def test_ggn_differs_from_hessian_on_a_nonlinear_model():
    model = tiny_model(batch_norm=False)
    x, y = tiny_data()
    ggn, _ = dense(gauss_newton.GaussNewtonOperator, model, x, y)
    hessian, _ = dense(operators.HessianOperator, model, x, y)
    assert np.max(np.abs(ggn - hessian)) > 1e-3
    assert np.linalg.eigvalsh(hessian).min() < -1e-6  # the Hessian is indefinite here


@pytest.mark.parametrize("loss", ["sparse_categorical_crossentropy", "mean_squared_error"])
def test_ggn_equals_hessian_for_a_linear_model(loss):
    model = tiny_model(batch_norm=False, hidden=False)
    x, y = tiny_data()
    if loss == "mean_squared_error":
        y = np.random.default_rng(1).standard_normal((NUM_EXAMPLES, NUM_CLASSES))
    ggn, _ = dense(gauss_newton.GaussNewtonOperator, model, x, y, loss=loss)
    hessian, _ = dense(operators.HessianOperator, model, x, y, loss=loss)
    np.testing.assert_allclose(ggn, hessian, atol=1e-12)
    np.testing.assert_allclose(ggn, reference_ggn(model, x, y, loss=loss), atol=1e-12)


@pytest.mark.parametrize("method", ["forward_over_backward", "reverse_over_reverse"])
def test_fisher_matches_per_example_gradients(method):
    model = tiny_model()
    x, y = tiny_data()
    matrix, operator = dense(gauss_newton.EmpiricalFisherOperator, model, x, y, method=method)
    expected = reference_fisher(model, x, y)
    np.testing.assert_allclose(matrix, expected, atol=1e-12, rtol=1e-9)
    # A sum of N rank-one terms: PSD and of rank at most N.
    eigenvalues = np.linalg.eigvalsh(matrix)
    assert eigenvalues.min() > -1e-12 * eigenvalues.max()
    assert np.sum(eigenvalues > 1e-10 * eigenvalues.max()) <= NUM_EXAMPLES
    # Its trace is the mean squared per-example gradient norm.
    assert operator.dim == matrix.shape[0]


def test_ggn_regularization_adds_the_regularizer_hessian():
    model = tiny_model(batch_norm=False, regularizer=keras.regularizers.L2(0.05))
    x, y = tiny_data()
    with_regularization, _ = dense(gauss_newton.GaussNewtonOperator, model, x, y,
                                   regularization=True)
    without, _ = dense(gauss_newton.GaussNewtonOperator, model, x, y)
    difference = with_regularization - without
    # L2(0.05) on the first kernel (20 of 39 entries): 2 · 0.05 on its diagonal, nothing else.
    np.testing.assert_allclose(difference, np.diag([0.1] * 20 + [0.0] * 19), atol=1e-12)


def test_fisher_refuses_regularization():
    model = tiny_model(batch_norm=False)
    x, y = tiny_data()
    with pytest.raises(ValueError, match="--operator=fisher"):
        gauss_newton.EmpiricalFisherOperator(operators.KerasModelFunction(model), x, y,
                                             regularization=True)


def test_make_operator_by_name():
    model = tiny_model(batch_norm=False)
    x, y = tiny_data()
    function = operators.KerasModelFunction(model)
    assert type(gauss_newton.make_operator("ggn", function, x, y)) is gauss_newton.GaussNewtonOperator
    assert type(gauss_newton.make_operator("hessian", function, x, y)) is operators.HessianOperator
    with pytest.raises(ValueError, match="--operator='gnn'"):
        gauss_newton.make_operator("gnn", function, x, y)


@pytest.mark.parametrize("name", ["ggn", "fisher"])
def test_streamed_data_give_the_same_operator(name):
    from hessian_tf.operators import streaming
    model = tiny_model()
    x, y = tiny_data()
    in_memory, _ = dense(gauss_newton.operator_class(name), model, x, y)
    streamed_class = gauss_newton.operator_class(name, streaming.StreamingHessianOperator)
    assert issubclass(streamed_class, gauss_newton.OPERATORS[name])
    operator = streamed_class(
        operators.KerasModelFunction(model), streaming.array_dataset_fn(x, y, BATCH_SIZE),
        num_examples=NUM_EXAMPLES, sample=(x[:2], y[:2]), batch_size=BATCH_SIZE)
    # A few products, not a dense matrix: each streamed product is a pass over tf.data.
    for vector in np.random.default_rng(2).standard_normal((2, operator.dim)):
        np.testing.assert_allclose(operator.matvec(vector), in_memory @ vector, atol=1e-12)


def test_mirrored_ggn_equals_one_device():
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    model = tiny_model()
    x, y = tiny_data()
    single, _ = dense(gauss_newton.GaussNewtonOperator, model, x, y)
    mirrored, operator = dense(gauss_newton.GaussNewtonOperator, model, x, y,
                               strategy=tf.distribute.MirroredStrategy(devices))
    assert operator.strategy.num_replicas_in_sync == 2
    np.testing.assert_allclose(mirrored, single, atol=1e-13)


def test_saved_model_ggn_and_fisher_match_keras(tmp_path):
    model = tiny_model()
    x, y = tiny_data()
    model.export(str(tmp_path / "exported"), verbose=False)
    loaded = operators.SavedModelFunction(tf.saved_model.load(str(tmp_path / "exported")))
    for operator_class in (gauss_newton.GaussNewtonOperator, gauss_newton.EmpiricalFisherOperator):
        keras_matrix, _ = dense(operator_class, model, x, y)
        saved = operator_class(loaded, x, y, batch_size=BATCH_SIZE)
        assert saved.method == "reverse_over_reverse"
        np.testing.assert_allclose(operators.dense_matrix(saved.matvec, saved.dim), keras_matrix,
                                   atol=1e-12)


def test_products_leave_the_model_bit_identical():
    model = tiny_model()
    x, y = tiny_data()
    before = [v.numpy().copy() for v in model.variables]
    for operator_class in (gauss_newton.GaussNewtonOperator, gauss_newton.EmpiricalFisherOperator):
        operator = operator_class(operators.KerasModelFunction(model), x, y,
                                  batch_size=BATCH_SIZE, bn_mode="train")
        operator.matvec(np.ones(operator.dim))
    for variable, value in zip(model.variables, before):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)
