"""Density plots in the style of the paper: log-scale density against eigenvalue."""

from __future__ import annotations

import textwrap
from typing import NamedTuple, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# Densities below this fraction of their peak are not drawn: the Gaussian tails
# would otherwise reach down to 1e-300 and flatten the picture.
DYNAMIC_RANGE = 1e-9


class Curve(NamedTuple):
    """One line of a plot, with an optional band (lower, upper)."""

    grid: np.ndarray  # [G]
    density: np.ndarray  # [G]
    lower: Optional[np.ndarray] = None  # [G]
    upper: Optional[np.ndarray] = None  # [G]
    label: str = ""
    color_index: Optional[int] = None  # None: the next colour
    linestyle: str = "-"


def steps_label(num_steps, lanczos_steps: int) -> str:
    """`m=80`, or `m=65 of 80` where every draw's Krylov space ran out first (the
    titles of the job's and the callback's plots)."""
    steps = int(max(num_steps))
    return f"m={steps}" + (f" of {lanczos_steps}" if steps < lanczos_steps else "")


def plot_densities(
    curves: Sequence,
    path: str,
    *,
    title: Optional[str] = None,
    xlabel: str = "Eigenvalue",
    fmt: str = "png",
) -> None:
    """Writes a figure with one log-scale density per curve: a Curve, or a
    (grid, density, label) tuple."""
    curves = [c if isinstance(c, Curve) else Curve(c[0], c[1], label=c[2]) for c in curves]
    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=120)
    peak = max(float(np.max(c.upper if c.upper is not None else c.density)) for c in curves)
    floor = peak * DYNAMIC_RANGE
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, curve in enumerate(curves):
        color = colors[(index if curve.color_index is None else curve.color_index) % len(colors)]
        axis.semilogy(curve.grid, np.maximum(curve.density, floor), color=color,
                      linestyle=curve.linestyle, linewidth=1.2, label=curve.label or None)
        if curve.lower is not None and curve.upper is not None:
            axis.fill_between(curve.grid, np.maximum(curve.lower, floor),
                              np.maximum(curve.upper, floor), color=color, alpha=0.25,
                              linewidth=0)
    axis.set_ylim(floor, peak * 3)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("Density (log scale)")
    if title:
        # Long titles (paths) wrap instead of running off the figure.
        axis.set_title("\n".join(textwrap.wrap(title, 70)), fontsize="medium")
    if any(curve.label for curve in curves):
        axis.legend(fontsize="small")
    axis.grid(True, which="major", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format=fmt)
    plt.close(figure)
