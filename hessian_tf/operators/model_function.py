"""A model as a twice-differentiable function of its parameters.

Two kinds of model are supported:
- Keras 3 models: `stateless_call` makes the outputs a pure function of parameter
  tensors, so nothing (BN moving statistics, RNG state) is ever assigned.
- SavedModels written by Keras `model.export()` (inference function `serve`) or
  by `hessian_tf.io.export` (one function per BN mode). Their functions read the
  variables they captured, so products differentiate the variables themselves;
  in inference mode nothing is assigned.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Optional, Sequence

import keras
import tensorflow as tf
from absl import logging

from hessian_tf.choices import BN_MODES
from hessian_tf.operators import folding, group_norm, recurrent
from hessian_tf.operators.activations import compact_activations
from hessian_tf.operators.attention import matmul_attention
from hessian_tf.operators.graphs import graph_nodes
from hessian_tf.operators.layer_norm import compact_layer_normalization
from hessian_tf.operators.convolutions import (
    dilated_convolutions, grouped_convolutions, pointwise_convolutions)
from hessian_tf.operators.moments import exact_moments
from hessian_tf.operators.second_order import second_order_gradients


# Names of the functions a SavedModel exported by hessian_tf carries per BN mode.
SAVED_FUNCTION_NAMES = {"inference": "serve", "train": "serve_bn_train"}


def check_bn_mode(bn_mode: str) -> None:
    if bn_mode not in BN_MODES:
        raise ValueError(
            f"--bn_mode={bn_mode!r} is not a BN mode; use 'inference' (moving "
            "statistics) or 'train' (statistics of each batch)."
        )


def accepts_training(model: keras.Model) -> bool:
    """Whether `model.call` takes a `training` argument (subclassed models may not)."""
    parameters = inspect.signature(model.call).parameters.values()
    return any(
        parameter.name == "training" or parameter.kind is inspect.Parameter.VAR_KEYWORD
        for parameter in parameters
    )


def batch_norm_layers(model: keras.Model) -> list:
    """The model's BatchNormalization layers, nested models' and layers' included."""
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, keras.layers.BatchNormalization)]


def regularizers_left_out(count: int, add: str) -> str:
    """The log line of a model's `count` regularizers whose losses a run leaves out
    (`add`: what adds them), or "" where there is none."""
    if not count:
        return ""
    return (f"the model has {count} regularizer(s) (of weights or activity), whose losses "
            f"are left out; {add} adds them")


@contextlib.contextmanager
def batch_norm_in_train_mode(model: keras.Model):
    """Makes every BatchNormalization layer of `model` use batch statistics, while
    the model itself is called with training=False (so dropout stays off).

    The statistics are those of the batch on its own replica, also for layers built
    with `synchronized=True`: the Hessian of bn_mode=train is the mean of per-batch
    Hessians, each batch is whole on one replica, and replicas run different
    numbers and sizes of batches, so a cross-replica all-reduce inside a batch
    would mix batches (or, under MirroredStrategy, fail to trace).

    Used while the product's graph is traced; the overrides are removed on exit.
    """
    layers = batch_norm_layers(model)
    synchronized = [layer.synchronized for layer in layers]
    for layer in layers:
        if "call" in vars(layer):  # e.g. folded into its convolution (folding.py)
            raise RuntimeError(
                f"BatchNormalization layer {layer.name}: its call is already overridden; "
                "enter one mode context of a model at a time.")
    for layer in layers:
        original = layer.call

        def call(*args, _original=original, training=None, **kwargs):
            del training
            return _original(*args, training=True, **kwargs)

        layer.call = call
        layer.synchronized = False
    try:
        yield
    finally:
        for layer, flag in zip(layers, synchronized):
            layer.synchronized = flag
        for layer in layers:
            del layer.call


class ModelStructureError(ValueError):
    """The model is not a function of one input tensor to one output tensor."""


def check_one_input_and_output(model: keras.Model, where: str = "--model") -> None:
    """Refuses a functional or Sequential model of several inputs or outputs, in one
    line that says what to do. A subclassed model has no symbolic inputs or outputs
    and is checked when it is first called (KerasModelFunction.__call__)."""
    try:
        inputs, outputs = model.inputs or [], model.outputs or []
    except (AttributeError, ValueError):  # not built from symbolic inputs
        return
    if len(inputs) > 1:
        shapes = ", ".join(f"{t.name} {tuple(t.shape[1:])}" for t in inputs)
        raise ModelStructureError(
            f"{where}: the model takes {len(inputs)} inputs ({shapes}), but hessian_tf "
            "feeds one input array (the dataset's x); build a model of one input that "
            "holds them all (e.g. concatenated, split again by slicing layers inside).")
    if len(outputs) > 1:
        raise ModelStructureError(
            f"{where}: the model has {len(outputs)} outputs, but hessian_tf needs one "
            "output tensor for its loss; pass the model of the output whose loss you "
            "study, e.g. keras.Model(model.inputs, model.outputs[0]).")


def single_output(outputs, where: str = "--model"):
    """A model's one output tensor, also when it comes in a list, tuple or dict of one
    (e.g. keras.Model(inputs, [logits])); several outputs (a subclassed model's, known
    only once called) raise ModelStructureError."""
    if isinstance(outputs, dict) and len(outputs) == 1:
        return next(iter(outputs.values()))
    if isinstance(outputs, (list, tuple)) and len(outputs) == 1:
        return outputs[0]
    if isinstance(outputs, (list, tuple, dict)):
        raise ModelStructureError(
            f"{where}: the model has several outputs, but hessian_tf needs one output "
            "tensor for its loss; pass a model of the output whose loss you study.")
    return outputs


class KerasModelFunction:
    """outputs = f(θ, x) for a Keras 3 model, pure in θ."""

    supports_forward_mode = True
    # The outputs are a pure function of the primals passed in, so a product graph
    # can be split at its vector-free part (operators/residuals.py).
    supports_residual_cache = True

    def __init__(self, model: keras.Model, *, fold_batch_norm: bool = True,
                 unroll_steps: int = recurrent.MAX_UNROLL_STEPS,
                 per_channel_group_norm: bool = True):
        if not model.built:
            raise ValueError(
                "--model: the Keras model is not built; call it on a batch (or build "
                "it with an input shape) before computing its spectrum."
            )
        check_one_input_and_output(model)
        self.model = model
        # The tf.Variables behind Keras variables: ForwardAccumulator and tapes
        # reject Keras 3 variables themselves.
        self.variables = [v.value for v in model.trainable_variables]
        self._non_trainable = [v.value for v in model.non_trainable_variables]
        self._call_options = {"training": False} if accepts_training(model) else {}
        # Inference BN folded into the convolution or Dense layer before it
        # (operators/folding.py): the same function of the same parameters, at 0.87-0.90 of
        # the product's cost on ResNet-32.
        self.fold_batch_norm = bool(fold_batch_norm)
        # Recurrent layers unrolled over sequences of at most this many steps
        # (operators/recurrent.py): the same function, at about half the product's cost
        # on the digits LSTM and GRU, and forward mode runs through it. 0: never.
        self.unroll_steps = recurrent.check_steps(unroll_steps)
        # GroupNormalization's statistics through per-channel means (group_norm.py):
        # the same function, 0.76-0.80 of the product's time on a GN CNN.
        self.per_channel_group_norm = bool(per_channel_group_norm)

    def with_model(self, model: keras.Model) -> "KerasModelFunction":
        """The same options on another model (its float64 copy, say)."""
        return KerasModelFunction(model, fold_batch_norm=self.fold_batch_norm,
                                  unroll_steps=self.unroll_steps,
                                  per_channel_group_norm=self.per_channel_group_norm)

    @property
    def input_dtype(self) -> tf.DType | None:
        """The dtype the model's input takes (None: unknown, e.g. a subclassed model)."""
        inputs = getattr(self.model, "inputs", None)
        return tf.as_dtype(inputs[0].dtype) if inputs else None

    @property
    def has_regularization(self) -> bool:
        return True

    @property
    def regularizers(self) -> int:
        """How many regularizers the model has: of its weights, and of its layers'
        outputs (activity), nested models' included; their losses are the model's own."""
        weights = sum(getattr(v, "regularizer", None) is not None for v in self.model.weights)
        return weights + sum(
            getattr(layer, "activity_regularizer", None) is not None
            for layer in self.model._flatten_layers(include_self=True, recursive=True))

    @property
    def batch_norms(self) -> int:
        """How many BatchNormalization layers the model has (nested ones included)."""
        return len(batch_norm_layers(self.model))

    def has_bn_mode(self, bn_mode: str) -> bool:
        return True

    def primals(self) -> list[tf.Tensor]:
        """The parameters as tensors read now (inside a tf.function: at each call)."""
        return [tf.convert_to_tensor(v) for v in self.variables]

    def state(self) -> list[tf.Tensor]:
        """The non-trainable variables (BN moving statistics, RNG state) read now.

        Read in the cross-replica context and passed to every replica: under a
        strategy, Keras keeps a copy of these per replica, and the copies drift
        apart in training; the first one (the one Keras saves) defines the model.
        """
        return [tf.convert_to_tensor(v) for v in self._non_trainable]

    @contextlib.contextmanager
    def mode_context(self, bn_mode: str):
        """Enter around the whole trace of a product, in the cross-replica context:
        MirroredStrategy traces replicas in threads, so a per-replica override
        would race with its own removal. Train: BN on each batch's statistics.
        Inference: BN folded into the convolution or Dense layer before it where
        nothing else reads that layer's output (folding.py), unless
        fold_batch_norm=False. Both: normalisation statistics differentiated exactly
        to second order (moments.py), recurrent layers unrolled over sequences of
        at most `unroll_steps` steps (recurrent.py), and GroupNormalization by
        per-channel statistics unless per_channel_group_norm=False (group_norm.py),
        the second derivatives of resizes, tiles, softsign and max poolings mended
        (second_order.py), grouped convolutions computed without XLA, pointwise
        ones as matrix products and dilated ones by TensorFlow's dilated kernel
        (convolutions.py), dot-product attention by batched matrix products
        (attention.py), and gelu, silu and LayerNormalization with their derivatives
        written out (activations.py, layer_norm.py)."""
        if bn_mode == "train":
            mode = batch_norm_in_train_mode(self.model)
        elif self.fold_batch_norm:
            mode = folding.fold_batch_norm(self.model)
        else:
            mode = contextlib.nullcontext()
        group_norm_mode = (group_norm.per_channel_statistics(self.model)
                           if self.per_channel_group_norm else contextlib.nullcontext())
        with exact_moments(), second_order_gradients(), grouped_convolutions(), \
                pointwise_convolutions(), dilated_convolutions(), matmul_attention(), \
                compact_activations(), compact_layer_normalization(), \
                recurrent.unrolled(self.model, self.unroll_steps), group_norm_mode, mode:
            yield

    def __call__(
        self, primals: Sequence[tf.Tensor], state: Sequence[tf.Tensor], x: tf.Tensor, *, bn_mode: str
    ):
        """Returns (outputs, sum of the model's own losses). For bn_mode='train' the
        caller must be inside `mode_context('train')`."""
        del bn_mode  # applied by mode_context
        outputs, _, losses = self.model.stateless_call(
            list(primals), list(state), x, return_losses=True, **self._call_options
        )
        outputs = single_output(outputs)
        regularization = tf.add_n(losses) if losses else tf.zeros([], outputs.dtype)
        return outputs, tf.cast(regularization, outputs.dtype)


class SavedModelFunction:
    """outputs = f(x) for a loaded SavedModel; differentiated w.r.t. its variables."""

    # Forward-over-backward through a loaded function inside tf.function returns
    # None tangents (measured, TF 2.21): only reverse-over-reverse is used.
    supports_forward_mode = False
    # The saved functions read their variables themselves, not the primals passed in.
    supports_residual_cache = False

    def __init__(self, loaded, path: str = ""):
        self.loaded = loaded
        self.path = path
        if not hasattr(loaded, "serve"):
            raise ValueError(
                f"--model={path}: the SavedModel has no 'serve' function; export it "
                "with Keras `model.export()` or hessian_tf.io.export_for_spectrum."
            )
        self.variables = list(getattr(loaded, "trainable_variables", []))
        # The dtype its signature takes (None: unknown); inputs are cast to it.
        self.input_dtype = _first_input_dtype(loaded.serve)
        self._checked = set()  # BN modes whose saved function was checked for StopGradient

    @property
    def has_regularization(self) -> bool:
        return False

    @property
    def regularizers(self) -> int:
        return 0  # a SavedModel does not carry them

    @property
    def batch_norms(self) -> Optional[int]:
        return None  # not known: its functions are all there is

    def has_bn_mode(self, bn_mode: str) -> bool:
        return hasattr(self.loaded, SAVED_FUNCTION_NAMES[bn_mode])

    def primals(self) -> list[tf.Variable]:
        return self.variables

    def state(self) -> list[tf.Tensor]:
        return []  # the saved functions read their own non-trainable variables

    def mode_context(self, bn_mode: str):
        """Each mode has its own saved function; the first use of one whose graph
        stops a gradient logs a warning (a saved graph cannot be traced again with
        exact statistics, moments.py). The second derivatives of resizes, tiles,
        softsign and max poolings are mended (second_order.py): the saved graphs are
        differentiated when products are traced."""
        if bn_mode in self._checked:
            return second_order_gradients()
        self._checked.add(bn_mode)
        count = self.stop_gradients(bn_mode)
        if count:
            logging.warning(
                "--model=%s: the SavedModel's function for --bn_mode=%s stops the gradient "
                "at %d node(s). If they are tf.nn.moments' statistics (LayerNormalization, "
                "GroupNormalization, train-mode BN; written by Keras's model.export(), or "
                "by hessian_tf's export_for_spectrum before version 5776e96), products miss "
                "their second-derivative terms: pass the .keras file, or export it again "
                "with hessian_tf.io.export_for_spectrum.", self.path, bn_mode, count)
        return second_order_gradients()

    def stop_gradients(self, bn_mode: str) -> int:
        """StopGradient nodes in the saved function of `bn_mode` and the functions it
        calls (0 if it has none)."""
        function = getattr(self.loaded, SAVED_FUNCTION_NAMES[bn_mode], None)
        return sum(node.op == "StopGradient"
                   for concrete in getattr(function, "concrete_functions", ())
                   for _, node in graph_nodes(concrete.graph.as_graph_def()))

    def __call__(self, primals, state, x: tf.Tensor, *, bn_mode: str):
        del primals, state  # the functions read the captured variables themselves
        function = getattr(self.loaded, SAVED_FUNCTION_NAMES[bn_mode])
        if self.input_dtype is not None:
            x = tf.cast(x, self.input_dtype)
        outputs = function(x)
        if isinstance(outputs, dict):
            if len(outputs) != 1:
                raise ValueError(
                    f"--model={self.path}: the SavedModel returns {sorted(outputs)}; "
                    "hessian_tf needs a single output."
                )
            outputs = next(iter(outputs.values()))
        return outputs, tf.zeros([], outputs.dtype)


def _first_input_dtype(function):
    try:
        specs = tf.nest.flatten(function.input_signature)
    except (AttributeError, TypeError):
        return None
    return specs[0].dtype if specs else None
