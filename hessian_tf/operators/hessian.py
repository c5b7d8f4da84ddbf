"""The Hessian of the mean training loss over a whole dataset, as a matvec.

H is the Hessian of L(θ) = (1/N) Σᵢ ℓ(f(xᵢ; θ), yᵢ) [+ R(θ) when asked] over exactly
the N examples given: every example once, the last uneven batch weighted exactly.
With bn_mode='train', BN uses the statistics of each batch, so H is the
batch-size-weighted mean of the per-batch Hessians: the batches (contiguous runs of
`batch_size` examples in dataset order) are part of the definition, and they are the
same whatever the number of replicas.

Distribution: whole batches are dealt to replicas round-robin; each replica sums its
batches' products in float64, and ONE cross-replica sum per product combines them.
The data live on the replicas' devices as tensors, so no input pipeline runs on the
products' critical path.

A TPU has no float64: with `accumulation='float32'` (automatic under TPUStrategy) no
float64 tensor enters the product graphs (checked at construction). Each replica then
sums its batches in float32 with compensated (Neumaier) summation, keeping the
rounding error of every addition in a second float32 vector; both vectors are summed
across replicas (plain float32 sums: up to one rounding per replica, like the
float32 products themselves) and added in float64 on the host.
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from hessian_tf.choices import METHODS, all_integers
from hessian_tf.distribute.strategies import run_once
from hessian_tf.linalg.lanczos import ROW_ALIGNMENT_BYTES
from hessian_tf.messages import first_line, traced_error
from hessian_tf.operators import flat_parameters as flatten_lib
from hessian_tf.operators import losses as losses_lib
from hessian_tf.operators.graphs import graph_nodes
from hessian_tf.operators.model_function import ModelStructureError, check_bn_mode

FORWARD, REVERSE = METHODS[1:]
# method='auto' times both methods' product graphs over the first AUTO_TIMING_BATCHES
# batches of each replica (after a run of each that sets it up: up to AUTO_ESTIMATE_RUNS
# timed runs of reverse over reverse and one of forward over backward, then up to
# AUTO_TIMING_RUNS alternating runs of both; medians of all of each method's) and takes forward
# over backward only when its median is at most AUTO_MARGIN of reverse over reverse's;
# within the margin the shared passes of lockstep blocks and the method that
# SavedModels need win.
AUTO_TIMING_BATCHES = 4
AUTO_TIMING_RUNS = 5
AUTO_MARGIN = 0.95
# Reverse over reverse is set up (traced, run once) and timed first. When the caller
# says how many block products the job will run, forward over backward is timed only
# if it could save more than its own set-up time, taking that
# - it saves at most FORWARD_MODE_MOST_SAVING of reverse over reverse's time. Measured:
#   it took 0.81-1.20 of it on the eight example networks (README.md, Speed), 0.72-0.84
#   on a small ViT, about 0.64 on a GroupNormalization CNN (before group_norm.py): the
#   largest saving, 36%. A small U-Net (UpSampling2D) took 0.30 of it until Tile's second
#   derivative was mended (second_order.py), 0.78-0.79 since;
# - its set-up takes FORWARD_MODE_SET_UP_RATIO times reverse over reverse's. Measured:
#   1.25-1.6 on four small networks of the digits (ViT, separable-convolution and BN
#   CNNs; one run each), 12.4 against 7.8 s on the ViT; 1.64 on ResNet50-V2 (14.9
#   against 9.1 s) and 2.77 on DenseNet-121 (51.5 against 18.6 s; a first product less
#   a second, one process each, 2026-12-01). With 1.25, a DenseNet-121 job of m = 90
#   timed forward mode in one run of two (its products' 40% was 27-29 s against 27.4 s)
#   and took 193 s against 141 s, to keep reverse over reverse. 2.0 misjudges the
#   set-up by at most 0.8 of reverse over reverse's, either way, over that range;
# - the products run at the fastest of up to AUTO_ESTIMATE_RUNS runs of reverse over
#   reverse after its set-up (the first runs are 1.5-4 times slower than the later ones
#   on those networks);
# - timing it also costs AUTO_RUNS_TO_TIME_FORWARD_MODE timed runs: its own, and one
#   alternating round of both methods.
# The bound and the first runs err towards timing. Skipped, forward mode's set-up is
# spared where the products could not repay it (the patches ViT of
# benchmarks/example_networks.py, one draw of m = 90: about 12 s of set-up for about 3 s
# saved).
# Given the number of products, a timed run (after each method's set-up) starts only
# while the timed runs would stay within AUTO_TIMING_SHARE of the products' time, but
# each method set up runs once, and both once more side by side: where the timed batches
# are all the data (a few batches of a large model) a timed run is a whole product. A
# short job of an ImageNet ResNet-18 (64 images in batches of 32, m = 5: 6 products of
# 7.4 s) spent 133 s in 16 runs of both methods; now in reverse over reverse's set-up run
# and one timed run, which are also the determinism check's two products.
FORWARD_MODE_MOST_SAVING = 0.4
FORWARD_MODE_SET_UP_RATIO = 2.0
AUTO_RUNS_TO_TIME_FORWARD_MODE = 3
AUTO_ESTIMATE_RUNS = 3
AUTO_TIMING_SHARE = 0.05
# The product graph takes the number of each replica's batches to run as an argument:
# the products pass this (all of them), and method='auto' times the same graph on its
# first AUTO_TIMING_BATCHES, then keeps the faster method's trace for the products
# (one second-order trace fewer at start-up: 13-14 s on the smoke config's width-4
# ResNet-32 on 2 CPU cores, one run).
ALL_BATCHES = np.iinfo(np.int32).max
# How building or running a product graph by forward over backward fails where forward
# mode does not run through the model: in many types (Keras's LSTM and GRU kept in
# their while loop, over sequences longer than KerasModelFunction.unroll_steps: a
# TypeError; an Embedding's IndexedSlices gradient before flat_parameters.dense: an
# AttributeError). Both fallbacks check that reverse over reverse runs, so a model
# that fails both ways fails with its own error.
_FORWARD_MODE_FAILURES = (Exception,)
ACCUMULATIONS = ("auto", "float64", "float32")
# What the refusals of float64 in float32 accumulation say first.
_FLOAT32_ACCUMULATION = (
    "accumulation='float32' (automatic under a TPUStrategy; a TPU has no float64)")


def nodes_of_dtype(concrete_function, dtype: tf.DType) -> list[str]:
    """The nodes of a traced function's graph, and of every function it calls (loop
    bodies, branches), with an input, output or attribute of `dtype`."""
    graph_def = concrete_function.graph.as_graph_def()
    wanted = dtype.as_datatype_enum

    def has_dtype(attr) -> bool:
        return attr.type == wanted or wanted in attr.list.type or (
            attr.HasField("tensor") and attr.tensor.dtype == wanted)

    found = []
    for function in graph_def.library.function:
        for arg in list(function.signature.input_arg) + list(function.signature.output_arg):
            if arg.type == wanted:
                found.append(f"{function.signature.name}:{arg.name}")
    for prefix, node in graph_nodes(graph_def):
        if any(has_dtype(attr) for attr in node.attr.values()):
            found.append(f"{prefix}{node.name} ({node.op})")
    return found


def compensated_add(total: tf.Tensor, error: tf.Tensor, value: tf.Tensor):
    """(total + value, error + the rounding error of that addition): Neumaier's
    summation. total + error (added in higher precision) is the sum of all values
    to about one rounding of the working precision, however many values."""
    new = total + value
    larger = tf.abs(total) >= tf.abs(value)
    big, small = tf.where(larger, total, value), tf.where(larger, value, total)
    return new, error + ((big - new) + small)


def host_tensor(array: np.ndarray, dtype: tf.DType) -> tf.Tensor:
    """`array` as a tensor of `dtype`, in `array`'s own memory where TensorFlow's CPU
    kernels can read it there (float64 into float64, C-contiguous, starting at a
    multiple of ROW_ALIGNMENT_BYTES, its memory writeable: a float64 Lanczos basis's
    row, as `zero_basis` lays it out), through DLPack; else a copy (`tf.constant`).

    A product's vectors went to TensorFlow as a copy into memory of its own: a pass
    over a vector's worth of fresh pages at every product, 105-110 ms at 54M float64
    entries (InceptionResNet-V2's parameters) against 0.1 ms shared (ad hoc, this
    machine), and one vector more at the product's peak. The tensor must not outlive
    the products that read it while the array's memory changes; a basis row does not
    change once written, and the product's graph holds its input only while it runs.
    Memory that is not aligned must not be shared: TensorFlow's kernels stop the
    process on it (`Check failed: IsAligned()`)."""
    if (dtype == tf.float64 and array.dtype == np.float64 and array.size
            and array.flags.c_contiguous and array.ctypes.data % ROW_ALIGNMENT_BYTES == 0):
        view = array.view()
        try:
            # DLPack exports writeable arrays only; the view is not written.
            view.flags.writeable = True
        except ValueError:  # memory that is read-only at its source: copied
            pass
        else:
            return tf.experimental.dlpack.from_dlpack(view.__dlpack__())
    return tf.constant(array, dtype=dtype)


class NonFiniteError(ValueError):
    """A loss, gradient or product is NaN or infinite. `row`: the vector of a block
    whose product it was, when known."""

    def __init__(self, message: str, *, row: Optional[int] = None):
        super().__init__(message)
        self.row = row


class NonDeterministicError(ValueError):
    """Two products of the same vector differ."""


class _ReplicaData(NamedTuple):
    x: tf.Tensor  # [batches_per_replica, min(batch_size, N), ...] padded
    y: tf.Tensor  # [batches_per_replica, min(batch_size, N), ...] padded
    sizes: tf.Tensor  # [batches_per_replica] examples in each batch (0 = padding)


class _TimedProducts(NamedTuple):
    """method='auto''s timed runs of the first block, for `check_determinism`."""
    vectors: np.ndarray  # [k, dim] float64, the block timed
    first: np.ndarray  # [k, dim] the chosen method's first run, as matmat returns it
    difference: float  # the largest of a later run's from `first` (NaN or inf: not finite)
    seconds: float  # two runs' seconds
    model_values: list  # the parameters' and state's values then (`_model_values`)


def auto_method(seconds: dict) -> str:
    """method='auto''s choice from the methods' timed seconds {method: seconds, or None
    where not timed}: forward over backward only at most AUTO_MARGIN of reverse over
    reverse's time."""
    forward = seconds.get(FORWARD)
    faster = forward is not None and forward <= AUTO_MARGIN * seconds[REVERSE]
    return FORWARD if faster else REVERSE


def auto_margin_note(seconds: Optional[dict]) -> str:
    """Why method='auto' kept reverse over reverse though forward over backward was
    timed faster (within AUTO_MARGIN), or "" where it did not."""
    forward, reverse = (seconds or {}).get(FORWARD), (seconds or {}).get(REVERSE)
    if forward is None or not reverse or forward >= reverse or auto_method(seconds) == FORWARD:
        return ""
    return (f"forward over backward took {forward / reverse:.4g} of reverse over reverse's "
            f"time, and is taken only at {AUTO_MARGIN:g} or less: reverse over reverse kept")


_NO_GRADIENT = re.compile(r"gradient registry has no entry for: (\w+)")


def _names_missing_derivatives(method):
    """`method` of the operator, raising TensorFlow's error for an op without a
    gradient (a LookupError, met when a product differentiates the gradient's own ops)
    as one ValueError that names the op."""
    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except Exception as error:  # LookupError, or autograph's StagingError around it
            match = _NO_GRADIENT.search(str(error))
            if match is None:
                raise
            raise ValueError(
                f"--model: TensorFlow has no gradient for the op {match.group(1)}, which a "
                "Hessian product of this model differentiates (the gradient of one of its "
                "layers' ops: e.g. ScaleAndTranslateGrad for an antialiased resize, "
                "ResizeAreaGrad for an area resize); replace that layer with one "
                "differentiable twice (e.g. a resize without antialiasing)."
            ) from error

    return wrapped


def _check_logits(outputs: np.ndarray, loss_name: str) -> None:
    """Cross-entropies take logits: outputs that are probabilities (non-negative,
    summing to 1 over classes, as after a softmax) would be normalised twice."""
    if outputs.ndim < 2 or outputs.shape[-1] < 2:
        return
    if np.all(outputs >= 0) and np.allclose(outputs.sum(axis=-1), 1.0, rtol=0, atol=1e-5):
        raise ValueError(
            f"--model: its outputs are probabilities (non-negative, summing to 1 over the "
            f"classes: a final softmax), but --loss={loss_name} takes logits, and the Hessian of "
            "a softmax applied twice is not the training loss's; remove the final "
            "softmax (e.g. model.layers[-1].activation = keras.activations.linear, then "
            "save) so the model outputs logits."
        )


def _check_binary(model_function, y: np.ndarray) -> None:
    """binary_crossentropy takes logits and targets in [0, 1] (numbers or booleans): a
    Keras model whose last layer applies a sigmoid would be squashed twice."""
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == np.bool_):
        raise ValueError(
            f"--dataset: targets of dtype {y.dtype}, but --loss=binary_crossentropy takes "
            "0/1 labels or probabilities; save them as numbers."
        )
    if y.size and (np.min(y) < 0 or np.max(y) > 1):
        raise ValueError(
            f"--dataset: targets range over [{np.min(y):g}, {np.max(y):g}], outside [0, 1], "
            "but --loss=binary_crossentropy takes 0/1 labels or probabilities; for class "
            "indices pass --loss=sparse_categorical_crossentropy."
        )
    from hessian_tf.operators.subset import base_function

    model = getattr(base_function(model_function), "model", None)  # under --variables
    last = model.layers[-1] if model is not None and model.layers else None
    if getattr(getattr(last, "activation", None), "__name__", "") == "sigmoid":
        raise ValueError(
            f"--model: its last layer {last.name} applies a sigmoid, but "
            "--loss=binary_crossentropy takes logits, and the Hessian of a sigmoid "
            "applied twice is not the training loss's; save the model with "
            "activation=None on that layer so that it outputs logits."
        )


def _declared_input_shape(model_function) -> tuple | None:
    """The input shape a Keras model of one input declares, without the batch (None: not
    such a model, e.g. a SavedModel's function, which checks its own signature)."""
    from hessian_tf.operators.subset import base_function

    try:
        return tuple(base_function(model_function).model.input_shape[1:])
    except (AttributeError, TypeError, ValueError, IndexError):
        return None


def _unfit_inputs(model_function, x: np.ndarray, cause: str = "") -> ValueError:
    """The one-line error for inputs `x` that do not fit the model (`cause`: why, if known)."""
    declared = _declared_input_shape(model_function)
    takes = "" if declared is None else f", which takes inputs of shape {declared}"
    because = f" ({cause})" if cause else ""
    return ValueError(
        f"--dataset: inputs of shape {x.shape[1:]} (dtype {x.dtype}) do not fit the "
        f"model{takes}{because}; pass data shaped as the model's input.")


def _check_declared_shape(model_function, x: np.ndarray) -> None:
    """A Keras model declares the shape of its input. Called directly, Keras refuses other
    shapes, but its `stateless_call` (the products' path) runs on them where the layers
    allow it (a sequence model of another length, a convolutional net at another size),
    without a word. Data of the declared rank that differ in a declared size are refused."""
    declared = _declared_input_shape(model_function)
    if declared is not None and len(declared) == x.ndim - 1 and any(
            isinstance(size, int) and size != got for size, got in zip(declared, x.shape[1:])):
        raise _unfit_inputs(model_function, x)


def _check_integer_inputs(model_function, x: np.ndarray) -> None:
    """A model whose input is integers (token ids, read by an Embedding) or booleans
    takes real inputs cast to them: a fraction would be cut off silently, and any
    non-zero number would be True."""
    if not x.size or x.dtype == np.bool_:
        return
    from hessian_tf.operators.subset import base_function

    dtype = base_function(model_function).input_dtype  # under --variables too
    if dtype is None or (np.issubdtype(x.dtype, np.integer) and not dtype.is_bool):
        return
    if dtype.is_bool and not np.all((x == 0) | (x == 1)):
        raise ValueError(
            f"--dataset: x holds numbers other than 0 and 1 (dtype {x.dtype}), but the "
            "model takes bool inputs, to which any non-zero number would be True; pass "
            "x as 0/1 or booleans."
        )
    if dtype.is_integer and not all_integers(x):
        raise ValueError(
            f"--dataset: x holds real numbers that are not integers (dtype {x.dtype}), "
            f"but the model takes {dtype.name} inputs (such as token ids), to which they "
            "would be cut; pass the model's integers."
        )


def deal_batches(x: np.ndarray, y: np.ndarray, batch_size: int, num_replicas: int):
    """Splits (x, y) into contiguous batches and deals them to replicas round-robin.

    Returns one _ReplicaData of numpy arrays per replica; every replica gets the
    same number of batch slots of min(batch_size, N) examples, padded with empty
    batches (size 0).
    """
    num_examples = x.shape[0]
    starts = list(range(0, num_examples, batch_size))
    slots = -(-len(starts) // num_replicas)
    # A dataset smaller than one batch is one full batch of its own size.
    slot_size = min(batch_size, num_examples)
    shards = []
    for replica in range(num_replicas):
        xs = np.zeros((slots, slot_size) + x.shape[1:], dtype=x.dtype)
        ys = np.zeros((slots, slot_size) + y.shape[1:], dtype=y.dtype)
        sizes = np.zeros((slots,), dtype=np.int32)
        for slot, start in enumerate(starts[replica::num_replicas]):
            stop = min(start + batch_size, num_examples)
            xs[slot, : stop - start] = x[start:stop]
            ys[slot, : stop - start] = y[start:stop]
            sizes[slot] = stop - start
        shards.append(_ReplicaData(xs, ys, sizes))
    return shards


def batch_value(batch_fn, x, y, count, args: tuple, *, size: int,
                static_sizes: Sequence[int], dynamic: bool, dtype=tf.float64) -> tf.Tensor:
    """batch_fn on the first `count` examples of (x, y), a vector [size] of `dtype`.

    A batch of one of `static_sizes` examples runs a trace with that static batch
    dimension: TensorFlow's CPU kernels run faster on static shapes (one product
    over the whole data, static ÷ dynamic, benchmarks/static_shapes.py: 0.72–0.74
    on the digits MLP in batches of 128, 0.83–0.97 in one batch, 0.95 on ResNet-32
    with inference BN, 0.99–1.00 with train BN). dynamic: whether a batch of
    another size can occur, which then runs a trace with (x, y) cut to `count`
    (their batch dimension unknown); without it, such a batch fails the graph
    rather than run a wrong trace. Only the traces that can run are built. An
    empty batch gives zeros (BN statistics of no example are NaN).
    """
    if not static_sizes and not dynamic:
        raise ValueError("batch_value: no trace can run; pass static_sizes or dynamic=True.")

    def static(batch_size):
        # tf.slice, not a reshape: Grappler infers from a reshape of a batch to
        # [batch_size, ...] that every batch has that size, and folds the choice
        # of trace away.
        return lambda: batch_fn(*(
            tf.slice(t, [0] * t.shape.rank, [batch_size] + [-1] * (t.shape.rank - 1))
            for t in (x, y)), *args)

    def unexpected():
        # "assertion failed: [count] [static_sizes]". No message strings: a TPU graph
        # holds no strings. XLA drops the Assert itself, so there such a batch would
        # give zeros; none occurs: in memory every dealt size has its trace, and
        # streamed batches pass dynamic=True.
        check = tf.debugging.Assert(False, [count, tf.constant(list(static_sizes))])
        with tf.control_dependencies([check]):
            return tf.zeros([size], dtype)

    branches = [lambda: tf.zeros([size], dtype)]
    branches += [static(batch_size) for batch_size in static_sizes]
    other = len(branches)  # the branch for any other size
    branches.append((lambda: batch_fn(x[:count], y[:count], *args)) if dynamic else unexpected)
    index = tf.constant(other)
    for position, batch_size in enumerate(static_sizes, start=1):
        index = tf.where(tf.equal(count, batch_size), position, index)
    return tf.switch_case(tf.where(count > 0, index, 0), branches)


def is_tpu_strategy(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, (tf.distribute.TPUStrategy,
                                 tf.distribute.experimental.TPUStrategy))


def replica_devices(strategy: tf.distribute.Strategy) -> tuple[str, ...]:
    """This worker's replica devices in replica order (`extended.worker_devices`: all of
    them under Mirrored and TPU strategies, the local ones under multi-worker, where
    global replica r is local replica r mod their number); () for the default strategy."""
    try:
        return tuple(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy has none
        return ()


def residual_cache_budget() -> int:
    """The most bytes `cache_residuals` may hold: a quarter of the host's memory."""
    from hessian_tf.spectrum import host_memory_bytes

    return host_memory_bytes() // 4


def _cached_product(cache: list,
                    like: Sequence[tf.TensorSpec]) -> Callable[[tf.Tensor], tf.Tensor]:
    """vector [dim] float64 → Σ over the batches of their products from cached residuals
    (`cache`: [(from_residuals, its arguments)] per batch; from_residuals(*arguments,
    *tangents) gives one float64 product per variable), in batch order. The vector is
    split into tangents shaped `like` the variables once, each batch's products are
    added to the sums per variable where TensorFlow holds them, and the sums are joined
    once. On the digits' wide MLP (4.3M parameters, 8 batches) products took 0.57–0.58 s
    against 0.68–0.69 s for the code that joined each batch's products into one vector
    and added them on the host (and cached tensors made of constants; two runs each, ad
    hoc). One call per batch, as before: one graph over all the batches ran about as
    fast (0.63 against 0.63–0.65 s per step, alternating) and took 2–4.5 s longer to
    build on ResNet-32 (its optimiser inlines or specialises each batch's function),
    against 3.8 s for the first product."""
    split = tf.function(lambda vector: flatten_lib.unflatten(vector, like), autograph=False)
    join = tf.function(flatten_lib.flatten, autograph=False)
    add = tf.function(lambda totals, products: [
        total + product for total, product in zip(totals, products, strict=True)],
        autograph=False)

    def summed(vector):
        tangents = split(vector)
        totals = None
        for from_residuals, arguments in cache:
            products = list(from_residuals(*arguments, *tangents))
            totals = products if totals is None else add(totals, products)
            products = None  # not held while the next batch's product runs
        return join(totals)

    return summed


class HessianOperator:
    """v ↦ H v for the Hessian of the mean loss of `model_function` over (x, y).

    Args:
      model_function: a KerasModelFunction or SavedModelFunction.
      x: [N, ...] inputs; y: [N, ...] targets (integer labels for sparse CE).
      batch_size: examples per product batch (per replica).
      loss: a name in `hessian_tf.operators.losses.LOSSES`.
      bn_mode: 'inference' (moving statistics) or 'train' (batch statistics).
      strategy: the tf.distribute strategy; default: the current one.
      regularization: add the model's own losses (weight regularizers) to L.
      method: 'forward_over_backward', 'reverse_over_reverse', or 'auto': reverse
        over reverse (it shares the forward and backward pass among the vectors of a
        block, and runs through every model), unless `choose_method` is called before
        the first product: it times both on the first batches and keeps the faster
        (neither is faster on every network: README.md, Speed), where both can run and
        the timing is this process's alone (a Keras model, in-memory data, no residual
        cache, neither a TPU nor several workers); given the number of products to
        come, forward mode only where they could repay its set-up. hessian-spectrum
        (with that number) and the Keras callback (without) call it.
      accumulation: how replicas sum their batches: 'float64', or 'float32' with
        compensated summation and no float64 tensor in the product graphs (for
        devices without float64: TPUs); 'auto': float32 under a TPUStrategy,
        float64 otherwise.
      cache_residuals: keep each batch's vector-free part of the product (forward
        pass, backward signals, BN statistics) between products; one replica and
        in-memory data only. The residuals belong to the parameters and model state
        they were computed from: a product after either changed recomputes them, and
        `drop_residuals()` frees them.

    `matvec(v)` is H v; `matmat(V)` is the products of a block of vectors V [k, dim]
    in ONE pass over the data (lockstep draws), the model's forward and backward
    pass computed once per batch for all k.
    """

    def __init__(
        self,
        model_function,
        x: np.ndarray,
        y: np.ndarray,
        *,
        batch_size: int = 128,
        loss: str = "sparse_categorical_crossentropy",
        bn_mode: str = "inference",
        strategy: Optional[tf.distribute.Strategy] = None,
        regularization: bool = False,
        method: str = "auto",
        cache_residuals: bool = False,
        accumulation: str = "auto",
    ):
        check_bn_mode(bn_mode)
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not a product method; use one of {METHODS}.")
        self.automatic_method = method == "auto"
        self._method_to_time = self.automatic_method  # resolved by timing in choose_method
        if method == "auto":
            method = self._auto_method(model_function)
        if method == "forward_over_backward" and not model_function.supports_forward_mode:
            raise ValueError(
                "--method=forward_over_backward: forward mode returns None through a "
                "loaded SavedModel's functions; use --method=reverse_over_reverse."
            )
        if batch_size < 1:
            raise ValueError(f"--batch_size={batch_size}: pass a batch size >= 1.")
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"--dataset: x has {x.shape[0]} examples but y has {y.shape[0]}; "
                "they must match."
            )
        if x.shape[0] == 0:
            raise ValueError("--dataset: the dataset has no examples.")
        if not model_function.variables:
            raise ValueError(
                "--model: the model has no trainable variables, so its Hessian is "
                "empty; unfreeze the layers whose curvature you want."
            )
        if not model_function.has_bn_mode(bn_mode):
            raise ValueError(
                f"--bn_mode={bn_mode}: this SavedModel has no function for BN "
                "train mode; export it with hessian_tf.io.export_for_spectrum, or use "
                "--bn_mode=inference."
            )
        if regularization and not model_function.has_regularization:
            raise ValueError(
                "--regularization: a SavedModel does not carry its regularization "
                "losses; use the .keras file, or turn regularization off."
            )
        if accumulation not in ACCUMULATIONS:
            raise ValueError(
                f"accumulation={accumulation!r} is not known; use one of {ACCUMULATIONS}.")
        self.model_function = model_function
        self.loss_name = loss
        self._loss = losses_lib.get_loss(loss)
        self.bn_mode = bn_mode
        self.method = method
        self.regularization = regularization
        self.batch_size = int(batch_size)
        self.strategy = strategy or tf.distribute.get_strategy()
        if accumulation == "auto":
            accumulation = "float32" if is_tpu_strategy(self.strategy) else "float64"
        if accumulation == "float32" and any(
            v.dtype == tf.float64 for v in model_function.variables
        ):
            raise ValueError(
                f"{_FLOAT32_ACCUMULATION}: the model has float64 parameters; use a float32 "
                "model (with hessian-spectrum: --precision=model)."
            )
        if accumulation == "float32" and cache_residuals:
            raise ValueError(
                "--cache_residuals: not with accumulation='float32' (automatic under a "
                "TPUStrategy); leave the cache off."
            )
        self.accumulation = accumulation
        self.reduce_in_replicas = is_tpu_strategy(self.strategy)  # see _sum_across_replicas
        self._device_dtype = tf.float32 if accumulation == "float32" else tf.float64
        self.num_examples = int(x.shape[0])
        self.dim = flatten_lib.num_parameters(model_function.variables)
        self.num_products = 0
        self.product_seconds = 0.0
        self.num_traces = 0  # traces of the product graph: one per block size
        if cache_residuals and not getattr(model_function, "supports_residual_cache", False):
            raise ValueError(
                "--cache_residuals: a SavedModel's functions read their variables "
                "themselves, so their products cannot be split; use the .keras file, or "
                "leave the cache off."
            )
        if cache_residuals and self.strategy.num_replicas_in_sync != 1:
            raise ValueError(
                f"--cache_residuals: the strategy has {self.strategy.num_replicas_in_sync} "
                "replicas; the cache is for one device. Leave it off, or use one device."
            )
        self.cache_residuals = bool(cache_residuals)
        self._cache = None  # vector -> Σ of the batches' products, once built
        self._cached_values = None  # the parameters and state the cache was built from
        self._splits = {}  # batch size -> residuals.split of its product, traced once
        self.residual_bytes = 0
        self.method_seconds = None  # {method: seconds (None: not run or not timed)}, once timed
        self.method_runs = None  # {method: how many timed runs its seconds are the median of}
        # choose_method's _TimedProducts for check_determinism, until a product runs.
        self._timed_products = None
        self.forward_mode_failure = ""  # why forward over backward did not run, if not
        self.forward_mode_untimed = ""  # why it was not timed (a short job), if not
        self._untimed_reason = self._untimed_because()
        self._method_to_time = self._method_to_time and not self._untimed_reason
        self._method_kept = False  # use_method took a method given (a resumed run's)
        self._check_fit(x, y)
        self._place_data(x, y)
        # No input signature: the block size k must be static (one trace per k).
        self._product_function = self._graph_function(self._product_graph)
        self._all_batches = tf.constant(ALL_BATCHES, tf.int32)
        self._product_traces = {}  # k -> the concrete function of blocks of k vectors
        self._loss_gradient_function = self._graph_function(self._loss_gradient_graph)
        if self._device_dtype != tf.float64:
            self._check_no_float64()

    def _check_no_float64(self) -> None:
        """Traces the one-vector product and the gradient (the traces the products then
        use) and refuses float64 in them: the model itself may compute in float64 (a
        float64 input layer or state), which a TPU cannot run."""
        for name, function in (
            ("product", self._product_trace(1)),
            ("gradient", self._loss_gradient_function.get_concrete_function()),
        ):
            found = nodes_of_dtype(function, tf.float64)
            if found:
                raise ValueError(
                    f"{_FLOAT32_ACCUMULATION}: the {name} graph computes in float64 at "
                    f"{len(found)} node(s), e.g. {', '.join(found[:3])}; make the model, "
                    "its inputs and its state float32."
                )

    # The product and gradient graphs are traced without AutoGraph: they are written in
    # TensorFlow's control flow (tf.while_loop, tf.switch_case), and a model's own code
    # runs unconverted either way (Keras's Model.__call__ is not converted, so neither
    # is what it calls). Converting hessian_tf's 17 functions took 2.6 s of the 20 s
    # set-up of ResNet50-V2's first product (cProfile, one run). Subclasses whose
    # graphs loop in Python over a tf.data iterator (streaming.py) set it True.
    autograph = False

    def _graph_function(self, python_function, **kwargs):
        """tf.function of this operator's graphs (`autograph`)."""
        return tf.function(python_function, autograph=self.autograph, **kwargs)

    @staticmethod
    def _auto_method(model_function) -> str:
        del model_function  # reverse over reverse works for every model format
        return "reverse_over_reverse"

    def _untimed_because(self) -> str:
        """Why method='auto' cannot time both methods here, or "" where it can: both run
        (forward mode through the model, no residual cache, which splits one method's
        graph), and this process alone decides (no TPU, where a second program is a
        second compilation; not several workers, whose timings could disagree and their
        graphs with them). Float32 accumulation is not timed either: `_check_no_float64`
        traces the products at construction, and `times_methods` times only before any
        trace."""
        # TensorFlow's own test (private): without it, assume several workers.
        several_workers = getattr(self.strategy.extended, "_in_multi_worker_mode", lambda: True)()
        if not self.model_function.supports_forward_mode:
            return "forward mode does not run through a SavedModel's functions"
        if self.cache_residuals:
            return "the residual cache splits one method's graph"
        if is_tpu_strategy(self.strategy):
            return "on a TPU a second method would be a second compilation"
        if several_workers:
            return "several workers, whose timings could disagree"
        return ""

    @property
    def auto_untimed_note(self) -> str:
        """Why method='auto' took its method without timing both, or "" (timed, a method
        given, or told by `forward_mode_untimed` or `forward_mode_failure`)."""
        if (not self.automatic_method or self.method_seconds or self.forward_mode_untimed
                or self.forward_mode_failure):
            return ""
        why = (self._untimed_reason or ("a resumed run keeps its first session's method"
                                           if self._method_kept else
                                           "the products were traced before they could be "
                                           "timed (float32 sums)"))
        return f"not timed ({why}): {self.method.replace('_', ' ')}"

    @_names_missing_derivatives
    def choose_method(self, block_size: int = 1, num_products: int | None = None,
                      vectors: np.ndarray | None = None) -> str:
        """For method='auto', before the first product (once; later calls, and calls
        for other methods or where the methods are not timed, change nothing): times
        both methods' products of blocks of `block_size` vectors (the lockstep size of
        the products to come) over the first batches and keeps the faster, AUTO_MARGIN
        in favour of reverse over reverse. Given `num_products`, the number of such
        block products the caller will run over the whole data, forward over backward
        is not timed (nor chosen) where it could not save its own set-up time
        (FORWARD_MODE_MOST_SAVING; `forward_mode_untimed` says why).

        `vectors` [block_size, dim] float64: the block the caller will multiply first,
        through `check_determinism`: the methods are timed on it, and the chosen
        method's timed runs (two or more) are that check's runs (the others must equal
        the first); where the timed batches are all the data (at most
        AUTO_TIMING_BATCHES per replica), the check returns the first as its product.
        Returns the method."""
        if not self.times_methods:
            self._method_to_time = False
            return self.method
        self._method_to_time = False
        if vectors is not None:
            vectors = np.asarray(vectors, dtype=np.float64)
            if vectors.shape != (block_size, self.dim):
                raise ValueError(
                    f"choose_method: vectors have shape {vectors.shape}; pass the first "
                    f"block, [{block_size}, {self.dim}].")
        self.method_seconds, traces, products = self._time_methods(
            block_size, num_products, vectors)
        self.method = auto_method(self.method_seconds)
        if self.method in traces:  # the timed graph is the product graph: kept
            self._product_traces[block_size] = traces[self.method]
            self.num_traces += 1
        if vectors is not None and self.method in products:
            self._timed_products = _TimedProducts(
                vectors, *products[self.method], self._model_values())
        return self.method

    @property
    def timed_runs_are_products(self) -> bool:
        """Whether `choose_method`'s timed runs are products over all the data (at most
        AUTO_TIMING_BATCHES batches per replica), so that the first run of its
        `vectors` can be `check_determinism`'s product."""
        return self.batches_per_replica <= AUTO_TIMING_BATCHES

    @property
    def times_methods(self) -> bool:
        """Whether `choose_method` would time the methods (method='auto' where both can
        run and this process alone decides, nothing traced or chosen yet)."""
        return self._method_to_time and not self._product_traces

    def use_method(self, method: str) -> None:
        """Takes `method` without timing, before the first product: a resumed
        --method=auto run takes the method its first session chose, so that it
        continues the same arithmetic; a dry run takes its job's."""
        self._method_kept = True
        if method == self.method:
            self._method_to_time = False
            return
        if method not in METHODS[1:] or self._product_traces or (
                method == "forward_over_backward"
                and not self.model_function.supports_forward_mode):
            raise ValueError(
                f"use_method({method!r}): pass one of {METHODS[1:]}, before the first product.")
        self._method_to_time = False
        self.method = method

    def _time_methods(self, block_size: int, num_products: int | None = None,
                      vectors: np.ndarray | None = None) -> tuple[dict, dict, dict]:
        """({method: median seconds of its product graph over the first
        AUTO_TIMING_BATCHES batches of each replica, for a block of `block_size`
        random unit vectors, or `vectors`}, {method: that graph's trace, for the
        methods that ran}, {method: (its first run's products as matmat returns them,
        the largest difference of a later run's from them (NaN or inf where one was not
        finite), the seconds of two runs)}, given `vectors`).
        Reverse over reverse first; forward over backward is left out (None) where
        `num_products` block products over the whole data could not repay its set-up
        and timing, and given `num_products` the timed runs are cut to
        AUTO_TIMING_SHARE of those products' time (see AUTO_TIMING_SHARE).
        The graph the products then run, cut short by its argument: one batch
        timed in its own function misjudged it (a BN gelu MLP on the digits, batch 128,
        forward over backward against reverse over reverse: 0.86 against 0.84 ms for
        one batch, 9.3 against 6.2 ms for the data's 15; README.md, Speed)."""
        keep = vectors is not None
        if not keep:
            vectors = np.random.default_rng(0).standard_normal((block_size, self.dim))
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        shape = vectors.shape
        vectors = host_tensor(vectors, self._device_dtype)  # as matmat's products read it
        spec = self._product_spec(block_size)
        limit = tf.constant(AUTO_TIMING_BATCHES, tf.int32)
        runs = {}
        seconds = {}
        products = {}  # given vectors: see the docstring
        # A later run's products and their differences from the first run's, in one
        # array: vector-sized temporaries each take fresh memory from the OS.
        later = []

        def run(method) -> float:
            """Runs `method`'s graph once; its seconds."""
            started = time.perf_counter()
            # On the host: also for asynchronous devices.
            rows = np.asarray(runs[method](vectors, limit))
            elapsed = time.perf_counter() - started
            if keep:
                if method not in products:
                    products[method] = (self._mean_products(rows, shape), 0.0)
                else:
                    first, difference = products[method]
                    if not later:
                        later.append(np.empty(shape))
                    gap = _largest_difference(  # NaN: not reused
                        first, self._mean_products(rows, shape, later[0]))
                    products[method] = (first, max(difference, gap) if np.isfinite(gap)
                                        else gap)
            return elapsed

        def timed(method):
            seconds[method].append(run(method))

        def within_budget(more: float) -> bool:
            """Whether the timed runs so far, and `more` seconds of them, fit in
            AUTO_TIMING_SHARE of the job's products (always without a count)."""
            if num_products is None:
                return True
            spent = sum(sum(runs_seconds) for runs_seconds in seconds.values())
            job = self._products_seconds(num_products, min(seconds[REVERSE]))
            return spent + more <= AUTO_TIMING_SHARE * job

        set_up = None  # reverse over reverse's, which runs first (and must run)
        for method in (REVERSE, FORWARD):
            if method == FORWARD and num_products is not None:
                self.forward_mode_untimed = self._forward_mode_untimed(
                    num_products, set_up, min(seconds[REVERSE]))
                if self.forward_mode_untimed:
                    break
            function = self._graph_function(functools.partial(self._method_graph, method=method))
            started = time.perf_counter()
            try:
                runs[method] = function.get_concrete_function(*spec)
                traced = time.perf_counter() - started
                set_up = traced + run(method)  # the first run sets the graph up
            except _FORWARD_MODE_FAILURES as error:
                if method != FORWARD:
                    raise
                runs.pop(method, None)
                self.forward_mode_failure = traced_error(error)
                break
            seconds[method] = []
            timed(method)
            while (method == REVERSE and len(seconds[method]) < AUTO_ESTIMATE_RUNS
                   and within_budget(seconds[method][-1])):
                timed(method)
        if len(runs) == 2:  # side by side, so that load from elsewhere slows both alike
            for round_ in range(AUTO_TIMING_RUNS):
                if round_ and not within_budget(seconds[REVERSE][-1] + seconds[FORWARD][-1]):
                    break
                for method in runs:
                    timed(method)
        self.method_runs = {method: len(seconds.get(method, ())) for method in METHODS[1:]}
        medians = {method: float(np.median(seconds[method])) if method in runs else None
                   for method in METHODS[1:]}
        return medians, runs, {method: (first, difference, 2 * medians[method])
                               for method, (first, difference) in products.items()}

    def _products_seconds(self, num_products: int, seconds: float) -> float:
        """The time of `num_products` products over the whole data, from `seconds` for
        one over the first AUTO_TIMING_BATCHES batches of each replica."""
        timed_batches = min(AUTO_TIMING_BATCHES, self.batches_per_replica)
        return seconds * self.batches_per_replica / timed_batches * num_products

    def _forward_mode_untimed(self, num_products: int, set_up: float, seconds: float) -> str:
        """Why forward over backward is not worth timing, or "": reverse over reverse
        took `set_up` seconds to trace and run once, and `seconds` for its product over
        the first batches."""
        products = self._products_seconds(num_products, seconds)
        cost = FORWARD_MODE_SET_UP_RATIO * set_up + AUTO_RUNS_TO_TIME_FORWARD_MODE * seconds
        if FORWARD_MODE_MOST_SAVING * products >= cost:
            return ""
        return (f"not timed: the job's products ({num_products}) take about {products:.3g} s by "
                f"reverse over reverse, of which forward over backward could save at "
                f"most {FORWARD_MODE_MOST_SAVING:.0%}, less than the {cost:.3g} s "
                f"that setting it up and timing it would take ({FORWARD_MODE_SET_UP_RATIO:g} "
                f"times reverse over reverse's set-up, and {AUTO_RUNS_TO_TIME_FORWARD_MODE} "
                "timed runs)")

    def _first_nonfinite_batch(self, vector) -> str:
        """", first in batch b (examples i-j)" for the first batch whose loss (or,
        given a vector, product) is not finite; a diagnosis run only after a failure,
        one batch at a time on the default device."""
        if getattr(self, "_x", None) is None:
            return ""
        primals = self.model_function.primals()
        state = self.model_function.state()
        dtype = self._device_dtype
        tangents = None if vector is None else flatten_lib.unflatten(
            tf.constant(vector, dtype), primals)

        @functools.partial(self._graph_function, reduce_retracing=True)
        def batch_values(x, y):
            with self.model_function.mode_context(self.bn_mode):
                values = [tf.reshape(tf.cast(self._batch_objective(primals, state, x, y), dtype), [1])]
                if tangents is not None:
                    values.append(flatten_lib.flatten(
                        self._batch_product(primals, state, tangents, x, y), dtype))
            return tf.reduce_all(tf.math.is_finite(tf.concat(values, 0)))

        for index, start in enumerate(range(0, self.num_examples, self.batch_size)):
            stop = min(start + self.batch_size, self.num_examples)
            if not bool(batch_values(tf.constant(self._x[start:stop]), tf.constant(self._y[start:stop]))):
                return f", first in batch {index} (examples {start}-{stop - 1})"
        return ""

    def _place_data(self, x: np.ndarray, y: np.ndarray) -> None:
        """Deals the batches to the replicas and puts them on their devices."""
        if self._device_dtype != tf.float64:  # no float64 on the device (TPU)
            x, y = (a.astype(np.float32) if a.dtype == np.float64 else a for a in (x, y))
        self._x, self._y = x, y  # references, for diagnosing non-finite values
        num_replicas = self.strategy.num_replicas_in_sync
        if self.num_examples < num_replicas:
            raise ValueError(
                f"--dataset: {self.num_examples} examples for {num_replicas} replicas; "
                "use fewer workers or devices than examples."
            )
        shards = deal_batches(x, y, self.batch_size, num_replicas)
        self.batches_per_replica = int(shards[0].sizes.size)
        # The batch sizes that occur (the full one and the last): one static trace each
        # (benchmarks/static_shapes.py empties it to time the dynamic trace instead).
        sizes = np.concatenate([shard.sizes for shard in shards])
        self._batch_sizes = tuple(sorted({int(n) for n in sizes if n > 0}, reverse=True))
        devices = replica_devices(self.strategy)

        def value_fn(context):
            replica = context.replica_id_in_sync_group
            # Strategies call this with no device scope: without one every shard would
            # sit on the default device (GPU:0, or the TPU host) and be copied to its
            # replica at every product.
            # No devices (the default strategy): the caller's device scope, if any
            # (tf.device(None) would clear it).
            with (tf.device(devices[replica % len(devices)]) if devices
                  else contextlib.nullcontext()):
                return _ReplicaData(*(tf.constant(a) for a in shards[replica]))

        self._data = self.strategy.experimental_distribute_values_from_function(value_fn)

    # ----------------------------------------------------------------- checks

    def _check_fit(self, x: np.ndarray, y: np.ndarray) -> None:
        """One forward pass on two examples: shapes and label ranges fit the model."""
        _check_declared_shape(self.model_function, x)
        _check_integer_inputs(self.model_function, x)
        sample = x[: min(2, x.shape[0])]
        try:
            with self.model_function.mode_context("inference"):
                outputs, _ = self.model_function(
                    self.model_function.primals(),
                    self.model_function.state(),
                    tf.constant(sample),
                    bn_mode="inference",
                )
        except ModelStructureError:
            raise
        except (ValueError, TypeError, tf.errors.InvalidArgumentError) as error:
            # Keras may print the whole input array after " [[".
            first = first_line(error, None, type(error).__name__).split(" [[")[0][:300]
            raise _unfit_inputs(self.model_function, x, first) from error
        outputs_shape = tuple(outputs.shape[1:])
        if len(outputs_shape) > 1 and getattr(outputs, "_keras_mask", None) is not None:
            raise ValueError(
                f"--model: its outputs carry a Keras mask (Embedding(mask_zero=True), "
                f"Masking), so Keras averages the loss over the unmasked positions only, "
                f"which --loss={self.loss_name} does not (it averages every position); pass "
                "a model whose outputs carry no mask.")
        if self.loss_name in ("sparse_categorical_crossentropy", "categorical_crossentropy"):
            _check_logits(np.asarray(outputs, np.float64), self.loss_name)
        if self.loss_name == "binary_crossentropy":
            _check_binary(self.model_function, y)
        if self.loss_name == "categorical_crossentropy" and y.size and (
                np.min(y) < 0 or np.max(y) > 1):
            raise ValueError(
                f"--dataset: targets range over [{np.min(y):g}, {np.max(y):g}], outside "
                "[0, 1], but --loss=categorical_crossentropy takes one-hot or soft labels "
                "(probabilities over the classes); for class indices pass "
                "--loss=sparse_categorical_crossentropy.")
        if self.loss_name == "sparse_categorical_crossentropy":
            num_classes = outputs_shape[-1] if outputs_shape else 1
            if num_classes == 1 and y.size and np.max(y) == 1 and np.min(y) == 0:
                raise ValueError(
                    "--dataset: labels 0 and 1 for a model of one output; "
                    "--loss=sparse_categorical_crossentropy takes one logit per class (one "
                    "output has a zero loss); pass --loss=binary_crossentropy for one logit."
                )
            positions = outputs_shape[:-1]  # () for a classifier; pixels, tokens
            if tuple(y.shape[1:]) not in (positions, positions + (1,)):
                per = (f"one class index per position {positions} of its outputs"
                       if positions else "one class index per example")
                shapes = (f"shape {outputs_shape} per example, as the model's outputs do,"
                          if tuple(y.shape[1:]) == tuple(outputs_shape) else
                          f"shape {y.shape[1:]} per example and the model's outputs are "
                          f"{outputs_shape},")
                raise ValueError(
                    f"--dataset: labels have {shapes} but "
                    f"--loss=sparse_categorical_crossentropy takes {per}; for one-hot or "
                    "soft labels pass --loss=categorical_crossentropy, for a regression's "
                    "real targets --loss=mean_squared_error."
                )
            if not all_integers(y):
                raise ValueError(
                    f"--dataset: labels of dtype {y.dtype} are not integers; "
                    "sparse_categorical_crossentropy needs class indices; for a "
                    "regression's real targets pass --loss=mean_squared_error."
                )
            low, high = int(np.min(y)), int(np.max(y))
            if low < 0 or high >= num_classes:
                raise ValueError(
                    f"--dataset: labels range over [{low}, {high}] but the model has "
                    f"{num_classes} outputs; labels must lie in [0, {num_classes - 1}]."
                )
        elif tuple(y.shape[1:]) != outputs_shape and int(np.prod(y.shape[1:])) != int(
            np.prod(outputs_shape)
        ):
            raise ValueError(
                f"--loss={self.loss_name}: targets of shape {y.shape[1:]} do not match "
                f"the model's outputs {outputs_shape}; pass targets of that shape (for a "
                "classifier: integer class labels with --loss=sparse_categorical_crossentropy)."
            )

    # ----------------------------------------------------------------- graphs

    def _batch_objective(self, primals, state, x, y):
        """Σ over the batch of per-example losses [+ n_b · R(θ)]."""
        outputs, regularization = self.model_function(primals, state, x, bn_mode=self.bn_mode)
        objective = tf.reduce_sum(self._loss(y, outputs))
        if self.regularization:
            count = tf.cast(tf.shape(x)[0], objective.dtype)
            objective += count * tf.cast(regularization, objective.dtype)
        return objective

    def _batch_product(self, primals, state, tangents, x, y):
        """H_b v for one batch's summed objective, as a list like `primals`."""
        return self._batch_products(primals, state, [tangents], x, y)[0]

    def _batch_products(self, primals, state, block, x, y, method=None):
        """[H_b v for v in block] for one batch (by `method`, default the operator's):
        reverse over reverse records the forward and backward pass once and
        differentiates them once per vector."""
        zero = tf.UnconnectedGradients.ZERO
        method = method or self.method
        if method == "forward_over_backward":
            products = []
            for tangents in block:
                with tf.autodiff.ForwardAccumulator(primals, tangents) as accumulator:
                    with tf.GradientTape() as tape:
                        tape.watch(primals)
                        objective = self._batch_objective(primals, state, x, y)
                    gradients = flatten_lib.dense(
                        tape.gradient(objective, primals, unconnected_gradients=zero))
                products.append(accumulator.jvp(gradients))
        else:
            with tf.GradientTape(persistent=len(block) > 1) as outer:
                outer.watch(primals)
                with tf.GradientTape() as inner:
                    inner.watch(primals)
                    objective = self._batch_objective(primals, state, x, y)
                gradients = flatten_lib.dense(
                    inner.gradient(objective, primals, unconnected_gradients=zero))
                # In the widest of the variables' dtypes (a model may mix them).
                widest = max((g.dtype for g in gradients), key=lambda dtype: dtype.size)
                inner_products = [
                    tf.add_n([tf.cast(tf.reduce_sum(g * tf.cast(t, g.dtype)), widest)
                              for g, t in zip(gradients, tangents)])
                    for tangents in block
                ]
            products = [flatten_lib.dense(outer.gradient(p, primals)) for p in inner_products]
            del outer
        if all(hv is None for hv in products[0]):
            # A silent None is how forward mode fails through loaded functions.
            raise ValueError(
                f"method={method}: every Hessian-vector product came back None "
                "(no path from the parameters to the gradient); use "
                "method='reverse_over_reverse'."
            )
        return [
            [tf.zeros_like(p) if hv is None else hv for p, hv in zip(primals, product)]
            for product in products
        ]

    # ------------------------------------------------------- accumulation

    def _accumulator(self, size: int) -> tf.Tensor:
        """A zero sum of vectors [size] on a replica: [1, size] float64, or [2, size]
        float32 (the sum and its compensation)."""
        return tf.zeros([1 if self._device_dtype == tf.float64 else 2, size], self._device_dtype)

    def _accumulate(self, accumulator: tf.Tensor, value: tf.Tensor) -> tf.Tensor:
        if self._device_dtype == tf.float64:
            return accumulator + value[tf.newaxis]
        return tf.stack(compensated_add(accumulator[0], accumulator[1], value))

    @staticmethod
    def _combined(accumulator, divisor: float = 1.0,
                  out: Optional[np.ndarray] = None) -> np.ndarray:
        """The float64 sum that a (cross-replica) accumulator holds (a tensor, or its
        array on the host), divided by `divisor`, on the host: a new array of its own
        (the caller may scale it in place), or `out` (a float64 array of the sum's
        size) written and returned. The accumulator is read where TensorFlow holds it
        (no copy such as `.numpy()` makes). A float64 accumulator (CPU and GPU) is one
        row, divided into the result in one pass (the same numbers as a copy divided
        in place); a float32 accumulator's compensation row is added to its float64
        conversion in place, as np.sum of the two rows did, without their float64
        copy (187 MB on ResNet-18's 11.7M parameters), then divided."""
        rows = np.asarray(accumulator)
        if rows.shape[0] == 1:
            return np.divide(rows[0], divisor, out=out, dtype=np.float64)
        if out is None:
            combined = rows[0].astype(np.float64)
        else:
            combined = out
            combined[...] = rows[0]
        combined += rows[1]
        combined /= divisor
        return combined

    def _sum_over_batches(self, batch_fn, size: int, args: tuple,
                          max_batches=None) -> tf.Tensor:
        """Σ over every batch of the dataset of batch_fn(x, y, *args) (a vector [size]
        of the device dtype), summed per replica, then ONE cross-replica reduction.
        Returns the accumulator (see `_accumulator`; `_combined` adds it up).

        In memory: each replica loops over its own dealt batches on its device, its
        first `max_batches` of them (an int or a scalar int32 tensor, passed to the
        replicas as an argument; None: all).
        """

        def replica_fn(data, max_batches, *args):
            batches = tf.minimum(tf.shape(data.sizes)[0], max_batches)

            def body(slot, total):
                count = data.sizes[slot]
                value = batch_value(
                    batch_fn, data.x[slot], data.y[slot], count, args, size=size,
                    static_sizes=self._batch_sizes, dynamic=not self._batch_sizes,
                    dtype=self._device_dtype)
                return slot + 1, self._accumulate(total, value)

            # One batch at a time: parallel iterations would hold several batches'
            # activations at once (measured: 3x the memory on ResNet-32), for no speed.
            _, total = tf.while_loop(
                lambda slot, _: slot < batches,
                body,
                (tf.constant(0), self._accumulator(size)),
                parallel_iterations=1,
            )
            return total

        with self.model_function.mode_context(self.bn_mode):
            limit = tf.convert_to_tensor(ALL_BATCHES if max_batches is None else max_batches,
                                         tf.int32)
            per_replica = self.strategy.run(replica_fn, args=(self._data, limit) + tuple(args))
        return self._sum_across_replicas(per_replica)

    def _sum_across_replicas(self, per_replica) -> tf.Tensor:
        """The sum of the replicas' accumulators (the cross-replica context's ONE
        reduction). Under a TPUStrategy (`reduce_in_replicas`) as an all-reduce run by
        the replicas, over the TPU interconnect: the strategy's own `reduce` there
        gathers every replica's accumulator to one device and adds them."""
        if not self.reduce_in_replicas:
            return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
        reduced = self.strategy.run(
            lambda total: tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, total),
            args=(per_replica,))
        return self.strategy.experimental_local_results(reduced)[0]

    def _product_graph(self, vectors, max_batches):
        """vectors [k, dim] (device dtype) → the accumulator of their summed products
        [terms, k·dim], one data pass over each replica's first `max_batches` batches
        (a scalar int32 tensor; the products pass ALL_BATCHES)."""
        self.num_traces += 1  # runs only while tracing
        return self._products_over_batches(vectors, max_batches=max_batches)

    def _method_graph(self, vectors, max_batches, *, method: str):
        """`_product_graph` by `method`, not counted: the graphs method='auto' times."""
        return self._products_over_batches(vectors, method=method, max_batches=max_batches)

    def _product_spec(self, size: int) -> tuple:
        """The product graph's arguments for blocks of `size` vectors."""
        return (tf.TensorSpec([size, self.dim], self._device_dtype),
                tf.TensorSpec([], tf.int32))

    def _products_over_batches(self, vectors, method=None, max_batches=None):
        """`_product_graph` by `method` (default: the operator's) over each replica's
        first `max_batches` batches (default: all)."""
        # Parameters and state are read once, in the cross-replica context, so every
        # replica differentiates the same model.
        primals = self.model_function.primals()
        state = self.model_function.state()
        size = int(vectors.shape[0])
        block = [flatten_lib.unflatten(vectors[j], primals) for j in range(size)]

        def batch_fn(x, y, primals, state, block):
            products = self._batch_products(primals, state, block, x, y, method=method)
            return tf.concat(
                [flatten_lib.flatten(p, self._device_dtype) for p in products], axis=0)

        return self._sum_over_batches(batch_fn, size * self.dim, (primals, state, block),
                                      max_batches=max_batches)

    def _loss_gradient_graph(self):
        primals = self.model_function.primals()
        state = self.model_function.state()

        def batch_fn(x, y, primals, state):
            with tf.GradientTape() as tape:
                tape.watch(primals)
                objective = self._batch_objective(primals, state, x, y)
            gradients = tape.gradient(
                objective, primals, unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
            # [loss, gradient...] in one vector: one all-reduce for both.
            dtype = self._device_dtype
            return tf.concat(
                [tf.reshape(tf.cast(objective, dtype), [1]), flatten_lib.flatten(gradients, dtype)],
                axis=0,
            )

        return self._sum_over_batches(batch_fn, self.dim + 1, (primals, state))

    # ----------------------------------------------------------------- public

    def matvec(self, vector: np.ndarray) -> np.ndarray:
        """H v. vector [dim] float64 → [dim] float64."""
        vector = np.asarray(vector, dtype=np.float64)
        if vector.shape != (self.dim,):
            raise ValueError(
                f"vector has shape {vector.shape}; the operator has dimension {self.dim}."
            )
        return self.matmat(vector[np.newaxis])[0]

    __call__ = matvec

    def matmat(self, vectors: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        """H V for a block of vectors [k, dim] float64 → [k, dim] float64, in one pass
        over the data. Each block size is traced once.

        `out`: a C-contiguous, writeable float64 array [k, dim] to write the products
        into (and return) instead of a new array. The SLQ driver passes the same one
        at every step: a new array of a ResNet-sized model's products takes its pages
        from the OS at every product (ResNet50-V2's 23.5M parameters: about 0.1 s)."""
        vectors = np.asarray(vectors, dtype=np.float64)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or vectors.shape[0] < 1:
            raise ValueError(
                f"vectors have shape {vectors.shape}; pass [k, {self.dim}] with k >= 1."
            )
        if out is not None and not (
                isinstance(out, np.ndarray) and out.shape == vectors.shape
                and out.dtype == np.float64 and out.flags.c_contiguous and out.flags.writeable):
            raise ValueError(
                f"out: an array of shape {getattr(out, 'shape', None)} and dtype "
                f"{getattr(out, 'dtype', None)}; pass a C-contiguous, writeable float64 "
                f"array of the vectors' shape {vectors.shape}, or none."
            )
        self._timed_products = None  # a product ran first: they are not the check's
        start = time.perf_counter()
        if self.cache_residuals:
            products = self._products_from_residuals(vectors, out)
        else:
            products = self._graph_products(vectors, self._all_batches, out)
        self.product_seconds += time.perf_counter() - start
        self.num_products += vectors.shape[0]
        finite = np.all(np.isfinite(products), axis=1)
        if not np.all(finite):
            row = int(np.argmin(finite))
            raise NonFiniteError(
                f"the Hessian-vector product has {int(np.sum(~np.isfinite(products[row])))} "
                f"non-finite entries{self._first_nonfinite_batch(vectors[row])}; check the "
                "model's weights and the data for NaN or overflow (try a smaller learning "
                "rate or float64).",
                row=row,
            )
        return products

    def _graph_products(self, vectors: np.ndarray, max_batches: tf.Tensor,
                        out: Optional[np.ndarray] = None) -> np.ndarray:
        """The product graph's run on `vectors` [k, dim] float64 (read in place where
        `host_tensor` can) over each replica's first `max_batches` batches, its sums
        divided by the number of examples (`_mean_products`; into `out` if given)."""
        accumulator = self._product_trace(vectors.shape[0])(
            host_tensor(vectors, self._device_dtype), max_batches)
        return self._mean_products(accumulator, vectors.shape, out)

    def _mean_products(self, accumulator, shape: tuple,
                       out: Optional[np.ndarray] = None) -> np.ndarray:
        """The products of the mean loss's Hessian, [k, dim], from the accumulator of
        their sums (`_combined`): a new array, or `out` (of that shape) written."""
        if out is None:
            return self._combined(accumulator, self.num_examples).reshape(shape)
        self._combined(accumulator, self.num_examples, out.reshape(-1))  # a view of out
        return out

    @_names_missing_derivatives
    def _product_trace(self, size: int):
        """The product graph's concrete function for blocks of `size` vectors, traced at
        its first use. Calling it skips the tf.function's argument binding and trace
        lookup: on the digits MLP, 4.96 against 5.13 ms per Lanczos step in one batch
        and 6.34 against 6.94 ms in batches of 128 (medians of 8 interleaved SLQ runs,
        m = 90; ad hoc)."""
        trace = self._product_traces.get(size)
        if trace is None:
            spec = self._product_spec(size)

            def build():
                return self._product_function.get_concrete_function(*spec)

            trace = self._forward_mode_or_fallback(build, spec)
            self._product_traces[size] = trace
        return trace

    def _forward_mode_or_fallback(self, build: Callable, spec: tuple):
        """build() (a trace of the products by the operator's method); where forward over
        backward does not build through the model but reverse over reverse does:
        under method='auto' (GGN's is forward mode) the products switch to reverse over
        reverse, and an explicit forward_over_backward is refused in one line."""
        traces = self.num_traces
        try:
            return build()
        except _FORWARD_MODE_FAILURES as error:
            if self.method != "forward_over_backward":
                raise
            self.num_traces = traces  # the failed trace is no trace of the products
            reverse_builds = True
            try:  # the same model by reverse over reverse: else the error is not the mode's
                self._graph_function(functools.partial(
                    self._method_graph, method="reverse_over_reverse",
                )).get_concrete_function(*spec)
            except Exception:  # noqa: BLE001 - the original error is the one to report
                reverse_builds = False
            if not reverse_builds:
                raise
            failure = traced_error(error)
            if not self.automatic_method:
                raise ValueError(
                    f"--method=forward_over_backward: forward mode does not run through this "
                    f"model ({failure}); use --method=reverse_over_reverse (or auto). Keras "
                    "recurrent layers run in forward mode unrolled only: over sequences of at "
                    "most --unroll_steps steps, and not backward masked ones returning sequences."
                ) from error
            self.forward_mode_failure = failure
            logging.info("Forward mode does not run through this model (%s): reverse over "
                         "reverse products", failure)
            self.method = "reverse_over_reverse"
            self._product_function = self._graph_function(self._product_graph)
            return build()

    def _products_from_residuals(self, vectors: np.ndarray,
                                 out: Optional[np.ndarray] = None) -> np.ndarray:
        """H V from each batch's cached residuals (built at the first call, from the
        parameters then), one vector at a time, summed in float64 over the batches in
        batch order (`_cached_product`); into `out` if given."""
        values = self._model_values()
        if self._cache is not None and not self._same_model(values, self._cached_values):
            self.drop_residuals()  # the model changed since: residuals of the old one
        if self._cache is None:
            self._cache = self._build_cache()
            self._cached_values = values
        products = np.empty_like(vectors) if out is None else out
        for row, vector in enumerate(vectors):
            np.divide(self._cache(tf.constant(vector)), self.num_examples, out=products[row])
        return products

    def _model_values(self) -> list:
        """The parameters' and state's values now (numpy copies)."""
        return [t.numpy() for t in self.model_function.primals() + self.model_function.state()]

    def _same_model(self, values: list, then: list) -> bool:
        """Whether the model's `values` are those of `then` (from `_model_values`)."""
        return all(np.array_equal(a, b) for a, b in zip(values, then))

    def batch_product_function(self, x_spec: tf.TensorSpec, y_spec: tf.TensorSpec):
        """(product, input specs, tangent specs): product(*primals, *state, x, y,
        *tangents) is one batch's product, float64 tensors shaped like the primals (one
        tangent each), a pure function of its arguments (what `residuals.split` splits).
        The vector's split into tangents and the products' join into one vector are left
        to the caller, which does them once per product, not once per batch."""
        primals, state = self.model_function.primals(), self.model_function.state()
        count = len(primals) + len(state)

        def product(*arguments):
            p, s = list(arguments[: len(primals)]), list(arguments[len(primals): count])
            x, y = arguments[count: count + 2]
            with self.model_function.mode_context(self.bn_mode):
                return [tf.cast(hv, tf.float64) for hv in flatten_lib.dense(
                    self._batch_product(p, s, list(arguments[count + 2:]), x, y))]

        specs = [tf.TensorSpec(t.shape, t.dtype) for t in primals + state] + [x_spec, y_spec]
        return product, specs, [tf.TensorSpec(t.shape, t.dtype) for t in primals]

    def drop_residuals(self) -> None:
        """Frees the cached residuals (if any); the next product recomputes them from
        the parameters then. The traced split functions are kept."""
        self._cache = None
        self._cached_values = None

    def _build_cache(self) -> Callable[[tf.Tensor], tf.Tensor]:
        from hessian_tf.operators import residuals as residuals_lib

        primals, state = self.model_function.primals(), self.model_function.state()
        splits, starts = self._splits, range(0, self.num_examples, self.batch_size)
        # One split per batch size (the last may differ).
        sizes = sorted({min(self.batch_size, self.num_examples - start) for start in starts})

        def build_splits():
            for size in sizes:
                if size not in splits:
                    specs = [tf.TensorSpec((size,) + a.shape[1:], a.dtype) for a in (self._x, self._y)]
                    splits[size] = self._forward_mode_or_fallback(
                        lambda: residuals_lib.split(*self.batch_product_function(*specs)),
                        self._product_spec(1))

        method = self.method
        build_splits()
        if self.method != method:  # forward mode fell back: no split of it may stay
            splits.clear()
            build_splits()
        batches = []
        for start in starts:
            x = self._x[start: start + self.batch_size]
            y = self._y[start: start + self.batch_size]
            batches.append((splits[x.shape[0]], x, y))
        self.residual_bytes = sum(split.residual_bytes for split, _, _ in batches)
        budget = residual_cache_budget()
        if self.residual_bytes > budget:
            raise ValueError(
                f"--cache_residuals: the residuals of {len(batches)} batches need "
                f"{self.residual_bytes / 2**30:.2f} GiB, more than a quarter of the memory "
                f"here ({budget / 2**30:.2f} GiB); leave the cache off for this dataset."
            )
        cache = []
        for split, x, y in batches:
            inputs = list(primals) + list(state) + [tf.constant(x), tf.constant(y)]
            arguments = split.residuals_of(*inputs) + [inputs[i] for i in split.passed]
            cache.append((split.from_residuals, arguments))
        return _cached_product(cache, [tf.TensorSpec(t.shape, t.dtype) for t in primals])

    def loss_and_gradient(self) -> tuple[float, np.ndarray]:
        """(L(θ), ∇L(θ)) over the whole dataset; the gradient is [dim] float64."""
        with run_once():  # once a job: Grappler's work would not be repaid
            total = self._combined(self._loss_gradient_function(), self.num_examples)
        loss, gradient = float(total[0]), total[1:]
        if not np.isfinite(loss):
            raise NonFiniteError(
                f"the mean loss over the dataset is non-finite ({loss}"
                f"{self._first_nonfinite_batch(None)}); check the model's weights and the "
                "data for NaN or overflow."
            )
        return loss, gradient

    @property
    def whole_determinism_check(self) -> bool:
        """Whether `check_determinism` multiplies its vectors twice over the whole data
        (at most AUTO_TIMING_BATCHES batches per replica, streamed data, or cached
        residuals), the first product being the run's; else it compares two runs over
        the first batches, and the run's first product is one more."""
        return (self.cache_residuals or self.batches_per_replica is None
                or self.timed_runs_are_products)

    def check_determinism(self, vectors: np.ndarray, *, relative_tolerance: Optional[float] = None):
        """Computes H v ([dim]) or H V ([k, dim]) twice (or over the first batches
        only, below) and raises NonDeterministicError if the two differ by more than
        rounding. Returns the product H v (H V).

        Multithreaded float32 kernels (convolution gradients) do not sum in a fixed
        order: two products of ResNet-32 differ by up to ~1e-6 of their largest entry
        (measured). Dropout, random augmentation layers or a kernel that overwrites its
        input change a product by far more, so the default tolerance is 1e-4 for
        products below float64 and 1e-10 in float64.

        Where the data in memory are more than AUTO_TIMING_BATCHES batches per replica
        (`whole_determinism_check` False), the two runs cover only the first batches
        (AUTO_TIMING_BATCHES of them, or fewer than half the batches where there are at
        most twice as many: less than a product together), then the returned product
        runs: the check costs those two runs, not a product. Non-determinism that shows
        only in later batches (a fault of the last, uneven batch's own trace, say) then
        goes unseen. Where `choose_method` timed these very vectors, the chosen method's
        timed runs are the check (the first compared with every other) at no run of its
        own; where they covered the whole data, their first is returned.
        """
        if relative_tolerance is None:
            float64 = all(v.dtype == tf.float64 for v in self.model_function.variables)
            relative_tolerance = 1e-10 if float64 else 1e-4
        vectors = np.asarray(vectors, dtype=np.float64)
        product = self.matvec if vectors.ndim == 1 else self.matmat
        first = None  # the product returned, where the check's runs give it
        timed, self._timed_products = self._timed_products, None  # used once
        if (timed is not None and vectors.shape[-1:] == (self.dim,)
                and np.array_equal(timed.vectors, vectors.reshape(-1, self.dim))
                # Else matmat says where a product is not finite.
                and np.all(np.isfinite(timed.first)) and np.isfinite(timed.difference)
                # Nor trained since.
                and self._same_model(self._model_values(), timed.model_values)):
            scale, difference = float(np.max(np.abs(timed.first))), timed.difference
            if self.timed_runs_are_products:
                first = timed.first.reshape(vectors.shape)
                self.num_products += 2 * timed.vectors.shape[0]
                self.product_seconds += timed.seconds
        elif self.whole_determinism_check:
            first = product(vectors)
            scale = float(np.max(np.abs(first)))
            # Cached residuals would hold the first pass's randomness for the second too.
            self.drop_residuals()
            difference = _largest_difference(first, product(vectors))
        else:
            block = vectors.reshape(-1, self.dim)
            batches = min(AUTO_TIMING_BATCHES, (self.batches_per_replica - 1) // 2)
            sample = self._products_over_first_batches(block, batches)
            scale = float(np.max(np.abs(sample)))
            difference = _largest_difference(
                sample, self._products_over_first_batches(block, batches))
            del sample  # before the product
            if not np.isfinite(difference):
                first = product(vectors)  # says where a product is not finite
        if not difference <= relative_tolerance * max(scale, np.finfo(np.float64).tiny):
            raise NonDeterministicError(
                f"two products of the same vector differ by {difference:.3g} (scale "
                f"{scale:.3g}): the operator is not a fixed matrix. Turn off shuffling, "
                "dropout and data augmentation in the model and the dataset; if none is "
                "on, a TensorFlow kernel of one of the model's layers differs from run to "
                "run or overwrites its inputs (as stride-1 max pooling's second derivative "
                "did until hessian_tf mended it): report the model's layers."
            )
        return product(vectors) if first is None else first

    def _products_over_first_batches(self, vectors: np.ndarray, batches: int) -> np.ndarray:
        """The product graph's sums of H_b V over each replica's first `batches` batches,
        divided by the number of examples, [k, dim]: not products of H (not counted)."""
        return self._graph_products(vectors, tf.constant(batches, tf.int32))


def _largest_difference(first: np.ndarray, second: np.ndarray) -> float:
    """max |first - second| (NaN or inf where either is not finite), computed in
    `second`'s memory (which it overwrites) rather than in vector-sized temporaries."""
    return float(np.max(np.abs(np.subtract(first, second, out=second), out=second)))


def dense_matrix(matvec: Callable[[np.ndarray], np.ndarray], dim: int) -> np.ndarray:
    """The dense matrix of a matvec, column by column (for tests and tiny models)."""
    columns = [matvec(np.eye(1, dim, i, dtype=np.float64).ravel()) for i in range(dim)]
    return np.stack(columns, axis=1)
