"""The spectrum job's configuration: every option, with the embedded default job."""

from __future__ import annotations

import math
import re

import ml_collections
import numpy as np

from hessian_tf.choices import (
    BN_MODES, LOSS_NAMES, METHODS, PRECISIONS, STRATEGIES, check_cpu_threads,
    check_graph_optimization, check_steps, is_integer, is_number)


def default_config() -> ml_collections.ConfigDict:
    """The embedded default job: the paper's one-hidden-layer MLP (16,510
    parameters) trained briefly on scikit-learn's digits, then its spectrum, m = 90.
    """
    config = ml_collections.ConfigDict()
    # Model: a .keras file or a SavedModel directory; empty = train the embedded
    # default MLP on the dataset first (saved as OUTPUT_DIR/model.keras).
    config.model = ""
    # Comma-separated Python modules imported before the model is loaded: the ones
    # that register its custom layers (keras.saving.register_keras_serializable).
    config.import_modules = ""
    config.default_model_epochs = 20
    # Data: 'digits', 'npz:PATH' or 'tfds:NAME[/CONFIG]' (with split, data_dir).
    config.dataset = "digits"
    config.split = "train"
    config.data_dir = ""
    config.batch_size = 128
    # Stream a tfds dataset from data_dir at every product instead of holding it in
    # memory (ImageNet); preprocessing: 'scale' (to [0, 1]) or 'imagenet'.
    config.stream = False
    config.preprocessing = "scale"
    # Print the cost (products, data read, basis memory, time from one batch) and stop.
    config.dry_run = False
    # The loss whose Hessian is taken; regularization adds the model's own losses.
    config.loss = "sparse_categorical_crossentropy"
    config.regularization = False
    # The curvature operator: 'hessian', 'ggn' (generalised Gauss-Newton) or 'fisher'
    # (empirical Fisher); variables: a regex (re.search on variable paths) that
    # restricts θ to the matching variables ('' = all).
    config.operator = "hessian"
    config.variables = ""
    config.bn_mode = "inference"
    # Products: 'auto', 'forward_over_backward' or 'reverse_over_reverse'.
    config.method = "auto"
    # 'model': products in the model's own dtype (float32 usually; float16 or bfloat16
    # under a mixed-precision policy, with a warning); 'float32': a float32 copy of a
    # Keras model; 'float64': a float64 copy (about 2x slower on CPU, ~1e-15 relative
    # error).
    config.precision = "model"
    # Compute the part of each batch's product that does not depend on the vector
    # (forward pass, backward signals) once and keep it for the whole run: faster
    # steps on conv nets (ResNet-32: 14% with inference BN, 31% with train BN) for
    # memory (6-8 MiB per ResNet-32 example); one device, in-memory data only.
    config.cache_residuals = False
    # Keras recurrent layers (LSTM, GRU, ...) run unrolled in the products over
    # sequences of at most this many steps (0: never): the same function as Keras's
    # while loop, about half the product time, and forward mode runs through it; the
    # trace takes ~0.1 s longer per step (benchmarks/recurrent.py).
    config.unroll_steps = 64
    config.check_determinism = True
    # Lanczos.
    config.lanczos_steps = 90
    config.num_draws = 1
    # Draws advanced together, one block of products (one data pass) per step; 0:
    # automatic, up to 8 draws whose Lanczos bases fit in a quarter of the memory.
    config.lockstep_draws = 0
    config.seed = 0
    config.basis_dtype = "float64"
    # Analyses: top eigenvalues with residual bounds (no extra products); Hutch++
    # trace (trace_matvecs products); the fraction of the gradient in the top
    # eigenspace (lanczos_steps more products, num_eigenpairs·n·8 bytes of vectors).
    config.num_eigenpairs = 5
    config.trace = False
    config.trace_matvecs = 30
    config.gradient_overlap = False
    # Density: kernel_width 0 means 0.002 × (λmax − λmin).
    config.kernel_width = 0.0
    config.num_grid_points = 4096
    # Distribution.
    config.strategy = "default"
    config.num_cpu_devices = 0
    # TensorFlow's CPU thread pools: threads per op, and ops run at once. intra_op 0:
    # automatic, 1 on a host of at most 2 cores without GPU or TPU (unless
    # TF_NUM_INTRAOP_THREADS is set; where it was measured), else TensorFlow's choice;
    # inter_op 0: TensorFlow's choice (one per core). ResNet-sized nets with train BN
    # on such a host: pass the number of cores (README, "Chosen by measurement").
    config.intra_op_threads = 0
    config.inter_op_threads = 0
    # Grappler's set-up of the job's graphs: auto (light unless a GPU is visible or
    # the strategy is tpu: one round, no memory or layout optimiser; a deep graph's
    # first run measured in about 0.6 of the time, products as fast), light, or full
    # (TensorFlow's).
    config.graph_optimization = "auto"
    config.tpu = ""
    # multi_worker: seconds to wait for every worker to join, and for any collective.
    config.worker_timeout = 600.0
    config.output_dir = "results/spectrum"
    # A checkpoint of the Lanczos state every this many products (0: never), in
    # OUTPUT_DIR/checkpoints, but not sooner than checkpoint_seconds after the last
    # (a short job is not slowed by saves); re-running the same command resumes.
    config.checkpoint_every = 10
    config.checkpoint_seconds = 60.0
    # Ignore (and delete) existing checkpoints and start over.
    config.restart = False
    return config


def merged_over_defaults(section: ml_collections.ConfigDict, *, where: str = "",
                         keep_defaults_for_none: bool = False) -> ml_collections.ConfigDict:
    """A config's spectrum options merged over `default_config()` (options it leaves
    out keep their defaults), as hessian-spectrum runs them. An unknown option is a
    ValueError (its line begins with `where`, if given); with keep_defaults_for_none,
    options set to None (placeholders that are filled when hessian-spectrum runs) keep
    their defaults too. A value of another type than its default's may raise
    ml_collections' TypeError."""
    merged = default_config()
    unknown = sorted(set(section.keys()) - set(merged.keys()))
    if unknown:
        raise ValueError(
            f"{where + ': ' if where else ''}unknown option(s) {unknown}; hessian-spectrum "
            f"knows {sorted(merged.keys())}."
        )
    merged.update({name: value for name, value in section.to_dict().items()
                   if value is not None or not keep_defaults_for_none})
    return merged


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
# Whether a value is of a kind: integers count as real numbers; a bool as neither.
_FITS = {bool: lambda value: isinstance(value, (bool, np.bool_)), int: is_integer,
         float: is_number, str: lambda value: isinstance(value, str)}


def check_types(config: ml_collections.ConfigDict) -> None:
    """Every option of the config holds a value of its default's type (a config file
    may set one to None, or to a value of another type where ml_collections lets it)."""
    for name, default in default_config().items():
        value = config[name]
        kind = type(default)
        if not _FITS[kind](value):
            raise ValueError(
                f"--{name}={value!r}: pass {_KINDS[kind]} (the default is {default!r})."
            )
        if kind is float and not math.isfinite(value):
            raise ValueError(f"--{name}={value}: pass a finite number (the default is "
                             f"{default!r}).")
        if kind is int and not -2**63 <= value < 2**63:  # NumPy's and TensorFlow's int64
            raise ValueError(f"--{name}={value}: pass an integer below 2**63 (the default "
                             f"is {default!r}).")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the option, the value and the fix."""
    check_types(config)
    positive = ("lanczos_steps", "num_draws", "batch_size", "num_grid_points", "num_eigenpairs")
    for name in positive:
        if config[name] < 1:
            raise ValueError(f"--{name}={config[name]}: pass an integer >= 1.")
    if config.seed < 0:
        raise ValueError(f"--seed={config.seed}: pass an integer >= 0 (NumPy's seeds).")
    if config.lockstep_draws < 0:
        raise ValueError(
            f"--lockstep_draws={config.lockstep_draws}: pass a number of draws >= 1, or 0 "
            "for automatic."
        )
    if config.num_grid_points < 2:
        raise ValueError(f"--num_grid_points={config.num_grid_points}: pass at least 2.")
    if config.kernel_width < 0:
        raise ValueError(
            f"--kernel_width={config.kernel_width}: pass a positive width, or 0 for the default."
        )
    check_cpu_threads(config.intra_op_threads, config.inter_op_threads)
    check_graph_optimization(config.graph_optimization)
    if config.num_cpu_devices < 0:
        raise ValueError(
            f"--num_cpu_devices={config.num_cpu_devices}: pass at least 1 (or 0 to leave "
            "the CPU as it is)."
        )
    if config.trace_matvecs < 3:
        raise ValueError(
            f"--trace_matvecs={config.trace_matvecs}: Hutch++ needs at least 3 products."
        )
    # Options of one feature, given without it, would be dropped without a word.
    defaults = default_config()
    if config.trace_matvecs != defaults.trace_matvecs and not config.trace:
        raise ValueError(
            f"--trace_matvecs={config.trace_matvecs} without --trace: no trace is estimated; "
            "pass --trace too, or drop --trace_matvecs."
        )
    if config.preprocessing != defaults.preprocessing and not config.stream:
        raise ValueError(
            f"--preprocessing={config.preprocessing} without --stream: it applies to streamed "
            "tfds data only; pass --stream too, or drop --preprocessing."
        )
    if config.model and config.default_model_epochs != defaults.default_model_epochs:
        raise ValueError(
            f"--default_model_epochs={config.default_model_epochs} (the flag's, or set by "
            f"--config) with --model={config.model}: it trains the embedded default MLP, "
            f"which --model replaces; drop it, or pass --default_model_epochs="
            f"{defaults.default_model_epochs} over a --config that sets it.")
    # Checked again where they are used; here too, so that --check_flags (which stops
    # before TensorFlow starts) and a dry run refuse them.
    if not config.output_dir:
        raise ValueError("--output_dir is empty; pass a directory to write results to.")
    if config.variables:
        try:
            re.compile(config.variables)
        except re.error as error:
            raise ValueError(f"--variables={config.variables!r} is not a valid regular "
                             f"expression ({error}); pass a pattern of variable paths "
                             "(re.search), e.g. --variables=dense.") from error
    if config.worker_timeout <= 0:
        raise ValueError(
            f"--worker_timeout={config.worker_timeout}: pass a positive number of seconds."
        )
    if config.checkpoint_seconds < 0:
        raise ValueError(
            f"--checkpoint_seconds={config.checkpoint_seconds}: pass a number of seconds >= 0."
        )
    if config.checkpoint_every < 0:
        raise ValueError(
            f"--checkpoint_every={config.checkpoint_every}: pass a number of products >= 1, "
            "or 0 for no checkpoints."
        )
    check_steps(config.unroll_steps)  # the message KerasModelFunction gives
    if config.default_model_epochs < 0:
        raise ValueError(f"--default_model_epochs={config.default_model_epochs}: pass >= 0.")
    choices = {
        "bn_mode": BN_MODES,
        "loss": LOSS_NAMES,
        "method": METHODS,
        "strategy": STRATEGIES,
        "basis_dtype": ("float64", "float32"),
        "operator": ("hessian", "ggn", "fisher"),
        "precision": PRECISIONS,
        "preprocessing": ("scale", "imagenet"),
    }
    for name, allowed in choices.items():
        if config[name] not in allowed:
            raise ValueError(f"--{name}={config[name]!r} is not valid; use one of {list(allowed)}.")
    if config.cache_residuals and config.stream:
        raise ValueError(
            "--cache_residuals: not with --stream (streamed data does not stay in memory, "
            "and neither could its residuals); leave one of them off."
        )
    if config.import_modules and not config.model:
        raise ValueError(
            f"--import_modules={config.import_modules} goes with --model (the modules that "
            "register its custom layers); pass --model, or drop --import_modules."
        )
    if config.strategy == "multi_worker" and not config.model:
        raise ValueError(
            "--strategy=multi_worker needs --model: every worker must load the same "
            "model (the embedded default is trained per process)."
        )
    if config.stream and (not config.dataset.startswith("tfds:") or not config.model):
        raise ValueError(
            f"--stream reads a tfds dataset at every product; got --dataset="
            f"{config.dataset} --model={config.model or '(empty)'}: pass --dataset="
            "tfds:NAME and --model, or drop --stream."
        )
    if not config.dataset.startswith("tfds:"):
        # digits and npz data are read whole; a split or directory would be ignored.
        fixes = {"split": "drop --split, or save only the examples you want",
                 "data_dir": "drop --data_dir (a config that sets it for a tfds dataset: "
                             "set its data_dir to '')"}
        for name, default in (("split", "train"), ("data_dir", "")):
            if config[name] != default:
                raise ValueError(
                    f"--{name}={config[name]} goes with --dataset=tfds:NAME (got "
                    f"--dataset={config.dataset}, which is read whole); {fixes[name]}."
                )
    if config.stream and config.precision != "model":
        raise ValueError(f"--stream with --precision={config.precision} is not supported; "
                         "use --precision=model.")
    if config.tpu and config.strategy != "tpu":
        raise ValueError(f"--tpu={config.tpu} needs --strategy=tpu (got --strategy={config.strategy}).")
