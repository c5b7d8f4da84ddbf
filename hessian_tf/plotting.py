"""Density plots in the style of the paper: log-scale density against eigenvalue."""

from __future__ import annotations

from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# Densities below this fraction of their peak are not drawn: the Gaussian tails
# would otherwise reach down to 1e-300 and flatten the picture.
DYNAMIC_RANGE = 1e-9


def plot_densities(
    curves: Sequence[tuple[np.ndarray, np.ndarray, str]],
    path: str,
    *,
    title: Optional[str] = None,
    xlabel: str = "Eigenvalue",
) -> None:
    """Writes a PNG with one log-scale density curve per (grid, density, label)."""
    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=120)
    peak = max(float(np.max(d)) for _, d, _ in curves)
    floor = peak * DYNAMIC_RANGE
    for grid, density, label in curves:
        axis.semilogy(grid, np.maximum(density, floor), label=label or None, linewidth=1.2)
    axis.set_ylim(floor, peak * 3)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("Density (log scale)")
    if title:
        axis.set_title(title)
    if any(label for _, _, label in curves):
        axis.legend()
    axis.grid(True, which="major", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)
