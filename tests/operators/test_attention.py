"""Keras's dot-product attention by batched matrix products (operators/attention.py)."""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.backend.tensorflow import nn as keras_tensorflow_nn

from hessian_tf import operators
from hessian_tf.operators import attention, model_function
from hessian_tf.operators.graphs import graph_nodes

B, T, S, N, H = 3, 5, 7, 2, 4


def attention_inputs(seed=0, *, length=S, dtype=np.float32):
    rng = np.random.default_rng(seed)
    query, key, value = (tf.constant(rng.standard_normal(shape), dtype) for shape in
                         ((B, T, N, H), (B, length, N, H), (B, length, N, H)))
    return query, key, value


TOLERANCES = {np.float64: 1e-12, np.float32: 1e-5, tf.float16.as_numpy_dtype: 4e-3,
              tf.bfloat16.as_numpy_dtype: 2e-2}


@pytest.mark.parametrize("case", ["plain", "causal", "mask", "bias", "mask_and_causal",
                                  "causal_longer_query", "broadcast_mask_and_bias"])
@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_values_are_keras_attention(case, dtype):
    # Keras's causal mask is a band over any (T, S): query i reads positions j <= i.
    length = {"causal": T, "causal_longer_query": T - 2}.get(case, S)
    query, key, value = attention_inputs(length=length, dtype=dtype)
    rng = np.random.default_rng(1)
    mask_shape, bias_shape = ((B, 1, T, length), (1, N, 1, length)) if "broadcast" in case \
        else ((B, N, T, length),) * 2
    mask = rng.random(mask_shape) < 0.7
    mask[0, 0, 1] = False  # a query that reads nothing: Keras's softmax of it is uniform
    mask = tf.constant(mask) if "mask" in case else None
    bias = (tf.constant(rng.standard_normal(bias_shape), dtype) if "bias" in case else None)
    arguments = (query, key, value, bias, mask, "causal" in case, 0.3)
    expected = attention._keras_attention(*arguments).numpy().astype(np.float64)
    got = attention.attention_by_matmul(*arguments)
    assert got.shape == (B, T, N, H) and got.dtype == dtype
    tolerance = TOLERANCES[dtype]
    np.testing.assert_allclose(got.numpy().astype(np.float64), expected, rtol=tolerance,
                               atol=tolerance * np.max(np.abs(expected)))
    if case == "causal":  # position 0 reads value 0 only
        np.testing.assert_allclose(got.numpy()[:, 0], value.numpy()[:, 0], rtol=tolerance)


def causal_language_model(vocabulary=11, length=6, width=8):
    """Embedding, causal self-attention (Keras's dot-product path), a token's logits."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((length,), dtype="int32")
    h = keras.layers.Embedding(vocabulary, width)(inputs)
    a = keras.layers.LayerNormalization()(h)
    h = keras.layers.Add()([h, keras.layers.MultiHeadAttention(2, width // 2)(
        a, a, use_causal_mask=True)])
    return keras.Model(inputs, keras.layers.Dense(vocabulary)(h))


def mended_and_keras(model, x, y, method, *, batch_size, op_type, mending):
    """[(product, count) with model_function's `mending`, the same without it (a null
    context while the operator is built and traced: Keras's or TensorFlow's own path)]:
    one product of a seeded random vector, and the number of `op_type` nodes in its
    traced graph."""
    results = []
    for mended in (True, False):
        with contextlib.ExitStack() as stack:
            if not mended:
                stack.enter_context(pytest.MonkeyPatch.context()).setattr(
                    model_function, mending, contextlib.nullcontext)
            operator = operators.HessianOperator(operators.KerasModelFunction(model), x, y,
                                                 batch_size=batch_size, method=method)
            product = operator.matvec(np.random.default_rng(3).standard_normal(operator.dim))
            graph = operator._product_trace(1).graph.as_graph_def()
        results.append((product, sum(node.op == op_type for _, node in graph_nodes(graph))))
    return results


def check_fewer_muls_same_products(model, x, y, method, mending):
    """Products with model_function's `mending` equal Keras's path's to 1e-12 (float64
    models) with fewer `Mul` nodes in the traced product."""
    (product, muls), (expected, keras_muls) = mended_and_keras(
        model, x, y, method, batch_size=8, op_type="Mul", mending=mending)
    np.testing.assert_allclose(product, expected, rtol=1e-12,
                               atol=1e-12 * np.max(np.abs(expected)))
    assert muls < keras_muls


@pytest.mark.parametrize("method", ["forward_over_backward", "reverse_over_reverse"])
def test_products_are_those_of_keras_attention(method):
    rng = np.random.default_rng(2)
    x, y = (rng.integers(0, 11, (12, 6)).astype(np.int32) for _ in range(2))
    (product, einsums), (expected, keras_einsums) = mended_and_keras(
        causal_language_model(), x, y, method, batch_size=4, op_type="Einsum",
        mending="matmul_attention")
    assert einsums == 0 and keras_einsums > 0
    np.testing.assert_allclose(product, expected, rtol=1e-5,
                               atol=1e-5 * np.max(np.abs(expected)))


@pytest.mark.parametrize("method", ["forward_over_backward", "reverse_over_reverse"])
def test_products_with_padded_queries_are_those_of_keras_attention(method):
    # Padding (mask_zero) masks every key of a padded query: Keras's select stops the
    # derivatives of its uniform softmax, and so must ours (an added mask did not).
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(11, 8, mask_zero=True)(inputs)
    h = keras.layers.MultiHeadAttention(2, 4)(h, h)
    model = keras.Model(inputs, keras.layers.Dense(11)(keras.layers.Flatten()(h)))
    rng = np.random.default_rng(2)
    x = rng.integers(1, 11, (12, 6)).astype(np.int32)
    x[:, 4:] = 0  # two padded positions
    y = rng.integers(0, 11, 12).astype(np.int32)
    (product, _), (expected, _) = mended_and_keras(
        model, x, y, method, batch_size=4, op_type="Einsum", mending="matmul_attention")
    np.testing.assert_allclose(product, expected, rtol=1e-5,
                               atol=1e-5 * np.max(np.abs(expected)))


def test_accelerator_hosts_and_exits_keep_keras_attention(monkeypatch):
    # Not measured on GPUs or TPUs: they keep Keras's einsums; outside the context
    # Keras's function is back.
    arguments = (*attention_inputs(length=T), None, None, True, 0.5)
    monkeypatch.setattr(attention.convolutions, "cpu_only", lambda: False)
    with attention.matmul_attention(), attention.matmul_attention():
        assert keras_tensorflow_nn._dot_product_attention_xla is attention.attention_by_matmul
        graph = tf.function(keras_tensorflow_nn._dot_product_attention_xla).get_concrete_function(
            *arguments).graph
    assert any(op.type == "Einsum" for op in graph.get_operations())
    assert keras_tensorflow_nn._dot_product_attention_xla is attention._keras_attention
