r"""The paper's BN comparison as one figure, from `hessian-train` work directories.

  python experiments/bn_comparison.py --output_dir=results/experiment_bn \
      results/experiment_bn/bn results/experiment_bn/no_bn [results/experiment_bn/population_bn]

Reads each WORKDIR's summary.json (which lists the spectra of that run) and the
spectrum-stepXXXXXXXX.npz files it names; draws, at step 0, the first evaluation
after it and the last, the densities of all runs overlaid on a log scale, plus
λmax / bulk edge against the step; prints
the table. Writes OUTPUT_DIR/bn_comparison.png and OUTPUT_DIR/bn_comparison.json.
The bulk edge is the 0.99-quantile of the quadrature measure (see
hessian_tf.keras.callback.bulk_edge): λmax / bulk edge is large when isolated
outliers stand far out of the bulk, and it does not depend on the scale of the
parameterisation (which BN changes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hessian_tf.plotting import DYNAMIC_RANGE  # noqa: E402

LABELS = {"on": "BN", "off": "no BN", "population": "population BN"}
MODEL_NAMES = {"cnn": "small CNN on digits", "resnet32": "ResNet-32", "resnet18": "ResNet-18",
               "mlp": "MLP"}


def load_run(workdir: str) -> dict:
    path = os.path.join(workdir, "summary.json")
    if not os.path.exists(path):
        raise ValueError(f"{workdir}: no summary.json; run hessian-train there first.")
    with open(path) as handle:
        summary = json.load(handle)
    spectra = {}
    for entry in summary["spectra"]:
        with np.load(entry["path"]) as arrays:
            spectra[int(entry["step"])] = {
                "grid": arrays["grid"], "density": arrays["density"],
                "lanczos_steps": int(arrays["alphas"].shape[-1]), **entry
            }
    if not spectra:
        raise ValueError(f"{workdir}: the run took no spectra (spectrum_callback.enabled?).")
    label = LABELS.get(summary.get("batch_norm"), os.path.basename(workdir.rstrip("/")))
    return {"label": label, "summary": summary, "spectra": spectra}


def panel_steps(steps: list[int]) -> list[int]:
    """Step 0, the first evaluation after it, and the last one."""
    return sorted(set([steps[0], steps[min(1, len(steps) - 1)], steps[-1]]))


def draw(runs: list[dict], path: str) -> None:
    common = sorted(set.intersection(*(set(run["spectra"]) for run in runs)))
    steps = panel_steps(common)
    figure, axes = plt.subplots(2, 2, figsize=(11, 8), dpi=110)
    axes = axes.ravel()
    for axis, step in zip(axes, steps):
        peak = max(float(run["spectra"][step]["density"].max()) for run in runs)
        floor = peak * DYNAMIC_RANGE
        for run in runs:
            spectrum = run["spectra"][step]
            axis.semilogy(
                spectrum["grid"], np.maximum(spectrum["density"], floor), linewidth=1.1,
                label=(
                    f"{run['label']}: λmax {spectrum['lambda_max']:.3g}, "
                    f"λmax/edge {spectrum['lambda_max_over_bulk_edge']:.0f}"
                ),
            )
        axis.set_ylim(floor, peak * 3)
        axis.set_title(f"step {step}")
        axis.set_xlabel("Eigenvalue")
        axis.set_ylabel("Density (log scale)")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    for axis in axes[len(steps):-1]:
        axis.axis("off")
    ratio_axis = axes[-1]
    for run in runs:
        ordered = sorted(run["spectra"])
        ratio_axis.semilogy(
            ordered, [run["spectra"][s]["lambda_max_over_bulk_edge"] for s in ordered],
            marker="o", markersize=3, label=run["label"],
        )
    ratio_axis.set_title("Outliers: λmax / bulk edge (0.99-quantile)")
    ratio_axis.set_xlabel("Training step")
    ratio_axis.grid(True, which="both", alpha=0.3)
    ratio_axis.legend(fontsize=8)
    first = runs[0]["summary"]
    # The runs' parameter counts differ (BN adds its scales and shifts), their m may.
    counts = sorted({run["summary"]["num_params"] for run in runs})
    steps = sorted({spectrum["lanczos_steps"] for run in runs
                    for spectrum in run["spectra"].values()})
    figure.suptitle(
        f"Hessian spectra along training: {MODEL_NAMES.get(first['model'], first['model'])}, "
        f"{' to '.join(f'{count:,}' for count in (counts[0], counts[-1])[:len(counts)])} "
        f"parameters, SLQ m = {', '.join(map(str, steps))}"
    )
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def table(runs: list[dict]) -> list[dict]:
    rows = []
    for run in runs:
        for step in sorted(run["spectra"]):
            spectrum = run["spectra"][step]
            rows.append({
                "run": run["label"],
                "step": step,
                "lambda_max": spectrum["lambda_max"],
                "lambda_min": spectrum["lambda_min"],
                "bulk_edge": spectrum["bulk_edge"],
                "lambda_max_over_bulk_edge": spectrum["lambda_max_over_bulk_edge"],
            })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", help="hessian-train work directories")
    parser.add_argument("--output_dir", default="results/experiment_bn")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(workdir) for workdir in args.workdirs]
    except (ValueError, OSError, KeyError) as error:
        print(f"bn_comparison: error: {error}", file=sys.stderr)
        return 2
    os.makedirs(args.output_dir, exist_ok=True)
    figure_path = os.path.join(args.output_dir, "bn_comparison.png")
    draw(runs, figure_path)
    rows = table(runs)
    print(f"{'run':<15}{'step':>6}{'lambda_max':>13}{'lambda_min':>13}{'bulk edge':>12}{'ratio':>9}")
    for row in rows:
        print(
            f"{row['run']:<15}{row['step']:>6}{row['lambda_max']:>13.4g}{row['lambda_min']:>13.4g}"
            f"{row['bulk_edge']:>12.4g}{row['lambda_max_over_bulk_edge']:>9.1f}"
        )
    finals = {}
    for run in runs:
        last = max(run["spectra"])
        steps = sorted(run["spectra"])
        ratios = [run["spectra"][s]["lambda_max_over_bulk_edge"] for s in steps]
        finals[run["label"]] = {
            "final_step": last,
            "final_ratio": ratios[-1],
            "median_ratio_after_step_0": float(np.median(ratios[1:])) if len(ratios) > 1 else None,
            "final_training_loss": run["summary"].get("final_loss"),
            "final_training_accuracy": run["summary"].get("final_accuracy"),
            "seconds": run["summary"].get("seconds"),
        }
    print("\nλmax / bulk edge (0.99-quantile):")
    for label, values in finals.items():
        print(
            f"  {label:<14} final (step {values['final_step']}): {values['final_ratio']:.1f}, "
            f"median after step 0: {values['median_ratio_after_step_0']:.1f}; "
            f"training loss {values['final_training_loss']:.4f}"
        )
    with open(os.path.join(args.output_dir, "bn_comparison.json"), "w") as handle:
        json.dump({"runs": finals, "spectra": rows}, handle, indent=2)
    print(f"\nWrote {figure_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
