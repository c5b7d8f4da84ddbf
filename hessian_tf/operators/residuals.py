"""A product graph split at the tensors that do not depend on the vector.

Every Lanczos step multiplies a new vector by the same operator, so the part of a
batch's product that does not depend on the vector (the forward pass, the backward
signals, BN statistics, activation masks) is the same at every step. `split` traces
a product with static shapes, finds the tensors at the boundary between that part
and the rest (the "residuals"), and returns two functions: one computes a batch's
residuals, the other the product from the residuals and the vector. Caching the
residuals of every batch trades memory (benchmarks/residuals.py: 2.4 MiB per example
on ResNet-32 with inference BN, 7.2 MiB with train BN) for the vector-free part of
every later product.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import tensorflow as tf


class SplitProduct(NamedTuple):
    """product(*inputs, *vectors) == from_residuals(*residuals_of(*inputs), *[inputs[i]
    for i in passed], *vectors), where `inputs` are the product's arguments before the
    vectors (one vector, or a vector's parts: a tangent per variable)."""

    residuals_of: Callable  # returns a list of tensors
    from_residuals: Callable  # returns what the product returns: a tensor, or a list
    passed: tuple  # indices of inputs that the second function takes as they are
    residual_bytes: int  # memory of one call's residuals


def split(product: Callable, input_specs: Sequence[tf.TensorSpec],
          vector_specs: tf.TensorSpec | Sequence[tf.TensorSpec]) -> SplitProduct:
    """Splits `product(*inputs, *vectors)` (a tensor, or a list of tensors) at its
    residuals: the tensors that do not depend on the vectors but feed what does, and
    read an argument, a capture or a stateful op (a random draw stays the one drawn
    when the residuals were computed); tensors made of constants alone are recomputed."""
    vector_specs = ([vector_specs] if isinstance(vector_specs, tf.TensorSpec)
                    else list(vector_specs))
    wrapped = tf.compat.v1.wrap_function(product, list(input_specs) + vector_specs)
    arguments = wrapped.inputs[: len(input_specs) + len(vector_specs)]
    inputs, vectors = arguments[: len(input_specs)], arguments[len(input_specs):]
    outputs = wrapped.outputs
    consumers = {}
    for op in wrapped.graph.get_operations():
        for tensor in op.inputs:
            consumers.setdefault(tensor.op, []).append(op)
        for control in op.control_inputs:
            consumers.setdefault(control, []).append(op)
    depends = _reachable([vector.op for vector in vectors], lambda op: consumers.get(op, ()))
    needed = _reachable(
        [output.op for output in outputs],
        lambda op: [t.op for t in op.inputs] + list(op.control_inputs))
    # What reads no argument, capture or stateful op (constants, and tensors made of them:
    # the ones a sum's gradient tiles to a variable's shape, an activation's zeros) is
    # recomputed from its constants with the product, not kept for every batch.
    operations = wrapped.graph.get_operations()
    fed = _reachable(
        [t.op for t in wrapped.inputs] + [op for op in operations if op._is_stateful],
        lambda op: consumers.get(op, ()))
    for position, output in enumerate(outputs):
        if output.op in fed and output.op not in depends:
            raise ValueError(
                f"the product's output {position} ({output.name}) does not depend on the "
                "vector; return zeros of static shape for a part without a path to it.")
    boundary, seen = [], set()
    for op in operations:  # graph order: deterministic
        if op in needed and op in depends:
            for tensor in op.inputs:
                if (tensor.op not in depends and tensor.op in fed
                        and tensor.ref() not in seen):
                    seen.add(tensor.ref())
                    boundary.append(tensor)
    index = {t.ref(): i for i, t in enumerate(inputs)}
    residuals = [t for t in boundary if t.ref() not in index]
    passed = tuple(index[t.ref()] for t in boundary if t.ref() in index)
    if not residuals:
        raise ValueError("the product has no vector-free part to cache.")
    fetches = outputs if isinstance(wrapped.structured_outputs, (list, tuple)) else outputs[0]
    try:
        compute_residuals = tf.function(wrapped.prune(feeds=list(inputs), fetches=residuals))
        from_residuals = tf.function(wrapped.prune(
            feeds=residuals + [inputs[i] for i in passed] + list(vectors), fetches=fetches))
    except KeyError as error:  # how pruning fails at a tensor inside a while loop
        raise ValueError(
            "--cache_residuals: this model's product cannot be split at its residuals, "
            "inside a loop of the model (a Keras recurrent layer over sequences longer than "
            "--unroll_steps, or a backward masked one returning sequences, say); leave the "
            "cache off, or pass an --unroll_steps of at least the sequences' length if "
            f"that is the loop (pruning failed: {error!r:.120})."
        ) from error

    def residuals_of(*arguments) -> list:
        computed = compute_residuals(*arguments)
        return list(computed) if isinstance(computed, (list, tuple)) else [computed]
    residual_bytes = sum(t.shape.num_elements() * t.dtype.size for t in residuals)
    return SplitProduct(residuals_of, from_residuals, passed, residual_bytes)


def _reachable(start, neighbours) -> set:
    seen, stack = set(), list(start)
    while stack:
        op = stack.pop()
        if op not in seen:
            seen.add(op)
            stack.extend(neighbours(op))
    return seen
