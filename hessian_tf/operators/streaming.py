"""The Hessian operator over a dataset too large for memory (e.g. ImageNet).

Each product is one pass over a `tf.data` pipeline distributed by the strategy
(`distribute_datasets_from_function`): every input pipeline (worker) reads its
own disjoint part of the data, every example exactly once, and its batches go to
its replicas in turn. Each replica sums its batches' products in float64 (or
compensated float32, see `accumulation`); ONE cross-replica reduction per product
combines them, as in memory.

Batches are formed per input pipeline, so with bn_mode='train' the batches (and
hence H) depend on the number of workers; the summary records it.

Under a TPUStrategy each batch gets `batch_size` zero rows appended before the
choice of trace (`pad_rows`; they are never read), so that every branch compiles
when a step's batches are all partial. Not run on a TPU here.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf

from hessian_tf.operators.hessian import HessianOperator, batch_value, is_tpu_strategy


class StreamingHessianOperator(HessianOperator):
    """HessianOperator whose data stream through a tf.data pipeline at every product.

    Args:
      model_function: as for HessianOperator.
      dataset_fn: input_context → tf.data.Dataset of (x, y) batches of at most
        `batch_size` examples, reading the part of the data for
        `input_context.input_pipeline_id` of `input_context.num_input_pipelines`.
      num_examples: N, the number of examples over all pipelines.
      sample: (x, y) a few examples, for the checks of shapes and labels.
      Other options as for HessianOperator.
    """

    # The products loop over the data in Python (`for batch in iter(...)`), which
    # AutoGraph writes as a while loop: traced without it, the loop would unroll.
    autograph = True

    def __init__(
        self,
        model_function,
        dataset_fn: Callable[[tf.distribute.InputContext], tf.data.Dataset],
        *,
        num_examples: int,
        sample: tuple[np.ndarray, np.ndarray],
        **options,
    ):
        self._dataset_fn = dataset_fn
        self._streamed_examples = int(num_examples)
        super().__init__(model_function, sample[0], sample[1], **options)

    def _untimed_because(self) -> str:
        return "streamed data: only a sample in memory"  # 'auto' is reverse over reverse

    def _place_data(self, x, y) -> None:
        del x, y  # only the sample, used for checks
        self.num_examples = self._streamed_examples
        if self.num_examples < self.strategy.num_replicas_in_sync:
            raise ValueError(
                f"--dataset: {self.num_examples} examples for "
                f"{self.strategy.num_replicas_in_sync} replicas; use fewer workers."
            )
        self.batches_per_replica = None
        dataset_fn = self._dataset_fn
        if self._device_dtype != tf.float64:  # no float64 on the device (TPU)
            def dataset_fn(context):
                return self._dataset_fn(context).map(_float64_as_float32)
        self._data = self.strategy.distribute_datasets_from_function(dataset_fn)
        self.pad_batches = is_tpu_strategy(self.strategy)

    def _sum_over_batches(self, batch_fn, size: int, args: tuple,
                          max_batches=None) -> tf.Tensor:
        # Every batch of the stream: max_batches cuts only the graphs method='auto'
        # times, and a streaming operator does not time (_untimed_because).
        del max_batches

        def step(total, batch, *args):
            x, y = batch
            count = tf.shape(x)[0]
            # Full batches run a static trace (if the pipeline's elements have a known
            # rank); the last may be partial, and a replica may get an empty batch at
            # the end of uneven data.
            known = x.shape.rank is not None and y.shape.rank is not None
            if known and self.pad_batches:
                x, y = pad_rows(x, self.batch_size), pad_rows(y, self.batch_size)
            return self._accumulate(total, batch_value(
                batch_fn, x, y, count, args, size=size,
                static_sizes=(self.batch_size,) if known else (), dynamic=True,
                dtype=self._device_dtype))

        with self.model_function.mode_context(self.bn_mode):
            totals = self.strategy.run(lambda: self._accumulator(size))
            # Over an iterator, AutoGraph writes a while loop, instantiated with the
            # function. Over the default strategy's data (a plain tf.data.Dataset) it
            # would write Dataset.reduce, which instantiates and optimises the whole
            # product graph again at every call: 193 ms against 9 ms per product on the
            # digits MLP (benchmarks/streaming.py).
            for batch in iter(self._data):
                totals = self.strategy.run(step, args=(totals, batch) + tuple(args))
        return self._sum_across_replicas(totals)


def pad_rows(tensor: tf.Tensor, rows: int) -> tf.Tensor:
    """`tensor` with `rows` zero rows appended; the rows are never read. A TPU
    compiles every branch of the choice of trace for the batch's shape; we take its
    batch dimension to be padded only to the largest batch of the step (TF's partial
    batch handling; not verified on a TPU), so a static trace's slice of `batch_size`
    rows must fit even in a step whose batches are all partial. Costs a copy of the
    batch on the device."""
    padding = tf.zeros(tf.concat([[rows], tf.shape(tensor)[1:]], 0), tensor.dtype)
    return tf.concat([tensor, padding], 0)


def _float64_as_float32(*tensors):
    """Cast on the input pipeline's host, so that no float64 reaches the device."""
    return tuple(tf.cast(t, tf.float32) if t.dtype == tf.float64 else t for t in tensors)


def array_dataset_fn(x: np.ndarray, y: np.ndarray, batch_size: int):
    """A dataset_fn over in-memory arrays, split evenly among input pipelines
    (for tests and small data; real jobs read files, e.g. with tfds)."""

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        parts = np.array_split(np.arange(x.shape[0]), context.num_input_pipelines)
        own = parts[context.input_pipeline_id]
        return (
            tf.data.Dataset.from_tensor_slices((x[own], y[own]))
            .batch(batch_size)
            .prefetch(tf.data.AUTOTUNE)
        )

    return dataset_fn
