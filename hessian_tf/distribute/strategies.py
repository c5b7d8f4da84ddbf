"""tf.distribute strategies from their names: the one place they are made."""

from __future__ import annotations

import contextlib
import json
import os
import threading

import tensorflow as tf

from hessian_tf.choices import (  # noqa: F401  (the names live without TensorFlow)
    GRAPH_OPTIMIZATIONS, STRATEGIES, check_cpu_threads, check_graph_optimization)
from hessian_tf.host import usable_cores
from hessian_tf.messages import first_line


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


def configure_cpu_threads(intra_op_threads: int, inter_op_threads: int) -> None:
    """Sets TensorFlow's CPU thread pools (before TF starts): threads per op and ops
    run at once; 0 leaves a pool as it is."""
    check_cpu_threads(intra_op_threads, inter_op_threads)
    threading = tf.config.threading
    for value, get, set_ in (
        (intra_op_threads, threading.get_intra_op_parallelism_threads,
         threading.set_intra_op_parallelism_threads),
        (inter_op_threads, threading.get_inter_op_parallelism_threads,
         threading.set_inter_op_parallelism_threads),
    ):
        if not value or get() == value:
            continue
        try:
            set_(value)
        except RuntimeError as error:
            raise ValueError(
                f"--intra_op_threads={intra_op_threads} --inter_op_threads="
                f"{inter_op_threads}: TensorFlow has already started; set them before any "
                "TensorFlow work (at the start of the program)."
            ) from error


# The automatic choice holds where it was measured: hosts of at most this many cores.
AUTOMATIC_MAX_CORES = 2


def automatic_cpu_threads(strategy: str) -> None:
    """One thread per op, ops side by side (one per core), on a host of at most
    AUTOMATIC_MAX_CORES usable cores and no GPU or TPU, unless TF_NUM_INTRAOP_THREADS
    says otherwise. On 2 cores a Lanczos step took 0.57-0.76 of its time under
    TensorFlow's choice on six digits networks, and a product 0.98 of it on ResNet-32
    with inference BN but 1.09-1.16 with train BN (README, "Chosen by measurement"). Larger
    hosts were not measured, so they keep TensorFlow's choice. Once TensorFlow has
    started (a job run inside a program that already used it), its pools stay as
    they are."""
    if (strategy == "tpu" or os.environ.get("TF_NUM_INTRAOP_THREADS")
            or usable_cores() > AUTOMATIC_MAX_CORES
            or tf.config.list_physical_devices("GPU")):
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
    except RuntimeError:
        pass


def light_graph_optimization(mode: str, *, tpu: bool = False) -> bool:
    """Whether `graph_optimization` lightens Grappler for `mode` (`tpu`: under a
    TPUStrategy)."""
    check_graph_optimization(mode)
    if mode != "auto":
        return mode == "light"
    return not tpu and not tf.config.list_physical_devices("GPU")


# Whether this thread is inside a light `graph_optimization`.
_LIGHT = threading.local()


@contextlib.contextmanager
def graph_optimization(mode: str, *, tpu: bool = False):
    """Grappler's configuration for the functions called inside, on this thread; the
    calling program's functions outside are untouched. A function is set up (traced
    graph optimised) at its first call under each configuration: one set up inside and
    called again outside is set up again by TensorFlow's, so every call of a graph
    belongs inside.

    light: one round of Grappler's optimisers instead of two, without the memory
    optimiser (whose swapping and recomputation serve GPU memory) and the layout
    optimiser (NCHW for GPU convolutions). On a CPU-only host of 2 cores the first run
    of DenseNet-121's product graph (121 layers; after its trace) took 8.2 s instead of
    14.0 s and of its gradient graph 3.7 s instead of 5.8 s; with the traces, the two
    graphs' set-up took 0.78 of the time, ResNet-32's 0.75, with products as fast
    (benchmarks/graph_setup.py, benchmarks/PYHESSIAN.md). full: the calling program's
    configuration as it is (TensorFlow's, unless the caller changed it). auto: light
    unless a GPU is visible or `tpu` (where it was measured), else full. Yields whether
    light."""
    light = light_graph_optimization(mode, tpu=tpu)
    if not light:
        yield False
        return
    from tensorflow.core.protobuf import rewriter_config_pb2

    def lighten(rewrite):
        options = rewriter_config_pb2.RewriterConfig
        rewrite.meta_optimizer_iterations = options.ONE
        rewrite.memory_optimization = options.NO_MEM_OPT
        rewrite.layout_optimizer = options.OFF

    was_light = getattr(_LIGHT, "active", False)
    _LIGHT.active = True
    try:
        with _rewritten(lighten):
            yield True
    finally:
        _LIGHT.active = was_light


@contextlib.contextmanager
def _rewritten(change):
    """This thread's function call options with `change(rewrite_options)` applied."""
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.eager import context

    eager = context.context()
    previous = eager.function_call_options
    config = config_pb2.ConfigProto()
    config.ParseFromString(previous.config_proto_serialized)
    change(config.graph_options.rewrite_options)
    eager.function_call_options = context.FunctionCallOptions(
        executor_type=previous.executor_type, config_proto=config)
    try:
        yield
    finally:
        eager.function_call_options = previous


@contextlib.contextmanager
def run_once():
    """For a graph a job runs once (the loss and gradient over the data): inside a
    light `graph_optimization`, not optimised by Grappler at all, whose work would
    not be repaid. DenseNet-121's gradient graph: its first run 1.9 s without Grappler
    against 3.0 s light and 5.1 s full; a later run would take 0.48 s against 0.43 s
    (ad hoc, one process each). Elsewhere it changes nothing."""
    if not getattr(_LIGHT, "active", False):
        yield
        return

    def switch_off(rewrite):
        rewrite.disable_meta_optimizer = True

    with _rewritten(switch_off):
        yield


def cpu_threads() -> dict:
    """TensorFlow's CPU thread pools as set: by the job, else by TF_NUM_INTRAOP_THREADS /
    TF_NUM_INTEROP_THREADS (which TensorFlow reads when it starts), else 0 (TensorFlow's
    choice, one per core)."""
    threading = tf.config.threading
    values = {"intra_op": threading.get_intra_op_parallelism_threads(),
              "inter_op": threading.get_inter_op_parallelism_threads()}
    for key, variable in (("intra_op", "TF_NUM_INTRAOP_THREADS"),
                          ("inter_op", "TF_NUM_INTEROP_THREADS")):
        if not values[key] and os.environ.get(variable, "").isdigit():
            values[key] = int(os.environ[variable])
    return values


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
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=resolver, communication_options=options
        )
    except tf.errors.UnknownError as error:
        if "Could not start gRPC server" not in str(error):
            raise
        address, task = _own_address(resolver)
        raise ValueError(
            f"TF_CONFIG: this process ({task}) could not serve at {address} ({error.message}):"
            " the port is in use by another process, or the host is not this machine's; "
            "free the port or give the task another address in TF_CONFIG's cluster."
        ) from error


def _own_address(resolver) -> tuple[str, str]:
    """This task's address in the cluster spec and its label (`worker 0`)."""
    task_type, task_id = resolver.task_type, resolver.task_id or 0
    try:
        address = resolver.cluster_spec().task_address(task_type, task_id)
    except (ValueError, KeyError, TypeError):
        address = "its address"
    return address, f"{task_type} {task_id}"


def wait_for_workers(strategy: tf.distribute.Strategy) -> None:
    """One all-reduce of a scalar over every replica: where a multi-worker job first
    waits for all its workers, cheaply, so that a deadline around it times the wait
    alone (around the first gradient it would also time a pass over the data, and end
    a long one that was no wait at all). Its collective group is the products' (one
    per set of devices), formed here."""

    @tf.function(autograph=False)
    def replicas():
        ones = strategy.run(lambda: tf.ones([], tf.float32))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, ones, axis=None)

    counted = float(replicas())
    if counted != strategy.num_replicas_in_sync:
        raise RuntimeError(
            f"waiting for the cluster: an all-reduce over {strategy.num_replicas_in_sync} "
            f"replicas counted {counted:g}")


def make_strategy(
    name: str, *, num_cpu_devices: int = 0, tpu: str = "", worker_timeout: float = 600.0,
    intra_op_threads: int = 0, inter_op_threads: int = 0,
) -> tf.distribute.Strategy:
    """Returns the strategy called `name`.

    default: TF's default (no distribution); one_device: the first GPU, else CPU;
    mirrored: all local GPUs, else all logical CPU devices; multi_worker: one
    replica set per worker, membership from TF_CONFIG or Slurm (collectives and
    the wait for peers time out after `worker_timeout` seconds); tpu: TPUStrategy.
    `intra_op_threads`, `inter_op_threads`: `configure_cpu_threads`; with
    `intra_op_threads` 0, `automatic_cpu_threads`.
    """
    if name not in STRATEGIES:
        raise ValueError(f"--strategy={name!r} is not a strategy; use one of {STRATEGIES}.")
    if tpu and name != "tpu":
        raise ValueError(f"--tpu={tpu} needs --strategy=tpu (got --strategy={name}).")
    configure_cpu_threads(intra_op_threads, inter_op_threads)
    if not intra_op_threads:
        automatic_cpu_threads(name)
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
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or None)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, OSError, RuntimeError, tf.errors.OpError) as error:  # the
        # resolver's (no name), urllib's (URLError: no such host) and the runtime's
        raise ValueError(
            f"--strategy=tpu --tpu={tpu}: no TPU found or reached ({type(error).__name__}: "
            f"{first_line(error, 200)}); pass the TPU's name or grpc:// address, which this "
            "host must reach (on a TPU VM, its name or local: launch/README.md)."
        ) from error
    return tf.distribute.TPUStrategy(resolver)
