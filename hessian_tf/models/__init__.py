"""Model definitions used by the embedded default job, tests and benchmarks."""

from hessian_tf.models.mlp import mlp, train_briefly
