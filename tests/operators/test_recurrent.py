"""Keras recurrent layers unrolled while a product graph is traced (recurrent.py): the
same Hessian as Keras's loop, by both methods; only sequences of at most unroll_steps
known steps; the layers as they were afterwards."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from hessian_tf import operators
from hessian_tf.operators import recurrent
from hessian_tf.operators.graphs import graph_nodes
from tests.operators.test_folding import reference_hessian

# One batch of all the examples: one trace per graph (uneven batches are tested elsewhere).
STEPS, FEATURES, NUM_EXAMPLES, BATCH_SIZE = 3, 2, 7, 7
LOOPS = ("While", "StatelessWhile")


def recurrent_net(kind: str, steps: int = STEPS, dtype="float64", **options):
    keras.utils.set_random_seed(0)
    layers = keras.layers
    inputs = keras.Input((steps, FEATURES), dtype=dtype)
    x = inputs
    if kind == "lstm":
        x = layers.LSTM(3, dtype=dtype, **options)(x)
    elif kind == "gru_sequences":
        x = layers.GRU(3, return_sequences=True, dtype=dtype, **options)(x)
        x = layers.GlobalAveragePooling1D(dtype=dtype)(x)
    elif kind == "simple_backwards":
        x = layers.SimpleRNN(3, go_backwards=True, dtype=dtype, **options)(x)
    elif kind == "masked_bidirectional_sequences":
        # Backward, masked, zeroed sequences: Keras's unrolled code is another function
        # here, so the layer keeps its loop (recurrent.unrolls).
        x = layers.Masking(0.0, dtype=dtype)(x)
        x = layers.Bidirectional(layers.LSTM(2, return_sequences=True, dtype=dtype,
                                             **options), dtype=dtype)(x)
        x = layers.GlobalAveragePooling1D(dtype=dtype)(x)
    elif kind == "masked_stacked":
        x = layers.Masking(0.0, dtype=dtype)(x)
        x = layers.GRU(3, return_sequences=True, dtype=dtype, **options)(x)
        x = layers.LSTM(2, dtype=dtype, **options)(x)
    return keras.Model(inputs, layers.Dense(3, dtype=dtype)(x))


def data(steps: int = STEPS):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((NUM_EXAMPLES, steps, FEATURES))
    x[1, -2:] = 0.0  # masked steps where a Masking layer reads the input
    return x, rng.integers(0, 3, NUM_EXAMPLES)


def rnn_layers(model):
    return [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.RNN)]


def while_loops(operator) -> int:
    graph = operator._product_trace(1).graph.as_graph_def()
    return sum(node.op in LOOPS for _, node in graph_nodes(graph))


def loops_in_product_graph(operator) -> int:
    """While loops beyond the operator's own (over the batches)."""
    return while_loops(operator) - operator_loops(
        operator.method, operator.batch_size, operator.strategy)


@functools.lru_cache(maxsize=None)
def operator_loops(method: str, batch_size: int, strategy) -> int:
    """While loops of the same operator on a model without recurrent layers."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((STEPS, FEATURES), dtype="float64")
    flat = keras.layers.Flatten(dtype="float64")(inputs)
    plain = keras.Model(inputs, keras.layers.Dense(3, dtype="float64")(flat))
    x, y = data()
    baseline = operators.HessianOperator(operators.KerasModelFunction(plain), x, y,
                                         batch_size=batch_size, method=method,
                                         strategy=strategy)
    baseline.matvec(np.ones(baseline.dim))
    return while_loops(baseline)


@pytest.mark.parametrize("kind", ["lstm", "gru_sequences", "simple_backwards",
                                  "masked_bidirectional_sequences", "masked_stacked"])
def test_unrolled_products_are_the_hessian_of_keras_loop(kind):
    model = recurrent_net(kind)
    x, y = data()
    expected = reference_hessian(model, x, y)  # Keras's own call: the loop
    vectors = np.random.default_rng(2).standard_normal((2, expected.shape[0]))
    looped = kind == "masked_bidirectional_sequences"  # its backward layer
    for method in ("forward_over_backward", "reverse_over_reverse"):
        operator = operators.HessianOperator(operators.KerasModelFunction(model), x, y,
                                             batch_size=BATCH_SIZE, method=method)
        if looped and method == "forward_over_backward":
            with pytest.raises(ValueError, match="forward mode does not run through"):
                operator.matmat(vectors)
            continue
        np.testing.assert_allclose(operator.matmat(vectors), vectors @ expected.T,
                                   rtol=1e-9, atol=1e-11)
        assert (loops_in_product_graph(operator) > 0) == looped


def test_only_short_known_sequences_are_unrolled_and_the_layers_are_restored():
    x, y = data()
    model = recurrent_net("masked_stacked")
    layers = rnn_layers(model)
    before = [(layer.unroll, layer.use_cudnn) for layer in layers]
    assert before == [(False, "auto")] * 2
    vector = np.random.default_rng(3).standard_normal(
        sum(int(np.prod(v.shape)) for v in model.trainable_variables))
    products = {}
    for steps in (STEPS, STEPS - 1, 0):
        operator = operators.HessianOperator(
            operators.KerasModelFunction(model, unroll_steps=steps), x, y,
            batch_size=BATCH_SIZE, method="reverse_over_reverse")
        products[steps] = operator.matvec(vector)
        assert (loops_in_product_graph(operator) > 0) == (steps < STEPS)
        assert [(layer.unroll, layer.use_cudnn) for layer in layers] == before
        assert not any("inner_loop" in vars(layer) for layer in layers)
    np.testing.assert_allclose(products[STEPS], products[0], rtol=1e-12, atol=1e-14)
    # Inside the context LSTM and GRU never take cuDNN (no gradient of its gradient).
    with recurrent.unrolled(model, STEPS):
        assert all(layer.use_cudnn is False for layer in layers)
    assert [(layer.unroll, layer.use_cudnn) for layer in layers] == before


def test_a_layer_built_unrolled_stays_unrolled_and_an_overridden_loop_is_left_alone():
    x, y = data()
    model = recurrent_net("lstm", unroll=True)
    operator = operators.HessianOperator(
        operators.KerasModelFunction(model, unroll_steps=0), x, y, batch_size=BATCH_SIZE)
    operator.matvec(np.ones(operator.dim))
    assert loops_in_product_graph(operator) == 0
    assert rnn_layers(model)[0].unroll is True

    model = recurrent_net("lstm")
    layer = rnn_layers(model)[0]
    calls = []

    def inner_loop(*args, _original=layer.inner_loop, **kwargs):
        calls.append(layer.unroll)
        return _original(*args, **kwargs)

    layer.inner_loop = inner_loop
    operator = operators.HessianOperator(operators.KerasModelFunction(model), x, y,
                                         batch_size=BATCH_SIZE)
    operator.matvec(np.ones(operator.dim))
    assert calls and not any(calls) and loops_in_product_graph(operator) > 0
    assert layer.inner_loop is inner_loop


def test_the_residual_cache_splits_an_unrolled_lstm():
    x, y = data()
    model = recurrent_net("lstm")
    vector = np.random.default_rng(4).standard_normal(
        sum(int(np.prod(v.shape)) for v in model.trainable_variables))
    model_function = operators.KerasModelFunction(model)
    plain = operators.HessianOperator(model_function, x, y, batch_size=BATCH_SIZE)
    cached = operators.HessianOperator(model_function, x, y, batch_size=BATCH_SIZE,
                                       cache_residuals=True)
    np.testing.assert_allclose(cached.matvec(vector), plain.matvec(vector),
                               rtol=1e-10, atol=1e-12)


def test_one_default_length_everywhere():
    import inspect

    from hessian_tf import config as config_lib
    from hessian_tf.keras.callback import SpectrumCallback

    assert config_lib.default_config().unroll_steps == recurrent.MAX_UNROLL_STEPS
    assert (inspect.signature(SpectrumCallback).parameters["unroll_steps"].default
            == recurrent.MAX_UNROLL_STEPS)
    assert operators.KerasModelFunction(recurrent_net("lstm")).unroll_steps == \
        recurrent.MAX_UNROLL_STEPS


def test_mirrored_replicas_trace_the_unrolled_layers_alike():
    # MirroredStrategy traces its replicas in threads, each through the same layers.
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    model = recurrent_net("simple_backwards")
    x, y = data()
    vectors = np.random.default_rng(5).standard_normal(
        (2, sum(int(np.prod(v.shape)) for v in model.trainable_variables)))
    model_function = operators.KerasModelFunction(model)
    single = operators.HessianOperator(model_function, x, y, batch_size=2)
    mirrored = operators.HessianOperator(model_function, x, y, batch_size=2,
                                         strategy=tf.distribute.MirroredStrategy(devices))
    np.testing.assert_allclose(mirrored.matmat(vectors), single.matmat(vectors),
                               rtol=1e-10, atol=1e-12)
    assert loops_in_product_graph(mirrored) == loops_in_product_graph(single) == 0


def test_a_layer_called_on_known_and_unknown_lengths():
    # unroll is set for each call alone: RNN.call refuses an unknown length while it is set.
    keras.utils.set_random_seed(0)
    lstm = keras.layers.LSTM(2, dtype="float64")
    short = keras.Input((STEPS, FEATURES), dtype="float64")
    model = keras.Model(short, keras.layers.Dense(3, dtype="float64")(lstm(short)))
    x, _ = data()

    @tf.function(input_signature=[tf.TensorSpec([None, STEPS, FEATURES], tf.float64),
                                  tf.TensorSpec([None, None, FEATURES], tf.float64)])
    def both(known, unknown):
        return lstm(known) + lstm(unknown)

    with recurrent.unrolled(model):
        traced = both.get_concrete_function()
        assert lstm.unroll is False
    expected = 2 * lstm(x).numpy()
    np.testing.assert_allclose(traced(x, x).numpy(), expected, rtol=1e-12)
    loops = sum(node.op in LOOPS for _, node in graph_nodes(traced.graph.as_graph_def()))
    assert loops == 1  # the unknown length's


def test_unroll_steps_is_an_integer_of_at_least_zero():
    model = recurrent_net("lstm")
    for bad in (-1, 8.5, True, "8"):
        with pytest.raises(ValueError, match=rf"^--unroll_steps={bad!r}: expected an integer"):
            operators.KerasModelFunction(model, unroll_steps=bad)
    assert operators.KerasModelFunction(model, unroll_steps=np.int64(8)).unroll_steps == 8
    from hessian_tf.io.export import export_for_spectrum
    with pytest.raises(ValueError, match=r"^export_for_spectrum: unroll_steps=-1: expected an"):
        export_for_spectrum(model, "never-written", unroll_steps=-1)
