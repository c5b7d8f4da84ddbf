"""Inference-mode BatchNormalization folded into the convolution or Dense layer before it.

With moving statistics, BN after a linear layer is a per-channel affine map:
BN(conv(x, W) + b) = conv(x, W·s) + (b − μ)·s + β, where s = γ / √(σ² + ε). The right
side is the same function of the same parameters (W, b, γ, β), so its Hessian is the
same; only the place of the multiplication by s changes, from every activation to the
kernel. The products then skip BN's element-wise work on activations in the forward
pass, its backward pass, and both their differentiations: on ResNet-32 (batch 128,
inference BN) one product costs 0.87-0.90 of the unfolded one (benchmarks/folding.py;
benchmarks/choices.py, variant `unfolded-bn`). In float64 the two agree to 2e-15 relative.

A pair is folded only when nothing else can see the linear layer's output:
- the model, and any model inside it that holds the pair, is a graph of layers
  (functional or Sequential, with Keras's own `call`), so its layers run only through
  the graph; no other kind of layer contains either layer, and the model has no
  Lambda layer (whose function may call any layer);
- the layer is a Conv2D, Conv3D (BaseConv's own `call` and `convolution_op`) or an
  unquantized Dense, linear, without an activity regulariser, called once, and read only by the BN layer, which is called once (not with
  training=True) and normalises the channel axis (the last, for Dense);
- its output is not an output of the model;
- both layers compute in their variables' dtype (float32 or float64: mixed precision
  would move BN's float32 arithmetic into float16).
Everything else runs as written. Folding pays only on large outputs: a pair whose
output (per traced batch) is small, or not large against the kernel (`fold_here`), runs
BN's own arithmetic inside the linear layer instead.
"""

from __future__ import annotations

import collections
import contextlib
import math

import keras
from keras import ops
from keras.src.layers.convolutional.base_conv import BaseConv
from keras.src.models.functional import Functional

_FLOAT_DTYPES = ("float32", "float64")


def _is_graph(model) -> bool:
    """Whether `model` runs its graph of layers and nothing else: a functional model
    or Sequential whose `call` is Keras's own."""
    if isinstance(model, keras.Sequential):
        return (type(model).call is keras.Sequential.call
                and getattr(model._functional, "_nodes_by_depth", None) is not None)
    return (isinstance(model, Functional) and type(model).call is Functional.call
            and getattr(model, "_nodes_by_depth", None) is not None)


def _graphs(model: keras.Model, graphs: list, hidden: set) -> None:
    """Appends to `graphs` the functional graphs of `model` and of the graph models
    nested in it (a Sequential's own graph is `_functional`), and adds to `hidden`
    the ids of every layer inside another kind of layer (a custom layer, a wrapper
    such as TimeDistributed, a subclassed model): its `call` may run them outside
    the graph, so they are not folded."""
    graph = model._functional if isinstance(model, keras.Sequential) else model
    graphs.append(graph)
    for layer in graph.layers:
        if _is_graph(layer):
            _graphs(layer, graphs, hidden)
        else:
            hidden.update(id(inner) for inner in layer._flatten_layers(include_self=False))


def _foldable_layer(layer) -> bool:
    """A Conv2D, Conv3D or Dense computing as the base class writes it (Conv1D pads
    causally in its own call; a subclass may transform the kernel in
    `convolution_op`), not quantized, without an activity regulariser (which would
    see the folded output)."""
    if getattr(layer, "activity_regularizer", None) is not None:
        return False
    if isinstance(layer, BaseConv):
        return (type(layer).call is BaseConv.call
                and type(layer).convolution_op is BaseConv.convolution_op)
    return (isinstance(layer, keras.layers.Dense) and type(layer).call is keras.layers.Dense.call
            and getattr(layer, "quantization_mode", None) is None)


def _channel_axis(layer, rank: int) -> int:
    """The axis counted from the end, for a tensor of `rank` dimensions."""
    if isinstance(layer, keras.layers.Dense):
        return -1
    if isinstance(layer, keras.layers.BatchNormalization):
        axis = layer.axis  # an int: Keras stores int(axis)
    else:
        axis = -1 if layer.data_format == "channels_last" else 1
    return axis - rank if axis >= 0 else axis


def foldable_pairs(model: keras.Model) -> list[tuple[keras.layers.Layer, keras.layers.Layer]]:
    """[(convolution or Dense, BatchNormalization)] that `fold_batch_norm` folds (module
    doc).

    Calls and readers are counted over the nodes of the graphs the model runs, not a
    layer's `_inbound_nodes`: Keras keeps there the nodes of graphs it discarded (a
    Sequential rebuilds its graph at every layer added, and keeps one stale node per
    rebuild on its first layers)."""
    if not _is_graph(model) or any(
            isinstance(layer, keras.layers.Lambda) for layer in model._flatten_layers()):
        return []  # a Lambda's function may call any layer it closes over
    graphs, hidden = [], set()
    _graphs(model, graphs, hidden)
    nodes = [node for graph in graphs for level in graph._nodes_by_depth.values()
             for node in level]
    calls = collections.Counter(id(node.operation) for node in nodes)
    readers = collections.Counter(id(t) for node in nodes for t in node.input_tensors)
    outputs = {id(t) for graph in graphs for t in graph.outputs}
    pairs = []
    for node in nodes:
        bn = node.operation
        # A node stored with training=True runs with the model call's training=False
        # (Keras passes it on), so it could fold; left alone, conservatively.
        if (type(bn).call is not keras.layers.BatchNormalization.call or calls[id(bn)] != 1
                or len(node.input_tensors) != 1 or id(bn) in hidden
                or node.arguments.kwargs.get("training") not in (None, False)):
            continue
        tensor = node.input_tensors[0]
        history = getattr(tensor, "_keras_history", None)
        conv = history.operation if history else None
        if (not _foldable_layer(conv) or calls[id(conv)] != 1 or readers[id(tensor)] != 1
                or id(tensor) in outputs or id(conv) in hidden):
            continue
        if conv.activation not in (None, keras.activations.linear):
            continue
        rank = len(tensor.shape)
        if _channel_axis(bn, rank) != _channel_axis(conv, rank):
            continue
        dtypes = {conv.compute_dtype, conv.variable_dtype, bn.compute_dtype, bn.variable_dtype}
        if len(dtypes) != 1 or dtypes.pop() not in _FLOAT_DTYPES:
            continue
        pairs.append((conv, bn))
    return pairs


def _folded_call(conv, bn):
    def call(inputs, training=None):  # Keras passes `training` to a Dense layer
        del training
        dtype = inputs.dtype
        scale = ops.rsqrt(ops.cast(bn.moving_variance, dtype) + bn.epsilon)
        if bn.scale:
            scale = scale * ops.cast(bn.gamma, dtype)
        shift = -ops.cast(bn.moving_mean, dtype) * scale
        if bn.center:
            shift = shift + ops.cast(bn.beta, dtype)
        bias = ops.cast(conv.bias, dtype) if conv.use_bias else None
        if isinstance(conv, keras.layers.Dense):
            linear = ops.matmul
        else:
            linear = conv.convolution_op
        if getattr(conv, "data_format", "channels_last") == "channels_first":
            shape = (1, conv.filters) + (1,) * conv.rank
            shift, channel_scale = ops.reshape(shift, shape), ops.reshape(scale, shape)
            bias = None if bias is None else ops.reshape(bias, shape)
        else:
            channel_scale = scale
        if not fold_here(conv.compute_output_shape(tuple(inputs.shape)), conv.kernel.shape):
            outputs = linear(inputs, conv.kernel)
            if bias is not None:
                outputs = outputs + bias
            return outputs * channel_scale + shift  # BN's own arithmetic, in this layer
        if bias is not None:
            shift = shift + bias * channel_scale
        return linear(inputs, conv.kernel * scale) + shift

    return call


# When to fold (per call, from the static shapes of the traced batch): folding trades
# BN's element-wise work on the layer's output for work on its kernel, and adds a few
# small ops. Measured before the thresholds, every pair folded (one full-data product,
# folded ÷ unfolded, medians of 40-60 interleaved rounds): ResNet-32 0.87-0.88 (outputs
# of 0.5M-2.1M elements at batch 128, 14-4,900 × the kernel); five 16-channel 8×8
# convolutions on the digits 0.81-0.83 (131K, 57-910 ×); a BN MLP 64-128-128-64 on 1797
# digits 0.78-0.81 (115K-230K, 14-28 ×); but the same MLP at batch 128 1.02-1.06 (8K-16K,
# 1-2 ×) and a CNN whose one BN follows a 16-channel convolution on 3×3 maps 1.02-1.05
# (18K, 16 ×). The thresholds lie between; with them, benchmarks/folding.py gives
# ResNet-32 0.87, the conv stack 0.78, the MLP 0.78 (batch 1797) and 1.00 (batch 128,
# not folded), the small CNN 0.98 (not folded).
MIN_OUTPUT_ELEMENTS = 2**16
MIN_OUTPUT_PER_KERNEL_ELEMENT = 4


def fold_here(output_shape, kernel_shape) -> bool:
    """Whether a layer of this output (batch included) and kernel shape is folded; not
    when a dimension is unknown."""
    if any(size is None for size in tuple(output_shape) + tuple(kernel_shape)):
        return False
    output = math.prod(int(size) for size in output_shape)
    kernel = math.prod(int(size) for size in kernel_shape)
    return output >= MIN_OUTPUT_ELEMENTS and output >= MIN_OUTPUT_PER_KERNEL_ELEMENT * kernel


def _identity(inputs, training=None, mask=None):
    del training, mask
    return inputs


@contextlib.contextmanager
def fold_batch_norm(model: keras.Model):
    """While entered, the first layer of each pair of `foldable_pairs(model)` computes
    itself and BN (BN's moving statistics, as with training=False) and BN passes its
    input on. Enter it around the trace of a function that calls the model with BN in
    inference mode; the layers are restored on exit. Layers whose `call` is already
    overridden (a caller's own context) are left alone. Yields the number of pairs."""
    pairs = [
        (conv, bn) for conv, bn in foldable_pairs(model)
        if "call" not in vars(conv) and "call" not in vars(bn)
    ]
    installed = []
    for conv, bn in pairs:
        installed += [(conv, _folded_call(conv, bn)), (bn, _identity)]
    for layer, call in installed:
        layer.call = call
    try:
        yield len(pairs)
    finally:
        for layer, call in installed:  # only what this context installed
            if vars(layer).get("call") is call:
                del layer.call
