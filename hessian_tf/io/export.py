"""Exporting a Keras model as a SavedModel whose spectrum can be taken in both BN modes.

Keras `model.export()` writes only the inference function, so its SavedModels
support `--bn_mode=inference` alone. `export_for_spectrum` writes one function per
BN mode (the names in `SAVED_FUNCTION_NAMES`):

- `serve(x)`: BN with its moving statistics, dropout off; returns the outputs.
- `serve_bn_train(x)`: BN with the statistics of the batch `x`, dropout off;
  returns the outputs and assigns nothing (the moving statistics are untouched).

One function per mode rather than one with a boolean input: a saved function that
switches BN mode with `tf.cond` fails its second derivative after loading
(InaccessibleTensorError, measured on TF 2.21).

The SavedModel also carries `trainable_variables` in the order of the model's
`trainable_variables` (the order in which the spectrum flattens θ),
`non_trainable_variables` and `variables`. Both functions read those variables
when called, so after `tf.saved_model.load` they are differentiable (twice, by
reverse over reverse) with respect to `loaded.trainable_variables`.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import keras
import tensorflow as tf

from hessian_tf.operators import model_function as model_function_lib
from hessian_tf.operators import recurrent
from hessian_tf.operators.attention import matmul_attention
from hessian_tf.operators.convolutions import grouped_convolutions, pointwise_convolutions
from hessian_tf.operators.model_function import SAVED_FUNCTION_NAMES, batch_norm_in_train_mode
from hessian_tf.operators.moments import exact_moments

InputSignature = Union[tf.TensorSpec, Sequence[tf.TensorSpec]]


def export_for_spectrum(
    model: keras.Model,
    path: Union[str, os.PathLike],
    *,
    input_signature: Optional[InputSignature] = None,
    unroll_steps: int = recurrent.MAX_UNROLL_STEPS,
) -> str:
    """Writes `model` to `path` as a SavedModel with one function per BN mode.

    The model is not changed: both functions compute with `model.stateless_call`
    on the variables' current values and discard the updated non-trainable values.

    Args:
      model: a built Keras 3 model with one input and one output tensor.
      path: the SavedModel directory to write.
      input_signature: a `tf.TensorSpec` (or a one-element list of one) for the
        input `[batch, ...]`; default: the model's input shape with the batch
        dimension left free, and its input dtype.
      unroll_steps: Keras recurrent layers are written unrolled into the functions
        over sequences of at most this many steps, and LSTM and GRU without cuDNN
        (operators/recurrent.py: the same function, faster products, and no cuDNN
        kernel, which has no second derivative, when exported on a GPU); 0: never.

    Returns:
      `path`.

    Raises:
      ValueError: the model is not built, has several inputs or outputs, or has no
        known input shape and no `input_signature` was given.
    """
    if not model.built:
        raise ValueError(
            "export_for_spectrum: the Keras model is not built; call it on a batch "
            "(or build it with an input shape) before exporting it."
        )
    model_function_lib.check_one_input_and_output(model, "export_for_spectrum")
    unroll_steps = recurrent.check_steps(unroll_steps, "export_for_spectrum: unroll_steps")
    spec = _input_spec(model, input_signature)
    trainable = [_backing_variable(v) for v in model.trainable_variables]
    non_trainable = [_backing_variable(v) for v in model.non_trainable_variables]
    if not trainable:
        raise ValueError(
            "export_for_spectrum: the model has no trainable variables, so its "
            "Hessian is empty; unfreeze the layers whose curvature you want."
        )

    # Dropout and other randomness off. stateless_call hands its keyword arguments
    # to `call` as they are, so `training` only goes to a call that accepts it.
    call_options = {"training": False} if model_function_lib.accepts_training(model) else {}

    def outputs_of(x):
        # Read the variables at each call: the loaded functions then depend on the
        # restored variables, which is what products differentiate.
        # Second derivatives through the statistics (moments.py); short recurrent
        # layers unrolled (recurrent.py); grouped convolutions without XLA and
        # pointwise ones as matrix products (convolutions.py); attention by batched
        # matrix products (attention.py). Not here, unlike the Keras model function's
        # mode context: second_order_gradients (it swaps gradient functions, which act
        # when products are traced: the loaded model's mode context enters it) and
        # dilated_convolutions (its kernel is probed in this process; the saved graph
        # may run where TensorFlow's dilated kernel does not), nor compact_activations
        # and compact_layer_normalization (their derivatives are recorded for the
        # tapes of this process; a saved graph holds tf.nn.gelu's, tf.nn.silu's and
        # LayerNormalization's ops, differentiated as TensorFlow registers them).
        with exact_moments(), grouped_convolutions(), pointwise_convolutions(), \
                matmul_attention(), recurrent.unrolled(model, unroll_steps):
            outputs, _ = model.stateless_call(
                [tf.convert_to_tensor(v) for v in trainable],
                [tf.convert_to_tensor(v) for v in non_trainable],
                x,
                **call_options,
            )
        return model_function_lib.single_output(outputs, "export_for_spectrum")

    def serve(x):
        return outputs_of(x)

    def serve_bn_train(x):
        # Entered inside the function, so the override holds whenever it is traced.
        with batch_norm_in_train_mode(model):
            return outputs_of(x)

    archive = tf.__internal__.tracking.AutoTrackable()
    # Tracked as lists in θ order. The functions capture these same tf.Variables,
    # so after loading the attributes and the captures are the same objects.
    archive.trainable_variables = list(trainable)
    archive.non_trainable_variables = list(non_trainable)
    archive.variables = list(trainable) + list(non_trainable)
    functions = {"inference": serve, "train": serve_bn_train}
    for bn_mode, python_function in functions.items():
        function = tf.function(python_function, input_signature=[spec], autograph=False)
        setattr(archive, SAVED_FUNCTION_NAMES[bn_mode], function)
    path = os.fspath(path)
    tf.saved_model.save(
        archive,
        path,
        # TF Serving needs a default signature: the inference function.
        signatures={"serving_default": archive.serve.get_concrete_function()},
    )
    return path


def _backing_variable(variable) -> tf.Variable:
    """The tf.Variable behind a Keras 3 variable (a tf.Variable is returned as is)."""
    if isinstance(variable, tf.Variable):
        return variable
    backing = getattr(variable, "_value", None)
    if not isinstance(backing, tf.Variable):
        raise ValueError(
            f"export_for_spectrum: variable {getattr(variable, 'path', variable)!r} is "
            f"not backed by a tf.Variable (got {type(backing).__name__}); export needs "
            "the TensorFlow backend (KERAS_BACKEND=tensorflow)."
        )
    return backing




def _input_spec(model: keras.Model, input_signature) -> tf.TensorSpec:
    if input_signature is not None:
        specs = tf.nest.flatten(input_signature)
        if len(specs) != 1 or not isinstance(specs[0], tf.TensorSpec):
            raise ValueError(
                f"export_for_spectrum: input_signature={input_signature!r}; pass one "
                "tf.TensorSpec (or a list of one), e.g. "
                "[tf.TensorSpec([None, 32, 32, 3], tf.float32)]."
            )
        return specs[0]
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        raise ValueError(
            "export_for_spectrum: the model has no known input shape (a subclassed "
            "model?); pass input_signature=[tf.TensorSpec([None, ...], dtype)]."
        )
    shape = [None] + list(inputs[0].shape[1:])
    return tf.TensorSpec(shape, tf.as_dtype(inputs[0].dtype), name="x")

