"""benchmarks/pyhessian_compare.py with a user's own network (--model, --data): the
parts that need neither torch nor PyHessian (CI installs neither): the files are
checked, and the graph of layers the PyTorch twin mirrors is read from the Keras model,
before anything is installed. The twin itself is checked against the Keras logits at
every run of the script."""

import os
import re
import subprocess
import sys
import types

import keras
import numpy as np
import pytest

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
sys.path.insert(0, BENCHMARKS)

import example_networks  # noqa: E402
import pyhessian_compare as compare  # noqa: E402


def chain_model():
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, activation="elu", name="conv")(inputs)
    h = keras.layers.MaxPooling2D(2, name="pool")(h)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.LeakyReLU(0.2)(h)
    h = keras.layers.Dropout(0.5)(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(6, name="hidden")(h)
    h = keras.layers.Activation("gelu")(h)
    h = keras.layers.Dense(4, activation="leaky_relu", name="hidden2")(h)
    h = keras.layers.ReLU(max_value=6.0, name="relu6")(h)  # MobileNet's
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(h))


def test_steps_of_a_chain():
    # Tensor 0 is the input; Dropout is no step (the identity at inference).
    assert compare.twin_graph(chain_model()) == ([
        ("module", "conv", (0,), 1), ("pool", ("max", (2, 2), (2, 2)), (1,), 2),
        ("module", "bn", (2,), 3), ("leaky_relu", pytest.approx(0.2), (3,), 4),
        ("flatten", None, (4,), 5), ("module", "hidden", (5,), 6),
        ("activation", "gelu", (6,), 7), ("module", "hidden2", (7,), 8),
        ("clamp", 6.0, (8,), 9), ("module", "logits", (9,), 10)], 10)


def test_same_poolings_carry_tensorflows_padding():
    # TensorFlow's "same" pads (outputs − 1) · stride + window − size entries, the odd
    # one after: 2 for 5 by 3 at stride 1; 1 for 5 by 2 at stride 2 and 3 for 5 by 4 at
    # stride 1; 2 for a sequence of 7 by 3 at stride 2 (4 outputs).
    inputs = keras.Input((5, 5, 1))
    h = keras.layers.MaxPooling2D(3, strides=1, padding="same", name="max")(inputs)
    h = keras.layers.AveragePooling2D((2, 4), strides=(2, 1), padding="same", name="avg")(h)
    model = keras.Model(inputs, keras.layers.Dense(2, name="logits")(
        keras.layers.GlobalAveragePooling2D(name="gap")(h)))
    steps, _ = compare.twin_graph(model)
    assert steps[:2] == [("pool", ("max", (3, 3), (1, 1), ((1, 1), (1, 1))), (0,), 1),
                         ("pool", ("average", (2, 4), (2, 1), ((0, 1), (1, 2))), (1,), 2)]
    sequences = keras.Input((7, 2))
    pooled = keras.layers.MaxPooling1D(3, strides=2, padding="same", name="seq")(sequences)
    model = keras.Model(sequences, keras.layers.Dense(2, name="logits")(
        keras.layers.GlobalMaxPooling1D(name="gmp")(pooled)))
    assert compare.twin_graph(model)[0][0] == ("pool", ("max", (3,), (2,), ((1, 1),)), (0,), 1)


def test_same_pooling_of_unknown_size_is_named():
    inputs = keras.Input((None, None, 1))
    h = keras.layers.MaxPooling2D(3, strides=1, padding="same", name="pool")(
        keras.layers.Conv2D(2, 1, name="conv")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2, name="logits")(
        keras.layers.GlobalAveragePooling2D(name="gap")(h)))
    with pytest.raises(compare.Failure, match=r"^twin: pooling pool has padding='same' "
                       r"over inputs of unknown size \(None, None\)"):
        compare.twin_graph(model)


def residual_model():
    """A residual block with a projection shortcut, a branch that is concatenated, a
    padding layer and a shared Dense layer."""
    inputs = keras.Input((8, 8, 2))
    h = keras.layers.ZeroPadding2D(((1, 0), (0, 1)), name="pad")(inputs)
    h = keras.layers.Conv2D(4, 2, strides=2, name="conv1")(h)
    h = keras.layers.LayerNormalization(name="ln")(h)
    shortcut = keras.layers.Conv2D(4, 1, strides=2, name="shortcut")(inputs)
    h = keras.layers.ReLU(name="relu")(keras.layers.Add(name="add")([h, shortcut]))
    h = keras.layers.Concatenate(axis=1, name="rows")([h, shortcut])  # NHWC axis 1 = H
    h = keras.layers.Concatenate(name="channels")([h, h])  # the last axis = C
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    shared = keras.layers.Dense(8, name="shared")
    h = keras.layers.Subtract(name="sub")([h, shared(shared(h))])
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(h))


def test_steps_of_a_residual_model():
    steps, output = compare.twin_graph(residual_model())
    by_output = {out: (kind, value, inputs) for kind, value, inputs, out in steps}
    assert len(by_output) == len(steps) == 13 and output == len(steps)
    # Every step reads tensors computed before it (the input is 0).
    assert all(max(inputs) < out for _, _, inputs, out in steps)
    named = {value: out for kind, value, _, out in steps if kind == "module"}
    assert set(named) == {"conv1", "ln", "shortcut", "shared", "logits"}
    assert by_output[named["shortcut"]][2] == (0,)
    assert by_output[1] == ("pad", (0, 1, 1, 0), (0,))  # F.pad order: left, right, top, bottom
    [add] = [out for out, (kind, _, _) in by_output.items() if kind == "add"]
    assert sorted(by_output[add][2]) == sorted([named["ln"], named["shortcut"]])
    concatenations = [(value, inputs) for kind, value, inputs, _ in steps if kind == "concatenate"]
    assert [axis for axis, _ in concatenations] == [2, 1]  # NCHW: H is 2, C is 1
    assert concatenations[1][1][0] == concatenations[1][1][1]
    shared_calls = [(inputs, out) for kind, value, inputs, out in steps if value == "shared"]
    assert len(shared_calls) == 2 and shared_calls[1][0] == (shared_calls[0][1],)
    [(_, _, sub_inputs, sub_output)] = [step for step in steps if step[0] == "subtract"]
    assert sub_inputs[1] == shared_calls[1][1]
    assert by_output[output] == ("module", "logits", (sub_output,))


def test_preprocessing_and_a_squeeze_and_excitation_block():
    # keras.applications.EfficientNet's: Rescaling, Normalization, and channel weights
    # [1, 1, C] multiplied onto [H, W, C] (a broadcasting merge).
    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    h = layers.Rescaling(1 / 255, name="rescale")(inputs)
    normalization = layers.Normalization(axis=-1, mean=[0.1, 0.2, 0.3],
                                         variance=[1.0, 4.0, 0.0], name="normalize")
    h = layers.Conv2D(4, 3, padding="same", name="conv")(normalization(h))
    squeeze = layers.Reshape((1, 1, 4), name="squeeze")(layers.GlobalAveragePooling2D(name="gap")(h))
    excite = layers.Conv2D(4, 1, activation="sigmoid", name="excite")(squeeze)
    h = layers.Multiply(name="scale")([h, excite])
    steps, output = compare.twin_graph(keras.Model(inputs, layers.Dense(3, name="logits")(
        layers.GlobalAveragePooling2D(name="pool")(h))))
    kinds = {step[0]: step[1] for step in steps}
    assert kinds["rescale"] == ((pytest.approx(1 / 255),), (0.0,))
    mean, deviation = kinds["normalize"]
    assert mean == pytest.approx((0.1, 0.2, 0.3))
    assert deviation == pytest.approx((1.0, 2.0, keras.config.epsilon()))  # max(√var, ε)
    assert ("multiply", None) in [(step[0], step[1]) for step in steps]
    assert output == len(steps)


def test_grouped_convolutions_pointwise_dense_and_hard_activations():
    # ConvNeXt's depthwise Conv2D(groups=channels) and Dense on an image's channels;
    # MobileNetV3's squeeze-and-excitation: global pooling with keepdims, hard sigmoid,
    # hard swish.
    layers = keras.layers
    inputs = keras.Input((8, 8, 4))
    h = layers.Conv2D(4, 3, padding="same", groups=4, name="depthwise")(inputs)
    h = layers.Conv2D(8, 3, padding="same", groups=2, name="grouped")(h)
    h = layers.Dense(8, activation="hard_silu", name="pointwise")(h)
    squeeze = layers.GlobalAveragePooling2D(keepdims=True, name="squeeze")(h)
    excite = layers.Conv2D(8, 1, activation="hard_sigmoid", name="excite")(squeeze)
    h = layers.Multiply(name="scale")([h, excite])
    steps, _ = compare.twin_graph(keras.Model(inputs, layers.Dense(3, name="logits")(
        layers.GlobalAveragePooling2D(name="pool")(h))))
    assert [(kind, value) for kind, value, _, _ in steps] == [
        ("module", "depthwise"), ("module", "grouped"), ("module", "pointwise"),
        ("global", ("average", True)), ("module", "excite"), ("multiply", None),
        ("global", ("average", False)), ("module", "logits")]
    deep = keras.Sequential([keras.Input((2, 2, 2, 2, 3)), layers.Dense(2)])
    with pytest.raises(compare.Failure, match="takes a 6-D input"):
        compare.twin_graph(deep)


def test_convnext_nested_models_layer_scale_and_stochastic_depth():
    # keras.applications.ConvNeXt's pieces: a nested Sequential stem, LayerScale,
    # StochasticDepth (the identity at inference) and a residual `inputs + x` by keras.ops.
    from keras.src.applications.convnext import LayerScale, StochasticDepth

    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    stem = keras.Sequential([layers.Conv2D(4, 2, strides=2, name="stem_conv"),
                             layers.LayerNormalization(name="stem_norm")], name="stem")
    h = stem(inputs)
    r = layers.Dense(4, name="pointwise")(layers.Conv2D(4, 3, padding="same", groups=4,
                                                        name="depthwise")(h))
    r = StochasticDepth(0.1, name="drop")(LayerScale(1e-6, 4, name="scale")(r))
    h = h + r
    model = keras.Model(inputs, layers.Dense(3, name="logits")(
        layers.GlobalAveragePooling2D(name="pool")(h)))
    steps, output = compare.twin_graph(model)
    assert [(kind, value, inputs) for kind, value, inputs, _ in steps] == [
        ("module", "stem_conv", (0,)), ("module", "stem_norm", (1,)),
        ("module", "depthwise", (2,)), ("module", "pointwise", (3,)),
        ("module", "scale", (4,)), ("add", None, (2, 5)),
        ("global", ("average", False), (6,)), ("module", "logits", (7,))]
    assert output == 8
    inputs_layer = model.layers[0].name  # Keras numbers input layers in a process
    assert set(compare.flat_layers(model)) == {
        inputs_layer, "stem_conv", "stem_norm", "depthwise", "pointwise", "scale", "drop",
        "pool", "logits"}


def test_inception_resnet_scaled_residual_is_a_step():
    from keras.src.applications.inception_resnet_v2 import CustomScaleLayer

    layers = keras.layers
    inputs = keras.Input((4, 4, 2))
    branch = layers.Conv2D(2, 1, name="branch")(inputs)
    h = CustomScaleLayer(0.17, name="residual")([inputs, branch])
    steps, _ = compare.twin_graph(keras.Model(inputs, layers.Dense(3, name="logits")(
        layers.GlobalAveragePooling2D(name="pool")(h))))
    assert ("scaled_add", pytest.approx(0.17), (0, 1)) in [step[:3] for step in steps]


def test_a_layer_scale_not_convnexts_is_named():
    class LayerScale(keras.layers.Layer):  # a user's own, of other arithmetic
        def call(self, x):
            return 2 * x

    inputs = keras.Input((4,))
    with pytest.raises(compare.Failure, match="not keras.applications.convnext's"):
        compare.twin_graph(keras.Model(inputs, LayerScale(name="mine")(inputs)))


def test_normalisations_without_scale_or_centre_are_modules():
    # InceptionV3's BN has no γ (scale=False): the twin holds its weight at 1, frozen.
    layers = keras.layers
    model = keras.Sequential([
        keras.Input((4, 4, 8)), layers.BatchNormalization(scale=False, name="bn"),
        layers.LayerNormalization(center=False, name="ln"),
        layers.GroupNormalization(2, scale=False, center=False, name="gn"),
        layers.GlobalAveragePooling2D(name="pool"), layers.Dense(3, name="logits")])
    steps, _ = compare.twin_graph(model)
    assert [(kind, value) for kind, value, _, _ in steps][:3] == [
        ("module", "bn"), ("module", "ln"), ("module", "gn")]


def test_arithmetic_of_a_tensor_and_a_number_is_a_step():
    # MobileNetV3's hard sigmoid: ReLU6(x + 3) * (1 / 6), by keras.ops between layers.
    layers = keras.layers
    inputs = keras.Input((4,))
    h = layers.Dense(4, name="dense")(inputs)
    h = layers.ReLU(6.0, name="relu6")(h + 3.0) * (1.0 / 6.0)
    h = 2.0 - h
    steps, output = compare.twin_graph(keras.Model(inputs, layers.Dense(3, name="logits")(h)))
    assert [(kind, value) for kind, value, _, _ in steps] == [
        ("module", "dense"), ("scalar", ("add", 3.0, True)), ("clamp", 6.0),
        ("scalar", ("multiply", pytest.approx(1 / 6), True)),
        ("scalar", ("subtract", 2.0, False)), ("module", "logits")]
    assert output == len(steps)
    with pytest.raises(compare.Failure, match=r"operation .* is not a layer the twin mirrors"):
        compare.twin_graph(keras.Model(inputs, keras.ops.add(inputs, keras.ops.ones((4,)))))


def test_layers_that_are_the_identity_at_inference_are_no_steps():
    layers = keras.layers
    model = keras.Sequential([
        keras.Input((8, 8, 1)), layers.RandomFlip(), layers.RandomTranslation(0.1, 0.1),
        layers.GaussianNoise(0.1), layers.SpatialDropout2D(0.2), layers.UpSampling2D((2, 3)),
        layers.GaussianDropout(0.1), layers.Flatten(), layers.Dropout(0.5), layers.Dense(3)])
    assert compare.twin_graph(model) == (
        [("upsample", ((2, 3), "nearest"), (0,), 1), ("flatten", None, (1,), 2),
         ("module", model.layers[-1].name, (2,), 3)], 3)


def test_symmetric_padding_before_a_valid_convolution_is_folded_into_it():
    layers = keras.layers
    inputs = keras.Input((8, 8, 2))
    folded = layers.Conv2D(2, 3, strides=2, name="folded")(layers.ZeroPadding2D(1, name="p1")(inputs))
    shared_pad = layers.ZeroPadding2D(1, name="p2")(inputs)  # read by two convolutions
    two = [layers.Conv2D(2, 3, name=f"reader{i}")(shared_pad) for i in (1, 2)]
    uneven = layers.Conv2D(2, 2, name="uneven")(layers.ZeroPadding2D(((0, 1), (0, 1)),
                                                                    name="p3")(inputs))
    same = layers.Conv2D(2, 3, padding="same", name="same")(layers.ZeroPadding2D(1, name="p4")(inputs))
    pooled = [layers.GlobalAveragePooling2D()(t) for t in [folded, *two, uneven, same]]
    model = keras.Model(inputs, layers.Dense(3, name="logits")(layers.Concatenate()(pooled)))
    steps, output = compare.twin_graph(model)
    kept, padding = compare.fold_paddings(model, steps, output)
    assert padding == {"folded": (1, 1)}
    assert [value for kind, value, _, _ in kept if kind == "pad"] == [
        (1, 1, 1, 1), (0, 1, 0, 1), (1, 1, 1, 1)]  # p2, p3, p4 stay
    [(_, _, inputs_of_folded, _)] = [step for step in kept if step[1] == "folded"]
    assert inputs_of_folded == (0,)  # reads the model's input, as its own padding
    assert len(kept) == len(steps) - 1


def test_models_the_twin_cannot_mirror_are_refused():
    inputs = keras.Input((4,))
    images = keras.Input((2, 2, 4))
    pooled = keras.layers.GlobalAveragePooling2D()(images)
    ranks = keras.layers.Add()([images, pooled])  # Keras expands the dims of [C]
    with pytest.raises(compare.Failure, match="merges equal shapes, or shapes of one rank "
                                              "that broadcast"):
        compare.twin_graph(keras.Model(images, ranks))
    other = keras.Input((4,))
    with pytest.raises(compare.Failure, match="2 inputs and 1 outputs"):
        compare.twin_graph(keras.Model([inputs, other], keras.layers.Add()([inputs, other])))
    with pytest.raises(compare.Failure, match=r"operation .* is not a layer the twin mirrors"):
        compare.twin_graph(keras.Model(inputs, keras.ops.tanh(keras.layers.Dense(3)(inputs))))
    with pytest.raises(compare.Failure, match=r"operation .* is not a layer the twin mirrors"):
        compare.twin_graph(keras.Model(inputs, inputs / keras.layers.Dense(4)(inputs)))


@pytest.mark.parametrize("layer, message", [
    (keras.layers.Conv2DTranspose(2, 3, dilation_rate=2), "Conv2DTranspose conv2d_transpose"),
    (keras.layers.Conv2DTranspose(2, 2, strides=3), "with kernel_size ≥ strides"),
    (keras.layers.Cropping2D((1, 0), data_format="channels_first"), "must be channels_last"),
    (keras.layers.PReLU(), "(PReLU) is not supported"),
    (keras.layers.Normalization(axis=1, mean=0.0, variance=1.0), "must normalise the last axis"),
    (keras.layers.UpSampling2D(2, interpolation="bicubic"), "interpolation='nearest' or 'bilinear'"),
    (keras.layers.ZeroPadding2D(1, data_format="channels_first"), "must be channels_last"),
    (keras.layers.MaxPooling2D((2, 1), data_format="channels_first"), "must be channels_last"),
    (keras.layers.Activation("softmax"), "activation 'softmax'"),
    (keras.layers.ReLU(negative_slope=0.1), "ReLU with max_value (e.g. ReLU6)"),
    (keras.layers.Conv2D(2, 3, activation="relu6"), "activation 'relu6'"),
    (keras.layers.Conv2D(2, 1, data_format="channels_first"), "must be channels_last"),
    (keras.layers.LayerNormalization(rms_scaling=True), "without rms_scaling"),
    (keras.layers.LayerNormalization(axis=(1, 2, 3)), "the last axis only"),
    (keras.layers.DepthwiseConv2D(1, data_format="channels_first"),
     "DepthwiseConv2D depthwise_conv"),
    (keras.layers.SeparableConv2D(2, 3, activation="relu6"), "activation 'relu6'"),
    (keras.layers.GroupNormalization(1, axis=1), "groups of the last axis of images, volumes or vectors"),
    (keras.layers.Flatten(data_format="channels_first"), "Flatten flatten_cf must be"),
])
def test_layers_the_twin_cannot_mirror_are_named(layer, message):
    # Each is refused by name before anything is installed (no torch needed).
    if isinstance(layer, keras.layers.Flatten):
        layer.name = "flatten_cf"
    model = keras.Sequential([keras.Input((8, 8, 1)), layer, keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    with pytest.raises(compare.Failure, match=re.escape(message)) as raised:
        compare.twin_graph(model)
    if "is not supported" in message:  # the list of layers it may use reads as a sentence
        assert str(raised.value).endswith(
            "may use these layers: " + compare.SUPPORTED_LAYERS + "."), str(raised.value)
        assert compare.SUPPORTED_LAYERS.endswith("functional models too")


def test_the_elu_layer_is_mirrored_with_its_alpha():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="hidden"),
                              keras.layers.ELU(alpha=0.5), keras.layers.Dense(2, name="logits")])
    assert compare.twin_graph(model)[0][1][:2] == ("elu", 0.5)


def sequence_model():
    """Sequences (batch, length, features): a convolution, self-attention, cross-attention
    (query, value, key), recurrent layers and pooling over the length."""
    layers = keras.layers
    inputs = keras.Input((8, 6))
    h = layers.Conv1D(8, 3, padding="causal", activation="gelu", name="conv")(inputs)
    attention = layers.MultiHeadAttention(2, 4, name="self")
    h = layers.Add(name="add")([h, attention(h, h)])
    key = layers.Dense(8, name="key")(h)
    h = layers.MultiHeadAttention(2, 4, name="cross")(h, h, key)
    h = layers.GRU(8, return_sequences=True, name="gru")(h)
    pooled = layers.GlobalMaxPooling1D(name="max")(layers.LSTM(8, return_sequences=True, name="lstm")(h))
    return keras.Model(inputs, layers.Dense(3, name="logits")(pooled))


def test_steps_of_a_sequence_model():
    steps, output = compare.twin_graph(sequence_model())
    by_name = {value: (inputs, out) for kind, value, inputs, out in steps if kind == "module"}
    conv = by_name["conv"][1]
    assert by_name["conv"][0] == (0,)
    assert by_name["self"][0] == (conv, conv)  # query and value: the same tensor
    [(_, _, add_inputs, add)] = [step for step in steps if step[0] == "add"]
    assert sorted(add_inputs) == sorted([conv, by_name["self"][1]])
    assert by_name["key"][0] == (add,)
    assert by_name["cross"][0] == (add, add, by_name["key"][1])  # query, value, key
    assert by_name["gru"][0] == (by_name["cross"][1],)
    assert ("global", ("max", False), (by_name["lstm"][1],)) in [step[:3] for step in steps]
    assert output == by_name["logits"][1]


def test_causal_self_attention_is_a_step_of_its_own():
    # use_causal_mask=True, a decoder's self-attention: torch's attn_mask in the twin;
    # the same layer's other settings are still checked.
    inputs = keras.Input((8, 8))
    h = keras.layers.MultiHeadAttention(2, 4, name="causal")(inputs, inputs, use_causal_mask=True)
    h = keras.layers.MultiHeadAttention(2, 4, name="plain")(h, h, use_causal_mask=False)
    steps, output = compare.twin_graph(keras.Model(inputs, h))
    assert [step[:3] for step in steps] == [("causal_attention", "causal", (0, 0)),
                                             ("module", "plain", (1, 1))]
    assert output == 2
    inputs = keras.Input((8, 6))
    narrow = keras.layers.MultiHeadAttention(2, 4, name="narrow")(inputs, inputs,
                                                                    use_causal_mask=True)
    with pytest.raises(compare.Failure, match="num_heads × key_dim"):
        compare.twin_graph(keras.Model(inputs, narrow))
    # Any other mask or option is refused by name, with the causal one too.
    layer = keras.Model(inputs, narrow).get_layer("narrow")
    for options in ({"attention_mask": object()}, {"use_causal_mask": True, "query_mask": 1}):
        call = types.SimpleNamespace(args=(None, None), kwargs=options)
        with pytest.raises(compare.Failure, match=re.escape(
                "without masks or other options but use_causal_mask=True; got 2 positional "
                f"arguments and {sorted(set(options) - {'use_causal_mask'})}")):
            compare.twin_step(layer, [(8, 6), (8, 6)], call)


def test_bidirectional_simple_recurrent_and_dilated_layers_are_modules():
    # Each one module of the twin (torch's bidirectional nn.LSTM/GRU/RNN, nn.RNN,
    # dilated nn.Conv1d/Conv2d), accepted before any install.
    layers = keras.layers
    inputs = keras.Input((8, 6))
    h = layers.Conv1D(8, 3, dilation_rate=2, padding="causal", name="tcn")(inputs)
    h = layers.Bidirectional(layers.GRU(4, return_sequences=True), merge_mode="sum",
                             name="bigru")(h)
    h = layers.SimpleRNN(5, activation="relu", return_sequences=True, name="rnn")(h)
    h = layers.Bidirectional(layers.LSTM(3), name="bilstm")(h)
    steps, output = compare.twin_graph(keras.Model(inputs, layers.Dense(3, name="logits")(h)))
    assert [(kind, value) for kind, value, _, _ in steps] == [
        ("module", name) for name in ("tcn", "bigru", "rnn", "bilstm", "logits")]
    images = keras.Input((9, 9, 2))
    h = layers.Conv2D(4, 3, dilation_rate=(2, 1), padding="same", name="conv")(images)
    h = layers.DepthwiseConv2D(3, dilation_rate=2, name="depthwise")(h)
    h = layers.SeparableConv2D(4, 3, dilation_rate=3, padding="same", name="separable")(h)
    steps, _ = compare.twin_graph(keras.Model(images, layers.Dense(3)(
        layers.GlobalAveragePooling2D()(h))))
    assert [value for kind, value, _, _ in steps if kind == "module"][:3] == [
        "conv", "depthwise", "separable"]


def test_images_transposed_convolution_and_cropping():
    layers = keras.layers
    inputs = keras.Input((8, 8, 1))
    h = layers.Conv2DTranspose(2, 3, strides=2, padding="same", name="up")(inputs)
    h = layers.Cropping2D(((1, 2), (3, 0)), name="crop")(h)
    model = keras.Model(inputs, layers.Dense(3, name="logits")(layers.GlobalAveragePooling2D()(h)))
    assert compare.twin_graph(model) == ([
        ("module", "up", (0,), 1), ("crop", (1, 2, 3, 0), (1,), 2),
        ("global", ("average", False), (2,), 3), ("module", "logits", (3,), 4)], 4)


def test_steps_of_a_conv1d_bn_network():
    # An audio-like 1-D CNN: BN and pooling of sequences (batch, length, features).
    layers = keras.layers
    inputs = keras.Input((32, 1))
    h = layers.Conv1D(4, 5, padding="same", name="conv")(inputs)
    h = layers.BatchNormalization(name="bn")(h)
    h = layers.MaxPooling1D(2, name="max")(layers.Activation("relu", name="relu")(h))
    h = layers.AveragePooling1D(4, strides=2, name="mean")(h)
    model = keras.Model(inputs, layers.Dense(3, name="logits")(
        layers.GlobalAveragePooling1D(name="gap")(h)))
    assert compare.twin_graph(model) == ([
        ("module", "conv", (0,), 1), ("module", "bn", (1,), 2),
        ("activation", "relu", (2,), 3), ("pool", ("max", (2,), (2,)), (3,), 4),
        ("pool", ("average", (4,), (2,)), (4,), 5), ("global", ("average", False), (5,), 6),
        ("module", "logits", (6,), 7)], 7)


def test_steps_of_a_volume_network():
    # A 3-D CNN on volumes (NDHWC in Keras, NCDHW in the twin): Conv3D, BN of volumes, 3-D
    # poolings ("same" with TensorFlow's padding), Dense on the channels, concatenation.
    layers = keras.layers
    inputs = keras.Input((5, 6, 7, 2))
    h = layers.Conv3D(4, 3, padding="same", activation="relu", name="conv")(inputs)
    h = layers.BatchNormalization(name="bn")(h)
    h = layers.MaxPooling3D(2, padding="same", name="max")(h)
    depth = layers.Concatenate(axis=1, name="depth")([h, h])
    channels = layers.Concatenate(name="channels")([depth, layers.Dense(3, name="dense")(depth)])
    h = layers.AveragePooling3D((2, 1, 2), name="mean")(channels)
    model = keras.Model(inputs, layers.Dense(3, name="logits")(
        layers.GlobalMaxPooling3D(name="gmp")(h)))
    assert compare.twin_graph(model) == ([
        ("module", "conv", (0,), 1), ("module", "bn", (1,), 2),
        ("pool", ("max", (2, 2, 2), (2, 2, 2), ((0, 1), (0, 0), (0, 1))), (2,), 3),
        ("concatenate", 2, (3, 3), 4), ("module", "dense", (4,), 5),
        ("concatenate", 1, (4, 5), 6), ("pool", ("average", (2, 1, 2), (2, 1, 2)), (6,), 7),
        ("global", ("max", False), (7,), 8), ("module", "logits", (8,), 9)], 9)
    # A 3-D U-Net's decoder: upsampling, padding and cropping of volumes (F.pad's order,
    # the last axis first; crops per axis in order).
    h = layers.UpSampling3D((1, 2, 3), name="up")(inputs)
    h = layers.ZeroPadding3D(((1, 0), (0, 2), (3, 4)), name="pad")(h)
    h = layers.Cropping3D(((0, 1), (2, 0), (1, 1)), name="crop")(h)
    steps, _ = compare.twin_graph(keras.Model(inputs, layers.Dense(3)(layers.Flatten()(h))))
    assert steps[:3] == [("upsample", ((1, 2, 3), "nearest"), (0,), 1),
                         ("pad", (3, 4, 0, 2, 1, 0), (1,), 2),
                         ("crop", (0, 1, 2, 0, 1, 1), (2,), 3)]
    # The twin's layout: channels first for images and volumes, other ranks as they are.
    assert [compare.tensor_axis(axis, 5) for axis in range(-1, 5)] == [1, 0, 2, 3, 4, 1]
    assert [compare.tensor_axis(axis, 4) for axis in range(4)] == [0, 2, 3, 1]
    assert compare.tensor_axis(2, 3) == 2
    volumes = np.arange(2 * 3 * 4 * 5 * 6).reshape(2, 3, 4, 5, 6)
    assert compare.channels_first(volumes).shape == (2, 6, 3, 4, 5)
    assert compare.channels_first(volumes)[1, 5, 2, 3, 4] == volumes[1, 2, 3, 4, 5]
    assert compare.channels_first(volumes[0]).shape == (3, 6, 4, 5)
    assert compare.channels_first(volumes[0, 0, 0]).shape == (5, 6)


@pytest.mark.parametrize("layer, message", [
    (keras.layers.Conv3D(2, 3, padding="same", data_format="channels_first"),
     "Conv3D conv3d_cf must be channels_last"),
    (keras.layers.MaxPooling3D(2, data_format="channels_first"), "must be channels_last"),
    (keras.layers.UpSampling3D(2, data_format="channels_first"), "must be channels_last"),
    (keras.layers.ZeroPadding3D(1, data_format="channels_first"), "must be channels_last"),
    (keras.layers.Conv3DTranspose(2, 2), "(Conv3DTranspose) is not supported"),
    (keras.layers.BatchNormalization(axis=1), "BN bn_axis must normalise the last axis of a "
                                              "2-D to 5-D input"),
])
def test_volume_layers_the_twin_cannot_mirror_are_named(layer, message):
    layer.name = {"Conv3D": "conv3d_cf", "BatchNormalization": "bn_axis"}.get(
        type(layer).__name__, layer.name)
    model = keras.Sequential([keras.Input((4, 4, 4, 2)), layer, keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    with pytest.raises(compare.Failure, match=re.escape(message)):
        compare.twin_graph(model)


@pytest.mark.parametrize("build, message", [
    (lambda h: keras.layers.MultiHeadAttention(2, 3)(h, h), "num_heads × key_dim"),
    (lambda h: keras.layers.MultiHeadAttention(2, 4, value_dim=2)(h, h), "value_dim = key_dim"),
    (lambda h: keras.layers.MultiHeadAttention(2, 4, use_bias=False)(h, h), "with biases"),
    (lambda h: keras.layers.LSTM(4, go_backwards=True)(h), "not go_backwards"),
    (lambda h: keras.layers.LSTM(4, activation="relu")(h), "tanh and sigmoid"),
    (lambda h: keras.layers.GRU(4, reset_after=False)(h), "reset_after=True"),
    (lambda h: keras.layers.Conv1D(4, 3, groups=2)(h), "without groups"),
    (lambda h: keras.layers.SimpleRNN(4, activation="sigmoid")(h), "nn.RNN: tanh or relu"),
    (lambda h: keras.layers.SimpleRNN(4, use_bias=False)(h), "with biases"),
    (lambda h: keras.layers.Concatenate()(
        keras.layers.Bidirectional(keras.layers.LSTM(4), merge_mode=None)(h)),
     "has 2 outputs; the twin mirrors layers of one output"),
    (lambda h: keras.layers.Bidirectional(
        keras.layers.LSTM(4), backward_layer=keras.layers.GRU(4, go_backwards=True))(h),
     "its backward layer the same"),
    (lambda h: keras.layers.Bidirectional(keras.layers.GRU(4, reset_after=False))(h),
     "reset_after=True"),
    (lambda h: keras.layers.Bidirectional(keras.layers.SimpleRNN(4), backward_layer=(
        keras.layers.SimpleRNN(4, activation="relu", go_backwards=True)))(h),
     "one setting for both directions"),
    (lambda h: keras.layers.GroupNormalization(2)(h), "of images, volumes or vectors"),
    (lambda h: keras.layers.Embedding(9, 4)(h), "must read the model's integer input"),
    (lambda h: keras.layers.LSTM(8)(
        h, initial_state=[keras.layers.Dense(8)(keras.layers.Flatten()(h))] * 2),
     "is called on 3 tensors"),
])
def test_sequence_layers_the_twin_cannot_mirror_are_named(build, message):
    inputs = keras.Input((8, 8))
    h = build(inputs)
    h = keras.layers.Flatten()(h) if len(h.shape) == 3 else h
    with pytest.raises(compare.Failure, match=re.escape(message)):
        compare.twin_graph(keras.Model(inputs, keras.layers.Dense(3)(h)))


def test_workload_from_files(tmp_path):
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    model.save(tmp_path / "net.keras")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 5))
    np.savez(tmp_path / "data.npz", x=x, y=rng.integers(0, 3, (10, 1)).astype(np.float64))
    workload = compare.workload_from_files(
        str(tmp_path / "net.keras"), str(tmp_path / "data.npz"), 128, None)
    assert (workload.name, workload.batch_size, workload.lanczos_steps) == ("net", 10, 90)
    assert workload.x.dtype == np.float32 and workload.y.dtype == np.int32
    assert workload.y.shape == (10,)

    # A trailing axis of size 1 is dropped, or added, as Keras does for hessian-spectrum.
    np.savez(tmp_path / "column.npz", x=x[..., np.newaxis], y=rng.integers(0, 3, 10))
    assert compare.workload_from_files(
        str(tmp_path / "net.keras"), str(tmp_path / "column.npz"), 4, 5).x.shape == (10, 5)
    keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(3)]).save(
        tmp_path / "image.keras")
    np.savez(tmp_path / "gray.npz", x=rng.uniform(size=(10, 4, 4)), y=rng.integers(0, 3, 10))
    assert compare.workload_from_files(
        str(tmp_path / "image.keras"), str(tmp_path / "gray.npz"), 4, 5).x.shape == (10, 4, 4, 1)

    # Tokens: an Embedding's integer inputs stay integers; real numbers are refused.
    tokens = keras.Input((5,), dtype="int32")
    embedded = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(7, 2)(tokens))
    keras.Model(tokens, keras.layers.Dense(3)(embedded)).save(tmp_path / "text.keras")
    np.savez(tmp_path / "tokens.npz", x=rng.integers(0, 7, (10, 5)), y=rng.integers(0, 3, 10))
    assert compare.workload_from_files(
        str(tmp_path / "text.keras"), str(tmp_path / "tokens.npz"), 4, 5).x.dtype == np.int32
    with pytest.raises(compare.Failure, match="takes integer inputs"):
        compare.workload_from_files(str(tmp_path / "text.keras"), str(tmp_path / "data.npz"), 4, 5)
    grid = keras.Input((5, 5), dtype="int32")  # tokens in a grid: the twin reads sequences
    with pytest.raises(compare.Failure, match=re.escape("of token sequences (batch, length)")):
        compare.twin_graph(keras.Model(grid, keras.layers.Dense(3)(
            keras.layers.Flatten()(keras.layers.Embedding(7, 2)(grid)))))
    masked = keras.layers.Embedding(7, 2, mask_zero=True)(tokens)
    with pytest.raises(compare.Failure, match="without mask_zero"):
        compare.twin_graph(keras.Model(tokens, keras.layers.Dense(3)(
            keras.layers.GlobalAveragePooling1D()(masked))))

    # One logit: 0/1 labels, binary cross-entropy on both sides; a final sigmoid refused.
    keras.Sequential([keras.Input((5,)), keras.layers.Dense(1)]).save(tmp_path / "binary.keras")
    np.savez(tmp_path / "coin.npz", x=x, y=rng.integers(0, 2, 10))
    assert compare.workload_from_files(
        str(tmp_path / "binary.keras"), str(tmp_path / "coin.npz"), 4, 5).binary
    assert not compare.workload_from_files(
        str(tmp_path / "net.keras"), str(tmp_path / "coin.npz"), 4, 5).binary
    with pytest.raises(compare.Failure, match=re.escape("labels must lie in [0, 1] (binary")):
        compare.workload_from_files(str(tmp_path / "binary.keras"), str(tmp_path / "data.npz"), 4, 5)
    keras.Sequential([keras.Input((5,)), keras.layers.Dense(1, activation="sigmoid")]).save(
        tmp_path / "sigmoid.keras")
    with pytest.raises(compare.Failure, match="last layer applies a sigmoid"):
        compare.workload_from_files(str(tmp_path / "sigmoid.keras"), str(tmp_path / "coin.npz"), 4, 5)

    np.savez(tmp_path / "soft.npz", x=x, y=rng.uniform(size=10))
    with pytest.raises(compare.Failure, match="not integer class labels"):
        compare.workload_from_files(str(tmp_path / "net.keras"), str(tmp_path / "soft.npz"), 4, 5)
    labels = rng.integers(0, 3, 10)
    bad = {
        "no_y.npz": (dict(x=x), "cannot read arrays x and y"),
        "wide.npz": (dict(x=x[:, :4], y=labels), "inputs of shape (4,), but --model takes (5,)"),
        "classes.npz": (dict(x=x, y=labels + 1), "labels must lie in [0, 2]"),
        "text.npz": (dict(x=x.astype(str), y=labels), "must be numeric"),
    }
    for name, (arrays, message) in bad.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(compare.Failure, match=re.escape(message)):
            compare.workload_from_files(str(tmp_path / "net.keras"), str(tmp_path / name), 4, 5)
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(compare.Failure, match="it holds a single array"):
        compare.workload_from_files(str(tmp_path / "net.keras"), str(tmp_path / "x.npy"), 4, 5)
    with pytest.raises(compare.Failure, match="the npz: prefix is for hessian-spectrum"):
        compare.workload_from_files(str(tmp_path / "net.keras"), "npz:" + str(tmp_path / "x.npy"),
                                    4, 5)
    # A layer the twin cannot mirror: named, with the flag.
    keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, activation="softmax")]).save(
        tmp_path / "probabilities.keras")
    with pytest.raises(compare.Failure, match=r"^--model=.*remove the final softmax"):
        compare.workload_from_files(str(tmp_path / "probabilities.keras"),
                                    str(tmp_path / "data.npz"), 4, 5)
    # Integer images: the twin would reshape them as NCHW.
    keras.Sequential([keras.Input((2, 2, 1), dtype="int32"), keras.layers.Reshape((4,)),
                      keras.layers.Embedding(5, 2), keras.layers.Flatten(),
                      keras.layers.Dense(3)]).save(tmp_path / "int_images.keras")
    np.savez(tmp_path / "int_images.npz", x=np.zeros((4, 2, 2, 1), np.int32), y=np.arange(4) % 3)
    with pytest.raises(compare.Failure, match=r"^--model=.*integer images or volumes \(2, 2, 1\)"):
        compare.workload_from_files(str(tmp_path / "int_images.keras"),
                                    str(tmp_path / "int_images.npz"), 4, 5)


def test_workload_of_labels_per_position(tmp_path):
    # A segmentation model (a class per pixel) and a tagger (a class per token).
    rng = np.random.default_rng(1)
    keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Conv2D(3, 1)]).save(tmp_path / "seg.keras")
    pixels = rng.integers(0, 3, (6, 4, 4))
    for name, y in (("pixels", pixels), ("column", pixels[..., None])):
        np.savez(tmp_path / f"{name}.npz", x=rng.uniform(size=(6, 4, 4, 1)), y=y)
        workload = compare.workload_from_files(
            str(tmp_path / "seg.keras"), str(tmp_path / f"{name}.npz"), 4, 5)
        assert workload.y.shape == (6, 4, 4) and not workload.binary
    np.savez(tmp_path / "per_image.npz", x=rng.uniform(size=(6, 4, 4, 1)), y=pixels[:, 0, 0])
    with pytest.raises(compare.Failure, match=re.escape(
            "pass one integer label per position (4, 4) of the model's outputs")):
        compare.workload_from_files(str(tmp_path / "seg.keras"), str(tmp_path / "per_image.npz"),
                                    4, 5)
    np.savez(tmp_path / "pixel_classes.npz", x=rng.uniform(size=(6, 4, 4, 1)), y=pixels + 1)
    with pytest.raises(compare.Failure, match=re.escape("labels must lie in [0, 2]")):
        compare.workload_from_files(str(tmp_path / "seg.keras"),
                                    str(tmp_path / "pixel_classes.npz"), 4, 5)
    keras.Sequential([keras.Input((5, 2)), keras.layers.Dense(3)]).save(tmp_path / "tagger.keras")
    np.savez(tmp_path / "tags.npz", x=rng.uniform(size=(6, 5, 2)), y=rng.integers(0, 3, (6, 5)))
    assert compare.workload_from_files(
        str(tmp_path / "tagger.keras"), str(tmp_path / "tags.npz"), 4, 5).y.shape == (6, 5)
    # Sequences of any length: the labels' positions are the data's.
    keras.Sequential([keras.Input((None, 2)), keras.layers.Dense(3)]).save(tmp_path / "any.keras")
    assert compare.workload_from_files(
        str(tmp_path / "any.keras"), str(tmp_path / "tags.npz"), 4, 5).y.shape == (6, 5)
    keras.Sequential([keras.Input((5, 2)), keras.layers.Dense(1)]).save(tmp_path / "one.keras")
    np.savez(tmp_path / "coins.npz", x=rng.uniform(size=(6, 5, 2)), y=rng.integers(0, 2, (6, 5)))
    with pytest.raises(compare.Failure, match=re.escape("one logit per position (5,)")):
        compare.workload_from_files(str(tmp_path / "one.keras"), str(tmp_path / "coins.npz"), 4, 5)


def test_workload_of_a_regression(tmp_path):
    # --loss=mean_squared_error: real targets shaped as the outputs, (N,) for one output.
    rng = np.random.default_rng(3)
    keras.Sequential([keras.Input((5,)), keras.layers.Dense(1)]).save(tmp_path / "reg.keras")
    x = rng.standard_normal((10, 5))
    np.savez(tmp_path / "real.npz", x=x, y=rng.standard_normal(10))
    workload = compare.workload_from_files(str(tmp_path / "reg.keras"),
                                           str(tmp_path / "real.npz"), 4, 5, "mean_squared_error")
    assert workload.regression and not workload.binary
    assert workload.y.shape == (10, 1) and workload.y.dtype == np.float32
    # By default real targets are refused, with the flag that takes them.
    with pytest.raises(compare.Failure, match=re.escape("pass --loss=mean_squared_error")):
        compare.workload_from_files(str(tmp_path / "reg.keras"), str(tmp_path / "real.npz"), 4, 5)
    # An autoencoder's targets: images shaped as its outputs, with or without the last axis.
    keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Conv2D(1, 3, padding="same")]).save(
        tmp_path / "ae.keras")
    images = rng.uniform(size=(6, 4, 4, 1))
    for name, y in (("images", images), ("gray", images[..., 0])):
        np.savez(tmp_path / f"{name}.npz", x=images, y=y)
        assert compare.workload_from_files(
            str(tmp_path / "ae.keras"), str(tmp_path / f"{name}.npz"), 4, 5,
            "mean_squared_error").y.shape == (6, 4, 4, 1)
    bad = {
        "two.npz": (dict(x=x, y=rng.standard_normal((10, 2))), "shaped as the model's outputs (1,)"),
        "few.npz": (dict(x=x, y=rng.standard_normal(9)), "shaped as the model's outputs (1,)"),
        "nan.npz": (dict(x=x, y=np.full(10, np.nan)), "NaN or infinite targets"),
    }
    for name, (arrays, message) in bad.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(compare.Failure, match=re.escape(message)):
            compare.workload_from_files(str(tmp_path / "reg.keras"), str(tmp_path / name), 4, 5,
                                        "mean_squared_error")
    with pytest.raises(compare.Failure, match=re.escape("--loss=hinge: pass auto")):
        compare.workload_from_files(str(tmp_path / "reg.keras"), str(tmp_path / "real.npz"), 4, 5,
                                    "hinge")


def run_script(*args):
    return subprocess.run([sys.executable, os.path.join(BENCHMARKS, "pyhessian_compare.py"),
                           *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--model=net.keras"], "--model and --data go together"),
    (["--model=net.keras", "--data=d.npz", "--workload=mlp-digits"], "pass one or the other"),
    (["--model=missing.keras", "--data=d.npz", "--no_install"], "--model=missing.keras: no such file"),
    (["--batch_size=64"], "--batch_size=64 goes with --model"),
    (["--loss=mean_squared_error"], "--loss=mean_squared_error goes with --model"),
    # Our side alone would take another Hessian (train-mode BN: λmax 7.87 against 0.94),
    # timed and printed as the same.
    (["--our_flags=--bn_mode=train"], "--our_flags: --bn_mode=train sets what both sides"),
    (["--our_flags=--method=auto --noregularization"], "--noregularization sets what"),
    (["--our_flags=--variables dense"], "--variables sets what both sides"),
    (["--our_flags=-bn_mode=train"], "-bn_mode=train sets what both sides"),
])
def test_bad_input_is_one_line_before_any_install(args, message):
    result = run_script(*args)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith(("error", "pyhessian"))]
    assert len(lines) == 1 and message in lines[0], result.stderr


# Steps of each example network's twin (layers of one step each; Dropout is none).
STEPS_OF_EXAMPLES = {"conv_pool_bn": 7, "mlp_bn_gelu": 4, "functional_elu_avgpool": 6,
                     "residual_ln": 18, "transpose_crop": 8, "attention_seq": 10,
                     "lstm_seq": 2, "gru_conv1d_seq": 5, "embedding_tokens": 4,
                     "binary_parity": 5, "patches_vit": 13, "separable_dropout": 4,
                     "unet_pixels": 14, "unet_bilinear": 14, "row_tagger": 3,
                     "inception_pool": 20, "convnext_blocks": 14, "resnext_blocks": 9}


def test_example_networks_are_accepted(tmp_path):
    # The networks of PYHESSIAN.md's "Your own network" pass every check before install.
    for bad in ([], [str(tmp_path), "--epochs=0"], [str(tmp_path), "--epochs=x"]):
        assert example_networks.main(bad) == 2
    assert example_networks.main([str(tmp_path), "--epochs=1"]) == 0  # 1: quicker
    for name, data in example_networks.NETWORKS.items():
        workload = compare.workload_from_files(
            str(tmp_path / f"{name}.keras"), str(tmp_path / f"{data}.npz"), 128, None)
        assert len(workload.x) == 1797 and workload.binary == (data == "digits_parity")
        assert len(compare.twin_graph(workload.keras_model)[0]) == STEPS_OF_EXAMPLES[name]


def test_patches_by_reshape_and_permute_are_steps_with_keras_arguments():
    """A ViT-style patch embedding: the twin reshapes and permutes on Keras's layout
    (images NHWC), with Keras's target shape and 1-based dims."""
    layers = keras.layers
    inputs = keras.Input((8, 8, 1))
    h = layers.Reshape((4, 2, 4, 2), name="split")(inputs)
    h = layers.Permute((1, 3, 2, 4), name="order")(h)
    h = layers.Reshape((16, -1), name="patches")(h)
    h = layers.GlobalAveragePooling1D(name="mean")(layers.Dense(6, name="embed")(h))
    model = keras.Model(inputs, layers.Dense(3, name="logits")(h))
    assert compare.twin_graph(model) == ([
        ("reshape", (4, 2, 4, 2), (0,), 1), ("permute", (1, 3, 2, 4), (1,), 2),
        ("reshape", (16, -1), (2,), 3), ("module", "embed", (3,), 4),
        ("global", ("average", False), (4,), 5), ("module", "logits", (5,), 6)], 6)
