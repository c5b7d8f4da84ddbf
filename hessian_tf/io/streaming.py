"""tfds splits streamed from `data_dir` (a local path or a bucket) at every product,
for datasets too large for memory, such as imagenet2012.

Each input pipeline reads its own `tfds.even_splits` part of the split, in file
order (no shuffling: products must be deterministic), preprocesses and batches it.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from hessian_tf.io.datasets import tfds_read_error

PREPROCESSINGS = ("scale", "imagenet")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_SIZE = 224


def _scale(image, label):
    if image.dtype.is_integer:
        image = tf.cast(image, tf.float32) / 255.0
    return image, label


def _imagenet(image, label):
    """The evaluation preprocessing users expect: shorter side to 256, central
    224×224 crop, [0, 1], then per-channel mean/std normalisation."""
    image = tf.cast(image, tf.float32) / 255.0
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = 256.0 / tf.reduce_min(shape)
    image = tf.image.resize(image, tf.cast(tf.round(shape * scale), tf.int32))
    image = tf.image.resize_with_crop_or_pad(image, IMAGENET_SIZE, IMAGENET_SIZE)
    image = (image - _IMAGENET_MEAN) / _IMAGENET_STD
    return image, label


def _load(name, split, data_dir):
    import tensorflow_datasets as tfds

    return tfds.load(
        name, split=split, data_dir=data_dir, as_supervised=True, download=False,
        shuffle_files=False,
    )


def tfds_stream(name: str, *, split: str, data_dir: str | None, batch_size: int,
                preprocessing: str = "scale"):
    """Returns (dataset_fn, num_examples, sample) for StreamingHessianOperator."""
    import tensorflow_datasets as tfds

    if preprocessing not in PREPROCESSINGS:
        raise ValueError(
            f"--preprocessing={preprocessing!r} is not known; use one of {list(PREPROCESSINGS)}."
        )
    preprocess = _imagenet if preprocessing == "imagenet" else _scale
    where = f"--dataset=tfds:{name} --split={split} --data_dir={data_dir}"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        try:
            num_examples = int(builder.info.splits[split].num_examples)
        except Exception:  # split info unknown (e.g. mock data): count once
            num_examples = 0
        if num_examples <= 0:
            num_examples = int(_load(name, split, data_dir).reduce(0, lambda n, _: n + 1))
        sample = next(iter(tfds.as_numpy(_load(name, split, data_dir).map(preprocess).batch(2))))
    except Exception as error:  # tfds raises its own types for missing data
        raise tfds_read_error(where, error) from error
    if num_examples == 0:
        raise ValueError(f"{where}: the split has no examples.")

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        part = tfds.even_splits(split, n=context.num_input_pipelines)[context.input_pipeline_id]
        return (
            _load(name, part, data_dir)
            .map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .batch(batch_size)
            .prefetch(tf.data.AUTOTUNE)
        )

    x, y = np.asarray(sample[0]), np.asarray(sample[1])
    if np.issubdtype(y.dtype, np.integer):
        y = y.astype(np.int32)
    return dataset_fn, num_examples, (x, y)
