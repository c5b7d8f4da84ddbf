"""ResNet-32 and ResNet-18: parameter counts, shapes, BN on/off, seeds."""

import keras
import numpy as np
import pytest

from hessian_tf.models import resnet


def num_weights(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


def bn_layers(model):
    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


def images(num_images, size, seed=0):
    return np.random.default_rng(seed).uniform(size=(num_images, size, size, 3)).astype(np.float32)


# ResNet-32 on 3-channel images, width w, c classes, option-B shortcuts.
# Convolution kernels (w² terms): stem 27w (3·3·3·w, linear in w); stage 1: 10
# convs of 9w² = 90w²; stage 2: 9·w·2w + 9 convs of 9·(2w)² + shortcut w·2w = 344w²;
# stage 3: 9·2w·4w + 9 convs of 9·(4w)² + shortcut 2w·4w = 1376w²; total 1810w².
# Channels after a convolution: w + 10w + 11·2w + 11·4w = 77w, so BN has 154w
# trainable (γ, β) and 154w non-trainable (moving mean, variance) entries; without
# BN the convolutions have 77w biases. Dense: 4w·c + c.
def resnet32_count(w, c, batch_norm=True):
    return 1810 * w**2 + 27 * w + (154 * w if batch_norm else 77 * w) + 4 * w * c + c


# ResNet-18, width w: kernels 7·7·3·w = 147w, then stage 1: 4·9w² = 36w²; stage 2:
# 9·w·2w + 3·9·(2w)² + w·2w = 128w²; stage 3: 512w²; stage 4: 2048w² (each ×4);
# total 2724w². Channels after a convolution: w + 4w + 5·2w + 5·4w + 5·8w = 75w
# (BN: 150w trainable + 150w moving statistics). Dense: 8w·c + c.
def resnet18_count(w, c, batch_norm=True):
    return 2724 * w**2 + 147 * w + (150 * w if batch_norm else 75 * w) + 8 * w * c + c


def test_resnet32_parameter_count():
    model = resnet.resnet32()
    assert num_weights(model.trainable_variables) == 466_906 == resnet32_count(16, 10)
    assert num_weights(model.non_trainable_variables) == 2_464 == 154 * 16
    assert model.count_params() == 469_370
    assert len(bn_layers(model)) == 33  # stem + 30 in blocks + 2 shortcuts


def test_resnet32_without_batch_norm():
    model = resnet.resnet32(batch_norm=False)
    assert not bn_layers(model)
    assert not model.non_trainable_variables
    assert num_weights(model.trainable_variables) == 465_674 == resnet32_count(16, 10, False)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 33 and all(conv.use_bias for conv in convs)


@pytest.mark.parametrize("width,num_classes", [(4, 10), (8, 100)])
def test_resnet32_counts_follow_the_formula(width, num_classes):
    for batch_norm in (True, False):
        model = resnet.resnet32(width=width, num_classes=num_classes, batch_norm=batch_norm)
        expected = resnet32_count(width, num_classes, batch_norm)
        assert num_weights(model.trainable_variables) == expected


def test_resnet32_shapes_and_names():
    model = resnet.resnet32(width=4, num_classes=7)
    assert model.get_layer("stage1_block5_out").output.shape == (None, 32, 32, 4)
    assert model.get_layer("stage2_block1_shortcut_conv").output.shape == (None, 16, 16, 8)
    assert model.get_layer("stage3_block5_out").output.shape == (None, 8, 8, 16)
    # Projections only where a stage changes the shape (option B).
    shortcuts = [layer.name for layer in model.layers if "shortcut_conv" in layer.name]
    assert shortcuts == ["stage2_block1_shortcut_conv", "stage3_block1_shortcut_conv"]
    logits = model(images(3, 32), training=False)
    assert logits.shape == (3, 7)
    assert np.all(np.isfinite(logits))


def test_resnet18_parameter_count():
    model = resnet.resnet18()
    # torchvision's resnet18 has 11,689,512 parameters (its BN statistics are buffers).
    assert num_weights(model.trainable_variables) == 11_689_512 == resnet18_count(64, 1000)
    assert num_weights(model.non_trainable_variables) == 9_600 == 150 * 64
    assert model.get_layer("stem_pool").output.shape == (None, 56, 56, 64)
    assert model.get_layer("stage4_block2_out").output.shape == (None, 7, 7, 512)


def test_narrow_resnet18_runs_forward():
    model = resnet.resnet18(width=8, input_shape=(64, 64, 3), num_classes=10)
    assert num_weights(model.trainable_variables) == 177_362 == resnet18_count(8, 10)
    logits = model(images(2, 64), training=False)
    assert logits.shape == (2, 10)
    assert np.all(np.isfinite(logits))


def test_narrow_resnet18_without_batch_norm():
    model = resnet.resnet18(width=8, input_shape=(64, 64, 3), num_classes=10, batch_norm=False)
    assert not bn_layers(model)
    assert num_weights(model.trainable_variables) == resnet18_count(8, 10, False) == 176_762


def test_seed_fixes_the_weights():
    first = resnet.resnet32(width=2, seed=3)
    second = resnet.resnet32(width=2, seed=3)
    other = resnet.resnet32(width=2, seed=4)
    for a, b in zip(first.trainable_variables, second.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    kernels = [v.numpy() for v in first.trainable_variables if len(v.shape) == 4]
    other_kernels = [v.numpy() for v in other.trainable_variables if len(v.shape) == 4]
    # Every convolution draws its own values (a repeated integer seed would repeat them).
    assert not np.array_equal(kernels[1], kernels[2])
    assert not np.array_equal(kernels[1], other_kernels[1])


@pytest.mark.parametrize(
    "kwargs",
    [dict(width=0), dict(num_classes=0), dict(input_shape=(32, 32)), dict(input_shape=(32, 32, None))],
)
def test_bad_options_raise_value_error(kwargs):
    with pytest.raises(ValueError, match="resnet32"):
        resnet.resnet32(**kwargs)
