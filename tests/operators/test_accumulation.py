"""accumulation='float32': no float64 in the product graphs (a TPU has none), and
compensated float32 sums that agree with float64 ones."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from hessian_tf import operators
from hessian_tf.operators import hessian
from hessian_tf.operators.streaming import StreamingHessianOperator, array_dataset_fn
from tests.operators.test_hessian import BATCH_SIZE, tiny_data, tiny_model


def make_operator(kind, accumulation, num_devices=1, dtype="float32", bn_mode="train",
                  data_dtype=np.float32, cross_device_ops=None):
    model = tiny_model(dtype=dtype)
    x, y = tiny_data(data_dtype)
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:num_devices]
    strategy = (tf.distribute.MirroredStrategy(devices, cross_device_ops=cross_device_ops)
                if num_devices > 1 else None)
    options = dict(batch_size=BATCH_SIZE, bn_mode=bn_mode, accumulation=accumulation,
                   strategy=strategy)
    function = operators.KerasModelFunction(model)
    if kind == "streaming":
        return StreamingHessianOperator(function, array_dataset_fn(x, y, BATCH_SIZE),
                                        num_examples=len(x), sample=(x[:2], y[:2]), **options)
    return operators.HessianOperator(function, x, y, **options)


@pytest.mark.parametrize("kind, num_devices, data_dtype", [
    ("in_memory", 1, np.float64), ("in_memory", 2, np.float32), ("streaming", 2, np.float64)])
def test_float32_accumulation_has_no_float64_on_the_device(kind, num_devices, data_dtype):
    # float64 inputs reach the device in float32 (streamed: cast by the pipeline).
    operator = make_operator(kind, "float32", num_devices, data_dtype=data_dtype)
    vector = np.random.default_rng(0).standard_normal(operator.dim)
    operator.matvec(vector)
    operator.loss_and_gradient()
    product = operator._product_trace(1)
    gradient = operator._loss_gradient_function.get_concrete_function()
    assert operator._product_function.experimental_get_tracing_count() == 1
    assert hessian.nodes_of_dtype(product, tf.float64) == []
    assert hessian.nodes_of_dtype(gradient, tf.float64) == []
    if kind == "in_memory":  # streamed, the host's iterator handles are strings
        # Nor strings (a TPU has none; XLA ignores the Assert of batch_value's guard).
        assert hessian.nodes_of_dtype(product, tf.string) == []
        assert hessian.nodes_of_dtype(gradient, tf.string) == []
    # The check does see float64 where it is: the default accumulation.
    default = make_operator(kind, "auto", num_devices)
    assert default.accumulation == "float64"
    default.matvec(vector)
    assert hessian.nodes_of_dtype(default._product_trace(1), tf.float64)


@pytest.mark.parametrize("kind, num_devices, bn_mode", [
    ("in_memory", 1, "inference"), ("in_memory", 2, "train"), ("streaming", 2, "train")])
def test_float32_accumulation_agrees_with_float64(kind, num_devices, bn_mode):
    compensated = make_operator(kind, "float32", num_devices, bn_mode=bn_mode)
    reference = make_operator(kind, "float64", num_devices, bn_mode=bn_mode)
    # The products themselves run in float32 in both; only the sums differ.
    assert_same_sums(compensated, reference, num_vectors=3)


def assert_same_sums(operator, reference, *, num_vectors):
    """Products of a block, the loss and the gradient agree to float32 rounding."""
    block = np.random.default_rng(num_vectors).standard_normal((num_vectors, reference.dim))
    expected = reference.matmat(block)
    np.testing.assert_allclose(operator.matmat(block), expected,
                               rtol=1e-6, atol=1e-6 * np.max(np.abs(expected)))
    loss, gradient = operator.loss_and_gradient()
    expected_loss, expected_gradient = reference.loss_and_gradient()
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-5,
                               atol=1e-6 * np.max(np.abs(expected_gradient)))


@pytest.mark.parametrize("kind", ["in_memory", "streaming"])
def test_what_a_tpu_strategy_switches_on_on_two_replicas(kind, monkeypatch):
    # On a MirroredStrategy taken for a TPUStrategy: float32 accumulation, the all-reduce
    # run by the replicas themselves, and (streamed) batches padded with zero rows; uneven
    # data, so a replica gets a partial batch and the other an empty one.
    from hessian_tf.operators import streaming

    for module in (hessian, streaming):
        monkeypatch.setattr(module, "is_tpu_strategy", lambda strategy: True)
    # Not the CPU's collective ops for the replicas' all-reduce: their group keys collide
    # with those of other strategies of other sizes in this process ("joining a group with
    # size 2, but that group has size 4"), which a job, with its one strategy, never has.
    tpu_like = make_operator(kind, "auto", 2, cross_device_ops=tf.distribute.ReductionToOneDevice())
    assert tpu_like.accumulation == "float32" and tpu_like.reduce_in_replicas
    if kind == "streaming":
        assert tpu_like.pad_batches
    monkeypatch.undo()
    reference = make_operator(kind, "auto", 2)
    assert reference.accumulation == "float64" and not reference.reduce_in_replicas
    assert_same_sums(tpu_like, reference, num_vectors=2)


def test_compensated_add_keeps_what_float32_drops():
    # 1 + 20000 × 1e-8 in float32: each addition alone rounds back to 1.

    @tf.function
    def sums(values):
        def body(i, naive, total, error):
            total, error = hessian.compensated_add(total, error, values[i])
            return i + 1, naive + values[i], total, error

        zero = tf.zeros([], tf.float32)
        _, naive, total, error = tf.while_loop(
            lambda i, *_: i < tf.shape(values)[0], body, (0, zero, zero, zero))
        return naive, total, error

    values = np.full(20001, 1e-8, np.float32)
    values[0] = 1.0
    naive, total, error = (float(t.numpy()) for t in sums(tf.constant(values)))
    exact = float(np.sum(values.astype(np.float64)))
    assert naive == 1.0  # off by 2e-4, some 1700 roundings
    assert abs(total + error - exact) <= np.finfo(np.float32).eps * exact


def test_replicas_sum_many_batches_with_compensation():
    # 2 replicas, 4001 batches of one example: 1, then 4000 × 1e-8 (float32), each
    # batch's value being its example's first input. On the replica that holds the 1,
    # a plain float32 sum drops all of its 2000 small values.
    operator = make_operator("in_memory", "float32", num_devices=2, bn_mode="inference")
    x = np.zeros((4001, 5), np.float32)
    x[0, 0], x[1:, 0] = 1.0, 1e-8
    operator.batch_size = 1
    operator._place_data(x, np.zeros(4001, np.int32))

    @tf.function
    def total():
        return operator._sum_over_batches(lambda x, y: tf.reshape(x[0, 0], [1]), 1, ())

    exact = float(np.sum(x[:, 0].astype(np.float64)))
    rows = total()
    eps = np.finfo(np.float32).eps
    assert rows.shape == (2, 1) and abs(float(rows[0, 0]) - exact) > 100 * eps * exact
    combined = float(operator._combined(rows)[0])
    assert abs(combined - exact) <= eps * exact


def test_accumulation_options_are_checked():
    x, y = tiny_data()
    with pytest.raises(ValueError, match="accumulation='float16' is not known"):
        operators.HessianOperator(operators.KerasModelFunction(tiny_model()), x, y,
                                  accumulation="float16")
    with pytest.raises(ValueError, match="the model has float64 parameters"):
        operators.HessianOperator(operators.KerasModelFunction(tiny_model()), x, y,
                                  accumulation="float32")
    model = tiny_model(dtype="float32")
    with pytest.raises(ValueError, match="--cache_residuals: not with accumulation='float32'"):
        operators.HessianOperator(operators.KerasModelFunction(model), x, y,
                                  accumulation="float32", cache_residuals=True)
    # float32 weights behind a float64 input layer: found in the traced graph.
    keras.utils.set_random_seed(0)
    float64_input = keras.Sequential([keras.Input((5,), dtype="float64"),
                                      keras.layers.Dense(3, dtype="float32")])
    with pytest.raises(ValueError, match=r"the product graph computes in float64 at \d+ node"):
        operators.HessianOperator(operators.KerasModelFunction(float64_input), x, y,
                                  accumulation="float32")


@pytest.mark.parametrize("name", ["ggn", "fisher"])
def test_gauss_newton_and_fisher_in_float32_accumulation(name):
    from hessian_tf.operators import gauss_newton

    x, y = tiny_data(np.float32)
    built = {
        accumulation: gauss_newton.make_operator(
            name, operators.KerasModelFunction(tiny_model(dtype="float32")), x, y,
            batch_size=BATCH_SIZE, bn_mode="train", regularization=name == "ggn",
            accumulation=accumulation)
        for accumulation in ("float32", "float64")
    }
    assert hessian.nodes_of_dtype(built["float32"]._product_trace(1), tf.float64) == []
    block = np.random.default_rng(2).standard_normal((2, built["float64"].dim))
    expected = built["float64"].matmat(block)
    np.testing.assert_allclose(built["float32"].matmat(block), expected,
                               rtol=1e-6, atol=1e-6 * np.max(np.abs(expected)))


@pytest.mark.parametrize("accumulation, cache_residuals", [
    ("float64", False), ("float32", False), ("float64", True)])
def test_products_written_into_out_are_the_products(accumulation, cache_residuals):
    model = tiny_model(dtype="float32")
    x, y = tiny_data(np.float32)
    operator = operators.HessianOperator(
        operators.KerasModelFunction(model), x, y, batch_size=BATCH_SIZE,
        accumulation=accumulation, cache_residuals=cache_residuals)
    vectors = np.random.default_rng(0).standard_normal((2, operator.dim))
    expected = operator.matmat(vectors)
    out = np.full_like(expected, np.nan)
    got = operator.matmat(vectors, out=out)
    assert got is out
    np.testing.assert_array_equal(out, expected)
    for bad in (np.empty((1, operator.dim)), np.empty((2, operator.dim), np.float32),
                np.empty((operator.dim, 2)).T):
        with pytest.raises(ValueError, match="out: an array of shape"):
            operator.matmat(vectors, out=bad)
