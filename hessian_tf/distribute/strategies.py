"""tf.distribute strategies from their names: the one place they are made."""

from __future__ import annotations

import json
import os

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


def check_tf_config() -> None:
    """Validates TF_CONFIG (as TFJob and hand-written launchers set it), if set."""
    text = os.environ.get("TF_CONFIG", "")
    if not text:
        return
    try:
        tf_config = json.loads(text)
        cluster = tf_config["cluster"]
        task = tf_config["task"]
        task_type, index = task["type"], int(task["index"])
        members = cluster[task_type]
        if not isinstance(members, list) or not 0 <= index < len(members):
            raise ValueError(f"task index {index} is not in cluster['{task_type}'] = {members}")
        for job, addresses in cluster.items():
            for address in addresses:
                host, _, port = str(address).rpartition(":")
                if not host or not port.isdigit():
                    raise ValueError(f"address {address!r} of job {job!r} is not HOST:PORT")
    except (ValueError, KeyError, TypeError) as error:
        detail = f"missing key {error}" if isinstance(error, KeyError) else str(error)
        raise ValueError(
            f"TF_CONFIG is malformed ({detail}); it must be JSON like "
            '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}.'
        ) from error


def cluster_resolver():
    """TF_CONFIG (also what Kubeflow's TFJob sets) if present, else Slurm's
    environment inside a Slurm job, else TF_CONFIG's resolver (a single worker)."""
    resolvers = tf.distribute.cluster_resolver
    if not os.environ.get("TF_CONFIG") and os.environ.get("SLURM_JOB_ID"):
        return resolvers.SlurmClusterResolver()
    check_tf_config()
    return resolvers.TFConfigClusterResolver()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes results: the chief, or worker 0 without a chief."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    jobs = resolver.cluster_spec().as_dict()
    if "chief" in jobs:
        return resolver.task_type == "chief"
    return resolver.task_type in (None, "worker") and (resolver.task_id or 0) == 0


def _multi_worker(worker_timeout: float) -> tf.distribute.Strategy:
    resolver = cluster_resolver()
    # A collective that waits longer than this for a peer fails instead of hanging.
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=worker_timeout)
    return tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=resolver, communication_options=options
    )


def make_strategy(
    name: str, *, num_cpu_devices: int = 0, tpu: str = "", worker_timeout: float = 600.0
) -> tf.distribute.Strategy:
    """Returns the strategy called `name`.

    default: TF's default (no distribution); one_device: the first GPU, else CPU;
    mirrored: all local GPUs, else all logical CPU devices; multi_worker: one
    replica set per worker, membership from TF_CONFIG or Slurm (collectives and
    the wait for peers time out after `worker_timeout` seconds); tpu: TPUStrategy.
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
        if worker_timeout <= 0:
            raise ValueError(
                f"--worker_timeout={worker_timeout}: pass a positive number of seconds."
            )
        return _multi_worker(worker_timeout)
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or None)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)
