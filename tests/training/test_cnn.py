"""The digits CNN: parameter counts, seeds, shapes."""

import numpy as np
import pytest

from hessian_tf.models.cnn import small_cnn


@pytest.mark.parametrize("batch_norm, expected", [(True, 14_458), (False, 14_378)])
def test_parameter_counts(batch_norm, expected):
    model = small_cnn(batch_norm=batch_norm)
    assert sum(int(np.prod(v.shape)) for v in model.trainable_variables) == expected


def test_initial_weights_depend_only_on_the_seed():
    first, second, other = small_cnn(seed=3), small_cnn(seed=3), small_cnn(seed=4)
    for a, b in zip(first.get_weights(), second.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first.get_weights()[0], other.get_weights()[0])


def test_logits_shape():
    x = np.zeros((3, 8, 8, 1), np.float32)
    assert small_cnn(num_classes=7)(x).shape == (3, 7)


@pytest.mark.parametrize("kwargs", [dict(input_shape=(64,)), dict(width=0)])
def test_bad_options(kwargs):
    with pytest.raises(ValueError, match="small_cnn: received"):
        small_cnn(**kwargs)
