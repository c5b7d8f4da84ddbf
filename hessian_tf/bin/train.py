r"""Trains an experiment config's model, with Hessian spectra along the way.

  hessian-train --config=configs/resnet32_cifar10.py:bn --workdir=results/resnet32_bn
  hessian-train --config=configs/cnn_digits.py:no_bn,smoke --workdir=/tmp/smoke
  hessian-train --config=configs/mlp_mnist.py --config.train.num_steps=500

Writes TensorBoard logs, per-evaluation spectra, checkpoints (`.keras`, readable
by `hessian-spectrum --model=...`) and summary.json to WORKDIR (default: the
config's `workdir`). Then `hessian-spectrum --config=<same config>
--config.workdir=WORKDIR` takes the final model's spectrum at m = 90.
Bad input: one line on stderr, exit status 2.
"""

from absl import flags

from hessian_tf.bin import (
    define_config_file, error_line, import_tensorflow_quietly, loaded_config, run_program)

_PROGRAM = "hessian-train"
_CONFIG = define_config_file(
    _PROGRAM, "An experiment config file, e.g. configs/resnet32_cifar10.py:bn,smoke."
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where logs, spectra and checkpoints go (default: the config's workdir)."
)
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks of errors.")


def _error(message) -> int:
    return error_line(_PROGRAM, message)


def main(argv) -> int:
    if len(argv) > 1:
        return _error(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        config = loaded_config(_CONFIG)
    except ValueError as error:
        return _error(error)
    if config is None:
        return _error("--config is required, e.g. --config=configs/cnn_digits.py:bn")
    # Already imported where a config file was loaded (flags_parser); --help and bad
    # flags were answered before TensorFlow's start-up.
    tf = import_tensorflow_quietly()
    try:
        from hessian_tf import training

        training.train(config, _WORKDIR.value)
    except (ValueError, OSError, KeyError, tf.errors.OpError) as error:
        if _VERBOSE.value:
            raise
        return _error(str(error) or type(error).__name__)
    return 0


def run():
    """Console-script entry point."""
    run_program(_PROGRAM, __name__, __doc__, main)


if __name__ == "__main__":
    run()
