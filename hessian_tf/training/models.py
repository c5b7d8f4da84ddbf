"""The config's model: ResNet-32, ResNet-18, the one-hidden-layer MLP or the small
CNN, with batch norm on, off, or with population statistics."""

from __future__ import annotations

import keras
import numpy as np

from hessian_tf.models import cnn, population_bn, resnet
# The package exports the function `mlp`, which hides the module of that name.
from hessian_tf.models.mlp import mlp as build_mlp


def build_model(train, input_shape: tuple[int, ...]) -> keras.Model:
    """A built, uncompiled model whose initial weights depend only on train.seed."""
    batch_norm = train.batch_norm != "off"
    common = dict(num_classes=train.num_classes, batch_norm=batch_norm, seed=train.seed)
    if train.model in ("resnet32", "resnet18", "cnn") and len(input_shape) != 3:
        raise ValueError(
            f"--config.train.model={train.model} needs images (height, width, channels); "
            f"the inputs have shape {input_shape}. Set --config.train.input_shape, "
            "e.g. (8, 8, 1) for digits."
        )
    if train.model == "resnet32":
        model = resnet.resnet32(input_shape=input_shape, width=train.width or 16, **common)
    elif train.model == "resnet18":
        model = resnet.resnet18(input_shape=input_shape, width=train.width or 64, **common)
    elif train.model == "cnn":
        model = cnn.small_cnn(input_shape=input_shape, width=train.width or 16, **common)
    else:
        if len(input_shape) != 1:
            raise ValueError(
                f"--config.train.model=mlp needs flat inputs; they have shape "
                f"{input_shape}. Set --config.train.input_shape=({int(np.prod(input_shape))},)."
            )
        model = build_mlp(
            input_shape[0],
            hidden_units=train.hidden_units,
            num_classes=train.num_classes,
            seed=train.seed,
        )
    if train.zero_init_residual:
        if train.model not in ("resnet32", "resnet18"):
            raise ValueError(
                f"--config.train.zero_init_residual=True: only resnets have residual "
                f"branches, not model={train.model}."
            )
        zero_residual_branches(model)
    if train.batch_norm == "population":
        model = population_bn.convert_batch_norm(model)
    return model


def compile_model(model: keras.Model, train) -> None:
    """SGD with momentum; the learning rate drops by lr_drop_factor at each step s
    of lr_drop_steps: the first s updates use the rate before, update s + 1 on
    (optimizer.iterations >= s) the rate after."""
    values = [
        train.learning_rate * train.lr_drop_factor**i
        for i in range(len(train.lr_drop_steps) + 1)
    ]
    if train.lr_drop_steps:
        learning_rate = keras.optimizers.schedules.PiecewiseConstantDecay(
            # The schedule keeps values[i] while iterations <= boundaries[i].
            [int(step) - 1 for step in train.lr_drop_steps], values
        )
    else:
        learning_rate = train.learning_rate
    optimizer = keras.optimizers.SGD(
        learning_rate=learning_rate,
        momentum=train.momentum,
        nesterov=train.nesterov,
        weight_decay=train.weight_decay or None,
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=False,  # XLA was slower on CPU (benchmarks/README.md)
    )


def learning_rate_at(model: keras.Model, step: int) -> float:
    """The learning rate of the update taken when optimizer.iterations == step."""
    learning_rate = model.optimizer._learning_rate
    if isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        return float(keras.ops.convert_to_numpy(learning_rate(step)))
    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


def zero_residual_branches(model: keras.Model) -> int:
    """Zeroes the last convolution of every residual branch of a hessian_tf resnet
    (layers `stageS_blockB_conv2`, with their bias) and the γ of the BN after it
    (`stageS_blockB_bn2`), so that every block starts as the identity map plus
    its shortcut. Returns the number of branches changed."""
    count = 0
    for layer in model.layers:
        name = layer.name
        if name.startswith("stage") and (name.endswith("_conv2") or name.endswith("_bn2")):
            for variable in layer.trainable_variables:
                if name.endswith("_conv2") or variable.path.endswith("gamma"):
                    variable.assign(np.zeros(variable.shape, variable.dtype))
            count += name.endswith("_conv2")
    if count == 0:
        raise ValueError(
            "zero_init_residual: the model has no layers named stageS_blockB_conv2; "
            "it is not a hessian_tf resnet."
        )
    return count
