"""Model definitions used by the embedded default job, tests, configs and benchmarks."""

from hessian_tf.models.mlp import mlp, train_briefly
from hessian_tf.models.resnet import resnet18, resnet32
