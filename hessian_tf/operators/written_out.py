"""Functions recorded for tapes and forward accumulators with their first and second
derivatives written out.

A product differentiates a network's gradient once more; TensorFlow does it op by op,
through each op's registered gradient (and, for forward accumulators, that gradient
transposed), broadcasting gradients and all. For a function f whose Jacobian J(x) is
symmetric (element-wise activations, the normalisation of LayerNorm), the
gradient and the JVP are one map v ↦ J(v), and the derivative of J(g) with respect to
x is the Hessian of gᵀf, symmetric again: v ↦ S_g(v). Writing out J and S_g makes a
product run them as a few ops each.

`SymmetricDerivatives` records (with `record.record_operation`, TensorFlow's own
mechanism for its functions, as second_order.py records the resizes' gradients):
- `value(y)`: y = f(x), computed elsewhere without recording, as an op of x whose
  gradient and JVP are `jacobian_of`;
- `jacobian_of(g)`: J(g), an op of (g, x) whose derivatives are J (by g) and S_g (by x).
Subclasses write `jacobian(v)` and `hessian(g, o)` (S_g as a function of v, o = J(g)),
unrecorded. Derivatives of order three and more through these ops are not f's (the
written derivatives are constants to the tapes); products need two. Used by
activations.py (gelu, silu) and layer_norm.py; their tests check these derivatives
against TensorFlow's.

Softmax (attention's) was measured this way too, J(v) = y·(v − Σ y·v) and
S_g(v) = o·(v − Σ y·v) − y·Σ o·v: no faster than TensorFlow's own derivatives (1.005 and
1.004 of the time on the causal language model of benchmarks/PYHESSIAN.md, by forward
over backward and reverse over reverse; ad hoc, medians of 5 alternating products), so
attention keeps `tf.nn.softmax`.
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf
from tensorflow.python.eager import record


def float_tensor(x):
    """x as a dense floating-point tensor, or None where the original function should
    take it as it is (ragged and sparse tensors, and other dtypes: their errors)."""
    if isinstance(x, (tf.RaggedTensor, tf.SparseTensor)):
        return None
    x = tf.convert_to_tensor(x)
    return x if x.dtype.is_floating else None


class SymmetricDerivatives:
    """f of x whose Jacobian is symmetric, with J and S_g written out by a subclass."""

    name = "HessianTfFunction"

    def __init__(self, x: tf.Tensor):
        self.x = x

    def jacobian(self, v: tf.Tensor) -> tf.Tensor:
        """J(v), unrecorded."""
        raise NotImplementedError

    def hessian(self, g: tf.Tensor, o: tf.Tensor) -> Callable[[tf.Tensor], tf.Tensor]:
        """v ↦ S_g(v), the derivative of J(g) with respect to x (o = J(g)), unrecorded."""
        raise NotImplementedError

    def value(self, y: tf.Tensor) -> tf.Tensor:
        """y = f(x) (computed without recording) recorded as an op of x whose derivative
        is `jacobian_of`."""
        record.record_operation(self.name, [y], [self.x],
                                lambda upstream: [self.jacobian_of(upstream)],
                                lambda tangent: [self.jacobian_of(tangent)])
        return y

    def jacobian_of(self, g: tf.Tensor) -> tf.Tensor:
        """J(g), recorded as an op of (g, x): its derivative by g is J, by x S_g (both
        symmetric, so the same maps for gradients and JVPs)."""
        with record.stop_recording():
            o = self.jacobian(g)
        built = []  # S_g, built once, when a derivative first needs it

        def hessian_of_g(v: tf.Tensor) -> tf.Tensor:
            with record.stop_recording():
                if not built:
                    built.append(self.hessian(g, o))
                return built[0](v)

        def jacobian(v: tf.Tensor) -> tf.Tensor:
            with record.stop_recording():
                return self.jacobian(v)

        def backward(upstream):
            return [jacobian(upstream), hessian_of_g(upstream)]

        def forward(g_tangent, x_tangent):  # an input without a tangent gives None
            terms = []
            if g_tangent is not None:
                terms.append(jacobian(g_tangent))
            if x_tangent is not None:
                terms.append(hessian_of_g(x_tangent))
            with record.stop_recording():
                return [tf.add_n(terms) if terms else tf.zeros_like(o)]

        record.record_operation(self.name + "Grad", [o], [g, self.x], backward, forward)
        return o


class Elementwise(SymmetricDerivatives):
    """An element-wise f: J(v) = f′(x)·v, S_g(v) = g·f″(x)·v. `derivatives(x)` gives
    f′(x) and a function giving f″(x); both are built when a derivative first needs
    them (a forward pass alone runs none of their ops)."""

    def __init__(self, x: tf.Tensor, derivatives, name: str):
        super().__init__(x)
        self.name, self._derivatives, self._built = name, derivatives, []

    def _parts(self):
        if not self._built:
            with record.stop_recording():
                self._built.extend(self._derivatives(self.x))
        return self._built

    def jacobian(self, v):
        return v * self._parts()[0]

    def hessian(self, g, o):
        scale = g * self._parts()[1]()
        return lambda v: scale * v
