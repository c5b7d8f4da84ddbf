r"""Hessian eigenvalue density of a model's training loss.

  hessian-spectrum --model=model.keras --dataset=npz:data.npz --output_dir=out
  hessian-spectrum --config=configs/mlp_digits.py --lanczos_steps=30

Writes OUTPUT_DIR/spectrum.npz, summary.json and density.png. Exit status:
  0   all three were written whole;
  2   bad input or a failure: one line on stderr, nothing written;
  75  preempted (SIGTERM): a checkpoint was written; run the same command to resume.
Long jobs checkpoint every --checkpoint_every products (at most once per
--checkpoint_seconds) under OUTPUT_DIR/checkpoints and resume from there when re-run;
--restart starts over.
"""

import json
import os
import sys

from absl import flags

from hessian_tf import config as config_lib
from hessian_tf.bin import (
    define_config_file, error_line, import_tensorflow_quietly, interrupted_line,
    job_error_message, loaded_config, run_program)

_PROGRAM = "hessian-spectrum"
# Errors whose own text is the one line of a bad input (a job's, a config file's).
_TOLD = (ValueError, OSError, KeyError, RuntimeError)
_DEFAULTS = config_lib.default_config()
_CONFIG = define_config_file(
    _PROGRAM, "An ml_collections config file (flags given explicitly override it)."
)
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks of errors.")
_CHECK_FLAGS = flags.DEFINE_bool(
    "check_flags", False, "Check the flags and the --config file, then exit (0, or 2 with "
    "the error line) before TensorFlow starts: launchers check once before starting workers.")

_HELP = {
    "model": "A .keras file or a SavedModel directory; empty: train the default MLP.",
    "import_modules": "Comma-separated Python modules to import before loading --model "
    "(those that register its custom Keras layers).",
    "default_model_epochs": "Epochs of training for the embedded default MLP.",
    "dataset": "'digits', 'npz:PATH' (arrays x, y) or 'tfds:NAME[/CONFIG]'.",
    "stream": "Stream the tfds dataset from --data_dir at every product (data larger than memory).",
    "preprocessing": "With --stream: 'scale' (integers to [0, 1]) or 'imagenet' (resize, crop, normalise).",
    "dry_run": "Print the job's cost (products, data read, basis memory, time estimate) and stop.",
    "split": "The tfds split, e.g. 'train' or 'train[:10%]'.",
    "data_dir": "The tfds data directory (a local path or a bucket).",
    "batch_size": "Examples per batch (per replica); defines BN statistics in train mode.",
    "loss": "sparse_categorical_crossentropy (logits; a class per example, or per pixel or "
            "token, averaged over them as Keras does), categorical_crossentropy, "
            "binary_crossentropy (logits; 0/1 targets or probabilities), mean_squared_error.",
    "regularization": "Add the model's own losses (weight regularizers) to the loss.",
    "operator": "hessian, ggn (generalised Gauss-Newton) or fisher (empirical Fisher).",
    "variables": "A regex over variable paths: restrict the parameters to the matching variables.",
    "num_eigenpairs": "Top eigenvalues in summary.json, with residual bounds and converged flags.",
    "trace": "Also estimate the trace by Hutch++ (costs --trace_matvecs products).",
    "trace_matvecs": "Products for Hutch++.",
    "gradient_overlap": "Fraction of the gradient in the top eigenspace (costs --lanczos_steps products).",
    "bn_mode": "inference: BN uses moving statistics; train: statistics of each batch.",
    "method": "Products by forward_over_backward or reverse_over_reverse; auto: for the "
    "Hessian, the faster of the two over the first 4 batches, timed at start-up (Keras "
    "models on in-memory data, one worker, no TPU, no --cache_residuals; forward mode only "
    "where the job's products could repay its set-up, see method_note; else reverse over "
    "reverse; a resumed run keeps its checkpoint's); for ggn and fisher, forward mode; "
    "reverse over reverse where forward mode does not run (Keras LSTM, GRU over sequences "
    "longer than --unroll_steps).",
    "precision": "model: products in the model's dtype (a mixed-precision policy's compute "
    "dtype); float32, float64: in a copy of the model in that dtype (float32: a model "
    "trained in float16 or bfloat16, to float32's precision; on a CPU also faster).",
    "check_determinism": "Compute the first product twice and fail if they differ (where "
    "the data in memory are more than 4 batches per replica, over only the first few).",
    "cache_residuals": "Keep each batch's vector-free part of the product (forward pass, "
    "backward signals) for the whole run: faster steps for memory (one device, in-memory data).",
    "unroll_steps": "Unroll Keras recurrent layers (LSTM, GRU, ...) in the products over "
    "sequences of at most this many steps (0: never): about half the product time, longer "
    "traces.",
    "lanczos_steps": "Lanczos order m.",
    "num_draws": "Independent Gaussian start vectors, averaged.",
    "lockstep_draws": "Draws run together, sharing each pass over the data (0: automatic, up to 8).",
    "seed": "Seed of the start vectors (and of the default model's training).",
    "basis_dtype": "Storage of the Lanczos basis: float64 or float32 (half the memory).",
    "kernel_width": "Gaussian kernel width sigma; 0: 0.002 x (lambda_max - lambda_min).",
    "num_grid_points": "Points of the density grid.",
    "strategy": "default, one_device, mirrored, multi_worker or tpu.",
    "num_cpu_devices": "Split the CPU into N logical devices (0: leave it).",
    "intra_op_threads": "TensorFlow CPU threads per op (0: automatic, 1 on a host of at most "
    "2 cores without GPU or TPU, else TensorFlow's choice).",
    "inter_op_threads": "TensorFlow CPU ops run at once (0: TensorFlow's choice).",
    "graph_optimization": "Grappler's set-up of the job's graphs: light (one round, no memory "
    "or layout optimiser: a deep graph's first run in about 0.6 of the time), full "
    "(TensorFlow's), or auto (light unless a GPU is visible or --strategy=tpu).",
    "tpu": "TPU name or address, with --strategy=tpu.",
    "worker_timeout": "multi_worker: seconds to wait for all workers, and for any all-reduce.",
    "checkpoint_every": "Checkpoint the Lanczos state every N products (0: never); re-run to resume.",
    "checkpoint_seconds": "...but not sooner than this many seconds after the last checkpoint.",
    "restart": "Delete existing checkpoints and start over.",
    "output_dir": "Where spectrum.npz, summary.json and density.png are written.",
}

for _name, _default in _DEFAULTS.items():
    _define = {
        bool: flags.DEFINE_bool,
        int: flags.DEFINE_integer,
        float: flags.DEFINE_float,
        str: flags.DEFINE_string,
    }[type(_default)]
    _define(_name, _default, _HELP[_name])


def resolve_config(flag_values=flags.FLAGS):
    """The config file (or the default), then every flag given explicitly."""
    config = loaded_config(_CONFIG) or config_lib.default_config()
    # An experiment config may hold both a training and a spectrum section.
    if "spectrum" in config:
        config = config.spectrum
    config = config_lib.merged_over_defaults(config.copy_and_resolve_references(),
                                             where="--config")
    for name in _DEFAULTS.keys():
        if flag_values[name].present:
            config[name] = flag_values[name].value
    return config


# The options of an experiment's train section that make its model: a workdir trained
# with others holds another model than the --config's.
_MODEL_OPTIONS = ("model", "batch_norm", "width", "hidden_units", "num_classes",
                  "input_shape", "image_size")


def _experiment_workdir(config):
    """(the --config experiment's workdir, its loaded config) where the job's model is
    the one hessian-train writes there (no --model, no `://` path: the job checks
    those); else (None, None)."""
    holder = loaded_config(_CONFIG)
    workdir = holder.get("workdir") if holder is not None and "train" in holder else None
    if (not workdir or flags.FLAGS["model"].present or not config.model
            or "://" in config.model
            or os.path.normpath(os.path.dirname(config.model)) != os.path.normpath(workdir)):
        return None, None
    return workdir, holder


def _experiment_refusal(config) -> str:
    """Where a --config experiment's model is not in its workdir, or was trained there
    with other model options (its config.json, written by hessian-train), the line that
    says so; else ""."""
    workdir, holder = _experiment_workdir(config)
    if workdir is None:
        return ""
    if not os.path.exists(config.model):
        return (f"--config.workdir={workdir}: no trained model there ({config.model} does "
                "not exist); train it first with hessian-train and this --config and "
                f"--workdir={workdir}, or pass the workdir it was trained in.")
    try:
        with open(os.path.join(workdir, "config.json"), encoding="utf-8") as file:
            trained = json.load(file).get("train", {})
    except (OSError, ValueError, AttributeError):
        return ""  # none (or unreadable): nothing to compare
    current = json.loads(holder.train.to_json_best_effort())
    differ = [name for name in _MODEL_OPTIONS
              if name in trained and name in current and trained[name] != current[name]]
    if not differ:
        return ""
    told = ", ".join(f"train.{name}={trained[name]!r}, not {current[name]!r}" for name in differ)
    return (f"--config.workdir={workdir}: its model was trained with {told} (its "
            "config.json); pass the --config variant it was trained with.")


def _interrupted(job, config) -> int:
    saved = job.latest_checkpoint(config)
    return interrupted_line(_PROGRAM, (
        f"no results were written; the checkpoint {saved} resumes the run "
        f"({job.same_command(config)})"
        if saved else "no results were written (SIGTERM instead writes a checkpoint "
        "before it stops, which the same command resumes from)"))


def main(argv):
    if len(argv) > 1:
        return error_line(_PROGRAM, f"unexpected arguments: {' '.join(argv[1:])}; every "
                          "option is a --flag (see --help)")
    try:
        # ml_collections runs a --config file while the flags are parsed, and raises a
        # failure to load it (OSError) at the first read of its value.
        config = resolve_config()
        # Before TensorFlow's start-up (3-5 s): a bad option is told at once.
        config_lib.validate(config)
    except Exception as error:  # noqa: BLE001
        # A config file's values are user input (a None, a string for a number): told
        # too; with flags alone, anything else is a fault of this program's.
        if _VERBOSE.value or not (isinstance(error, _TOLD) or _CONFIG.present):
            raise
        return error_line(_PROGRAM, error if isinstance(error, _TOLD) else
                          f"--config: {type(error).__name__}: {error}")
    refusal = _experiment_refusal(config)
    if refusal:
        return error_line(_PROGRAM, refusal)
    if _CHECK_FLAGS.value:
        return 0
    tf = import_tensorflow_quietly()
    from hessian_tf import job

    try:
        job.run(config)
    except job.Preempted as preempted:
        print(f"hessian-spectrum: {preempted}", file=sys.stderr)
        return job.Preempted.exit_status
    except job.WriteFailed as error:
        if _VERBOSE.value:
            raise
        error_line(_PROGRAM, error)
        return job.WriteFailed.exit_status
    except KeyboardInterrupt:
        if _VERBOSE.value:
            raise
        return _interrupted(job, config)
    except (*_TOLD, MemoryError, tf.errors.OpError) as error:
        if _VERBOSE.value:
            raise
        if isinstance(error, (RuntimeError, tf.errors.OpError)) and (
                "KeyboardInterrupt" in str(error)):
            # Ctrl-C while TensorFlow raised its own error (a peer worker, interrupted
            # too, closed its connection): pybind11's "... REPLACED BY KeyboardInterrupt".
            return _interrupted(job, config)
        message = job_error_message(error)
        saved = job.latest_checkpoint(config)
        if saved and isinstance(error, (tf.errors.UnavailableError,
                                        tf.errors.DeadlineExceededError)):
            # A lost worker: the chief's checkpoints hold the run so far.
            message = message.rstrip(".") + f"; the checkpoint {saved} resumes the run."
        return error_line(_PROGRAM, message)
    return 0


def run():
    """Console-script entry point."""
    run_program(_PROGRAM, __name__, __doc__, main)


if __name__ == "__main__":
    run()
