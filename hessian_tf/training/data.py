"""Input pipelines for training, and fixed in-memory examples for spectra.

Sources (`train.dataset`): 'digits' and 'npz:PATH' are read into memory with
`hessian_tf.io.datasets`; 'tfds:NAME[/CONFIG]' is streamed from a prepared TFDS
directory (no download). Every example goes through the same preprocessing:
integer images are scaled to [0, 1], resized when `image_size` > 0, augmented
(training only) and reshaped to `input_shape` when that is set. Shuffling and
augmentation are seeded, so a run is repeatable.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from hessian_tf.choices import all_integers
from hessian_tf.io import datasets as datasets_lib
from hessian_tf.messages import first_line

_CROP_PADDING = 4  # pixels of zero padding before the random crop (CIFAR style)


def _tfds_name(spec: str) -> str:
    return spec[len("tfds:"):]


def _source(train, split: str) -> tuple[tf.data.Dataset, bool, int]:
    """(examples (image, label) unbatched, integer images?, size or -1 if unknown)."""
    if not train.dataset.startswith("tfds:"):
        try:
            x, y = datasets_lib.load_dataset(train.dataset)
        except ValueError as error:  # told with the spectrum program's flags
            raise ValueError(str(error).replace("--dataset=", "--config.train.dataset=")
                             .replace("--model", "hessian-spectrum --model")) from error
        _check_labels(train, y)  # in memory: before training, whatever else reads them
        return tf.data.Dataset.from_tensor_slices((x, y)), False, int(x.shape[0])
    import tensorflow_datasets as tfds

    name = _tfds_name(train.dataset)
    try:
        dataset = tfds.load(
            name,
            split=split,
            data_dir=train.data_dir or None,
            as_supervised=True,
            download=False,
            shuffle_files=False,
        )
    except Exception as error:  # tfds raises its own types for missing data
        first = first_line(error, fallback=type(error).__name__)
        raise ValueError(
            f"--config.train.dataset={train.dataset} split={split!r}: could not be read "
            f"({type(error).__name__}: {first}); prepare it with `tfds build {name}` "
            "into --config.train.data_dir, or add the `mock` variant for random data."
        ) from error
    image_spec = dataset.element_spec[0]
    return dataset, image_spec.dtype.is_integer, -1


def _check_example_shape(train, shape: tf.TensorShape, *, augment: bool) -> None:
    """Raises ValueError unless the preprocessing fits the examples' shape: resizes
    and augmentation take images (height, width, channels), and `input_shape` holds
    as many values as an example has after them."""
    size = int(train.image_size)
    if (size or augment) and shape.rank != 3:
        name, value, off = (("image_size", size, "0") if size
                            else ("augment", train.augment, "'none'"))
        raise ValueError(
            f"--config.train.{name}={value!r}: resizing and augmentation take images "
            f"(height, width, channels), and the examples of {train.dataset} have shape "
            f"{tuple(shape)}; pass {off}, or images."
        )
    input_shape = tuple(int(d) for d in train.input_shape)
    if not input_shape or not shape.is_fully_defined():
        return
    example = (size, size, shape[-1]) if size else tuple(shape)
    if np.prod(example) != np.prod(input_shape):
        raise ValueError(
            f"--config.train.input_shape={input_shape}: the examples of {train.dataset} "
            f"have shape {example} ({int(np.prod(example))} values) after preprocessing, "
            f"this shape {int(np.prod(input_shape))}; pass a shape of "
            f"{int(np.prod(example))} values, or () to keep theirs."
        )


def _preprocess(train, integer_images: bool, *, augment: bool):
    """(image, label[, seed]) → (float32 input, int32 label)."""
    size = int(train.image_size)
    input_shape = tuple(int(d) for d in train.input_shape)

    def preprocess(image, label, seed=None):
        image = tf.cast(image, tf.float32)
        if integer_images:
            image = image / 255.0
        if size:
            image = tf.image.resize(image, [size, size])
        if augment and train.augment != "none":
            crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
            if train.augment == "crop_flip":
                shape = tf.shape(image)
                padded = tf.pad(
                    image, [[_CROP_PADDING, _CROP_PADDING], [_CROP_PADDING, _CROP_PADDING], [0, 0]]
                )
                image = tf.image.stateless_random_crop(padded, shape, seed=crop_seed)
            image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
        if input_shape:
            image = tf.reshape(image, input_shape)
        return image, tf.cast(label, tf.int32)

    return preprocess


def training_dataset(train) -> tf.data.Dataset:
    """An endless, shuffled, augmented dataset of [batch_size, ...] batches."""
    dataset, integer_images, size = _source(train, train.split)
    augment = train.augment != "none"
    _check_example_shape(train, dataset.element_spec[0].shape, augment=augment)
    buffer = int(train.shuffle_buffer)
    if size > 0 and (buffer == 0 or buffer > size):
        buffer = size
    elif buffer == 0:
        buffer = 10000
    dataset = dataset.shuffle(buffer, seed=train.seed, reshuffle_each_iteration=True).repeat()
    if augment:
        # One stateless seed pair per example: augmentation repeats with the seed,
        # whatever the number of parallel calls.
        seeds = tf.data.Dataset.random(seed=train.seed).batch(2)
        dataset = tf.data.Dataset.zip((dataset, seeds)).map(
            lambda example, seed: (example[0], example[1], seed)
        )
    dataset = dataset.map(
        _preprocess(train, integer_images, augment=augment),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return dataset.batch(train.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def fixed_examples(train, *, split: str, num_examples: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `num_examples` examples of `split` (0: all), preprocessed without
    augmentation, as numpy arrays (x [N, ...] float32, y [N] int32).

    For 'digits' and 'npz:' sources the split is ignored (they have one)."""
    dataset, integer_images, _ = _source(train, split)
    _check_example_shape(train, dataset.element_spec[0].shape, augment=False)
    if num_examples > 0:
        dataset = dataset.take(num_examples)
    dataset = dataset.map(_preprocess(train, integer_images, augment=False)).batch(1024)
    xs, ys = [], []
    for x, y in dataset.as_numpy_iterator():
        xs.append(x)
        ys.append(y)
    if not xs:
        raise ValueError(
            f"--config.train.dataset={train.dataset} split={split!r}: no examples."
        )
    x, y = np.concatenate(xs), np.concatenate(ys)
    _check_labels(train, y)
    return x, y


def _check_labels(train, y: np.ndarray) -> None:
    if not all_integers(y):
        # The training loss would cut them to integers.
        raise ValueError(
            f"--config.train.dataset={train.dataset}: labels of dtype {y.dtype} are not "
            "class indices (some are not integers); pass integer labels in "
            f"[0, {train.num_classes - 1}]."
        )
    if len(y) and (y.min() < 0 or y.max() >= train.num_classes):
        raise ValueError(
            f"--config.train.num_classes={train.num_classes}: the labels of "
            f"{train.dataset} range over [{y.min()}, {y.max()}]; pass the number of classes."
        )


def input_shape(dataset: tf.data.Dataset) -> tuple[int, ...]:
    """The shape of one input of a batched dataset; all sizes must be known."""
    shape = tuple(dataset.element_spec[0].shape[1:])
    if any(d is None for d in shape):
        raise ValueError(
            f"the inputs have shape {shape} with unknown sizes (images of varying "
            "size); set --config.train.image_size to resize them."
        )
    return tuple(int(d) for d in shape)
