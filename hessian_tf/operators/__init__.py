"""Curvature operators: (model, loss, data, strategy, bn_mode) → matvec."""

from hessian_tf.operators.flat_parameters import flatten, num_parameters, unflatten
from hessian_tf.operators.hessian import (
    HessianOperator,
    NonDeterministicError,
    NonFiniteError,
    deal_batches,
    dense_matrix,
)
from hessian_tf.operators.losses import LOSSES, get_loss
from hessian_tf.operators.model_function import (
    BN_MODES,
    KerasModelFunction,
    SavedModelFunction,
    batch_norm_in_train_mode,
)
