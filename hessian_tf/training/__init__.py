"""Training with the Hessian spectrum along the way: `train(config, workdir)`.

See `hessian_tf.training.config` for the options and `configs/` for experiments.
"""

from hessian_tf.training.config import base_config, parse_variants, validate
from hessian_tf.training.loop import resolve, train

__all__ = ["base_config", "parse_variants", "resolve", "train", "validate"]
