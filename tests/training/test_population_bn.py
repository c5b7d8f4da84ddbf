"""Population BN: the layer ignores `training`, statistics are exact, saving works."""

import keras
import numpy as np
import pytest

from hessian_tf.models import population_bn
from hessian_tf.operators import HessianOperator, KerasModelFunction


def bn_cnn(seed=0):
    """conv → BN → ReLU → conv → BN → ReLU → pool → dense: two BN layers in series."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization(epsilon=1e-5)(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(3, 3, padding="same")(x)
    x = keras.layers.BatchNormalization(epsilon=1e-5)(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(5)(x))


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    # A mean and scale far from 0 and 1, so that normalising matters.
    x = (3.0 + 2.0 * rng.standard_normal((50, 6, 6, 2))).astype(np.float32)
    y = rng.integers(0, 5, 50).astype(np.int32)
    return x, y


def test_conversion_keeps_weights_and_inference_outputs(data):
    x, _ = data
    model = bn_cnn()
    converted = population_bn.convert_batch_norm(model)
    assert len(population_bn.population_bn_layers(converted)) == 2
    assert [w.shape for w in converted.weights] == [w.shape for w in model.weights]
    np.testing.assert_array_equal(
        model(x, training=False).numpy(), converted(x, training=False).numpy()
    )


def test_statistics_are_those_of_the_whole_dataset_as_one_batch(data):
    x, _ = data
    model = bn_cnn()
    converted = population_bn.convert_batch_norm(model)
    # Batches of 7 over 50 examples: uneven, combined exactly.
    population_bn.PopulationStatistics(converted, batch_size=7).update(x)
    # BN in training mode with all 50 examples as one batch normalises every layer
    # with the statistics of its inputs over the whole dataset, the later layer's
    # inputs computed with the earlier layer already normalised so.
    expected = model(x, training=True).numpy()
    np.testing.assert_allclose(converted(x, training=False).numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(converted(x, training=True).numpy(), expected, rtol=1e-4, atol=1e-5)


def test_first_layer_statistics_match_numpy(data):
    x, _ = data
    converted = population_bn.convert_batch_norm(bn_cnn())
    population_bn.PopulationStatistics(converted, batch_size=16).update(x)
    first = population_bn.population_bn_layers(converted)[0]
    conv = keras.Model(converted.inputs[0], first.input)(x).numpy().astype(np.float64)
    np.testing.assert_allclose(first.moving_mean.numpy(), conv.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(first.moving_variance.numpy(), conv.var(axis=(0, 1, 2)), rtol=1e-4)


def test_training_does_not_touch_the_statistics(data):
    x, y = data
    converted = population_bn.convert_batch_norm(bn_cnn())
    population_bn.PopulationStatistics(converted, batch_size=50).update(x)
    layers = population_bn.population_bn_layers(converted)
    before = [(l.moving_mean.numpy(), l.moving_variance.numpy(), l.gamma.numpy()) for l in layers]
    converted.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    converted.fit(x, y, batch_size=10, epochs=1, verbose=0)
    for layer, (mean, variance, gamma) in zip(layers, before):
        np.testing.assert_array_equal(layer.moving_mean.numpy(), mean)
        np.testing.assert_array_equal(layer.moving_variance.numpy(), variance)
        assert not np.array_equal(layer.gamma.numpy(), gamma)  # γ, β do train


def test_hessian_is_the_same_in_both_bn_modes(data):
    x, y = data
    converted = population_bn.convert_batch_norm(bn_cnn())
    population_bn.PopulationStatistics(converted, batch_size=50).update(x)
    vector = np.random.default_rng(1).standard_normal(
        sum(int(np.prod(v.shape)) for v in converted.trainable_variables)
    )
    products = [
        HessianOperator(KerasModelFunction(converted), x, y, batch_size=16, bn_mode=mode).matvec(vector)
        for mode in ("inference", "train")
    ]
    np.testing.assert_allclose(products[0], products[1], rtol=1e-5, atol=1e-7)


def test_saved_model_loads_with_the_same_outputs(data, tmp_path):
    x, _ = data
    converted = population_bn.convert_batch_norm(bn_cnn())
    population_bn.PopulationStatistics(converted, batch_size=50).update(x)
    path = str(tmp_path / "model.keras")
    converted.save(path)
    loaded = keras.saving.load_model(path, compile=False, safe_mode=True)
    assert len(population_bn.population_bn_layers(loaded)) == 2
    np.testing.assert_array_equal(loaded(x, training=True).numpy(), converted(x).numpy())


def test_a_model_without_population_bn_is_refused():
    with pytest.raises(ValueError, match="no PopulationBatchNormalization"):
        population_bn.PopulationStatistics(bn_cnn())
