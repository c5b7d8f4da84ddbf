"""Keras recurrent layers unrolled while a product graph is traced.

A Keras RNN layer (LSTM, GRU, SimpleRNN, ConvLSTM, `keras.layers.RNN` with any cell)
runs its time steps in a `tf.while_loop` unless built with `unroll=True`. The two
compute the same function: the same cell called on the same inputs in the same order,
once in a loop and once written out step by step (except where Keras's unrolled code
masks backward sequences wrongly; those keep the loop: `unrolls`). For a product the
loop costs: its gradient keeps every step's activations in TensorArrays, and the second
differentiation goes through those stacks again. Forward mode does not run through it
at all (a TypeError inside TensorFlow). Unrolled, one product of the digits LSTM and
GRU networks takes about half the time, and forward over backward runs
(benchmarks/recurrent.py).

Unrolling writes one copy of the cell per step into every graph (the forward pass, its
gradient, the product), so tracing time grows with the length. A layer is unrolled
only for sequences of at most `max_steps` (default `MAX_UNROLL_STEPS`) steps whose
length is known while tracing; longer ones keep the loop. The same context turns off
cuDNN (`use_cudnn`) for LSTM and GRU: cuDNN's kernels have a gradient but no gradient
of that gradient.
"""

from __future__ import annotations

import contextlib

import keras
from keras.src import tree

from hessian_tf.choices import MAX_UNROLL_STEPS, check_steps  # noqa: F401


def _time_steps(sequences) -> int | None:
    """The static length of the sequences (nested for cells with several inputs)."""
    shape = tree.flatten(sequences)[0].shape
    return shape[1] if len(shape) > 1 else None


def unrolls(layer, sequences, mask, max_steps: int) -> bool:
    """Whether `layer` runs `sequences` unrolled: at most `max_steps` known steps, and
    not a backward masked run returning zeroed sequences. There Keras's unrolled code
    computes another function than its loop: it zeroes the outputs, which come in
    reversed order, with the mask in forward order (keras/src/backend/tensorflow/
    rnn.py; every masked Bidirectional(..., return_sequences=True) is such a run)."""
    steps = _time_steps(sequences)
    if steps is None or steps > max_steps:
        return False
    return not (mask is not None and layer.go_backwards and layer.zero_output_for_mask
                and layer.return_sequences)


@contextlib.contextmanager
def unrolled(model: keras.Model, max_steps: int = MAX_UNROLL_STEPS):
    """Inside: every RNN layer of `model` whose `inner_loop` is Keras's (not already
    overridden on the instance) unrolls the sequences `unrolls` accepts, and LSTM and
    GRU do not use cuDNN. Each call sets `unroll` for itself only (RNN.call refuses
    sequences of unknown length while `unroll` is set). Enter around the whole trace,
    in the cross-replica context (as model_function.batch_norm_in_train_mode);
    MirroredStrategy runs its replicas' traces one thread at a time."""
    layers = [layer for layer in model._flatten_layers()
              if isinstance(layer, keras.layers.RNN) and "inner_loop" not in vars(layer)]
    saved = [(layer.unroll, getattr(layer, "use_cudnn", None)) for layer in layers]
    for layer in layers:
        def inner_loop(sequences, initial_state, mask, training=False, *, _layer=layer,
                       _original=layer.inner_loop, _unroll=layer.unroll):
            _layer.unroll = _unroll or unrolls(_layer, sequences, mask, max_steps)
            try:
                return _original(sequences, initial_state, mask, training=training)
            finally:
                _layer.unroll = _unroll

        layer.inner_loop = inner_loop
        if hasattr(layer, "use_cudnn"):
            layer.use_cudnn = False
    try:
        yield
    finally:
        for layer, (unroll, use_cudnn) in zip(layers, saved):
            del layer.inner_loop
            layer.unroll = unroll
            if use_cudnn is not None:
                layer.use_cudnn = use_cudnn
