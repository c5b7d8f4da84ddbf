"""Strategies from names."""

from hessian_tf.distribute.strategies import STRATEGIES, configure_cpu_devices, make_strategy
