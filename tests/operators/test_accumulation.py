"""accumulation='float32': no float64 in the product graphs (a TPU has none), and
compensated float32 sums that agree with float64 ones."""

import numpy as np
import pytest
import tensorflow as tf

from hessian_tf import operators
from hessian_tf.operators import hessian
from hessian_tf.operators.streaming import StreamingHessianOperator, array_dataset_fn
from tests.operators.test_hessian import BATCH_SIZE, tiny_data, tiny_model


def double_typed_nodes(concrete_function) -> list[str]:
    """Nodes of the function's graph and of every function it calls (loop bodies,
    branches) with a float64 input, output or attribute."""
    graph_def = concrete_function.graph.as_graph_def()
    double = tf.float64.as_datatype_enum
    found = []

    def has_double(attr) -> bool:
        return attr.type == double or double in attr.list.type or (
            attr.HasField("tensor") and attr.tensor.dtype == double)

    nodes = [("", node) for node in graph_def.node]
    for function in graph_def.library.function:
        nodes += [(function.signature.name + "/", node) for node in function.node_def]
        for arg in list(function.signature.input_arg) + list(function.signature.output_arg):
            if arg.type == double:
                found.append(f"{function.signature.name}:{arg.name}")
    for prefix, node in nodes:
        if any(has_double(attr) for attr in node.attr.values()):
            found.append(f"{prefix}{node.name} ({node.op})")
    return found


def make_operator(kind, accumulation, num_devices=1, dtype="float32", bn_mode="train",
                  data_dtype=np.float32):
    model = tiny_model(dtype=dtype)
    x, y = tiny_data(data_dtype)
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:num_devices]
    options = dict(batch_size=BATCH_SIZE, bn_mode=bn_mode, accumulation=accumulation,
                   strategy=tf.distribute.MirroredStrategy(devices) if num_devices > 1 else None)
    function = operators.KerasModelFunction(model)
    if kind == "streaming":
        return StreamingHessianOperator(function, array_dataset_fn(x, y, BATCH_SIZE),
                                        num_examples=len(x), sample=(x[:2], y[:2]), **options)
    return operators.HessianOperator(function, x, y, **options)


@pytest.mark.parametrize("kind, num_devices, data_dtype", [
    ("in_memory", 1, np.float64), ("in_memory", 2, np.float32), ("streaming", 2, np.float32)])
def test_float32_accumulation_has_no_float64_on_the_device(kind, num_devices, data_dtype):
    # In memory, float64 inputs are put on the device in float32.
    operator = make_operator(kind, "float32", num_devices, data_dtype=data_dtype)
    vector = np.random.default_rng(0).standard_normal(operator.dim)
    operator.matvec(vector)
    operator.loss_and_gradient()
    product = operator._product_function.get_concrete_function(
        tf.TensorSpec([1, operator.dim], tf.float32))
    gradient = operator._loss_gradient_function.get_concrete_function()
    assert operator._product_function.experimental_get_tracing_count() == 1
    assert double_typed_nodes(product) == []
    assert double_typed_nodes(gradient) == []
    # The check does see float64 where it is: the default accumulation.
    default = make_operator(kind, "auto", num_devices)
    assert default.accumulation == "float64"
    default.matvec(vector)
    assert double_typed_nodes(default._product_function.get_concrete_function(
        tf.TensorSpec([1, default.dim], tf.float64)))


@pytest.mark.parametrize("kind, num_devices, bn_mode", [
    ("in_memory", 1, "inference"), ("in_memory", 2, "train"), ("streaming", 2, "train")])
def test_float32_accumulation_agrees_with_float64(kind, num_devices, bn_mode):
    compensated = make_operator(kind, "float32", num_devices, bn_mode=bn_mode)
    reference = make_operator(kind, "float64", num_devices, bn_mode=bn_mode)
    block = np.random.default_rng(1).standard_normal((3, reference.dim))
    expected = reference.matmat(block)
    # The products themselves run in float32 in both; only the sums differ.
    np.testing.assert_allclose(compensated.matmat(block), expected,
                               rtol=1e-6, atol=1e-6 * np.max(np.abs(expected)))
    loss, gradient = compensated.loss_and_gradient()
    expected_loss, expected_gradient = reference.loss_and_gradient()
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-5,
                               atol=1e-6 * np.max(np.abs(expected_gradient)))


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


def test_accumulation_options_are_checked():
    x, y = tiny_data()
    with pytest.raises(ValueError, match="accumulation='float16' is not known"):
        operators.HessianOperator(operators.KerasModelFunction(tiny_model()), x, y,
                                  accumulation="float16")
    with pytest.raises(ValueError, match="the model has float64 parameters"):
        operators.HessianOperator(operators.KerasModelFunction(tiny_model()), x, y,
                                  accumulation="float32")
