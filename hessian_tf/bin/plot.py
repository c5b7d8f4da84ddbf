r"""Re-renders saved spectra: a new kernel width, a log|λ| view, several runs overlaid.

  hessian-plot --runs=results/bn,results/no_bn --labels="BN,no BN" --output=compare.png
  hessian-plot --runs=results/default --output=log.png --log_abs

Each run is a spectrum job's output directory (its spectrum.npz: nodes and weights
per draw), or an .npz file of those arrays (a SpectrumCallback's
LOG_DIR/spectrum-stepNNNNNNNN.npz). No product is computed: the densities are rebuilt from the saved
quadrature nodes and weights, on one grid shared by all runs. A run with two or
more draws gets a bootstrap band over its draws (`--confidence`, default 90%).

Views:
- default: the density φσ(λ) on a log scale against λ (as density.png).
- `--log_abs`: the density of log10|λ| per decade, one curve for λ > 0 (solid) and
  one for λ < 0 (dashed) per run; each integrates to the weight of its sign.
  Eigenvalues below 1e-9 · max|λ| in magnitude are left out (numerically zero).
`--kernel_width` is in the units of the x axis: eigenvalue units, or decades of |λ|
with `--log_abs`; 0 picks 0.002 × the common eigenvalue range (0.01 × the range in
decades with `--log_abs`), the same for every run so the curves compare.

Bad input: one line on stderr, exit status 2, no output file.
"""

from __future__ import annotations

import glob
import math
import os
from typing import NamedTuple, Optional, Sequence

import numpy as np
from absl import flags

from hessian_tf import host, plotting
from hessian_tf.bin import error_line, run_program
from hessian_tf.io import results
from hessian_tf.linalg import bootstrap, density

_PROGRAM = "hessian-plot"
_RUNS = flags.DEFINE_list(
    "runs", [], "Comma-separated spectrum output directories (or a SpectrumCallback's npz files).")
_LABELS = flags.DEFINE_list(
    "labels", [], "Comma-separated legend labels, one per run (default: the directories' "
    "names, an .npz file's without .npz)."
)
_OUTPUT = flags.DEFINE_string("output", "", "The image to write (.png, .pdf or .svg).")
_KERNEL_WIDTH = flags.DEFINE_float(
    "kernel_width", 0.0,
    "Gaussian kernel width in x-axis units (decades of |lambda| with --log_abs); 0: default.",
)
_LOG_ABS = flags.DEFINE_bool("log_abs", False, "Plot against log10|lambda|, one curve per sign.")
DEFAULT_CONFIDENCE, DEFAULT_NUM_RESAMPLES = 0.9, 500  # the band's
_BAND = flags.DEFINE_bool("band", True, "Draw a bootstrap band over the draws (2 or more).")
_CONFIDENCE = flags.DEFINE_float("confidence", DEFAULT_CONFIDENCE,
                                  "Pointwise coverage of the band.")
_NUM_RESAMPLES = flags.DEFINE_integer("num_resamples", DEFAULT_NUM_RESAMPLES,
                                      "Bootstrap resamples of the draws.")
_NUM_GRID_POINTS = flags.DEFINE_integer("num_grid_points", 2048, "Points of the common grid.")
_TITLE = flags.DEFINE_string("title", "", "Plot title (default: the kernel width).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the bootstrap.")

FORMATS = ("png", "pdf", "svg")
# Eigenvalues smaller than this fraction of max|λ| are left out of the log|λ| view.
LOG_ABS_RELATIVE_FLOOR = 1e-9
DEFAULT_RELATIVE_LOG_KERNEL_WIDTH = 0.01
MARGIN_IN_KERNEL_WIDTHS = 8.0


class Run(NamedTuple):
    """One saved spectrum: per-draw nodes and weights (padding removed)."""

    path: str
    label: str
    nodes: list
    weights: list


Curve = plotting.Curve


def load_run(path: str, label: str) -> Run:
    """Reads OUTPUT_DIR/spectrum.npz, or an .npz file of the same arrays (a
    SpectrumCallback's spectrum-stepNNNNNNNN.npz); ValueError naming the run if it is
    unusable."""
    if os.path.isfile(path) and path.endswith(".npz"):
        npz_path = path
    elif not os.path.isdir(path):
        raise ValueError(f"--runs: {path!r} is not a directory or an .npz file; pass spectrum "
                         "output directories (or a SpectrumCallback's npz files).")
    else:
        npz_path = os.path.join(path, "spectrum.npz")
    if not os.path.isfile(npz_path):
        steps = sorted(glob.glob(os.path.join(glob.escape(path), "spectrum-step*.npz")))
        raise ValueError(
            f"--runs: {path!r} has no spectrum.npz; "
            + (f"it holds a SpectrumCallback's {len(steps)} npz file(s): pass one, e.g. "
               f"{steps[-1]}." if steps else
               "pass the --output_dir of a finished spectrum job.")
        )
    try:
        with np.load(npz_path) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError) as error:
        # NumPy takes a file that is no .npz for a pickle and offers allow_pickle.
        reason = ("not an .npz archive: cut short or overwritten?"
                  if "pickle" in str(error) else str(error))
        raise ValueError(f"--runs: cannot read {npz_path} ({reason}); pass the "
                         "--output_dir of a finished spectrum job.") from error
    missing = [key for key in ("nodes", "weights") if key not in arrays]
    if missing:
        raise ValueError(f"--runs: {npz_path} has no {' or '.join(missing)} array.")
    nodes = np.atleast_2d(np.asarray(arrays["nodes"], dtype=np.float64))
    weights = np.atleast_2d(np.asarray(arrays["weights"], dtype=np.float64))
    if nodes.ndim != 2 or nodes.shape != weights.shape or nodes.size == 0:
        raise ValueError(
            f"--runs: {npz_path} has nodes {nodes.shape} and weights {weights.shape}; "
            "expected two equal non-empty [num_draws, lanczos_steps] arrays."
        )
    steps = arrays.get("num_steps")
    steps = (
        np.full(nodes.shape[0], nodes.shape[1])
        if steps is None
        else np.asarray(steps, dtype=np.int64).reshape(-1)
    )
    if steps.shape != (nodes.shape[0],) or np.any(steps < 1) or np.any(steps > nodes.shape[1]):
        raise ValueError(f"--runs: {npz_path} has num_steps {steps.tolist()} that do not fit its nodes.")
    draws_nodes = [nodes[d, :k] for d, k in enumerate(steps)]
    draws_weights = [weights[d, :k] for d, k in enumerate(steps)]
    for d, (n, w) in enumerate(zip(draws_nodes, draws_weights)):
        if not (np.all(np.isfinite(n)) and np.all(np.isfinite(w)) and np.all(w >= 0)):
            raise ValueError(
                f"--runs: {npz_path} draw {d} has non-finite nodes or invalid weights."
            )
        if not w.sum() > 0:
            raise ValueError(f"--runs: {npz_path} draw {d} has weights summing to 0.")
    return Run(path, label, draws_nodes, draws_weights)


def _linear_curves(runs, *, kernel_width, band, confidence, num_resamples, num_grid_points, seed):
    all_nodes = np.concatenate([n for run in runs for n in run.nodes])
    low, high = float(all_nodes.min()), float(all_nodes.max())
    sigma = kernel_width or density.default_kernel_width(low, high)
    margin = MARGIN_IN_KERNEL_WIDTHS * sigma
    grid = np.linspace(low - margin, high + margin, num_grid_points)
    curves = []
    for index, run in enumerate(runs):
        with_band = band and len(run.nodes) > 1
        result = bootstrap.bootstrap_density_band(
            run.nodes, run.weights, grid=grid, kernel_width=sigma,
            num_resamples=num_resamples if with_band else 1, confidence=confidence, seed=seed,
        )
        curves.append(Curve(
            grid, result.density, result.lower if with_band else None,
            result.upper if with_band else None, run.label, index, "-",
        ))
    return curves, sigma


def _log_abs_curves(runs, *, kernel_width, band, confidence, num_resamples, num_grid_points, seed):
    largest = max(float(np.max(np.abs(n))) for run in runs for n in run.nodes)
    if largest == 0:
        raise ValueError("--log_abs: every eigenvalue is zero; there is no log|λ| to plot.")
    floor = LOG_ABS_RELATIVE_FLOOR * largest
    kept = np.concatenate([np.abs(n)[np.abs(n) >= floor] for run in runs for n in run.nodes])
    logs = np.log10(kept)
    low, high = float(logs.min()), float(logs.max())
    sigma = kernel_width or DEFAULT_RELATIVE_LOG_KERNEL_WIDTH * max(high - low, 1.0)
    margin = MARGIN_IN_KERNEL_WIDTHS * sigma
    grid = np.linspace(low - margin, high + margin, num_grid_points)
    curves = []
    for index, run in enumerate(runs):
        for sign, name, style in ((1.0, "λ > 0", "-"), (-1.0, "λ < 0", "--")):
            nodes, weights = [], []
            for n, w in zip(run.nodes, run.weights):
                mask = sign * n >= floor
                nodes.append(np.log10(sign * n[mask]))
                weights.append(w[mask] / w.sum())
            mass = float(np.mean([w.sum() for w in weights]))
            if mass == 0:
                continue
            with_band = band and len(run.nodes) > 1
            result = bootstrap.bootstrap_density_band(
                nodes, weights, grid=grid, kernel_width=sigma,
                num_resamples=num_resamples if with_band else 1, confidence=confidence,
                seed=seed, normalize=False,
            )
            label = f"{run.label}: {name} (mass {mass:.3g})" if run.label else f"{name} (mass {mass:.3g})"
            curves.append(Curve(
                grid, result.density, result.lower if with_band else None,
                result.upper if with_band else None, label, index, style,
            ))
    return curves, sigma


def default_labels(runs: Sequence[str]) -> list[str]:
    """The runs' legend labels where --labels gives none: a directory's name, an .npz
    file's name without `.npz`."""
    return [os.path.basename(os.path.normpath(run)).removesuffix(".npz") for run in runs]


def _check_typesets(flag: str, text: str) -> None:
    """Matplotlib typesets text between $ signs as math: math it cannot parse failed
    only when the image was saved, in its parser's words."""
    from matplotlib.textpath import TextPath

    if "$" not in text:  # no math (and TextPath fails on an empty text)
        return
    try:
        TextPath((0, 0), text)
    except ValueError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise ValueError(
            f"{flag}={text!r}: matplotlib cannot typeset it ({lines[-1] if lines else error}); "
            "write a dollar sign as \\$, or mend the math between $ signs.") from error


def render(
    run_dirs: Sequence[str],
    output: str,
    *,
    labels: Optional[Sequence[str]] = None,
    kernel_width: float = 0.0,
    log_abs: bool = False,
    band: bool = True,
    confidence: float = DEFAULT_CONFIDENCE,
    num_resamples: int = DEFAULT_NUM_RESAMPLES,
    num_grid_points: int = 2048,
    title: str = "",
    seed: int = 0,
) -> dict:
    """Checks every input, then writes `output` whole (or not at all).

    Returns what was drawn: {'output', 'kernel_width', 'runs', 'num_draws', 'view'}.
    """
    run_dirs = [r for r in run_dirs if r]
    if not run_dirs:
        raise ValueError("--runs is empty; pass one or more spectrum output directories.")
    if labels:
        if len(labels) != len(run_dirs):
            raise ValueError(
                f"--labels has {len(labels)} label(s) {list(labels)} for {len(run_dirs)} run(s); "
                "pass one label per run, or none."
            )
    else:
        labels = default_labels(run_dirs)
    if not math.isfinite(kernel_width) or kernel_width < 0:
        raise ValueError(
            f"--kernel_width={kernel_width}: pass a positive width, or 0 for the default."
        )
    if not 0 < confidence < 1:
        raise ValueError(f"--confidence={confidence}: pass a number strictly between 0 and 1.")
    if num_resamples < 1:
        raise ValueError(f"--num_resamples={num_resamples}: pass at least 1.")
    if num_grid_points < 2:
        raise ValueError(f"--num_grid_points={num_grid_points}: pass at least 2.")
    if seed < 0:
        raise ValueError(f"--seed={seed}: pass an integer >= 0 (the bootstrap's seed).")
    if not band:  # the band's own options, given without it, would be dropped
        for flag, value, default in (("--confidence", confidence, DEFAULT_CONFIDENCE),
                                     ("--num_resamples", num_resamples,
                                      DEFAULT_NUM_RESAMPLES), ("--seed", seed, 0)):
            if value != default:
                raise ValueError(f"{flag}={value} with --noband: it sets the bootstrap band, "
                                 f"which --noband leaves out; drop one of them.")
    for flag, text in [("--title", title), *(("--labels", label) for label in labels or ())]:
        _check_typesets(flag, text)
    refusal = bootstrap.density_memory_refusal(
        num_grid_points, 2 if band else 1, num_resamples, host.memory_bytes() // 2,
        "--num_grid_points or --num_resamples")
    if refusal:
        raise ValueError(refusal)
    if not output:
        raise ValueError("--output is empty; pass the image to write, e.g. --output=plot.png.")
    fmt = os.path.splitext(output)[1].lstrip(".").lower()
    if fmt not in FORMATS:
        raise ValueError(
            f"--output={output}: unknown image type {fmt!r}; end it in one of "
            f"{['.' + f for f in FORMATS]}."
        )
    if os.path.isdir(output):
        raise ValueError(f"--output={output} is a directory; pass a file name.")
    runs = [load_run(path, label) for path, label in zip(run_dirs, labels)]
    make = _log_abs_curves if log_abs else _linear_curves
    curves, sigma = make(
        runs, kernel_width=kernel_width, band=band, confidence=confidence,
        num_resamples=num_resamples, num_grid_points=num_grid_points, seed=seed,
    )
    unit = "decades" if log_abs else ""
    title = title or f"kernel width σ = {sigma:.3g}{' ' + unit if unit else ''}" + (
        f", {confidence:.0%} bootstrap band over draws"
        if band and any(len(run.nodes) > 1 for run in runs) else ""
    )
    xlabel = "log10 |eigenvalue|" if log_abs else "Eigenvalue"
    directory = os.path.dirname(os.path.abspath(output))
    # Made and proved writable first: a refusal names --output, not a temporary file.
    created = results.check_writable(directory, flag="--output's directory")
    try:
        results.write_files(
            directory,
            {os.path.basename(output): lambda path: plotting.plot_densities(
                curves, path, title=title, xlabel=xlabel, fmt=fmt)},
        )
    except BaseException:
        results.remove_empty_directories(created)
        raise
    return {
        "output": output,
        "kernel_width": sigma,
        "runs": [run.path for run in runs],
        "num_draws": [len(run.nodes) for run in runs],
        "view": "log_abs" if log_abs else "linear",
    }


def main(argv):
    if len(argv) > 1:
        return error_line(_PROGRAM, f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        drawn = render(
            _RUNS.value,
            _OUTPUT.value,
            labels=_LABELS.value,
            kernel_width=_KERNEL_WIDTH.value,
            log_abs=_LOG_ABS.value,
            band=_BAND.value,
            confidence=_CONFIDENCE.value,
            num_resamples=_NUM_RESAMPLES.value,
            num_grid_points=_NUM_GRID_POINTS.value,
            title=_TITLE.value,
            seed=_SEED.value,
        )
    except (ValueError, OSError) as error:
        return error_line(_PROGRAM, str(error) or type(error).__name__)
    print(
        f"hessian-plot: wrote {drawn['output']} ({len(drawn['runs'])} run(s), "
        f"kernel width {drawn['kernel_width']:.3g})"
    )
    return 0


def run():
    """Console-script entry point."""
    run_program(_PROGRAM, __name__, __doc__, main, log_progress=False)


if __name__ == "__main__":
    run()
