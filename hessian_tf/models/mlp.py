"""The paper's kind of small model: one hidden layer."""

from __future__ import annotations

import keras
import numpy as np


def mlp(
    input_dim: int = 64,
    *,
    hidden_units: int = 220,
    num_classes: int = 10,
    activation: str = "tanh",
    seed: int = 0,
) -> keras.Model:
    """Dense(hidden_units, activation) → Dense(num_classes) logits.

    With the defaults (digits: 64 inputs) it has 16,510 parameters.
    """
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((input_dim,)),
            keras.layers.Dense(hidden_units, activation=activation, name="hidden"),
            keras.layers.Dense(num_classes, name="logits"),
        ],
        name="mlp",
    )


def train_briefly(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 20,
    batch_size: int = 64,
    learning_rate: float = 0.05,
    seed: int = 0,
) -> float:
    """Trains with SGD + momentum on sparse labels; returns the training accuracy
    of the trained model (of the initial one for epochs=0)."""
    keras.utils.set_random_seed(seed)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=learning_rate, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    if epochs:
        model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, shuffle=True)
    return float(model.evaluate(x, y, verbose=0, return_dict=True)["accuracy"])
