"""Residual networks of He et al. (2016) with basic blocks, as Keras functional models.

- `resnet32`: the CIFAR ResNet (3 stages of 5 basic blocks, 16/32/64 filters,
  global average pooling, a dense layer of logits). Shortcuts are option B of the
  paper: identity where shapes match, a strided 1×1 convolution (+ BN) where a
  stage halves the resolution and doubles the width. With BN it has 466,906
  trainable parameters (option A, zero-padded identity shortcuts, would have
  464,154); option B is what torchvision-style code and the ResNet-18 use, and it
  keeps every parameter a weight of some layer.
- `resnet18`: the ImageNet ResNet-18 (7×7 stem, max pooling, 4 stages of 2 basic
  blocks, 64/128/256/512 filters); 11,689,512 trainable parameters at width 64,
  the same as torchvision's `resnet18`.

Conventions, chosen to match PyTorch implementations (so spectra are comparable
with PyHessian's, and weights could be ported): strided convolutions pad
symmetrically (explicit `ZeroPadding2D`, then 'valid'), where Keras' 'same' would
pad only the bottom/right; BN uses epsilon 1e-5 and momentum 0.9; convolutions
have He-normal kernels. With `batch_norm=False` the BN layers are left out and
every convolution gets a bias instead. Without BN nothing rescales the residual
sums, so activations grow with depth at initialisation (He et al. train
such networks only with BN); the networks are still well defined, and are
useful to see what BN does to the spectrum.

Outputs are logits (no softmax), as the operators' losses expect. Every layer has
a name: `stem_conv`, `stage2_block1_conv1`, `stage2_block1_shortcut_bn`, `logits`, ...
Stages and blocks count from 1.
"""

from __future__ import annotations

from typing import Optional, Sequence

import keras

from hessian_tf.models.seeds import LayerSeeds

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


def _check_options(
    name: str, input_shape: Sequence[Optional[int]], num_classes: int, width: int
) -> tuple:
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or any(d is not None and int(d) < 1 for d in input_shape):
        raise ValueError(
            f"{name}: input_shape={input_shape} is not an image shape; pass "
            "(height, width, channels), e.g. (32, 32, 3)."
        )
    if input_shape[-1] is None:
        raise ValueError(f"{name}: input_shape={input_shape} needs a known number of channels.")
    if int(num_classes) < 1:
        raise ValueError(f"{name}: num_classes={num_classes}; pass at least 1.")
    if int(width) < 1:
        raise ValueError(f"{name}: width={width}; pass a positive number of filters.")
    return input_shape


def _conv(x, filters, kernel_size, *, strides, use_bias, seeds, name):
    """A convolution padded like PyTorch's (kernel_size // 2 on every side)."""
    if strides > 1 and kernel_size > 1:
        x = keras.layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
        padding = "valid"
    else:
        padding = "same"
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        use_bias=use_bias,
        kernel_initializer=keras.initializers.HeNormal(seed=seeds()),
        name=name,
    )(x)


def _conv_bn(x, filters, kernel_size, *, strides, batch_norm, seeds, name, bn_name):
    x = _conv(
        x, filters, kernel_size, strides=strides, use_bias=not batch_norm, seeds=seeds, name=name
    )
    if batch_norm:
        x = keras.layers.BatchNormalization(
            epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=bn_name
        )(x)
    return x


def _basic_block(x, filters, *, strides, batch_norm, seeds, name):
    """conv3×3-BN-ReLU-conv3×3-BN, plus the shortcut, then ReLU."""
    y = _conv_bn(
        x, filters, 3, strides=strides, batch_norm=batch_norm, seeds=seeds,
        name=f"{name}_conv1", bn_name=f"{name}_bn1",
    )
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = _conv_bn(
        y, filters, 3, strides=1, batch_norm=batch_norm, seeds=seeds,
        name=f"{name}_conv2", bn_name=f"{name}_bn2",
    )
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        # Option B: a projection only where the shape changes.
        shortcut = _conv_bn(
            x, filters, 1, strides=strides, batch_norm=batch_norm, seeds=seeds,
            name=f"{name}_shortcut_conv", bn_name=f"{name}_shortcut_bn",
        )
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def _stages(x, filters, blocks_per_stage, *, first_stride, batch_norm, seeds):
    for stage, (stage_filters, num_blocks) in enumerate(zip(filters, blocks_per_stage), start=1):
        for block in range(1, num_blocks + 1):
            strides = (first_stride if stage == 1 else 2) if block == 1 else 1
            x = _basic_block(
                x, stage_filters, strides=strides, batch_norm=batch_norm, seeds=seeds,
                name=f"stage{stage}_block{block}",
            )
    return x


def _head(x, num_classes, seeds):
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.layers.Dense(
        num_classes, kernel_initializer=keras.initializers.GlorotUniform(seed=seeds()),
        name="logits",
    )(x)


def resnet32(
    *,
    input_shape: Sequence[Optional[int]] = (32, 32, 3),
    num_classes: int = 10,
    batch_norm: bool = True,
    width: int = 16,
    seed: int = 0,
) -> keras.Model:
    """The CIFAR ResNet-32 of He et al. (2016), option-B shortcuts.

    Args:
      input_shape: (height, width, channels) of one image.
      num_classes: number of logits.
      batch_norm: BN after every convolution (convolutions without bias); False
        drops the BN layers and gives the convolutions biases.
      width: filters of the first stage; the stages have width, 2·width, 4·width.
      seed: initial weights depend only on it.

    Returns:
      A built keras.Model mapping [batch, *input_shape] images to [batch,
      num_classes] logits. Trainable parameters on 3-channel images: 1810·w² +
      181·w + 4·w·c + c with BN (466,906 at w = 16, c = 10) and 1810·w² + 104·w +
      4·w·c + c without (465,674).
    """
    input_shape = _check_options("resnet32", input_shape, num_classes, width)
    seeds = LayerSeeds(seed)
    inputs = keras.Input(input_shape, name="images")
    x = _conv_bn(
        inputs, width, 3, strides=1, batch_norm=batch_norm, seeds=seeds,
        name="stem_conv", bn_name="stem_bn",
    )
    x = keras.layers.ReLU(name="stem_relu")(x)
    x = _stages(
        x, (width, 2 * width, 4 * width), (5, 5, 5),
        first_stride=1, batch_norm=batch_norm, seeds=seeds,
    )
    outputs = _head(x, num_classes, seeds)
    return keras.Model(inputs, outputs, name="resnet32")


def resnet18(
    *,
    input_shape: Sequence[Optional[int]] = (224, 224, 3),
    num_classes: int = 1000,
    batch_norm: bool = True,
    width: int = 64,
    seed: int = 0,
) -> keras.Model:
    """The ImageNet ResNet-18 of He et al. (2016).

    A 7×7 stride-2 stem and 3×3 stride-2 max pooling (input/4), then four stages
    of two basic blocks with width, 2·, 4·, 8·width filters (input/32), global
    average pooling and a dense layer of logits. At width 64 with 1000 classes it
    has 11,689,512 trainable parameters (as torchvision's resnet18); a narrow
    width (e.g. 8) on small images makes a model for smoke tests.

    Args: as `resnet32`.
    """
    input_shape = _check_options("resnet18", input_shape, num_classes, width)
    seeds = LayerSeeds(seed)
    inputs = keras.Input(input_shape, name="images")
    x = _conv_bn(
        inputs, width, 7, strides=2, batch_norm=batch_norm, seeds=seeds,
        name="stem_conv", bn_name="stem_bn",
    )
    x = keras.layers.ReLU(name="stem_relu")(x)
    # Zero padding equals PyTorch's −∞ padding here: the inputs are ReLU outputs.
    x = keras.layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="stem_pool")(x)
    x = _stages(
        x, (width, 2 * width, 4 * width, 8 * width), (2, 2, 2, 2),
        first_stride=1, batch_norm=batch_norm, seeds=seeds,
    )
    outputs = _head(x, num_classes, seeds)
    return keras.Model(inputs, outputs, name="resnet18")
