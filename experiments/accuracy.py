r"""The paper's accuracy check on digits: exact eigenvalues against SLQ.

  python experiments/accuracy.py --output_dir=results/experiment_accuracy

1. `hessian-spectrum --output_dir=OUTPUT_DIR/slq` with default settings: trains the
   embedded one-hidden-layer MLP (64 → 220 tanh → 10, 16,510 parameters) on the
   1797 digits for 20 epochs, saves it (OUTPUT_DIR/slq/model.keras) and runs
   degree-90 SLQ, one draw, with float32 products.
2. The exact Hessian of the same loss at the same weights: a float64 copy of that
   model, the dense matrix assembled column by column from 16,510 float64 products
   H eᵢ over all 1797 examples, symmetrised, and its eigenvalues (LAPACK eigvalsh).
3. Distances, printed and written to OUTPUT_DIR/accuracy.json:
   - extreme eigenvalues: |λ̂ − λ| / |λ| for λmax and λmin (λ̂ from SLQ);
   - Wasserstein-1 between the exact spectral measure (1/n) Σⱼ δ(λⱼ) and the SLQ
     measure Σᵢ wᵢ δ(ℓᵢ) (also divided by λmax − λmin);
   - L1 distance ∫ |φ̂ − φ| between the two measures smoothed by the same Gaussian
     kernel (the binary's σ) on one grid covering both.
4. One figure, OUTPUT_DIR/accuracy.png: both smoothed densities, log scale.

Minutes on 2 CPU cores (the 16,510 products dominate).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np


def run_binary(output_dir: str, *, reuse: bool = False) -> dict:
    """The spectrum binary with its defaults (it trains the default MLP)."""
    if reuse and os.path.exists(os.path.join(output_dir, "spectrum.npz")):
        return _read_binary_results(output_dir, seconds=float("nan"))
    binary = shutil.which("hessian-spectrum", path=os.path.dirname(sys.executable))
    command = [binary] if binary else [sys.executable, "-m", "hessian_tf.bin.spectrum"]
    command.append(f"--output_dir={output_dir}")
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return _read_binary_results(output_dir, seconds=time.perf_counter() - started)


def _read_binary_results(output_dir: str, *, seconds: float) -> dict:
    with open(os.path.join(output_dir, "summary.json")) as handle:
        summary = json.load(handle)
    with np.load(os.path.join(output_dir, "spectrum.npz")) as arrays:
        spectrum = {name: arrays[name] for name in arrays.files}
    return {"summary": summary, "spectrum": spectrum, "seconds": seconds}


def exact_eigenvalues(model_path: str, *, report_every: int = 2000) -> dict:
    """Eigenvalues of the dense float64 Hessian of the mean loss over all digits."""
    import keras

    from hessian_tf.io.datasets import load_digits
    from hessian_tf.operators import HessianOperator, KerasModelFunction
    from hessian_tf.operators.precision import cast_model

    x, y = load_digits()
    model = keras.saving.load_model(model_path, compile=False)
    model64 = cast_model(model, "float64")
    operator = HessianOperator(
        KerasModelFunction(model64), x.astype(np.float64), y, batch_size=x.shape[0]
    )
    dim = operator.dim
    hessian = np.empty((dim, dim), dtype=np.float64)
    unit = np.zeros(dim, dtype=np.float64)
    started = time.perf_counter()
    for column in range(dim):
        unit[column] = 1.0
        hessian[:, column] = operator.matvec(unit)
        unit[column] = 0.0
        if (column + 1) % report_every == 0 or column + 1 == dim:
            elapsed = time.perf_counter() - started
            print(
                f"  {column + 1:,}/{dim:,} products, {elapsed:.0f} s "
                f"({1000 * elapsed / (column + 1):.1f} ms each)", flush=True,
            )
    product_seconds = time.perf_counter() - started
    asymmetry = float(np.max(np.abs(hessian - hessian.T)) / np.max(np.abs(hessian)))
    hessian += hessian.T
    hessian *= 0.5
    started = time.perf_counter()
    eigenvalues = np.linalg.eigvalsh(hessian)
    return {
        "eigenvalues": eigenvalues,
        "dim": dim,
        "product_seconds": product_seconds,
        "eigh_seconds": time.perf_counter() - started,
        "relative_asymmetry": asymmetry,
    }


def distances(
    eigenvalues: np.ndarray, nodes: np.ndarray, weights: np.ndarray, sigma: float, tolerance: float
):
    """The printed distances between the exact and the SLQ spectra, and both
    smoothed densities on one grid."""
    from scipy.stats import wasserstein_distance

    from hessian_tf.linalg import gaussian_density
    from hessian_tf.linalg.density import DEFAULT_NUM_GRID_POINTS, MARGIN_IN_KERNEL_WIDTHS

    num_draws = nodes.shape[0]
    slq_nodes = nodes.ravel()
    slq_weights = weights.ravel() / num_draws
    keep = slq_weights > 0  # draws that stopped early are padded with zero weights
    slq_nodes, slq_weights = slq_nodes[keep], slq_weights[keep]
    exact_max, exact_min = float(eigenvalues[-1]), float(eigenvalues[0])
    slq_max, slq_min = float(slq_nodes.max()), float(slq_nodes.min())
    width = exact_max - exact_min
    w1 = float(wasserstein_distance(eigenvalues, slq_nodes, v_weights=slq_weights))
    low = min(exact_min, slq_min) - MARGIN_IN_KERNEL_WIDTHS * sigma
    high = max(exact_max, slq_max) + MARGIN_IN_KERNEL_WIDTHS * sigma
    grid = np.linspace(low, high, DEFAULT_NUM_GRID_POINTS)
    exact_density = gaussian_density(
        [eigenvalues], [np.full(eigenvalues.size, 1.0 / eigenvalues.size)],
        kernel_width=sigma, grid=grid,
    ).density
    slq_density = gaussian_density([slq_nodes], [slq_weights], kernel_width=sigma, grid=grid).density
    l1 = float(np.trapezoid(np.abs(exact_density - slq_density), grid))
    metrics = {
        "num_eigenvalues": int(eigenvalues.size),
        "exact_lambda_max": exact_max,
        "slq_lambda_max": slq_max,
        "lambda_max_relative_error": abs(slq_max - exact_max) / abs(exact_max),
        "exact_lambda_min": exact_min,
        "slq_lambda_min": slq_min,
        "lambda_min_relative_error": abs(slq_min - exact_min) / abs(exact_min),
        "lambda_min_error_over_norm": abs(slq_min - exact_min) / max(abs(exact_max), abs(exact_min)),
        "wasserstein_1": w1,
        "wasserstein_1_over_width": w1 / width,
        "kernel_width": sigma,
        "l1_smoothed_densities": l1,
        # Below −tolerance (the binary's zero tolerance): the many eigenvalues at
        # zero fall on either side of it by rounding alone.
        "zero_tolerance": tolerance,
        "exact_negative_fraction_beyond_tolerance": float(np.mean(eigenvalues < -tolerance)),
        "slq_negative_mass_beyond_tolerance": float(slq_weights[slq_nodes < -tolerance].sum()),
    }
    return metrics, grid, exact_density, slq_density


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="results/experiment_accuracy")
    parser.add_argument(
        "--reuse", action="store_true",
        help="reuse OUTPUT_DIR/slq and OUTPUT_DIR/exact_eigenvalues.npz of an earlier run "
        "(recompute only the distances and the figure)",
    )
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    started = time.perf_counter()

    slq_dir = os.path.join(args.output_dir, "slq")
    slq = run_binary(slq_dir, reuse=args.reuse)
    summary = slq["summary"]
    print(
        f"SLQ (binary, m={summary['config']['lanczos_steps']}, float32 products): "
        f"{summary['num_params']:,} parameters, {slq['seconds']:.1f} s including training",
        flush=True,
    )

    print("Exact Hessian: float64 products H e_i, one per column ...", flush=True)
    exact_path = os.path.join(args.output_dir, "exact_eigenvalues.npz")
    if args.reuse and os.path.exists(exact_path):
        with np.load(exact_path) as arrays:
            exact = {name: arrays[name] for name in arrays.files}
        exact.update({
            "dim": int(exact["dim"]),
            "product_seconds": float(exact["product_seconds"]),
            "eigh_seconds": float(exact["eigh_seconds"]),
            "relative_asymmetry": float(exact["relative_asymmetry"]),
        })
        print(f"  reusing {exact_path}", flush=True)
    else:
        exact = exact_eigenvalues(summary["model_file"])
        np.savez(exact_path, **exact)
    print(
        f"  {exact['dim']:,} products in {exact['product_seconds']:.0f} s, eigvalsh in "
        f"{exact['eigh_seconds']:.0f} s; max |H - H^T| / max |H| = {exact['relative_asymmetry']:.2e}",
        flush=True,
    )

    metrics, grid, exact_density, slq_density = distances(
        exact["eigenvalues"], slq["spectrum"]["nodes"], slq["spectrum"]["weights"],
        float(summary["kernel_width"]), float(summary["zero_tolerance"]),
    )
    metrics.update({
        "num_params": exact["dim"],
        "lanczos_steps": summary["config"]["lanczos_steps"],
        "num_draws": summary["config"]["num_draws"],
        "slq_precision": summary["precision"],
        "slq_seconds": None if np.isnan(slq["seconds"]) else slq["seconds"],
        "reused_earlier_results": bool(args.reuse),
        "exact_product_seconds": exact["product_seconds"],
        "exact_eigh_seconds": exact["eigh_seconds"],
        "exact_relative_asymmetry": exact["relative_asymmetry"],
        "seconds": time.perf_counter() - started,
    })

    from hessian_tf.plotting import plot_densities

    figure = os.path.join(args.output_dir, "accuracy.png")
    plot_densities(
        [
            (grid, exact_density, f"exact (dense float64, {exact['dim']:,} eigenvalues)"),
            (grid, slq_density, f"SLQ, m = {metrics['lanczos_steps']} (binary, float32 products)"),
        ],
        figure,
        title=(
            f"MLP on digits: exact vs SLQ, σ = {metrics['kernel_width']:.3g}, "
            f"L1 = {metrics['l1_smoothed_densities']:.3f}"
        ),
    )
    with open(os.path.join(args.output_dir, "accuracy.json"), "w") as handle:
        json.dump(metrics, handle, indent=2)

    print(f"\nλmax: exact {metrics['exact_lambda_max']:.10g}, SLQ {metrics['slq_lambda_max']:.10g}, "
          f"relative error {metrics['lambda_max_relative_error']:.2e}")
    print(f"λmin: exact {metrics['exact_lambda_min']:.10g}, SLQ {metrics['slq_lambda_min']:.10g}, "
          f"relative error {metrics['lambda_min_relative_error']:.2e} "
          f"({metrics['lambda_min_error_over_norm']:.2e} of max |λ|)")
    print(f"Wasserstein-1 (exact measure vs SLQ nodes/weights): {metrics['wasserstein_1']:.4g} "
          f"({metrics['wasserstein_1_over_width']:.2e} of λmax − λmin)")
    print(f"L1 between densities smoothed with σ = {metrics['kernel_width']:.4g}: "
          f"{metrics['l1_smoothed_densities']:.4f} (of at most 2)")
    print(f"Mass below −{metrics['zero_tolerance']:.3g}: exact "
          f"{metrics['exact_negative_fraction_beyond_tolerance']:.4f}, SLQ "
          f"{metrics['slq_negative_mass_beyond_tolerance']:.4f}")
    print(f"Total {metrics['seconds']:.0f} s. Wrote {figure} and accuracy.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
