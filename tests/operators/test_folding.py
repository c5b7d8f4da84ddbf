"""Inference BN folded into the convolution or Dense layer before it: the same Hessian,
and only where nothing else reads (or transforms) that layer's output."""

import numpy as np
import pytest
import tensorflow as tf
import keras

from hessian_tf import operators
from hessian_tf.operators import folding

NUM_EXAMPLES = 7
BATCH_SIZE = NUM_EXAMPLES  # one batch: one trace per graph (uneven batches: test_hessian)


@pytest.fixture(params=["folded", "in_layer"])
def path(request, monkeypatch):
    """Runs a test with every pair folded into its kernel, then with every pair's BN
    arithmetic run inside the linear layer (what small outputs get, `fold_here`)."""
    threshold = 0 if request.param == "folded" else 10**12
    monkeypatch.setattr(folding, "MIN_OUTPUT_ELEMENTS", threshold)
    monkeypatch.setattr(folding, "MIN_OUTPUT_PER_KERNEL_ELEMENT", threshold)
    return request.param


def set_statistics(model, seed=1):
    """Moving statistics, γ and β away from their initial values, so that a BN left
    out, or applied twice, changes the products."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            size = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.uniform(-0.5, 0.5, size))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, size))
            if layer.scale:
                layer.gamma.assign(rng.uniform(0.5, 1.5, size))
            if layer.center:
                layer.beta.assign(rng.uniform(-0.5, 0.5, size))
    return model


def conv_bn_net(dtype="float64"):
    """Three foldable pairs (bias / no bias, BN without β, BN without γ), a skip
    connection whose convolution is read twice (not foldable), and a strided conv."""
    keras.utils.set_random_seed(0)
    conv = lambda filters, **kw: keras.layers.Conv2D(filters, 3, padding="same", dtype=dtype, **kw)
    inputs = keras.Input((5, 5, 2), dtype=dtype)
    x = conv(3, name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1", dtype=dtype)(x)
    x = keras.layers.Activation("relu", dtype=dtype)(x)
    y = conv(3, use_bias=False, name="conv2")(x)
    y = keras.layers.BatchNormalization(center=False, name="bn2", dtype=dtype)(y)
    y = keras.layers.Activation("tanh", dtype=dtype)(y)
    skip = conv(3, name="skip")(x)  # read by bn3 and by the sum
    z = keras.layers.BatchNormalization(name="bn3", dtype=dtype)(skip)
    z = keras.layers.Add(dtype=dtype)([y, z, skip])
    z = conv(4, strides=2, use_bias=False, name="conv4")(z)
    z = keras.layers.BatchNormalization(scale=False, name="bn4", dtype=dtype)(z)
    z = keras.layers.GlobalAveragePooling2D(dtype=dtype)(z)
    outputs = keras.layers.Dense(3, dtype=dtype)(z)
    return set_statistics(keras.Model(inputs, outputs))


def data(dtype=np.float64):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((NUM_EXAMPLES, 5, 5, 2)).astype(dtype),
            rng.integers(0, 3, NUM_EXAMPLES).astype(np.int32))


def reference_hessian(model, x, y):
    """Dense Hessian of the mean loss with Keras's own inference call (unfolded)."""
    variables = [v.value for v in model.trainable_variables]
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            logits = model(x, training=False)
            loss = tf.reduce_mean(
                tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        gradient = tf.concat([tf.reshape(g, [-1]) for g in inner.gradient(loss, variables)], 0)
    jacobians = outer.jacobian(gradient, variables)
    return tf.concat([tf.reshape(j, [gradient.shape[0], -1]) for j in jacobians], 1).numpy()


def pair_names(model):
    return sorted((conv.name, bn.name) for conv, bn in folding.foldable_pairs(model))


def test_pairs_are_the_convolutions_read_only_by_their_bn():
    assert pair_names(conv_bn_net()) == [("conv1", "bn1"), ("conv2", "bn2"), ("conv4", "bn4")]


@pytest.mark.parametrize("method", ["forward_over_backward", "reverse_over_reverse"])
def test_folded_products_are_the_hessian(method, path):
    model = conv_bn_net()
    x, y = data()
    expected = reference_hessian(model, x, y)
    vectors = np.random.default_rng(2).standard_normal((3, expected.shape[0]))
    products = {}
    for fold in (True, False):
        operator = operators.HessianOperator(
            operators.KerasModelFunction(model, fold_batch_norm=fold), x, y,
            batch_size=BATCH_SIZE, method=method)
        products[fold] = operator.matmat(vectors)
        np.testing.assert_allclose(products[fold], vectors @ expected.T, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(products[True], products[False], rtol=1e-11, atol=1e-13)


def activation_multiplications(model_function, x):
    """Mul ops on activation-shaped tensors (leading dimension the batch's) in a trace
    of the inference forward pass."""
    function = tf.function(lambda x: model_function(
        model_function.primals(), model_function.state(), x, bn_mode="inference")[0])
    with model_function.mode_context("inference"):
        graph = function.get_concrete_function(tf.TensorSpec(x.shape, x.dtype)).graph
    return sum(
        op.type == "Mul" and op.outputs[0].shape.rank >= 2 and op.outputs[0].shape[0] == x.shape[0]
        for op in graph.get_operations())


def test_folding_removes_bn_work_on_activations(path):
    model = conv_bn_net()
    x, _ = data()
    folded = activation_multiplications(operators.KerasModelFunction(model), x)
    unfolded = activation_multiplications(
        operators.KerasModelFunction(model, fold_batch_norm=False), x)
    # bn3 stays: its convolution is read twice. In the layer, each pair multiplies once.
    assert unfolded == 4 and folded == (1 if path == "folded" else 4)


@pytest.mark.parametrize("output, kernel, fold", [
    ((128, 32, 32, 16), (3, 3, 16, 16), True),  # ResNet-32, first stage
    ((128, 8, 8, 64), (3, 3, 64, 64), True),  # ResNet-32, last stage (14 × the kernel)
    ((128, 8, 8, 16), (3, 3, 16, 16), True),  # digits CNN of 16-channel 8×8 convolutions
    ((1797, 64), (128, 64), True),  # BN MLP on all the digits
    ((128, 128), (128, 128), False),  # the same MLP at batch 128
    ((128, 3, 3, 16), (3, 3, 8, 16), False),  # a small convolution: 18K outputs
    ((128, 7, 7, 512), (3, 3, 512, 512), False),  # ResNet-18's last stage at batch 128
    ((None, 32, 32, 16), (3, 3, 16, 16), False),  # unknown batch
])
def test_fold_here(output, kernel, fold):
    assert folding.fold_here(output, kernel) == fold


def test_train_mode_is_not_folded():
    model = conv_bn_net()
    x, y = data()
    train = [operators.HessianOperator(
        operators.KerasModelFunction(model, fold_batch_norm=fold), x, y,
        batch_size=BATCH_SIZE, bn_mode="train") for fold in (True, False)]
    vector = np.random.default_rng(3).standard_normal(train[0].dim)
    np.testing.assert_array_equal(train[0].matvec(vector), train[1].matvec(vector))


def test_context_restores_the_layers_and_leaves_other_overrides():
    model = conv_bn_net()
    layers = [layer for pair in folding.foldable_pairs(model) for layer in pair]
    with folding.fold_batch_norm(model) as count:
        assert count == 3
        assert all("call" in vars(layer) for layer in layers)
        with folding.fold_batch_norm(model) as inner:
            assert inner == 0  # already overridden: left to the outer context
        assert all("call" in vars(layer) for layer in layers)
    assert not any("call" in vars(layer) for layer in layers)
    with operators.batch_norm_in_train_mode(model):
        with folding.fold_batch_norm(model) as count:
            assert count == 0
        assert all("call" in vars(bn) for _, bn in folding.foldable_pairs(model))
    assert not any("call" in vars(layer) for layer in layers)


def single_pair(build):
    """foldable_pairs of a model `build(inputs)` → outputs on 6×6×2 images."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 2))
    return pair_names(keras.Model(inputs, build(inputs)))


def test_what_is_not_folded():
    conv = lambda **kw: keras.layers.Conv2D(3, 3, name="conv", **kw)
    bn = lambda **kw: keras.layers.BatchNormalization(name="bn", **kw)
    assert single_pair(lambda x: bn()(conv()(x))) == [("conv", "bn")]
    # A nonlinear convolution, or Dense.
    assert single_pair(lambda x: bn()(conv(activation="relu")(x))) == []
    assert single_pair(lambda x: bn()(keras.layers.Dense(3, activation="relu")(x))) == []
    # BN on batch statistics, written into the graph.
    assert single_pair(lambda x: bn()(conv()(x), training=True)) == []
    # BN over another axis than the channels.
    assert single_pair(lambda x: bn(axis=1)(conv()(x))) == []
    # Not BaseConv's own call: Conv1D pads causally in its call.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 2))
    model = keras.Model(inputs, keras.layers.BatchNormalization()(keras.layers.Conv1D(3, 3)(inputs)))
    assert pair_names(model) == []

    # A shared convolution.
    def shared(x):
        layer = conv(padding="same")
        return keras.layers.Add()([bn()(layer(x)), layer(keras.layers.Activation("relu")(x))])

    assert single_pair(shared) == []
    # Mixed precision: BN computes in float32 on a float16 convolution.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(3, 3, dtype="mixed_float16")(inputs)
    model = keras.Model(inputs, keras.layers.BatchNormalization(dtype="mixed_float16")(x))
    assert pair_names(model) == []


def test_nested_and_sequential_models_fold_subclassed_do_not():
    keras.utils.set_random_seed(0)
    block = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(3, 3, name="c"),
                              keras.layers.BatchNormalization(name="b")], name="block")
    inputs = keras.Input((6, 6, 2))
    outer = keras.Model(inputs, keras.layers.Flatten()(block(inputs)))
    assert pair_names(block) == [("c", "b")]
    assert pair_names(outer) == [("c", "b")]

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(3, 3)
            self.bn = keras.layers.BatchNormalization()

        def call(self, x):
            return self.bn(self.conv(x))

    model = Subclassed()
    model(np.zeros((1, 6, 6, 2), np.float32))
    assert folding.foldable_pairs(model) == []


def test_a_loaded_sequential_folds(tmp_path):
    """Keras keeps the nodes of the graphs a Sequential discarded while its layers
    were added: a loaded one has 7 nodes on its first layer. Calls are counted in the
    graph that runs."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((6, 6, 2)), keras.layers.Conv2D(3, 3, name="c1"),
        keras.layers.BatchNormalization(name="b1"), keras.layers.ReLU(),
        keras.layers.Conv2D(3, 3, activation="relu", name="c2"),
        keras.layers.BatchNormalization(name="b2"), keras.layers.Flatten(),
        keras.layers.Dense(4, name="d"), keras.layers.BatchNormalization(name="b3")])
    model.save(tmp_path / "net.keras")
    loaded = keras.models.load_model(tmp_path / "net.keras")
    assert len(loaded.layers[0]._inbound_nodes) > 1
    assert pair_names(loaded) == [("c1", "b1"), ("d", "b3")]


def test_dense_bn_products_are_the_hessian(path):
    keras.utils.set_random_seed(0)
    model = set_statistics(keras.Sequential([
        keras.Input((5,), dtype="float64"), keras.layers.Dense(4, dtype="float64"),
        keras.layers.BatchNormalization(dtype="float64"), keras.layers.Activation("tanh", dtype="float64"),
        keras.layers.Dense(4, use_bias=False, dtype="float64"),
        keras.layers.BatchNormalization(dtype="float64"), keras.layers.Dense(3, dtype="float64")]))
    assert len(folding.foldable_pairs(model)) == 2
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((NUM_EXAMPLES, 5)), rng.integers(0, 3, NUM_EXAMPLES).astype(np.int32)
    expected = reference_hessian(model, x, y)
    model_function = operators.KerasModelFunction(model)
    operator = operators.HessianOperator(model_function, x, y, batch_size=BATCH_SIZE)
    np.testing.assert_allclose(operators.dense_matrix(operator.matvec, operator.dim), expected,
                               rtol=1e-9, atol=1e-11)
    # Which path ran: BN's own multiplication of the activations, or none (folded).
    assert activation_multiplications(model_function, x) == (
        0 if path == "folded" else 2)


def grouped_channels_first(dtype="float64"):
    inputs = keras.Input((4, 5, 5), dtype=dtype)
    x = keras.layers.Conv2D(4, 3, padding="same", groups=2, dilation_rate=2,
                            data_format="channels_first", dtype=dtype)(inputs)
    x = keras.layers.BatchNormalization(axis=1, dtype=dtype)(x)
    x = keras.layers.GlobalAveragePooling2D(data_format="channels_first", dtype=dtype)(x)
    return keras.Model(inputs, keras.layers.Dense(3, dtype=dtype)(x)), (4, 5, 5)


def conv3d(dtype="float64"):
    inputs = keras.Input((3, 3, 3, 2), dtype=dtype)
    x = keras.layers.Conv3D(3, 2, strides=1, dtype=dtype)(inputs)
    x = keras.layers.BatchNormalization(dtype=dtype)(x)
    x = keras.layers.Flatten(dtype=dtype)(x)
    return keras.Model(inputs, keras.layers.Dense(3, dtype=dtype)(x)), (3, 3, 3, 2)


def nested_and_loaded(dtype="float64", directory=None):
    block = keras.Sequential([
        keras.Input((5, 5, 2), dtype=dtype), keras.layers.Conv2D(3, 3, dtype=dtype),
        keras.layers.BatchNormalization(dtype=dtype)])
    inputs = keras.Input((5, 5, 2), dtype=dtype)
    x = keras.layers.Flatten(dtype=dtype)(block(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, dtype=dtype)(x))
    model.save(directory / "nested.keras")
    return keras.models.load_model(directory / "nested.keras"), (5, 5, 2)


@pytest.mark.parametrize("build", [grouped_channels_first, conv3d, nested_and_loaded])
def test_other_layouts_fold_to_the_same_hessian(build, tmp_path, path):
    keras.utils.set_random_seed(0)
    if build is nested_and_loaded:
        model, shape = build(directory=tmp_path)
    else:
        model, shape = build()
    set_statistics(model)
    assert len(folding.foldable_pairs(model)) == 1
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((NUM_EXAMPLES,) + shape), rng.integers(0, 3, NUM_EXAMPLES)
    # Against Keras's own BN (a dense reference through pfor fails on grouped
    # channels_first convolutions on CPU).
    products = [operators.HessianOperator(
        operators.KerasModelFunction(model, fold_batch_norm=fold), x, y.astype(np.int32),
        batch_size=BATCH_SIZE) for fold in (True, False)]
    vectors = rng.standard_normal((2, products[0].dim))
    folded, unfolded = (operator.matmat(vectors) for operator in products)
    np.testing.assert_allclose(folded, unfolded, rtol=1e-11, atol=1e-13)
    assert np.linalg.norm(unfolded) > 1e-3


class StandardizedConv2D(keras.layers.Conv2D):
    """Weight standardisation (keras.io): each filter standardised in convolution_op,
    which would cancel a scale folded into the kernel."""

    def convolution_op(self, inputs, kernel):
        mean, variance = keras.ops.moments(kernel, axes=[0, 1, 2], keepdims=True)
        return super().convolution_op(inputs, (kernel - mean) / keras.ops.sqrt(variance + 1e-10))


class Reuse(keras.layers.Layer):
    """Calls a layer of the graph itself, outside the graph."""

    def __init__(self, layer, **kwargs):
        super().__init__(**kwargs)
        self.layer = layer

    def call(self, x):
        return self.layer(x)


def test_layers_that_may_run_outside_the_graph_or_transform_the_kernel_are_not_folded():
    bn = lambda: keras.layers.BatchNormalization(name="bn")
    assert single_pair(lambda x: bn()(StandardizedConv2D(3, 3, name="conv")(x))) == []
    assert single_pair(lambda x: bn()(keras.layers.Conv2D(
        3, 3, activity_regularizer="l2", name="conv")(x))) == []

    def reused(x):
        conv = keras.layers.Conv2D(3, 3, name="conv")
        return keras.layers.Add()([bn()(conv(x)), Reuse(conv)(x)])

    assert single_pair(reused) == []

    def with_lambda(x):
        conv = keras.layers.Conv2D(3, 3, name="conv")
        return keras.layers.Add()([bn()(conv(x)), keras.layers.Lambda(lambda t: conv(t))(x)])

    assert single_pair(with_lambda) == []

    class Overridden(keras.Model):  # a functional model with its own call
        def call(self, x, training=None):
            return super().call(x, training=training) * 2.0

    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 2))
    outputs = keras.layers.BatchNormalization()(keras.layers.Conv2D(3, 3)(inputs))
    assert folding.foldable_pairs(keras.Model(inputs, outputs))
    assert folding.foldable_pairs(Overridden(inputs, outputs)) == []


def test_train_mode_refuses_a_model_whose_bn_is_folded():
    model = conv_bn_net()
    with folding.fold_batch_norm(model):
        with pytest.raises(RuntimeError, match="already overridden"):
            with operators.batch_norm_in_train_mode(model):
                pass
    assert not any("call" in vars(layer) for pair in folding.foldable_pairs(model) for layer in pair)
