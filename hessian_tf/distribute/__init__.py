"""Strategies from names, cluster membership, and who writes results."""

from hessian_tf.distribute.strategies import (
    STRATEGIES,
    automatic_cpu_threads,
    check_cpu_threads,
    check_tf_config,
    cluster_resolver,
    configure_cpu_devices,
    configure_cpu_threads,
    cpu_threads,
    is_chief,
    make_strategy,
)
