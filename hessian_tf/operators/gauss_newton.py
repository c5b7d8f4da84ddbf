"""The generalised Gauss-Newton matrix and the empirical Fisher, as matvecs.

Both are built as Jᵀ Λ J for the Jacobian J of a vector-valued function of θ over a
batch, so one product costs one Jacobian-vector product (J v), a small product on
that function's values (Λ), and one vector-Jacobian product (Jᵀ u):

- GGN: G = (1/N) Σ_b J_bᵀ H_ℓ J_b, where J_b = ∂f(X_b; θ)/∂θ is the Jacobian of the
  batch's outputs and H_ℓ = ∂²(Σᵢ ℓ(zᵢ, yᵢ))/∂z² the Hessian of the summed loss
  with respect to those outputs (block diagonal over examples). H = G + Σᵢ
  (∂ℓ/∂zᵢ) ∂²zᵢ/∂θ², so G equals the Hessian when f is linear in θ; G is symmetric
  positive semi-definite whenever ℓ is convex in z (cross-entropy on logits, MSE).
  With `regularization=True` the exact Hessian of the model's own losses (weight
  regularizers) is added.
- Empirical Fisher: F = (1/N) Σᵢ gᵢ gᵢᵀ with gᵢ = ∇_θ ℓ(f(xᵢ; θ), yᵢ), the
  per-example gradients. With J_ℓ the Jacobian of the batch's per-example loss
  vector (rows gᵢᵀ), F v = (1/N) Σ_b J_ℓᵀ (J_ℓ v): no per-example gradient is
  ever stored.

The data handling (exact weighting of uneven batches, BN modes, strategies, one
all-reduce per product) is HessianOperator's; only the per-batch product differs.
With bn_mode='train' an example's outputs depend on its whole batch, and J is the
Jacobian of the batch's outputs (so G and F are, like H, defined by the batching).

Methods: 'forward_over_backward' computes J v in forward mode
(tf.autodiff.ForwardAccumulator); 'reverse_over_reverse' computes it as the
derivative of a vector-Jacobian product with respect to its cotangent (for models
whose forward mode is missing, such as loaded SavedModels).
"""

from __future__ import annotations

import contextlib

import tensorflow as tf

from hessian_tf.operators.hessian import HessianOperator

_ZERO = tf.UnconnectedGradients.ZERO


def _inner_product(gradients, tangents):
    return tf.add_n(
        [tf.reduce_sum(g * tf.cast(t, g.dtype)) for g, t in zip(gradients, tangents)]
    )


class _JacobianProductOperator(HessianOperator):
    """v ↦ (1/N) Σ_b J_bᵀ Λ_b J_b v for the Jacobian J_b of `_values` on a batch."""

    def _values(self, outputs, y):
        """The vector-valued function of the outputs whose Jacobian is J."""
        raise NotImplementedError

    def _curvature_product(self, values, y, direction):
        """Λ applied to J v (values' shape)."""
        raise NotImplementedError

    def _batch_values(self, primals, state, x, y):
        """(the values whose Jacobian is J, n_b · R(θ)) on one batch."""
        outputs, regularization = self.model_function(primals, state, x, bn_mode=self.bn_mode)
        count = tf.cast(tf.shape(x)[0], regularization.dtype)
        return self._values(outputs, y), count * regularization

    @staticmethod
    def _auto_method(model_function) -> str:
        # J v is a forward-mode product: one forward pass, where reverse mode
        # needs a double backward pass.
        return (
            "forward_over_backward" if model_function.supports_forward_mode
            else "reverse_over_reverse"
        )

    def _untimed_because(self) -> str:
        return "'auto' is forward mode wherever it runs"  # _auto_method

    def _batch_products(self, primals, state, block, x, y, method=None):
        return [self._batch_product(primals, state, tangents, x, y, method=method)
                for tangents in block]

    def _batch_product(self, primals, state, tangents, x, y, method=None):
        method = method or self.method
        forward = method == "forward_over_backward"
        with contextlib.ExitStack() as stack:
            # Only with regularization: a second-order tape for ∇²R v.
            outer = stack.enter_context(tf.GradientTape()) if self.regularization else None
            if outer is not None:
                outer.watch(primals)
            with tf.GradientTape(persistent=outer is not None or not forward) as tape:
                tape.watch(primals)
                if forward:
                    with tf.autodiff.ForwardAccumulator(primals, tangents) as accumulator:
                        values, regularization = self._batch_values(primals, state, x, y)
                    jvp = accumulator.jvp(values)
                else:
                    values, regularization = self._batch_values(primals, state, x, y)
            if outer is not None:
                regularization_gradient = tape.gradient(
                    regularization, primals, unconnected_gradients=_ZERO
                )
                regularization_inner = _inner_product(regularization_gradient, tangents)
        if not forward:
            # J v = ∂/∂u ⟨Jᵀ u, v⟩: Jᵀ u is linear in the cotangent u.
            cotangent = tf.zeros_like(values)
            with tf.GradientTape() as dual:
                dual.watch(cotangent)
                pulled = tape.gradient(
                    values, primals, output_gradients=cotangent, unconnected_gradients=_ZERO
                )
                inner = _inner_product(pulled, tangents)
            jvp = dual.gradient(inner, cotangent)
        if jvp is None:
            # A silent None is how forward mode fails through loaded functions.
            raise ValueError(
                f"method={method}: the Jacobian-vector product came back None "
                "(forward mode does not reach the outputs); use "
                "method='reverse_over_reverse'."
            )
        weighted = self._curvature_product(values, y, jvp)
        products = tape.gradient(
            values, primals, output_gradients=weighted, unconnected_gradients=_ZERO
        )
        if outer is not None:
            extra = outer.gradient(regularization_inner, primals, unconnected_gradients=_ZERO)
            products = [p + tf.cast(e, p.dtype) for p, e in zip(products, extra)]
        return products


class GaussNewtonOperator(_JacobianProductOperator):
    """v ↦ G v for the generalised Gauss-Newton matrix of the mean loss.

    Same arguments and interface as HessianOperator (`matvec`, `dim`,
    `num_examples`, `loss_and_gradient`, `check_determinism`).
    """

    name = "ggn"

    def _values(self, outputs, y):
        return outputs

    def _curvature_product(self, values, y, direction):
        # The loss as a function of the outputs alone: a leaf of its own tapes.
        outputs = tf.stop_gradient(values)
        direction = tf.cast(direction, outputs.dtype)
        with tf.GradientTape() as outer:
            outer.watch(outputs)
            with tf.GradientTape() as inner:
                inner.watch(outputs)
                loss = tf.reduce_sum(self._loss(y, outputs))
            gradient = inner.gradient(loss, outputs)
            projected = tf.reduce_sum(gradient * direction)
        return outer.gradient(projected, outputs, unconnected_gradients=_ZERO)


class EmpiricalFisherOperator(_JacobianProductOperator):
    """v ↦ F v for the empirical Fisher (1/N) Σᵢ gᵢ gᵢᵀ of per-example gradients.

    Same arguments and interface as HessianOperator, except that
    `regularization=True` is refused: the Fisher is a second moment of the data
    loss's gradients, and adding a regularizer's Hessian to it would be neither.
    """

    name = "fisher"

    def __init__(self, *args, regularization: bool = False, **kwargs):
        if regularization:
            raise ValueError(
                "--operator=fisher with --regularization: the empirical Fisher is built "
                "from the per-example gradients of the data loss only; turn "
                "regularization off, or use --operator=ggn or --operator=hessian."
            )
        super().__init__(*args, regularization=False, **kwargs)

    def _values(self, outputs, y):
        return self._loss(y, outputs)

    def _curvature_product(self, values, y, direction):
        return tf.cast(direction, values.dtype)


OPERATORS = {
    "hessian": HessianOperator,
    "ggn": GaussNewtonOperator,
    "fisher": EmpiricalFisherOperator,
}


def operator_class(name: str, base: type = HessianOperator) -> type:
    """The class of operator `name` ('hessian', 'ggn' or 'fisher') on the data
    handling of `base`, a HessianOperator subclass that changes only where the
    batches come from (e.g. StreamingHessianOperator): the per-batch product is
    the operator's, the loop over data is base's."""
    if name not in OPERATORS:
        raise ValueError(
            f"--operator={name!r} is not an operator; use one of {sorted(OPERATORS)}."
        )
    if not (isinstance(base, type) and issubclass(base, HessianOperator)):
        raise TypeError(f"base={base!r} is not a HessianOperator subclass.")
    operator = OPERATORS[name]
    if base is HessianOperator or operator is HessianOperator:
        return base if operator is HessianOperator else operator
    return type(f"{base.__name__}{operator.__name__}", (operator, base), {})


def make_operator(name: str, model_function, x, y, **kwargs) -> HessianOperator:
    """The operator called `name` ('hessian', 'ggn' or 'fisher') on in-memory data;
    keyword arguments as for HessianOperator."""
    return operator_class(name)(model_function, x, y, **kwargs)
