"""Curvature with respect to a subset of the parameters (`--variables=REGEX`).

`SubsetModelFunction` wraps a model function so that θ is only the trainable
variables whose path matches a regular expression; the others are held fixed at
their current values. Any operator built on it (Hessian, GGN, Fisher) then has the
dimension of the selected variables, and its matrix is the principal sub-block of
the full one: rows and columns of the selected variables, in model order.

Paths are Keras 3 variable paths such as `sequential/dense_1/kernel` (a
SavedModel's variable names without the `:0` suffix). The expression is applied
with `re.search`, so `dense_1/` selects both variables of that layer; anchor it
(`^...$`) to match whole paths.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import tensorflow as tf

# The error lists at most this many of the model's variable paths.
MAX_LISTED_PATHS = 40


def base_function(model_function):
    """The model function under any variable subsets (SubsetModelFunction wraps one in
    `inner`, possibly another subset): the one that holds the model itself."""
    while getattr(model_function, "inner", None) is not None:
        model_function = model_function.inner
    return model_function


def variable_paths(model_function) -> list[str]:
    """The path of each trainable variable of `model_function`, in θ's order."""
    paths = getattr(model_function, "paths", None)
    if paths is not None:
        return list(paths)
    model = getattr(model_function, "model", None)
    if model is not None and len(model.trainable_variables) == len(model_function.variables):
        return [v.path for v in model.trainable_variables]
    return [re.sub(r":\d+$", "", v.name) for v in model_function.variables]


def _listing(paths: Sequence[str]) -> str:
    shown = ", ".join(paths[:MAX_LISTED_PATHS])
    if len(paths) > MAX_LISTED_PATHS:
        shown += f", ... ({len(paths) - MAX_LISTED_PATHS} more)"
    return f"[{shown}]"


def select_variables(paths: Sequence[str], pattern: str) -> list[int]:
    """Indices of the paths that `pattern` matches (re.search); ValueError naming
    `--variables`, the expression and the available paths if it is invalid or
    matches nothing."""
    try:
        expression = re.compile(pattern)
    except re.error as error:
        raise ValueError(
            f"--variables={pattern!r} is not a valid regular expression ({error}); the "
            f"model's trainable variables are {_listing(paths)}."
        ) from error
    selected = [i for i, path in enumerate(paths) if expression.search(path)]
    if not selected:
        raise ValueError(
            f"--variables={pattern!r} matches none of the model's {len(paths)} trainable "
            f"variables {_listing(paths)}; pass a regular expression (re.search) that "
            "matches at least one of these paths."
        )
    return selected


class SubsetModelFunction:
    """A model function whose parameters are the variables matching `pattern`.

    The unselected parameters travel with the non-trainable state (read at each
    product, so the operator always sees the model's current values) and are
    never differentiated.

    Args:
      model_function: a KerasModelFunction or SavedModelFunction (or another
        SubsetModelFunction).
      pattern: a regular expression over variable paths (`re.search`).
    """

    def __init__(self, model_function, pattern: str):
        all_paths = variable_paths(model_function)
        self.inner = model_function
        self.pattern = pattern
        self.all_paths = all_paths
        self.selected_indices = select_variables(all_paths, pattern)
        chosen = set(self.selected_indices)
        self.fixed_indices = [i for i in range(len(all_paths)) if i not in chosen]
        self.paths = [all_paths[i] for i in self.selected_indices]
        self.variables = [model_function.variables[i] for i in self.selected_indices]
        self.supports_forward_mode = model_function.supports_forward_mode
        self.supports_residual_cache = getattr(model_function, "supports_residual_cache", False)
        self._num_state = len(model_function.state())

    @property
    def has_regularization(self) -> bool:
        return self.inner.has_regularization

    @property
    def regularizers(self) -> int:
        return self.inner.regularizers

    @property
    def batch_norms(self):
        return self.inner.batch_norms

    def has_bn_mode(self, bn_mode: str) -> bool:
        return self.inner.has_bn_mode(bn_mode)

    def mode_context(self, bn_mode: str):
        return self.inner.mode_context(bn_mode)

    def primals(self) -> list:
        primals = self.inner.primals()
        return [primals[i] for i in self.selected_indices]

    def state(self) -> list:
        """The inner state, then the unselected parameters as constants."""
        primals = self.inner.primals()
        fixed = [tf.convert_to_tensor(primals[i]) for i in self.fixed_indices]
        return list(self.inner.state()) + fixed

    def __call__(self, primals, state, x: tf.Tensor, *, bn_mode: str):
        state = list(state)
        inner_state, fixed = state[: self._num_state], state[self._num_state :]
        full = [None] * len(self.all_paths)
        for index, value in zip(self.selected_indices, primals):
            full[index] = value
        for index, value in zip(self.fixed_indices, fixed):
            full[index] = value
        return self.inner(full, inner_state, x, bn_mode=bn_mode)

    def flat_indices(self) -> list[int]:
        """Positions of the selected parameters in the full flat θ (for tests and
        for mapping Ritz vectors back onto the whole model)."""
        offsets, start = [], 0
        for variable in self.inner.variables:
            size = int(np.prod(variable.shape))
            offsets.append((start, size))
            start += size
        indices = []
        for index in self.selected_indices:
            offset, size = offsets[index]
            indices.extend(range(offset, offset + size))
        return indices
