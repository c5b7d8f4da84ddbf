"""Second derivatives TensorFlow gets wrong or slow, mended while products are traced.

TensorFlow differentiates an op by the function registered for its type. Products of
the Hessian differentiate the gradient's own ops, and some of those are mended
here, by the registered functions being swapped within `second_order_gradients()`,
entered around the traces of products and gradients (the model functions' mode
contexts):

- Wrong: TensorFlow declares `ResizeBilinearGrad` not differentiable, so every second
  derivative through a bilinear resize (Keras's `UpSampling2D(interpolation=
  "bilinear")`, `Resizing`, `ops.image.resize`) was silently zero, and so was forward
  mode's derivative of the resize itself: on a float64 network with one bilinear
  `UpSampling2D` products by the two methods were off by 59% and 97% of the largest
  entry of central differences of the exact gradient. `ResizeBicubicGrad`
  and `ResizeNearestNeighborGrad` have no gradient (an error). A resize is linear and
  these ops are its transpose, so their gradient is the resize itself, with the same
  attributes (`resize_gradient_gradient`). Tapes and forward accumulators keep no
  inputs for ResizeBilinearGrad, so the resizes' own gradients are replaced too: the
  same ops, recorded as the linear maps they are (`_transposed`). Other resizes
  (antialiased ones, lanczos, area: `ScaleAndTranslate`, `ResizeArea`) are not mended;
  their second derivatives are missing, an error that the operator names in one line.
- Wrong: TensorFlow's CPU kernels of `MaxPoolGradGrad` and `MaxPool3DGradGrad` (the
  second derivative through a max pooling) write their result into the buffer of
  their `grad` input when the two have as many elements and the input is not needed
  elsewhere, and zero it before reading it. A pooling of stride 1 with "same" padding
  (Inception's pooling branches, YOLO's SPPF) has outputs of its input's size, and in
  a traced product (not eagerly, where Python holds the input) the second derivative
  through it could then be zero, as the executor happened to free the input's other
  uses first: on a float64 network with one `MaxPooling2D(2, strides=1,
  padding="same")` products were off by 63% of the largest entry of central
  differences of the exact gradient, by both methods, and not symmetric.
  `max_pool_gradient_gradient` gives the op inputs padded to the "valid" pooling of
  the same windows (the image by −∞, its gradient by zeros), which has more elements
  than the output, so nothing is overwritten; a pooling of 1×1 windows is a strided
  slice.
- Wrong without oneDNN: TensorFlow's Eigen CPU kernel of `MaxPool3DGrad`
  (TF_ENABLE_ONEDNN_OPTS=0, CPUs oneDNN does not build for) gives a window's gradient to
  every entry that ties for its maximum, and `MaxPool3DGradGrad` takes the first: over
  ties (a 3-D max pooling of raw convolutions over a volume's constant background) the
  gradient was not a subgradient and products not symmetric. oneDNN's kernel gives it to
  the first in graphs. Where a probe finds such a kernel (`max_pool3d_splits_ties`), a
  float32 or bfloat16 MaxPool3D's gradient on a CPU-only host goes to each window's
  first maximum as MaxPool3DGradGrad finds it (`max_pool3d_gradient`).
- Missing: `SoftsignGrad` has no gradient, so a softsign activation stopped every
  product with a traceback; `softsign_gradient_gradient` is its derivative.
- Slow: TensorFlow's gradient of `Tile` (array_grad.py) reshapes the incoming gradient
  to 2 × rank axes, interleaving each multiple with its dimension, and sums over the
  even axes, which it computes as a tensor at run time. Its own gradient, which reverse
  over reverse products take, goes through `Sum`'s general gradient and becomes a
  `Tile` of that 2 × rank shape: a 10-D tile for a 5-D one. Keras's `UpSampling2D`
  (nearest) and `ops.repeat` tile that way, and on a small U-Net
  (benchmarks/example_networks.py's unet_pixels, one batch of 128, 2 CPU cores) two
  such 10-D tiles took 374 ms of a 733 ms reverse-over-reverse product (TensorFlow's
  profiler, one ad hoc run). `tile_gradient` is the same sum over as few axes as the
  shapes allow when they are static: the tiled axes, with the untiled axes between
  them merged and axes of 1 dropped, summed over axes known when the graph is built;
  its gradient is then a tile of that small rank. On that U-Net the product took
  322 ms against 845 ms by reverse over reverse (benchmarks/tile_gradient.py, one run;
  256 against 686 ms in another). Dynamic shapes and IndexedSlices gradients take
  TensorFlow's gradient as it is (forward accumulators trace JVPs with relaxed shapes
  after 32 traces of an op type in a process).
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow.python.eager import context, forwardprop, record
from tensorflow.python.framework import ops
from tensorflow.python.ops import gen_image_ops, gen_nn_ops

from hessian_tf.messages import first_line
from hessian_tf.operators import convolutions
from hessian_tf.operators.shared_patch import SharedPatch

# TensorFlow's registry of gradient functions, which the tapes look up by op type at
# each differentiation (so a swap applies to traces made while it is in place).
_REGISTRY = getattr(getattr(ops, "_gradient_registry", None), "_registry", None)
_TYPE = "type"


def tile_gradient(op, grad):
    """The gradient of tf.tile(x, multiples) with respect to x (and None for the
    multiples), as TensorFlow's, summed over static, merged axes."""
    shape, tiled = op.inputs[0].shape, getattr(grad, "shape", None)
    if (tiled is None or isinstance(grad, tf.IndexedSlices)
            or not shape.is_fully_defined() or not tiled.is_fully_defined()
            or shape.rank != tiled.rank or 0 in shape.as_list() or 0 in tiled.as_list()):
        return _original(op, grad)
    multiples = np.asarray(tiled.as_list()) // np.asarray(shape.as_list())
    # A tiled axis of m·n entries is m copies of n: reshaped as [m, n], summed over m.
    sizes, summed = [], []
    for multiple, size in zip(multiples.tolist(), shape.as_list()):
        if multiple > 1:
            sizes.append(multiple)
            summed.append(True)
        if size > 1 or not sizes:
            if sizes and not summed[-1]:
                sizes[-1] *= size  # merged with the untiled axis before it
            else:
                sizes.append(size)
                summed.append(False)
    axes = [axis for axis, is_summed in enumerate(summed) if is_summed]
    reduced = tf.reduce_sum(tf.reshape(grad, sizes), axes)
    return [tf.reshape(reduced, shape), None]


def _spatial_size(images):
    """[rows, columns] of NHWC `images`: static where known, else a tensor."""
    size = images.shape[1:3]
    return size.as_list() if size.is_fully_defined() else tf.shape(images)[1:3]


def _transposed(resize, transpose, grad, attributes, *args):
    """transpose(grad, *args) (a resize's gradient op: the resize transposed), recorded
    for tapes and forward accumulators as the linear map it is: its gradient is the
    resize of the incoming gradient to `grad`'s size, its JVP the same transpose of the
    tangent. (Tapes keep no inputs for TensorFlow's ops, and accumulators would take
    ResizeBilinearGrad's JVP as zero.)"""
    size, dtype = _spatial_size(grad), grad.dtype
    with record.stop_recording():
        result = transpose(grad, *args, **attributes)

    def backward(upstream):
        return [tf.cast(resize(upstream, size, **attributes), dtype)]

    def forward(tangent):  # recorded the same way, for derivatives of higher order
        return [_transposed(resize, transpose, tangent, attributes, *args)]

    record.record_operation("HessianTfTransposedResize", [result], [grad], backward, forward)
    return result


def _attributes(op) -> dict:
    return {"align_corners": op.get_attr("align_corners"),
            "half_pixel_centers": op.get_attr("half_pixel_centers")}


_RESIZES = {"ResizeBilinearGrad": gen_image_ops.resize_bilinear,
            "ResizeBicubicGrad": gen_image_ops.resize_bicubic,
            "ResizeNearestNeighborGrad": gen_image_ops.resize_nearest_neighbor}


def resize_gradient_gradient(op, grad):
    """The gradient of a resize's gradient op with respect to its first input, the
    gradient of the resized image: the resize of `grad` to that input's size, where
    the op's inputs are known (graphs differentiated as graphs: a SavedModel's
    functions); tapes and forward accumulators, which keep no inputs for
    ResizeBilinearGrad, take the products of `_transposed` instead."""
    if not op.inputs:
        return [None, None]
    first = op.inputs[0]
    resized = _RESIZES[op.type](grad, _spatial_size(first), **_attributes(op))
    return [tf.cast(resized, first.dtype), None]


def resize_bilinear_gradient(op, grad):
    """TensorFlow's gradient of ResizeBilinear, recorded as a linear map (`_transposed`)."""
    return [_transposed(gen_image_ops.resize_bilinear, gen_image_ops.resize_bilinear_grad,
                        grad, _attributes(op), op.inputs[0]), None]


def resize_bicubic_gradient(op, grad):
    """TensorFlow's gradient of ResizeBicubic (none for other dtypes than float32 and
    float64, as TensorFlow's), recorded as a linear map."""
    if op.inputs[0].dtype not in (tf.float32, tf.float64):
        return [None, None]
    return [_transposed(gen_image_ops.resize_bicubic, gen_image_ops.resize_bicubic_grad,
                        grad, _attributes(op), op.inputs[0]), None]


def resize_nearest_neighbor_gradient(op, grad):
    """TensorFlow's gradient of ResizeNearestNeighbor, recorded as a linear map."""
    return [_transposed(gen_image_ops.resize_nearest_neighbor,
                        gen_image_ops.resize_nearest_neighbor_grad, grad, _attributes(op),
                        _spatial_size(op.inputs[0])), None]


def softsign_gradient_gradient(op, grad):
    """The gradient of SoftsignGrad(g, x) = g / (1 + |x|)², which TensorFlow lacks (a
    softsign activation had no second derivative, an error): grad / (1 + |x|)² for g,
    −2 grad · g · sign(x) / (1 + |x|)³ for x."""
    gradients, features = op.inputs
    scale = 1.0 / (1.0 + tf.abs(features))
    return [grad * tf.square(scale),
            -2.0 * grad * gradients * tf.sign(features) * scale * tf.square(scale)]


_MAX_POOL_GRAD_GRADS = {"MaxPoolGrad": gen_nn_ops.max_pool_grad_grad,
                        "MaxPoolGradV2": gen_nn_ops.max_pool_grad_grad_v2,
                        "MaxPool3DGrad": gen_nn_ops.max_pool3d_grad_grad}


def _same_padding(images, pooled, ksize, strides):
    """[[before, after] per axis] of a "same" pooling of `images` to `pooled`, as
    TensorFlow pads (the odd one after): static where the shapes and the window are
    (lists of ints), else a tensor (`ksize`, `strides` may be tensors)."""
    known = (images.shape[1:-1].is_fully_defined() and pooled.shape[1:-1].is_fully_defined()
             and isinstance(ksize, list) and isinstance(strides, list))
    if known:
        size, out = np.asarray(images.shape[1:-1].as_list()), np.asarray(pooled.shape[1:-1].as_list())
        window, stride = np.asarray(ksize[1:-1]), np.asarray(strides[1:-1])
        total = np.maximum((out - 1) * stride + window - size, 0)
        return [[0, 0]] + [[t // 2, t - t // 2] for t in total.tolist()] + [[0, 0]]
    size, out = tf.shape(images)[1:-1], tf.shape(pooled)[1:-1]
    window, stride = (tf.cast(tf.convert_to_tensor(v)[1:-1], size.dtype) for v in (ksize, strides))
    total = tf.maximum((out - 1) * stride + window - size, 0)
    spatial = tf.stack([total // 2, total - total // 2], 1)
    edge = tf.zeros([1, 2], spatial.dtype)
    return tf.concat([edge, spatial, edge], 0)


def max_pool_gradient_gradient(op, grad):
    """The gradient of a max pooling's gradient op (MaxPoolGrad, MaxPoolGradV2,
    MaxPool3DGrad): zero for the image and the pooled image, as TensorFlow's, and for
    the incoming gradient the pooling's JVP, by TensorFlow's GradGrad op given inputs
    it cannot overwrite (the module's docstring): a "same" pooling as the "valid" one of
    the padded image, a pooling of 1×1 windows as the strided slice it is. A
    MaxPoolV2 whose window is computed in the graph is padded by tensors; were that
    window 1×1 at run time (a pooling that copies), nothing would be padded and the
    kernel could still overwrite. Explicit paddings, which TensorFlow's GradGrad ops do
    not take (a ValueError at every second derivative), become the "valid" pooling of
    the padded image in any layout. NCHW poolings are otherwise TensorFlow's as they are
    (GPU kernels, which allocate their output)."""
    images, pooled = op.inputs[0], op.inputs[1]
    grad_grad = _MAX_POOL_GRAD_GRADS[op.type]
    data_format, padding = (op.get_attr(name).decode() for name in ("data_format", "padding"))
    if op.type == "MaxPoolGradV2":
        ksize, strides = op.inputs[3], op.inputs[4]
        static = [tf.get_static_value(t) for t in (ksize, strides)]
        if all(value is not None for value in static):
            ksize, strides = static
        window = {"ksize": op.inputs[3], "strides": op.inputs[4]}
        rest = [None, None]
    else:
        ksize, strides = op.get_attr("ksize"), op.get_attr("strides")
        window = {"ksize": ksize, "strides": strides}
        rest = []
    explicit = op.get_attr("explicit_paddings") if padding == "EXPLICIT" else None
    return [tf.zeros_like(images), tf.zeros_like(pooled),
            _at_first_maxima(grad_grad, images, pooled, grad, ksize, strides, window,
                             padding, data_format, explicit)] + rest


def _at_first_maxima(grad_grad, images, pooled, grad, ksize, strides, window, padding,
                     data_format, explicit_paddings=None):
    """`grad` (shaped as `images`) at each window's first maximum (the max pooling's
    JVP) by TensorFlow's GradGrad op `grad_grad`, given inputs it cannot overwrite (the
    module's docstring); `window` holds the op's ksize and strides as it takes them."""
    if padding == "EXPLICIT":  # [before, after] per axis, in the layout's order
        paddings = np.reshape(explicit_paddings, [-1, 2]).tolist()
        images = tf.pad(images, paddings, constant_values=float("-inf"))
        grad = tf.pad(grad, paddings)
        padding = "VALID"
    if data_format in ("NHWC", "NDHWC"):
        if not isinstance(ksize, tf.Tensor):
            ksize, strides = [int(k) for k in ksize], [int(s) for s in strides]
            if all(k == 1 for k in ksize):  # a max over one entry: a strided slice
                return grad[tuple(slice(None, None, s) for s in strides)]
        sizes = images.shape[1:], pooled.shape[1:]
        can_overwrite = not (sizes[0].is_fully_defined() and sizes[1].is_fully_defined()
                             and sizes[0].num_elements() != sizes[1].num_elements())
        if padding == "SAME" and can_overwrite:
            # A "valid" pooling of more entries than it outputs (a window has k > 1).
            paddings = _same_padding(images, pooled, ksize, strides)
            images = tf.pad(images, paddings, constant_values=float("-inf"))
            grad = tf.pad(grad, paddings)
            padding = "VALID"
    return grad_grad(images, pooled, grad, padding=padding, data_format=data_format, **window)


@tf.function(autograph=False)
def _gradient_of_tied_maxima(images):
    pooled = tf.nn.max_pool3d(images, 2, 2, "VALID")
    return tf.reduce_sum(gen_nn_ops.max_pool3d_grad(
        images, pooled, tf.ones_like(pooled), [1, 2, 2, 2, 1], [1, 2, 2, 2, 1], "VALID"))


def max_pool3d_splits_ties() -> bool:
    """Whether TensorFlow's MaxPool3DGrad, run in a graph on this host's CPU, gives a
    window's gradient to every entry that ties for its maximum (probed once per
    process, eagerly, also when called while a graph is built): Eigen's kernel does
    (TF_ENABLE_ONEDNN_OPTS=0, CPUs oneDNN does not build for), so that the gradient of
    a window of eight equal entries sums to 8, while MaxPool3DGradGrad, the second
    derivative, takes the first; oneDNN's kernel, which graphs take where TensorFlow
    has it, gives it to the first. A probe that fails says False (TensorFlow's
    gradient), logged once, and is tried again at the next call."""
    global _splits_ties, _probe_failed
    with _probe_lock:
        if _splits_ties is None:
            try:
                with context.eager_mode(), tf.device("/CPU:0"):
                    total = float(_gradient_of_tied_maxima(tf.zeros([1, 2, 2, 2, 1])))
            except Exception as error:  # noqa: BLE001  (any failure: TensorFlow's gradient)
                if not _probe_failed:
                    logging.info("hessian_tf: MaxPool3DGrad's ties were not probed (%s); "
                                 "TensorFlow's gradient of MaxPool3D is kept.",
                                 first_line(error))
                _probe_failed = True
                return False
            _splits_ties = total != 1.0
        return _splits_ties


_splits_ties = None
_probe_failed = False
_probe_lock = threading.Lock()
_MAX_POSITION_PART = 4096  # positions go through GradGrad in two exact float32 parts
_SEARCHED = (tf.float32, tf.bfloat16)  # dtypes whose 3-D max pooling gradients are mended


def max_pool3d_gradient(op, grad):
    """TensorFlow's gradient of MaxPool3D where its kernel gives each window's gradient
    to its first maximum; where it gives it to every tied maximum (`max_pool3d_splits_ties`,
    CPU-only hosts, float32 or bfloat16, NDHWC), the gradient at the first maximum of
    each window as MaxPool3DGradGrad finds it: the flat positions of the images' entries,
    from 1, go through MaxPool3DGradGrad (in float32, in two parts, each exact) and `grad`
    is summed into them. A window without a maximum among the images' entries (NaN, or
    −∞ tied with "same" padding before it) gets 0, as padding, and its gradient is
    dropped. The derivative, a gather at those positions, is then MaxPool3DGradGrad's
    transpose, so products are symmetric."""
    images = op.inputs[0]
    if (images.dtype not in _SEARCHED or op.get_attr("data_format") != b"NDHWC"
            or not convolutions.cpu_only() or not max_pool3d_splits_ties()):
        return _max_pool3d_original(op, grad)
    ksize, strides = op.get_attr("ksize"), op.get_attr("strides")
    window = {"ksize": ksize, "strides": strides}
    shape = tf.shape(images, out_type=tf.int64)
    size = tf.reduce_prod(shape[1:])
    positions = tf.broadcast_to(tf.reshape(tf.range(1, size + 1), shape[1:]), shape)
    searched, pooled = tf.cast(images, tf.float32), tf.cast(op.outputs[0], tf.float32)
    first = [tf.cast(_at_first_maxima(
        gen_nn_ops.max_pool3d_grad_grad, searched, pooled, tf.cast(part, tf.float32),
        ksize, strides, window, op.get_attr("padding").decode(), "NDHWC"), tf.int64)
        for part in (positions // _MAX_POSITION_PART, positions % _MAX_POSITION_PART)]
    found = tf.stop_gradient(first[0] * _MAX_POSITION_PART + first[1])  # 0: none
    offsets = tf.reshape(tf.range(shape[0]) * size, [-1, 1, 1, 1, 1])
    ids = tf.where(found > 0, found - 1 + offsets, -1)  # negative ids are dropped
    summed = tf.math.unsorted_segment_sum(tf.reshape(grad, [-1]), tf.reshape(ids, [-1]),
                                          shape[0] * size)
    return tf.reshape(summed, shape)


# op type -> the gradient function within second_order_gradients()
REPLACEMENTS = {"Tile": tile_gradient, "ResizeBilinear": resize_bilinear_gradient,
                "ResizeBicubic": resize_bicubic_gradient,
                "ResizeNearestNeighbor": resize_nearest_neighbor_gradient,
                **{name: resize_gradient_gradient for name in _RESIZES},
                "SoftsignGrad": softsign_gradient_gradient,
                **{name: max_pool_gradient_gradient for name in _MAX_POOL_GRAD_GRADS}}
_original = (_REGISTRY.get("Tile", {}).get(_TYPE) if _REGISTRY else None)  # TensorFlow's
_max_pool3d_original = (_REGISTRY.get("MaxPool3D", {}).get(_TYPE) if _REGISTRY else None)
if _max_pool3d_original is not None:  # (where TensorFlow keeps it elsewhere: not mended)
    REPLACEMENTS["MaxPool3D"] = max_pool3d_gradient
_found = {}  # op type -> the registry's entry at the first entry, restored at the last exit


def installed() -> bool:
    """Whether every op type of REPLACEMENTS differentiates by its replacement now."""
    return bool(_REGISTRY) and all(
        _REGISTRY.get(name, {}).get(_TYPE) is function for name, function in REPLACEMENTS.items())


def _install(install: bool) -> None:
    for name, function in REPLACEMENTS.items():
        if install:
            _found[name] = _REGISTRY.get(name)
            _REGISTRY[name] = {**(_found[name] or {}), _TYPE: function}
        elif _found.get(name) is None:  # it had no entry: none again
            _REGISTRY.pop(name, None)
        else:
            _REGISTRY[name] = _found[name]
    # Forward accumulators trace each op's JVP once per op and shapes, for the process:
    # traced from the other gradients, they would be reused.
    cache = getattr(forwardprop, "_jvp_function_cache", None)
    if cache is not None:
        cache.clear()


_patch = SharedPatch(lambda: _install(True), lambda: _install(False))


def second_order_gradients():
    """Within: the op types of REPLACEMENTS differentiate by their replacements.
    Entries may nest and overlap (in threads): installed by the first, the registry's
    entries as found then restored when the last exits, and forward accumulators' JVPs
    traced again on each side. The registry is the process's: another thread
    differentiating meanwhile takes the replacements too (the same derivatives, or the
    exact ones for resizes). Where this TensorFlow keeps its gradients elsewhere,
    nothing changes (tests/operators/test_second_order.py checks that it installs)."""
    if not _REGISTRY or _original is None:
        return contextlib.nullcontext()
    return _patch()
