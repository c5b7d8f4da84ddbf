"""Strategies from names, cluster membership, and who writes results."""

from hessian_tf.distribute.strategies import (
    GRAPH_OPTIMIZATIONS,
    STRATEGIES,
    automatic_cpu_threads,
    check_cpu_threads,
    check_graph_optimization,
    check_tf_config,
    cluster_resolver,
    configure_cpu_devices,
    configure_cpu_threads,
    cpu_threads,
    graph_optimization,
    is_chief,
    make_strategy,
    wait_for_workers,
)
