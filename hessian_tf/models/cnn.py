"""A small convolutional network for 8×8 digits: the BN experiment on one CPU.

conv3×3(w) → conv3×3(2w, stride 2) → conv3×3(2w), each followed by BN (when on)
and ReLU, then global average pooling and a dense layer of logits. With BN the
convolutions have no bias (BN's β takes its place); without BN they have one.
Trainable parameters on 8×8×1 inputs with 10 classes, width w = 16: 14,458 with BN
and 14,378 without.
"""

from __future__ import annotations

from typing import Sequence

import keras

from hessian_tf.models.seeds import LayerSeeds

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


def small_cnn(
    *,
    input_shape: Sequence[int] = (8, 8, 1),
    num_classes: int = 10,
    batch_norm: bool = True,
    width: int = 16,
    seed: int = 0,
) -> keras.Model:
    """The digits CNN; initial weights depend only on `seed`.

    Args:
      input_shape: (height, width, channels) of one image.
      num_classes: number of logits.
      batch_norm: BN after every convolution.
      width: filters of the first convolution (the others have 2·width).
      seed: seed of the initial weights.

    Returns:
      A built keras.Model from [batch, *input_shape] images to [batch, num_classes]
      logits.
    """
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(
            f"small_cnn: received input_shape={input_shape}; expected (height, width, "
            "channels), e.g. (8, 8, 1) for digits."
        )
    if int(num_classes) < 1 or int(width) < 1:
        raise ValueError(
            f"small_cnn: received num_classes={num_classes}, width={width}; expected "
            "positive integers."
        )
    seeds = LayerSeeds(seed)
    inputs = keras.Input(input_shape, name="images")
    x = inputs
    layers = (("conv1", width, 1), ("conv2", 2 * width, 2), ("conv3", 2 * width, 1))
    for name, filters, strides in layers:
        x = keras.layers.Conv2D(
            filters,
            3,
            strides=strides,
            padding="same",
            use_bias=not batch_norm,
            kernel_initializer=keras.initializers.HeNormal(seed=seeds()),
            name=name,
        )(x)
        if batch_norm:
            x = keras.layers.BatchNormalization(
                epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_bn"
            )(x)
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.GlorotUniform(seed=seeds()),
        name="logits",
    )(x)
    return keras.Model(inputs, outputs, name="small_cnn")
