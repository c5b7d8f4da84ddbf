"""Strategies from names, cluster membership, and who writes results."""

from hessian_tf.distribute.strategies import (
    STRATEGIES,
    check_tf_config,
    cluster_resolver,
    configure_cpu_devices,
    is_chief,
    make_strategy,
)
