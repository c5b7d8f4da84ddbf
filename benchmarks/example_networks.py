"""Small networks trained on scikit-learn's digits, for
`pyhessian_compare.py --model ... --data ...` (benchmarks/PYHESSIAN.md, "Your own network").

Writes to OUT_DIR: conv_pool_bn.keras, mlp_bn_gelu.keras, functional_elu_avgpool.keras,
residual_ln.keras (a residual block, then LayerNormalization and two concatenated poolings),
transpose_crop.keras (a strided convolution, Conv2DTranspose back up, concatenated,
cropped), and three that read an image's 8 rows as a sequence of 8 tokens:
attention_seq.keras (a pre-LayerNorm transformer block, self-attention and an MLP),
lstm_seq.keras and gru_conv1d_seq.keras (a GRU, then strided and causal Conv1D); and
embedding_tokens.keras, a text classifier's shape on the 64 pixels as tokens (their
intensities 0-16 as words): Embedding, Conv1D, global max pooling; binary_parity.keras,
a CNN of one logit telling odd digits from even (binary cross-entropy); patches_vit.keras,
a ViT's shape: 2×2 patches cut by Reshape and Permute, a linear embedding, a pre-LayerNorm
transformer block (self-attention, a gelu MLP), mean pooling; and separable_dropout.keras:
SeparableConv2D and DepthwiseConv2D (gelu) with L2 weight penalties, Dropout, global average
pooling. Two predict a class per position: unet_pixels.keras, a small U-Net (two
poolings, Conv2DTranspose and UpSampling2D back up, skip connections concatenated, BN) on
the digits at 32×32, labelling each pixel 0 (background) or 1 + the digit (ink); and
row_tagger.keras, Conv1D and an LSTM of sequences tagging each of an image's 8 rows with
its digit (rows holding ink) or 10; unet_bilinear is unet_pixels with a bilinear
UpSampling2D, whose second derivatives TensorFlow leaves out (second_order.py); and
inception_pool.keras, two Inception blocks (1×1, 1×1 then 3×3, and 3×3 max and average
poolings of stride 1 with "same" padding, each then 1×1, concatenated) around a 3×3 max
pooling of stride 2, whose stride-1 max poolings TensorFlow's kernel differentiated wrong
to second order (second_order.py); convnext_blocks.keras and resnext_blocks.keras, grouped
convolutions (ConvNeXt's depthwise 7×7 and ResNeXt's 8 channels per group) on the digits
at 32×32, which Keras compiles by XLA and hessian_tf computes without (convolutions.py). With
digits_img.npz (x: 8×8×1 images, x/16; y: labels), digits_flat.npz (x: the 64 pixels),
digits_seq.npz (x: 8×8, rows as tokens), digits_tokens.npz (x: 64 int32 tokens) and
digits_parity.npz (the images; y: 1 for an odd digit), digits_pixels.npz (x: 32×32×1,
each pixel repeated 4×4; y: a label per pixel), digits_img32.npz (the same images; y:
labels) and digits_rows.npz (x: as digits_seq;
y: a tag per row).
Each network is trained 3 epochs with Adam (batch 64, seed 0), so BN has moving statistics
of its own (`--epochs` sets another number: the tests train one).

Usage:
  .venv/bin/python benchmarks/example_networks.py OUT_DIR [--epochs=3]
  .venv/bin/python benchmarks/pyhessian_compare.py --model=OUT_DIR/conv_pool_bn.keras --data=OUT_DIR/digits_img.npz
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

# Which data each network takes.
NETWORKS = {"conv_pool_bn": "digits_img", "mlp_bn_gelu": "digits_flat",
            "functional_elu_avgpool": "digits_img", "residual_ln": "digits_img",
            "transpose_crop": "digits_img", "attention_seq": "digits_seq",
            "lstm_seq": "digits_seq", "gru_conv1d_seq": "digits_seq",
            "embedding_tokens": "digits_tokens", "binary_parity": "digits_parity",
            "patches_vit": "digits_img", "separable_dropout": "digits_img",
            "unet_pixels": "digits_pixels", "unet_bilinear": "digits_pixels",
            "row_tagger": "digits_rows", "inception_pool": "digits_img",
            "convnext_blocks": "digits_img32", "resnext_blocks": "digits_img32"}


def loss(name: str) -> str:
    """hessian_tf's --loss for a network: its training loss, on logits."""
    return ("binary_crossentropy" if NETWORKS[name] == "digits_parity"
            else "sparse_categorical_crossentropy")


def build(name: str):
    import keras

    layers = keras.layers
    if name in ("unet_pixels", "unet_bilinear", "row_tagger"):
        return build_per_position_model(name)
    if name == "conv_pool_bn":
        return keras.Sequential([
            keras.Input((8, 8, 1)), layers.Conv2D(8, 3, activation="relu"), layers.MaxPooling2D(2),
            layers.Conv2D(16, 3, padding="same"), layers.BatchNormalization(), layers.ReLU(),
            layers.GlobalAveragePooling2D(), layers.Dense(10)])
    if name == "mlp_bn_gelu":
        return keras.Sequential([
            keras.Input((64,)), layers.Dense(64), layers.BatchNormalization(),
            layers.Activation("gelu"), layers.Dropout(0.2), layers.Dense(10)])
    if name == "binary_parity":
        return keras.Sequential([
            keras.Input((8, 8, 1)), layers.Conv2D(8, 3, activation="relu"), layers.MaxPooling2D(2),
            layers.Flatten(), layers.Dense(32, activation="relu"), layers.Dense(1)])
    if name == "embedding_tokens":
        inputs = keras.Input((64,), dtype="int32")
        h = layers.Conv1D(32, 5, activation="relu")(layers.Embedding(17, 16)(inputs))
        return keras.Model(inputs, layers.Dense(10)(layers.GlobalMaxPooling1D()(h)))
    if name.endswith("_seq"):
        return build_sequence_model(name)
    if name.endswith("_blocks"):
        return build_grouped_model(name)
    inputs = keras.Input((8, 8, 1))
    if name == "patches_vit":
        h = layers.Reshape((4, 2, 4, 2))(inputs)  # (patch row, row in it, patch column, ...)
        h = layers.Reshape((16, 4))(layers.Permute((1, 3, 2, 4))(h))  # 16 patches of 2×2
        return keras.Model(inputs, transformer_logits(h, width=16, key_dim=8))
    if name == "separable_dropout":
        l2 = keras.regularizers.l2(1e-3)
        h = layers.SeparableConv2D(8, 3, padding="same", activation="relu",
                                   depthwise_regularizer=l2, pointwise_regularizer=l2)(inputs)
        h = layers.DepthwiseConv2D(3, padding="same", activation="gelu")(h)
        h = layers.GlobalAveragePooling2D()(layers.Dropout(0.3)(h))
        return keras.Model(inputs, layers.Dense(10, kernel_regularizer=l2)(h))
    if name == "transpose_crop":
        h = layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
        down = layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(h)
        up = layers.Conv2DTranspose(16, 3, strides=2, padding="same", activation="relu")(down)
        h = layers.Cropping2D(1)(layers.Concatenate()([h, up]))
        h = layers.Conv2D(16, 3, activation="relu")(h)
        return keras.Model(inputs, layers.Dense(10)(layers.GlobalAveragePooling2D()(h)))
    if name == "inception_pool":
        h = layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
        h = inception_block(h)
        h = layers.MaxPooling2D(3, strides=2, padding="same")(h)  # GoogLeNet's: 8×8 → 4×4
        h = layers.GlobalAveragePooling2D()(inception_block(h))
        return keras.Model(inputs, layers.Dense(10)(h))
    if name == "residual_ln":
        h = layers.ReLU()(layers.BatchNormalization()(
            layers.Conv2D(16, 3, padding="same", use_bias=False)(inputs)))
        r = layers.ReLU()(layers.BatchNormalization()(
            layers.Conv2D(16, 3, padding="same", use_bias=False)(h)))
        r = layers.BatchNormalization()(layers.Conv2D(16, 3, padding="same", use_bias=False)(r))
        h = layers.ReLU()(layers.Add()([h, r]))
        # Downsampling padded as PyTorch pads (hessian_tf.models.resnet does the same).
        h = layers.Conv2D(32, 3, strides=2)(layers.ZeroPadding2D(1)(h))
        h = layers.ReLU()(layers.LayerNormalization()(h))
        h = layers.Concatenate()([layers.GlobalAveragePooling2D()(h),
                                  layers.GlobalMaxPooling2D()(h)])
        return keras.Model(inputs, layers.Dense(10)(h))
    # functional_elu_avgpool
    h = layers.Conv2D(6, 3, padding="same", activation="elu")(inputs)
    h = layers.LeakyReLU(0.1)(layers.AveragePooling2D(2)(h))
    h = layers.Dense(32, activation="sigmoid")(layers.Flatten()(h))
    return keras.Model(inputs, layers.Dense(10)(h))


def inception_block(h, width: int = 16):
    """Inception's four branches, concatenated: 1×1; 1×1 then 3×3; 3×3 max pooling and
    3×3 average pooling of stride 1 ("same" padding), each then 1×1."""
    import keras

    layers = keras.layers

    def conv(size, x):
        return layers.Conv2D(width, size, padding="same", activation="relu")(x)

    pooled = [pooling(3, strides=1, padding="same")(h)
              for pooling in (layers.MaxPooling2D, layers.AveragePooling2D)]
    return layers.Concatenate()([conv(1, h), conv(3, conv(1, h))] + [conv(1, p) for p in pooled])


def transformer_logits(tokens, *, width: int, key_dim: int):
    """10 logits of a sequence of tokens: a Dense embedding of `width`, one pre-LayerNorm
    transformer block (2-head self-attention, a gelu MLP of 2 × width), mean pooling."""
    import keras

    layers = keras.layers
    h = layers.Dense(width)(tokens)
    a = layers.LayerNormalization()(h)
    h = layers.Add()([h, layers.MultiHeadAttention(num_heads=2, key_dim=key_dim)(a, a)])
    f = layers.Dense(2 * width, activation="gelu")(layers.LayerNormalization()(h))
    h = layers.Add()([h, layers.Dense(width)(f)])
    return layers.Dense(10)(layers.GlobalAveragePooling1D()(h))


def character_windows(length: int = 64, step: int = 20):
    """(x, y, vocabulary size): the 14 dataset descriptions scikit-learn ships
    (sklearn/datasets/descr/*.rst, concatenated in name order) as windows of `length`
    character ids every `step` characters, each character's label the next one (int32)."""
    import glob

    import sklearn

    pattern = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "descr", "*.rst")
    text = ""
    for path in sorted(glob.glob(pattern)):
        with open(path, encoding="utf-8") as file:
            text += file.read()
    characters = {c: i for i, c in enumerate(sorted(set(text)))}
    ids = np.array([characters[c] for c in text], np.int32)
    starts = range(0, len(ids) - length, step)
    return (np.stack([ids[s:s + length] for s in starts]),
            np.stack([ids[s + 1:s + length + 1] for s in starts]), len(characters))


def causal_language_model(vocabulary: int, length: int = 64):
    """A small GPT of characters (benchmarks/PYHESSIAN.md's causal language model):
    `Embedding(vocabulary, 64)` plus a causal `Conv1D(64, 4, gelu)` of it (a position
    signal), two pre-LayerNorm blocks of causal self-attention (4 heads of 16) and a gelu
    MLP (256), LayerNorm, `Dense(vocabulary)` logits per position."""
    import keras

    layers = keras.layers
    tokens = keras.Input((length,), dtype="int32")
    h = layers.Embedding(vocabulary, 64)(tokens)
    h = layers.Add()([h, layers.Conv1D(64, 4, padding="causal", activation="gelu")(h)])
    for _ in range(2):
        a = layers.LayerNormalization()(h)
        h = layers.Add()([h, layers.MultiHeadAttention(4, 16)(a, a, use_causal_mask=True)])
        f = layers.Dense(256, activation="gelu")(layers.LayerNormalization()(h))
        h = layers.Add()([h, layers.Dense(64)(f)])
    return keras.Model(tokens, layers.Dense(vocabulary)(layers.LayerNormalization()(h)))


def build_sequence_model(name: str):
    import keras

    layers = keras.layers
    inputs = keras.Input((8, 8))  # 8 tokens (an image's rows) of 8 features
    if name == "attention_seq":
        return keras.Model(inputs, transformer_logits(inputs, width=32, key_dim=16))
    if name == "lstm_seq":
        return keras.Model(inputs, layers.Dense(10)(layers.LSTM(32)(inputs)))
    # gru_conv1d_seq
    h = layers.GRU(24, return_sequences=True)(inputs)
    h = layers.Conv1D(16, 4, strides=2, padding="same", activation="tanh")(h)
    h = layers.Conv1D(16, 3, padding="causal", activation="relu")(h)
    return keras.Model(inputs, layers.Dense(10)(layers.GlobalMaxPooling1D()(h)))


def build_grouped_model(name: str):
    """Grouped convolutions on the digits at 32×32 (64 channels). convnext_blocks:
    ConvNeXt's shape, a 4×4 stride-4 stem and LayerNormalization, then two blocks of a
    7×7 depthwise `Conv2D(groups=channels)`, LayerNormalization, a gelu MLP of pointwise
    Dense layers (×4) and a residual add. resnext_blocks: a stride-2 3×3 stem, then
    ResNeXt's bottleneck: 1×1, a 3×3 `Conv2D(groups=8)` (8 channels per group), 1×1 and
    BN, a residual add."""
    import keras

    layers = keras.layers
    inputs = keras.Input((32, 32, 1))
    if name == "convnext_blocks":
        h = layers.LayerNormalization(epsilon=1e-6)(layers.Conv2D(64, 4, strides=4)(inputs))
        for _ in range(2):
            r = layers.Conv2D(64, 7, padding="same", groups=64)(h)
            r = layers.Dense(256, activation="gelu")(layers.LayerNormalization(epsilon=1e-6)(r))
            h = layers.Add()([h, layers.Dense(64)(r)])
    else:  # resnext_blocks
        h = layers.Conv2D(64, 3, strides=2, padding="same", activation="relu")(inputs)
        r = layers.Conv2D(64, 1, activation="relu")(h)
        r = layers.Conv2D(64, 3, padding="same", groups=8, activation="relu")(r)
        r = layers.BatchNormalization()(layers.Conv2D(64, 1)(r))
        h = layers.ReLU()(layers.Add()([h, r]))
    return keras.Model(inputs, layers.Dense(10)(layers.GlobalAveragePooling2D()(h)))


def pixel_digits(images, digits):
    """The digits at 32×32×1 (`images` [N, 8, 8] in [0, 1], each pixel repeated 4×4) and
    a label per pixel: 0 for background, 1 + the digit for ink (above 0.25)."""
    large = np.kron(images, np.ones((4, 4), np.float32))
    labels = np.where(large > 0.25, 1 + np.asarray(digits)[:, None, None], 0)
    return large[..., np.newaxis], labels.astype(np.int32)


def build_per_position_model(name: str):
    """11 logits per position: a pixel's (the U-Nets) or a row's (row_tagger)."""
    import keras

    layers = keras.layers
    if name == "row_tagger":
        return keras.Sequential([
            keras.Input((8, 8)), layers.Conv1D(32, 3, padding="same", activation="relu"),
            layers.LSTM(48, return_sequences=True), layers.Dense(11)])
    inputs = keras.Input((32, 32, 1))
    c1 = layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    c2 = layers.Conv2D(32, 3, padding="same")(layers.MaxPooling2D()(c1))
    c2 = layers.ReLU()(layers.BatchNormalization()(c2))
    b = layers.Conv2D(64, 3, padding="same", activation="relu")(layers.MaxPooling2D()(c2))
    u2 = layers.Concatenate()([layers.Conv2DTranspose(32, 2, strides=2)(b), c2])
    u2 = layers.Conv2D(32, 3, padding="same", activation="relu")(u2)
    upsampling = layers.UpSampling2D(
        interpolation="bilinear" if name == "unet_bilinear" else "nearest")
    u1 = layers.Concatenate()([upsampling(u2), c1])
    u1 = layers.Conv2D(16, 3, padding="same", activation="relu")(u1)
    return keras.Model(inputs, layers.Conv2D(11, 1)(u1))


def main(argv: list[str]) -> int:
    epochs = [arg for arg in argv if arg.startswith("--epochs=")]
    paths = [arg for arg in argv if not arg.startswith("--epochs=")]
    text = epochs[-1].split("=", 1)[1] if epochs else "3"
    if len(paths) != 1 or not text.isdigit() or int(text) < 1:
        print(f"usage: example_networks.py OUT_DIR [--epochs=N] (N ≥ 1; got {argv})",
              file=sys.stderr)
        return 2
    out_dir, epochs = paths[0], int(text)
    os.makedirs(out_dir, exist_ok=True)
    import keras
    from sklearn.datasets import load_digits

    from hessian_tf.operators.convolutions import grouped_convolutions

    digits = load_digits()
    flat = (digits.data / 16).astype(np.float32)
    data = {"digits_img": flat.reshape(-1, 8, 8, 1), "digits_flat": flat,
            "digits_seq": flat.reshape(-1, 8, 8), "digits_tokens": digits.data.astype(np.int32)}
    y = digits.target.astype(np.int32)
    labels = {name: y for name in data}
    data["digits_parity"], labels["digits_parity"] = data["digits_img"], y % 2
    # A label per pixel (0: background, 1 + the digit: ink) and per row (the digit where
    # the row holds ink, else 10).
    data["digits_pixels"], labels["digits_pixels"] = pixel_digits(data["digits_seq"], y)
    data["digits_img32"], labels["digits_img32"] = data["digits_pixels"], y
    data["digits_rows"] = data["digits_seq"]
    labels["digits_rows"] = np.where(data["digits_seq"].sum(-1) > 1.5, y[:, None],
                                     10).astype(np.int32)
    for name, x in data.items():
        np.savez(os.path.join(out_dir, f"{name}.npz"), x=x, y=labels[name])
    keras.utils.set_random_seed(0)
    for name, data_name in NETWORKS.items():
        model = build(name)
        binary = data_name == "digits_parity"
        model.compile(optimizer="adam", loss=(
            keras.losses.BinaryCrossentropy(from_logits=True) if binary
            else keras.losses.SparseCategoricalCrossentropy(from_logits=True)))
        # Keras compiles grouped convolutions by XLA, slow on a CPU: trained by
        # hessian_tf's (convolutions.py), the same convolutions.
        with grouped_convolutions():
            model.fit(data[data_name],
                      labels[data_name].reshape(-1, 1) if binary else labels[data_name],
                      epochs=epochs, batch_size=64, verbose=0)
        path = os.path.join(out_dir, f"{name}.keras")
        model.save(path)
        params = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
        print(f"{path} ({params:,} parameters) with {data_name}.npz")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
