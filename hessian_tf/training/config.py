"""Experiment configurations: a `train` section, a `spectrum` section, checks.

An experiment config (`configs/<name>.py`, `get_config(arg)`) is a ConfigDict with

- `workdir`: where `hessian-train` writes (the `--workdir` flag overrides it); the
  `spectrum` section's paths follow it (ml_collections references).
- `train`: everything `hessian_tf.training.train` reads (see `base_config`).
- `spectrum`: a `hessian_tf.config.default_config()` for the spectrum binary,
  pointing at the final model (`WORKDIR/model.keras`) and the examples the callback
  used (`npz:WORKDIR/spectrum_data.npz`), with the callback's BN mode and batch
  size, so that `hessian-spectrum --config=configs/<name>.py` reproduces the
  Hessian of the last evaluation of training at m = 90.

`arg` is a comma-separated list of variants: at most one model variant of the
config (e.g. `bn`, `no_bn`, `population_bn`), plus `smoke` (seconds on 2 CPU
cores: a few steps, one spectrum evaluation after step 0) and `mock` (TFDS mock
data: random examples of the right shapes, no download).
"""

from __future__ import annotations

import math

from typing import NamedTuple, Sequence

import ml_collections

from hessian_tf import config as spectrum_config_lib
from hessian_tf.choices import BN_MODES, is_integer

MODELS = ("resnet32", "resnet18", "mlp", "cnn")
BATCH_NORMS = ("on", "off", "population")
AUGMENTATIONS = ("none", "flip", "crop_flip")
FLAG_VARIANTS = ("smoke", "mock")
# Random examples per split under the `mock` variant.
MOCK_NUM_EXAMPLES = 64


def base_config() -> ml_collections.ConfigDict:
    """Every option, with defaults; configs change what their experiment needs."""
    config = ml_collections.ConfigDict()
    config.workdir = ml_collections.FieldReference("results/train")

    train = config.train = ml_collections.ConfigDict()
    # Model: resnet32 | resnet18 | mlp | cnn; batch norm: on | off | population.
    train.model = "resnet32"
    train.batch_norm = "on"
    train.width = 0  # 0: the model's own default (resnet32 16, resnet18 64, cnn 16)
    train.hidden_units = 220  # mlp only
    # resnets: zero the last convolution of every residual branch (and its BN γ),
    # so that every block starts as the identity (SkipInit, De & Smith 2020).
    train.zero_init_residual = False
    train.num_classes = 10
    # Data: 'digits', 'npz:PATH' (arrays x, y) or 'tfds:NAME[/CONFIG]'. Integer
    # images are scaled to [0, 1] (as hessian_tf.io.datasets does).
    train.dataset = "tfds:cifar10"
    train.split = "train"
    train.data_dir = ""
    train.image_size = 0  # > 0: resize images to image_size × image_size
    train.input_shape = ()  # non-empty: reshape each example to this (e.g. (784,))
    train.augment = "none"  # none | flip | crop_flip (pad 4, random crop, flip)
    train.shuffle_buffer = 10000  # 0: the whole (in-memory) dataset
    train.mock_data = 0  # > 0: TFDS mock data with this many examples per split
    # Optimisation: SGD with momentum; the learning rate is multiplied by
    # lr_drop_factor at each step in lr_drop_steps.
    train.batch_size = 128
    train.num_steps = 1000
    train.steps_per_epoch = 0  # 0: num_steps (one Keras epoch)
    train.learning_rate = 0.1
    train.momentum = 0.9
    train.nesterov = False
    train.weight_decay = 0.0  # decoupled, Keras SGD(weight_decay=); not in the Hessian
    train.lr_drop_steps = ()
    train.lr_drop_factor = 0.1
    train.seed = 0
    train.deterministic = False  # tf.config.experimental.enable_op_determinism()
    train.log_every_steps = 100
    # Checkpoints WORKDIR/checkpoints/step-XXXXXXXX.keras at these steps (0 = before
    # training); the final model is always saved as well (and as WORKDIR/model.keras).
    train.checkpoint_steps = ()
    # batch_norm='population': statistics over the first num_examples training
    # examples (0: all), recomputed before step 0 and every update_every_steps.
    train.population_bn = ml_collections.ConfigDict(
        dict(update_every_steps=500, num_examples=10000, batch_size=500)
    )
    # The SpectrumCallback: at step 0 and every every_n_steps steps, the Hessian of
    # the mean loss over the first num_examples examples of `split` ('' = the
    # training split), preprocessed without augmentation.
    train.spectrum_callback = ml_collections.ConfigDict(
        dict(
            enabled=True,
            every_n_steps=1000,
            num_examples=4096,
            split="",
            lanczos_steps=90,
            num_draws=1,
            bn_mode="inference",
            batch_size=128,
            seed=0,
            # Keep each batch's vector-free part of the product during an evaluation
            # (faster steps for memory; one replica only; see README.md).
            cache_residuals=False,
        )
    )

    spectrum = config.spectrum = spectrum_config_lib.default_config()
    workdir = config.get_ref("workdir")
    spectrum.model = workdir + "/model.keras"
    spectrum.dataset = "npz:" + workdir + "/spectrum_data.npz"
    spectrum.output_dir = workdir + "/spectrum_final"
    spectrum.bn_mode = train.spectrum_callback.get_ref("bn_mode")
    spectrum.batch_size = train.spectrum_callback.get_ref("batch_size")
    spectrum.seed = train.spectrum_callback.get_ref("seed")
    return config


class Variants(NamedTuple):
    model: str
    smoke: bool
    mock: bool


def parse_variants(arg: str, *, choices: Sequence[str], default: str) -> Variants:
    """'bn,smoke' → Variants('bn', smoke=True, mock=False)."""
    tokens = [token.strip() for token in (arg or "").split(",") if token.strip()]
    allowed = list(choices) + list(FLAG_VARIANTS)
    unknown = [token for token in tokens if token not in allowed]
    if unknown:
        raise ValueError(
            f"--config argument {arg!r}: unknown variant {unknown[0]!r}; use a "
            f"comma-separated list of {allowed} with at most one of {list(choices)}."
        )
    models = [token for token in tokens if token in choices]
    if len(models) > 1:
        raise ValueError(
            f"--config argument {arg!r}: variants {models} exclude each other; pick one."
        )
    return Variants(models[0] if models else default, "smoke" in tokens, "mock" in tokens)


def apply_flag_variants(config: ml_collections.ConfigDict, variants: Variants) -> None:
    """`smoke`: 3 steps of batch 8, spectra (m = 4, 32 examples) at steps 0 and 2,
    a learning-rate drop at step 2, a checkpoint at step 0. `mock`: TFDS mock data."""
    if variants.smoke:
        train = config.train
        train.num_steps = 3
        train.batch_size = 8
        train.steps_per_epoch = 0
        train.log_every_steps = 1
        train.lr_drop_steps = (2,)
        train.checkpoint_steps = (0,)
        train.shuffle_buffer = 64
        train.population_bn.update_every_steps = 2
        train.population_bn.num_examples = 32
        train.population_bn.batch_size = 16
        callback = train.spectrum_callback
        callback.every_n_steps = 2
        callback.num_examples = 32
        callback.lanczos_steps = 4
        callback.batch_size = 16
        config.spectrum.lanczos_steps = 4
    if variants.mock:
        config.train.mock_data = MOCK_NUM_EXAMPLES


# ------------------------------------------------------------------ validation


def _fail(name: str, value, expected: str):
    raise ValueError(f"--config.{name}={value!r}: expected {expected}.")


def _at_least(name, value, low):
    if not is_integer(value) or value < low:
        _fail(name, value, f"an integer >= {low}")
    if value >= 2**63:  # TensorFlow's int64 (it had failed at the first batch)
        _fail(name, value, f"an integer >= {low} and below 2**63")


def _steps(name, value, *, low, increasing=False):
    # Steps past num_steps are allowed (never reached), so that a run can be
    # shortened with one override.
    if not isinstance(value, (tuple, list)) or not all(is_integer(step) for step in value):
        _fail(name, value, "a tuple of integer steps, e.g. (40000,)")
    if any(step < low for step in value):
        _fail(name, value, f"steps >= {low}")
    if increasing and list(value) != sorted(set(value)):
        _fail(name, value, "strictly increasing steps")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the option, its value and what is expected."""
    for section in ("workdir", "train", "spectrum"):
        if section not in config:
            raise ValueError(
                f"--config: the config has no '{section}' field, so it is no experiment "
                "config (a spectrum job's, such as configs/mlp_digits.py, goes to "
                "hessian-spectrum); build one from hessian_tf.training.config.base_config()."
            )
    defaults = base_config()
    unknown = sorted(set(config.train.keys()) - set(defaults.train.keys()))
    if unknown:
        raise ValueError(
            f"--config.train: unknown option(s) {unknown}; known: {sorted(defaults.train.keys())}."
        )
    for name in ("population_bn", "spectrum_callback"):
        unknown = sorted(set(config.train[name].keys()) - set(defaults.train[name].keys()))
        if unknown:
            raise ValueError(
                f"--config.train.{name}: unknown option(s) {unknown}; known: "
                f"{sorted(defaults.train[name].keys())}."
            )
    if not config.workdir:
        _fail("workdir", config.workdir, "a directory (or pass --workdir)")
    train = config.train
    choices = {
        "model": MODELS,
        "batch_norm": BATCH_NORMS,
        "augment": AUGMENTATIONS,
    }
    for name, allowed in choices.items():
        if train[name] not in allowed:
            _fail(f"train.{name}", train[name], f"one of {list(allowed)}")
    if train.model == "mlp" and train.batch_norm != "off":
        _fail("train.batch_norm", train.batch_norm, "'off' for model='mlp' (it has no BN)")
    dataset = train.dataset
    if not isinstance(dataset, str) or not (
        dataset == "digits" or dataset.startswith(("npz:", "tfds:"))
    ) or dataset in ("npz:", "tfds:"):
        _fail("train.dataset", dataset, "'digits', 'npz:PATH' or 'tfds:NAME[/CONFIG]'")
    if not train.split:
        _fail("train.split", train.split, "a split name such as 'train'")
    if train.mock_data and not dataset.startswith("tfds:"):
        _fail("train.mock_data", train.mock_data, f"0 (the `mock` variant) with "
              f"train.dataset={dataset!r}: mock data stand in for tfds datasets only")
    for name, low in (
        ("width", 0), ("hidden_units", 1), ("num_classes", 1), ("image_size", 0),
        ("shuffle_buffer", 0), ("mock_data", 0), ("batch_size", 1), ("num_steps", 1),
        ("steps_per_epoch", 0), ("seed", 0), ("log_every_steps", 1),
    ):
        _at_least(f"train.{name}", train[name], low)
    if not isinstance(train.input_shape, (tuple, list)) or not all(
        is_integer(d) and d >= 1 for d in train.input_shape
    ):
        _fail("train.input_shape", train.input_shape, "a tuple of positive sizes, or ()")
    if not 0 < train.learning_rate < math.inf:
        _fail("train.learning_rate", train.learning_rate, "a positive, finite learning rate")
    if not 0 <= train.momentum < 1:
        _fail("train.momentum", train.momentum, "a momentum in [0, 1)")
    if not 0 <= train.weight_decay < math.inf:
        _fail("train.weight_decay", train.weight_decay, "a finite weight decay >= 0")
    if not 0 < train.lr_drop_factor < math.inf:
        _fail("train.lr_drop_factor", train.lr_drop_factor, "a positive, finite factor, "
              "e.g. 0.1")
    _steps("train.lr_drop_steps", train.lr_drop_steps, low=1, increasing=True)
    _steps("train.checkpoint_steps", train.checkpoint_steps, low=0, increasing=True)
    population = train.population_bn
    _at_least("train.population_bn.update_every_steps", population.update_every_steps, 1)
    _at_least("train.population_bn.num_examples", population.num_examples, 0)
    _at_least("train.population_bn.batch_size", population.batch_size, 1)
    callback = train.spectrum_callback
    for name in ("zero_init_residual", "nesterov", "deterministic"):
        if not isinstance(train[name], bool):
            _fail(f"train.{name}", train[name], "True or False")
    for name in ("enabled", "cache_residuals"):
        if not isinstance(callback[name], bool):
            _fail(f"train.spectrum_callback.{name}", callback[name], "True or False")
    for name in ("every_n_steps", "num_examples", "lanczos_steps", "num_draws", "batch_size"):
        _at_least(f"train.spectrum_callback.{name}", callback[name], 1)
    _at_least("train.spectrum_callback.seed", callback.seed, 0)
    if callback.bn_mode not in BN_MODES:
        _fail("train.spectrum_callback.bn_mode", callback.bn_mode, f"one of {list(BN_MODES)}")
    # The section as hessian-spectrum --config will run it: told now, not after the
    # training.
    try:
        spectrum = spectrum_config_lib.merged_over_defaults(
            config.spectrum, keep_defaults_for_none=True)
        spectrum_config_lib.validate(spectrum)
    except (TypeError, ValueError) as error:  # TypeError: ml_collections' of a value's type
        raise ValueError(f"--config.spectrum: {error}") from error
