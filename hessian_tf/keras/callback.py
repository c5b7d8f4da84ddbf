"""A Keras callback that tracks the Hessian eigenvalue density during training.

At training step 0 and then on a schedule, `SpectrumCallback` computes the SLQ
spectrum of the Hessian of the mean loss over a fixed, in-memory dataset at the
model's current weights, and writes

- TensorBoard scalars `hessian/lambda_max`, `hessian/lambda_min`,
  `hessian/negative_mass`, `hessian/negative_mass_tolerance`,
  `hessian/trace_estimate`, `hessian/bulk_edge`, `hessian/lambda_max_over_bulk_edge`
  and an image `hessian/density`, at step = the optimizer's iteration count;
- `LOG_DIR/spectrum-step{step:08d}.npz` with the arrays of the job's
  `spectrum.npz` (alphas, betas, nodes, weights, ritz_residuals, num_steps, grid,
  density) plus `step`, `bulk_edge` and `bulk_fraction`.

Summaries are written with TensorFlow's own `tf.summary.write` in TensorBoard's
scalar and image formats: `tf.summary.scalar` and `tf.summary.image` belong to the
tensorboard package, which TensorFlow 2.21 no longer installs (without it they
raise TBNotInstalledError).

Computing a spectrum never changes the model (see README.md), uses no Keras or
TensorFlow random state (start vectors come from numpy generators seeded by
(seed, draw)) and creates no Keras variables, so training with the callback ends
bit-identical to training without it.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import tempfile
import time
from typing import NamedTuple, Optional, Union

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow.core.framework import summary_pb2

from hessian_tf import plotting
from hessian_tf import spectrum as spectrum_lib
from hessian_tf.choices import is_integer, is_number
from hessian_tf.distribute import GRAPH_OPTIMIZATIONS, graph_optimization, is_chief
from hessian_tf.io import models as models_lib
from hessian_tf.io import results
from hessian_tf.linalg import statistics as statistics_lib
from hessian_tf.operators import hessian as hessian_lib
from hessian_tf.operators import losses as losses_lib
from hessian_tf.operators import model_function as model_function_lib
from hessian_tf.operators import precision as precision_lib
from hessian_tf.operators import recurrent

# The bulk edge is the eigenvalue below which this fraction of the spectrum's mass
# lies. Outliers number about the number of classes (Ghorbani et al. 2019, Papyan
# 2019), well under 1% of the parameters of any model worth a spectrum, so the 0.99
# quantile sits inside the bulk, and it is far enough from 1 to rest on more than
# the last few Lanczos nodes.
DEFAULT_BULK_FRACTION = 0.99

SCALAR_TAGS = (
    "hessian/lambda_max",
    "hessian/lambda_min",
    "hessian/negative_mass",
    "hessian/negative_mass_tolerance",
    "hessian/trace_estimate",
    "hessian/bulk_edge",
    "hessian/lambda_max_over_bulk_edge",
)
IMAGE_TAG = "hessian/density"
SPECTRUM_FILE_FORMAT = "spectrum-step{step:08d}.npz"

Data = Union[tf.data.Dataset, tuple]


# --------------------------------------------------------------------- schedule


def _check_period(name: str, value, *, required: bool = False) -> None:
    if value is None and not required:  # a schedule's period not given
        return
    if not is_integer(value) or value < 1:
        raise ValueError(
            f"SpectrumCallback: received {name}={value!r}; expected a positive integer. "
            f"Fix: pass {name}=N with an integer N >= 1."
        )


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When to evaluate, besides before the first step: every N steps or N epochs.

    Attributes:
      every_n_steps: evaluate after every step whose count is a multiple of N. When
        a callback sees steps in strides (`steps_per_execution` > 1), it evaluates at
        the first step it sees at or past each multiple, and records that step.
      every_n_epochs: evaluate at the end of every N-th epoch.
    """

    every_n_steps: Optional[int] = None
    every_n_epochs: Optional[int] = None

    def __post_init__(self):
        if (self.every_n_steps is None) == (self.every_n_epochs is None):
            raise ValueError(
                "SpectrumCallback: received every_n_steps="
                f"{self.every_n_steps!r} and every_n_epochs={self.every_n_epochs!r}; "
                "expected exactly one of them. Fix: pass every_n_steps=N to evaluate "
                "every N training steps, or every_n_epochs=N for every N epochs."
            )
        _check_period("every_n_steps", self.every_n_steps)
        _check_period("every_n_epochs", self.every_n_epochs)

    def due_after_step(self, step: int, last_step: Optional[int]) -> bool:
        """True when a multiple of every_n_steps lies in (last_step, step]."""
        if self.every_n_steps is None:
            return False
        if last_step is None:
            return step % self.every_n_steps == 0
        return step // self.every_n_steps > last_step // self.every_n_steps

    def due_after_epoch(self, epoch: int) -> bool:
        """True at the end of epoch `epoch` (0-based, as Keras counts)."""
        return self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0

    def planned_evaluations(self, epochs: Optional[int], steps: Optional[int]) -> Optional[int]:
        """Evaluations in a `fit` of `epochs` epochs of `steps` steps (Keras's
        `callback.params`), the one before training included; None where unknown."""
        if not epochs:
            return None
        if self.every_n_epochs is not None:
            return 1 + epochs // self.every_n_epochs
        return 1 + epochs * steps // self.every_n_steps if steps else None


# ------------------------------------------------------------------- bulk edge


def bulk_edge(
    nodes: np.ndarray,
    weights: np.ndarray,
    num_steps: Optional[np.ndarray] = None,
    *,
    fraction: float = DEFAULT_BULK_FRACTION,
) -> float:
    """The `fraction`-quantile of the quadrature measure, pooled over draws.

    The smallest node ℓ such that the nodes ≤ ℓ carry at least `fraction` of the
    weight, each draw weighing 1/num_draws. The quadrature measure Σᵢ wᵢ δ(ℓᵢ)
    estimates the eigenvalue counting measure (1/n) Σⱼ δ(λⱼ), so this is about
    the eigenvalue below which `fraction` of all eigenvalues lie. By the
    Chebyshev–Markov–Stieltjes inequalities the Gauss quadrature's distribution
    function is off from the start vector's spectral distribution function by at
    most one node's weight, so the quantile is as sharp as the nodes near it are
    dense.

    Args:
      nodes: [num_draws, m] quadrature nodes (rows may be zero-padded).
      weights: [num_draws, m] their weights; each row sums to 1.
      num_steps: [num_draws] valid entries of each row; default all m.
      fraction: in (0, 1).

    Returns:
      The bulk edge, in eigenvalue units.
    """
    nodes = np.atleast_2d(np.asarray(nodes, dtype=np.float64))
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if num_steps is None:
        num_steps = [nodes.shape[1]] * nodes.shape[0]
    pooled_nodes = np.concatenate([row[:k] for row, k in zip(nodes, num_steps)])
    pooled_weights = np.concatenate(
        [row[:k] / len(num_steps) for row, k in zip(weights, num_steps)]
    )
    order = np.argsort(pooled_nodes, kind="stable")
    cumulative = np.cumsum(pooled_weights[order])
    # Weights sum to 1 up to rounding: a quantile within rounding of the total
    # must not fall off the end.
    index = int(np.searchsorted(cumulative, fraction * cumulative[-1] * (1 - 1e-12)))
    return float(pooled_nodes[order][min(index, order.size - 1)])


# ------------------------------------------------------------------------ data


def _dataset_to_arrays(dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    if dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
        raise ValueError(
            "SpectrumCallback: received a tf.data.Dataset that repeats forever; "
            "expected a finite dataset of (x, y) batches, read once into memory. "
            "Fix: remove .repeat() (or use .take(num_batches))."
        )
    xs, ys = [], []
    for element in dataset.as_numpy_iterator():
        if not isinstance(element, (tuple, list)) or len(element) != 2:
            kind = (
                f"a {len(element)}-tuple" if isinstance(element, (tuple, list))
                else type(element).__name__
            )
            raise ValueError(
                f"SpectrumCallback: received a dataset whose elements are {kind}; "
                "expected (x, y) batches. Fix: map the dataset to (inputs, targets) "
                "pairs, e.g. dataset.map(lambda x, y, w: (x, y)) to drop sample weights."
            )
        x, y = (np.asarray(a) for a in element)
        if x.ndim == 0 or y.ndim == 0:
            raise ValueError(
                f"SpectrumCallback: received dataset elements x {x.shape}, y {y.shape}; "
                "expected batches with a leading batch axis. Fix: call .batch(N) on "
                "the dataset."
            )
        xs.append(x)
        ys.append(y)
    if not xs:
        raise ValueError(
            "SpectrumCallback: received an empty dataset; expected at least one "
            "(x, y) batch. Fix: pass the examples whose Hessian you want."
        )
    return np.concatenate(xs), np.concatenate(ys)


def materialize(data: Data) -> tuple[np.ndarray, np.ndarray]:
    """(x [N, ...], y [N, ...]) numpy arrays from a finite dataset of (x, y) batches
    or an (x, y) pair of arrays. A dataset is iterated exactly once."""
    if isinstance(data, tf.data.Dataset):
        x, y = _dataset_to_arrays(data)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = (np.asarray(a) for a in data)
    else:
        raise ValueError(
            f"SpectrumCallback: received data of type {type(data).__name__}; expected "
            "a tf.data.Dataset of (x, y) batches or an (x, y) pair of arrays. Fix: "
            "pass data=(x, y) or data=tf.data.Dataset.from_tensor_slices((x, y)).batch(N)."
        )
    if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"SpectrumCallback: received x of shape {x.shape} and y of shape {y.shape}; "
            "expected the same number (at least one) of examples along axis 0. Fix: "
            "pass matching inputs and targets."
        )
    if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
        raise ValueError(
            "SpectrumCallback: received inputs holding NaN or infinite values; "
            "expected finite inputs. Fix: clean the data."
        )
    return x, y


# The binary's flags that are the callback's own arguments (by the same name, or data
# and model): the operators' messages name flags, told here as the callback's terms.
_ARGUMENTS = ("lanczos_steps", "num_draws", "bn_mode", "batch_size", "loss", "seed",
              "regularization", "method", "lockstep_draws", "cache_residuals",
              "unroll_steps", "graph_optimization", "kernel_width")
_FLAG = re.compile(r"(?<![\w-])--(dataset|model|" + "|".join(_ARGUMENTS) + r")(?![\w-])")


def in_callback_terms(message: str) -> str:
    """`message` with the binary's flags that are this callback's arguments named as
    its arguments (`--batch_size=4` → `batch_size=4`; `--dataset`, `--model` → data,
    model)."""
    return _FLAG.sub(lambda match: {"dataset": "data", "model": "model"}.get(
        match.group(1), match.group(1)), message)


# ---------------------------------------------------------------- the operator


def strategy_of(model: keras.Model) -> tf.distribute.Strategy:
    """The strategy the model's variables were created under (Keras records it
    when the model is built in a strategy scope), else the current one."""
    for variable in model.trainable_variables:
        strategy = getattr(getattr(variable, "value", variable), "distribute_strategy", None)
        if strategy is not None:
            return strategy
    return getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy()


# ------------------------------------------------------------------ summaries


def _plugin_metadata(plugin_name: str) -> summary_pb2.SummaryMetadata:
    """What TensorBoard's own scalar and image summaries attach (plugin data
    version 0 serialises to no bytes)."""
    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin_name)
    )


# -------------------------------------------------------------------- callback


class SpectrumEvaluation(NamedTuple):
    """One evaluation. `path` is the npz written ('' where this worker writes none)."""

    step: int
    spectrum: spectrum_lib.Spectrum
    bulk_edge: float
    lambda_max_over_bulk_edge: float
    path: str
    seconds: float


class SpectrumCallback(keras.callbacks.Callback):
    """Writes the Hessian eigenvalue density to TensorBoard during `model.fit`.

    The Hessian is that of the mean loss over `data` (every example once), at the
    model's current weights, with dropout off and BN as `bn_mode` says
    (see `hessian_tf.operators.HessianOperator`). It is evaluated before the first
    training step and then every `every_n_steps` steps or `every_n_epochs` epochs,
    at step = `model.optimizer.iterations`. Every evaluation uses the same start
    vectors (from `seed`), so changes between steps come from the model alone.

    The first evaluation computes its first product twice and raises
    `NonDeterministicError` if they differ (randomness in the model's inference).
    Under a tf.distribute strategy the products run on the strategy the model's
    variables belong to. With MultiWorkerMirroredStrategy every worker must run the
    callback (products are collective); only the chief writes.

    Args:
      data: a finite `tf.data.Dataset` of (x, y) batches, read into memory once
        here (any shuffling or augmentation is frozen at that one pass; do not pass
        the dataset `fit` trains on if it reshuffles, since reading it advances its
        shuffle), or an (x, y) pair of arrays [N, ...].
      log_dir: local directory for the TensorBoard events and the npz files.
      every_n_steps: evaluate every N training steps. Exactly one of this and
        `every_n_epochs`.
      every_n_epochs: evaluate at the end of every N-th epoch.
      lanczos_steps: Lanczos order m per draw.
      num_draws: independent start vectors, averaged.
      bn_mode: 'inference' (moving statistics) or 'train' (batch statistics).
      batch_size: examples per product batch (per replica); part of the definition
        of H when bn_mode='train'.
      loss: per-example loss on the model's outputs, a name in
        `hessian_tf.operators.LOSSES`; cross-entropies take logits.
      seed: seed of the start vectors.
      regularization: add the model's regularization losses to the loss.
      method: Hessian-vector product method (see HessianOperator).
      bulk_fraction: the bulk edge is the `bulk_fraction`-quantile of the spectrum
        (see `bulk_edge`).
      kernel_width: σ of the density's Gaussian kernel; default relative to the
        spectrum's width.
      lockstep_draws: draws computed together, one block of products per Lanczos
        step (one pass over the data for all of them); each holds its own Lanczos
        basis (lanczos_steps × parameters × 8 bytes) on the host. 0: automatic, up to
        8 draws whose bases fit in a quarter of the host's memory.
      cache_residuals: keep each batch's vector-free part of the product (forward
        pass, backward signals, BN statistics) during an evaluation, so each Lanczos
        step computes only the rest (faster steps for memory: see README.md). One
        replica only; computed at the start of each evaluation from the weights then
        and freed at its end, so training never holds it.
      unroll_steps: Keras recurrent layers (LSTM, GRU, ...) run unrolled in the
        products over sequences of at most this many steps, 0: never (the same
        function as their loop, about half the product time; see
        hessian_tf/operators/recurrent.py).
      graph_optimization: Grappler's set-up of the callback's graphs (each set up at
        its first run; the training's own graphs are untouched): 'light' (one round,
        no memory or layout optimiser: a deep graph's first run in about 0.6 of the
        time), 'full' (the program's configuration as it is), or 'auto' (light unless
        a GPU is visible or the model is on a TPU).

    method='auto' times the methods within a share of the products of the fit's
    evaluations, counted from the epochs and steps Keras gives the callback (without
    a count where Keras does not know the steps; a fit from a later `initial_epoch`
    is counted from epoch 0, which only widens the share).

    Attributes:
      evaluations: a SpectrumEvaluation per evaluation, in order.
    """

    def __init__(
        self,
        data: Data,
        *,
        log_dir: Union[str, os.PathLike],
        every_n_steps: Optional[int] = None,
        every_n_epochs: Optional[int] = None,
        lanczos_steps: int = 90,
        num_draws: int = 1,
        bn_mode: str = "inference",
        batch_size: int = 128,
        loss: str = "sparse_categorical_crossentropy",
        seed: int = 0,
        regularization: bool = False,
        method: str = "auto",
        bulk_fraction: float = DEFAULT_BULK_FRACTION,
        kernel_width: Optional[float] = None,
        lockstep_draws: int = 0,
        cache_residuals: bool = False,
        unroll_steps: int = recurrent.MAX_UNROLL_STEPS,
        graph_optimization: str = "auto",
    ):
        super().__init__()
        self.schedule = Schedule(every_n_steps=every_n_steps, every_n_epochs=every_n_epochs)
        for name, value in (
            ("lanczos_steps", lanczos_steps), ("num_draws", num_draws), ("batch_size", batch_size)
        ):
            _check_period(name, value, required=True)
        if bn_mode not in model_function_lib.BN_MODES:
            raise ValueError(
                f"SpectrumCallback: received bn_mode={bn_mode!r}; expected one of "
                f"{model_function_lib.BN_MODES}. Fix: pass bn_mode='inference' (moving "
                "statistics) or bn_mode='train' (statistics of each batch)."
            )
        if loss not in losses_lib.LOSSES:
            raise ValueError(
                f"SpectrumCallback: received loss={loss!r}; expected one of "
                f"{sorted(losses_lib.LOSSES)}. Fix: pass the name of the per-example "
                "loss the model is trained with."
            )
        if method not in hessian_lib.METHODS:
            raise ValueError(
                f"SpectrumCallback: received method={method!r}; expected one of "
                f"{hessian_lib.METHODS}. Fix: leave method='auto'."
            )
        if not is_number(bulk_fraction) or not 0.0 < bulk_fraction < 1.0:
            raise ValueError(
                f"SpectrumCallback: received bulk_fraction={bulk_fraction!r}; expected a "
                f"fraction in (0, 1). Fix: pass e.g. bulk_fraction={DEFAULT_BULK_FRACTION}."
            )
        if not is_integer(lockstep_draws) or lockstep_draws < 0:
            raise ValueError(
                f"SpectrumCallback: received lockstep_draws={lockstep_draws!r}; expected 0 "
                "(automatic) or a positive number of draws. Fix: pass lockstep_draws=0, or "
                "1 to hold one Lanczos basis at a time."
            )
        if not isinstance(regularization, bool):
            raise ValueError(
                f"SpectrumCallback: received regularization={regularization!r}; expected "
                "True or False. Fix: pass regularization=True to add the model's "
                "regularization losses to the loss.")
        if not isinstance(cache_residuals, bool):
            raise ValueError(
                f"SpectrumCallback: received cache_residuals={cache_residuals!r}; expected "
                "True or False. Fix: pass cache_residuals=True to keep each batch's "
                "vector-free part of the product during an evaluation."
            )
        if graph_optimization not in GRAPH_OPTIMIZATIONS:
            raise ValueError(
                f"SpectrumCallback: received graph_optimization={graph_optimization!r}; "
                f"expected one of {GRAPH_OPTIMIZATIONS}. Fix: leave graph_optimization='auto' "
                "(light unless a GPU is visible or the model is on a TPU), or pass 'full' for "
                "the program's own configuration."
            )
        if kernel_width is not None and (
                not is_number(kernel_width) or not 0 < kernel_width < math.inf):
            raise ValueError(
                f"SpectrumCallback: received kernel_width={kernel_width!r}; expected a "
                "positive, finite width. Fix: pass a width > 0, or None for the default."
            )
        if not is_integer(seed) or seed < 0:
            raise ValueError(
                f"SpectrumCallback: received seed={seed!r}; expected a non-negative integer "
                "(the start vectors' seed). Fix: pass seed=0, or another integer >= 0."
            )
        given = log_dir
        log_dir = os.fspath(log_dir) if isinstance(log_dir, (str, os.PathLike)) else None
        if not isinstance(log_dir, str) or not log_dir:
            raise ValueError(
                f"SpectrumCallback: received log_dir={given!r}; expected a directory. "
                "Fix: pass log_dir='PATH'."
            )
        try:
            # Proved writable, then left as it was: created with the first results, so
            # that a callback that fails first leaves no empty directory behind.
            results.remove_empty_directories(results.check_writable(log_dir, flag="log_dir"))
        except results.NotWritableError as error:
            raise ValueError(
                f"SpectrumCallback: received log_dir={log_dir!r}, which cannot be created "
                f"or written ({error.reason}); expected a writable directory. Fix: pass a "
                "writable local directory."
            ) from error
        earlier = glob.glob(os.path.join(glob.escape(log_dir), SPECTRUM_FILE_FORMAT.replace(
            "{step:08d}", "*")))
        if earlier:
            logging.warning(
                "SpectrumCallback: log_dir=%s already holds %d spectrum file(s) of an "
                "earlier run: those of the steps this run evaluates are replaced, and "
                "TensorBoard shows both runs' events there; pass a new log_dir to keep "
                "them apart.", log_dir, len(earlier))
        self.log_dir = log_dir
        self.lanczos_steps = int(lanczos_steps)
        self.num_draws = int(num_draws)
        self.bn_mode = bn_mode
        self.batch_size = int(batch_size)
        self.loss = loss
        self.seed = int(seed)
        self.regularization = bool(regularization)
        self.method = method
        self.bulk_fraction = float(bulk_fraction)
        self.kernel_width = kernel_width
        self.lockstep_draws = int(lockstep_draws)
        self.unroll_steps = recurrent.check_steps(unroll_steps, "SpectrumCallback: unroll_steps")
        self.cache_residuals = cache_residuals
        self.graph_optimization = graph_optimization
        self.evaluations: list[SpectrumEvaluation] = []
        self._x, self._y = materialize(data)
        self._operator: Optional[hessian_lib.HessianOperator] = None
        self._operator_model = None
        self._determinism_checked = False
        self._writer = None
        self._last_step: Optional[int] = None

    # ------------------------------------------------------------ keras hooks

    def on_train_begin(self, logs=None):
        self._prepare_operator()
        self._evaluate(self._global_step())

    def on_train_batch_end(self, batch, logs=None):
        if self.schedule.every_n_steps is None:
            return
        step = self._global_step()
        if self.schedule.due_after_step(step, self._last_step):
            self._evaluate(step)

    def on_epoch_end(self, epoch, logs=None):
        if self.schedule.due_after_epoch(epoch):
            self._evaluate(self._global_step())

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ---------------------------------------------------------------- helpers

    def _planned_products(self, group: int) -> Optional[int]:
        """Block products of `group` vectors over the whole data in the fit's
        evaluations (the determinism check's included), or None where Keras does not
        say how many epochs and steps the fit has."""
        params = getattr(self, "params", None) or {}
        evaluations = self.schedule.planned_evaluations(params.get("epochs"), params.get("steps"))
        if evaluations is None:
            return None
        return evaluations * spectrum_lib.lanczos_block_products(
            self.num_draws, self.lanczos_steps, group) + int(
                self._operator.whole_determinism_check)

    def _global_step(self) -> int:
        """The optimizer's update count: the step Keras' TensorBoard callback uses."""
        return int(tf.convert_to_tensor(self.model.optimizer.iterations).numpy())

    def _prepare_operator(self) -> None:
        model = self.model
        if self._operator is not None and self._operator_model is model:
            return
        if not model.built:
            # Building it here would draw initial weights from the training's RNG.
            raise ValueError(
                "SpectrumCallback: received a model that is not built when training "
                "begins; expected a built model, so that the spectrum at step 0 can be "
                "computed without touching the training's random state. Fix: give the "
                "model a keras.Input, or call model.build(input_shape) before fit."
            )
        strategy = strategy_of(model)
        if self.cache_residuals and strategy.num_replicas_in_sync != 1:
            raise ValueError(
                f"SpectrumCallback: received cache_residuals=True for a model on "
                f"{strategy.num_replicas_in_sync} replicas; the residual cache is for one "
                "device. Fix: pass cache_residuals=False (or train on one device)."
            )
        try:
            self._operator = hessian_lib.HessianOperator(
                model_function_lib.KerasModelFunction(model, unroll_steps=self.unroll_steps),
                self._x,
                self._y,
                batch_size=self.batch_size,
                loss=self.loss,
                bn_mode=self.bn_mode,
                strategy=strategy,
                regularization=self.regularization,
                method=self.method,
                cache_residuals=self.cache_residuals,
            )
        except ValueError as error:
            raise ValueError(f"SpectrumCallback: {in_callback_terms(str(error))}") from error
        group = spectrum_lib.lockstep_group(
            self.num_draws, self.lanczos_steps, self._operator.dim, lockstep=self.lockstep_draws)
        refusal = spectrum_lib.basis_memory_refusal(
            group, self.lanczos_steps, self._operator.dim,
            flag=f"SpectrumCallback: lanczos_steps={self.lanczos_steps}",
            steps_flag="lanczos_steps", one_basis_flag="lockstep_draws=1")
        if refusal:
            raise ValueError(refusal)
        self._operator_model = model
        self._determinism_checked = False
        warning = precision_lib.half_precision_warning(
            model, "SpectrumCallback", "for products in float32, save the model and run "
            "hessian-spectrum --precision=float32 on it.")
        if warning:
            logging.warning("%s", warning)
        try:
            compiled = (model.get_compile_config() or {}).get("loss")
        except Exception:  # noqa: BLE001 - a model compiled in ways Keras cannot save
            compiled = None
        differs = models_lib.loss_difference(compiled, self.loss, flag="loss",
                                             owner="the callback's ")
        if differs:
            logging.warning("SpectrumCallback: %s", differs)
        regularizers = self._operator.model_function.regularizers
        logging.info(
            "SpectrumCallback: Hessian of the mean %s%s over %d examples, %d parameters, "
            "%d replicas, BN %s",
            self.loss, " + the model's own losses (regularizers)"
            if self.regularization and regularizers else "", self._operator.num_examples,
            self._operator.dim, strategy.num_replicas_in_sync, self.bn_mode,
        )
        left_out = model_function_lib.regularizers_left_out(
            0 if self.regularization else regularizers, "regularization=True")
        if left_out:
            logging.info("SpectrumCallback: %s", left_out)

    def _evaluate(self, step: int) -> None:
        if step == self._last_step:
            return
        started = time.perf_counter()
        operator = self._operator
        first_product = None if self._determinism_checked else operator.check_determinism
        group = spectrum_lib.lockstep_group(
            self.num_draws, self.lanczos_steps, operator.dim, lockstep=self.lockstep_draws)
        # Grappler's set-up of the graphs first run here (ours; the training's keep
        # their own).
        with graph_optimization(self.graph_optimization,
                                tpu=hessian_lib.is_tpu_strategy(operator.strategy)):
            try:
                # method='auto': timed at the first evaluation, kept for the others (on the
                # first block, whose determinism check its timed runs can then be), within
                # a share of the products the fit's evaluations will run, where Keras says
                # how many steps and epochs there are.
                # The run then starts from the state whose first block they were timed on.
                start = None
                if operator.times_methods:
                    start = spectrum_lib.new_state(
                        operator.dim, lanczos_steps=self.lanczos_steps, num_draws=self.num_draws,
                        seed=self.seed, lockstep=group,
                    ) if first_product is not None else None
                    first = spectrum_lib.first_block(start) if start is not None else None
                    operator.choose_method(group, self._planned_products(group), vectors=first)
                    del first
                    logging.info("SpectrumCallback: method='auto' chose %s products (median "
                                 "seconds over the first batches: %s%s)", operator.method,
                                 operator.method_seconds,
                                 f"; {operator.forward_mode_failure}"
                                 if operator.forward_mode_failure else "")
                spectrum = spectrum_lib.stochastic_lanczos_quadrature(
                    operator.matvec,
                    operator.dim,
                    lanczos_steps=self.lanczos_steps,
                    num_draws=self.num_draws,
                    seed=self.seed,
                    kernel_width=self.kernel_width,
                    first_product=first_product,
                    matmat=operator.matmat,
                    lockstep=group,
                    initial_state=start,
                )
            except (hessian_lib.NonDeterministicError, hessian_lib.NonFiniteError) as error:
                raise type(error)(f"SpectrumCallback at training step {step}: "
                                  f"{in_callback_terms(str(error))}") from error
            except ValueError as error:  # e.g. the residual cache does not fit in memory
                raise ValueError(f"SpectrumCallback at training step {step}: "
                                 f"{in_callback_terms(str(error))}") from error
            finally:
                operator.drop_residuals()  # training never holds the cache
        self._determinism_checked = True
        self._last_step = step
        edge = bulk_edge(
            spectrum.nodes, spectrum.weights, spectrum.num_steps, fraction=self.bulk_fraction
        )
        lambda_max = spectrum.statistics.lambda_max
        # A ratio to a bulk edge at or below zero says nothing about outliers.
        ratio = lambda_max / edge if edge > 0 else float("nan")
        path = ""
        if is_chief(operator.strategy):
            self._write_summaries(step, spectrum, edge, ratio)
            path = self._write_spectrum(step, spectrum, edge)
        seconds = time.perf_counter() - started
        self.evaluations.append(SpectrumEvaluation(step, spectrum, edge, ratio, path, seconds))
        logging.info(
            "SpectrumCallback at step %d: %s; bulk_edge=%.4g lambda_max/bulk_edge=%.4g "
            "(%.1f s)", step, statistics_lib.headline(spectrum.statistics), edge, ratio,
            seconds)

    def _write_summaries(self, step, spectrum, edge, ratio) -> None:
        statistics = spectrum.statistics
        values = dict(
            zip(
                SCALAR_TAGS,
                (
                    statistics.lambda_max,
                    statistics.lambda_min,
                    statistics.negative_mass,
                    statistics.negative_mass_tolerance,
                    statistics.trace,
                    edge,
                    ratio,
                ),
            )
        )
        png = self._density_png(step, spectrum)
        # [height, width, channels]: decoding proves the PNG whole and gives its size.
        height, width = tf.io.decode_png(png).shape[:2]
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        # record_if(True): Keras' TensorBoard callback may switch recording off
        # between its own update steps.
        with self._writer.as_default(step=step), tf.summary.record_if(True):
            for tag, value in values.items():
                tf.summary.write(
                    tag, tf.constant(value, tf.float32), step=step,
                    metadata=_plugin_metadata("scalars"),
                )
            tf.summary.write(
                IMAGE_TAG, tf.constant([str(width), str(height), png], tf.string),
                step=step, metadata=_plugin_metadata("images"),
            )
        self._writer.flush()

    def _density_png(self, step: int, spectrum) -> bytes:
        """The density plot as the job draws it, PNG-encoded."""
        title = (
            f"Hessian at step {step}: n={self._operator.dim:,}, "
            f"{plotting.steps_label(spectrum.num_steps, self.lanczos_steps)}, "
            f"{self.num_draws} draw(s)"
            + (f", BN {self.bn_mode}" if self._operator.model_function.batch_norms else "")
        )
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "density.png")
            plotting.plot_densities(
                [(spectrum.density.grid, spectrum.density.density, "")], path, title=title
            )
            with open(path, "rb") as handle:
                return handle.read()

    def _write_spectrum(self, step, spectrum, edge) -> str:
        arrays = {
            **spectrum_lib.spectrum_arrays(spectrum),
            "step": np.asarray(step, dtype=np.int64),
            "bulk_edge": np.asarray(edge),
            "bulk_fraction": np.asarray(self.bulk_fraction),
        }
        name = SPECTRUM_FILE_FORMAT.format(step=step)
        os.makedirs(self.log_dir, exist_ok=True)
        (path,) = results.write_files(self.log_dir, {name: results.npz_writer(arrays)})
        return path
