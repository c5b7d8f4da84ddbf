"""tf.distribute strategies from their names: the one place they are made."""

from __future__ import annotations

import tensorflow as tf

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")


def configure_cpu_devices(num_cpu_devices: int) -> None:
    """Splits the CPU into `num_cpu_devices` logical devices (before TF starts)."""
    if num_cpu_devices < 1:
        raise ValueError(
            f"--num_cpu_devices={num_cpu_devices}: pass at least 1 (or 0 to leave the "
            "CPU as it is)."
        )
    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration()] * num_cpu_devices
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == num_cpu_devices:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, wanted)
    except RuntimeError as error:
        raise ValueError(
            f"--num_cpu_devices={num_cpu_devices}: TensorFlow has already started its "
            "devices; set it before any TensorFlow work (at the start of the program)."
        ) from error


def make_strategy(
    name: str, *, num_cpu_devices: int = 0, tpu: str = ""
) -> tf.distribute.Strategy:
    """Returns the strategy called `name`.

    default: TF's default (no distribution); one_device: the first GPU, else CPU;
    mirrored: all local GPUs, else all logical CPU devices; multi_worker: one
    replica set per worker, membership from TF_CONFIG; tpu: TPUStrategy.
    """
    if name not in STRATEGIES:
        raise ValueError(f"--strategy={name!r} is not a strategy; use one of {STRATEGIES}.")
    if tpu and name != "tpu":
        raise ValueError(f"--tpu={tpu} needs --strategy=tpu (got --strategy={name}).")
    if num_cpu_devices:
        configure_cpu_devices(num_cpu_devices)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or None)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)
