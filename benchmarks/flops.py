"""Floating-point operations of a traced graph: the arithmetic floor of a timing.

`graph_flops(concrete_function)` adds up TensorFlow's registered flop statistics
(`ops.RegisterStatistics(op_type, "flops")`: convolutions and their gradients, matrix
products, most elementwise ops) over the operations the function's outputs depend on.
Operations the outputs do not need are left out, as the function runtime prunes them
(in a reverse-over-reverse product, the gradient's own weight gradients, which only
feed the inner product with the tangents, whose derivative does not need them).

Ops without a registered statistic (e.g. Relu, Exp, Tanh, data movement) count zero,
so the totals are dominated by the convolutions and matrix products. Forward-mode
products are over-counted: TensorFlow's jvp of a matrix product or convolution is a
function that also multiplies the zero tangent of an input (the data), which is counted.
"""

from __future__ import annotations

from typing import Dict

from tensorflow.python.framework import ops as ops_lib
from tensorflow.python.util import deprecation

CONVOLUTIONS = ("Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter", "Conv3D",
                "DepthwiseConv2dNative")
MATRIX_PRODUCTS = ("MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3")


SHAPE_OPS = ("Shape", "ShapeN", "Size", "Rank")
CALLS = ("PartitionedCall", "StatefulPartitionedCall")


def needed_operations(graph, outputs) -> tuple[list, dict]:
    """The operations of `graph` that the tensors `outputs` depend on (through
    inputs and control inputs), and for each function call among them the indices
    of its outputs that are needed ({call op: set of indices})."""
    seen, calls = set(), {}
    stack = [(t.op, t.value_index) for t in outputs]
    while stack:
        op, index = stack.pop()
        if op.type in CALLS:
            indices = calls.setdefault(op, set())
            indices.update(range(len(op.outputs)) if index is None else [index])
        if op in seen:
            continue
        seen.add(op)
        if op.type in SHAPE_OPS and all(t.shape.is_fully_defined() for t in op.inputs):
            continue  # constant-folded: the values of its inputs are not needed
        stack.extend((t.op, t.value_index) for t in op.inputs)
        stack.extend((c, None) for c in op.control_inputs)
    return [op for op in graph.get_operations() if op in seen], calls


def graph_flops(concrete_function) -> Dict[str, int]:
    """{'convolution', 'matrix product', 'other', 'total'} flops of one call."""
    totals = {"convolution": 0, "matrix product": 0, "other": 0}
    _add_flops(concrete_function.graph, concrete_function.outputs, totals)
    totals["total"] = sum(totals.values())
    return totals


def _add_flops(graph, outputs, totals: Dict[str, int]) -> None:
    operations, calls = needed_operations(graph, outputs)
    for op in operations:
        if op.type in CALLS:
            # Forward-mode products call one function per primitive (the jvp of a
            # matrix product, say): count what its needed outputs need in its body.
            body = graph._get_function(op.get_attr("f").name).graph  # pylint: disable=protected-access
            _add_flops(body, [body.outputs[i] for i in sorted(calls[op])], totals)
            continue
        if op.type in ("While", "If", "StatelessWhile", "StatelessIf", "Case"):
            raise ValueError(f"{op.type} {op.name}: control flow is not counted.")
        with deprecation.silence():  # the statistics read shapes through a TF1 helper
            value = ops_lib.get_stats_for_node_def(graph, op.node_def, "flops").value
        if not value:
            continue
        kind = ("convolution" if op.type in CONVOLUTIONS
                else "matrix product" if op.type in MATRIX_PRODUCTS else "other")
        totals[kind] += int(value)
