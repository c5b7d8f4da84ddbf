"""hessian-plot: densities rebuilt from saved nodes and weights, views, bands, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hessian_tf import linalg
from hessian_tf.bin import plot

PNG = b"\x89PNG\r\n\x1a\n"


def run_plot(*args):
    return subprocess.run([sys.executable, "-m", "hessian_tf.bin.plot", *args],
                          capture_output=True, text=True, timeout=120)


def fabricate(directory, nodes, weights, num_steps=None):
    os.makedirs(directory, exist_ok=True)
    arrays = {"nodes": np.asarray(nodes, float), "weights": np.asarray(weights, float)}
    if num_steps is not None:
        arrays["num_steps"] = np.asarray(num_steps)
    np.savez(os.path.join(directory, "spectrum.npz"), **arrays)
    return str(directory)


@pytest.fixture
def two_runs(tmp_path):
    rng = np.random.default_rng(0)

    def draws(shift, num_draws):
        nodes = np.sort(rng.normal(shift, 1.0, (num_draws, 8)), axis=1)
        weights = rng.uniform(0.1, 1.0, (num_draws, 8))
        return nodes, weights / weights.sum(axis=1, keepdims=True)

    first = fabricate(tmp_path / "bn", *draws(0.0, 3))
    second = fabricate(tmp_path / "no_bn", *draws(2.0, 1))
    return first, second


def test_overlay_on_a_common_grid_with_bands(two_runs):
    runs = [plot.load_run(path, label) for path, label in zip(two_runs, ["a", "b"])]
    curves, sigma = plot._linear_curves(runs, kernel_width=0.0, band=True, confidence=0.9,
                                        num_resamples=100, num_grid_points=1000, seed=0)
    all_nodes = np.concatenate([n for run in runs for n in run.nodes])
    assert sigma == pytest.approx(0.002 * (all_nodes.max() - all_nodes.min()))
    assert curves[0].grid is curves[1].grid  # one grid for every run
    for curve, run in zip(curves, runs):
        expected = linalg.gaussian_density(run.nodes, run.weights, kernel_width=sigma,
                                           grid=curve.grid).density
        np.testing.assert_allclose(curve.density, expected, rtol=1e-12, atol=1e-300)
        assert np.trapezoid(curve.density, curve.grid) == pytest.approx(1.0)
    assert curves[0].lower is not None and np.all(curves[0].lower <= curves[0].upper)
    assert curves[1].lower is None  # one draw: no band


def test_new_kernel_width_and_labels(two_runs, tmp_path):
    output = tmp_path / "out" / "plot.png"
    drawn = plot.render(two_runs, str(output), labels=["BN", "no BN"], kernel_width=0.5,
                        num_resamples=50)
    assert output.read_bytes()[:8] == PNG
    assert drawn["kernel_width"] == 0.5 and drawn["num_draws"] == [3, 1]
    assert not [p for p in os.listdir(output.parent) if p.startswith(".tmp")]


def test_log_abs_view_splits_the_signs(tmp_path):
    nodes = [[-0.5, 1e-3, 1.0, 100.0], [-2.0, 0.01, 10.0, 100.0]]
    weights = [[0.25, 0.25, 0.25, 0.25], [0.5, 0.1, 0.2, 0.2]]
    run = plot.load_run(fabricate(tmp_path / "run", nodes, weights), "r")
    curves, sigma = plot._log_abs_curves([run], kernel_width=0.05, band=True, confidence=0.9,
                                         num_resamples=50, num_grid_points=4000, seed=0)
    positive, negative = curves
    assert "λ > 0" in positive.label and "λ < 0" in negative.label
    # Each sign's curve carries that sign's weight, averaged over the draws.
    assert np.trapezoid(positive.density, positive.grid) == pytest.approx(0.625, rel=1e-6)
    assert np.trapezoid(negative.density, negative.grid) == pytest.approx(0.375, rel=1e-6)
    assert positive.grid[0] < -3 < 2 < positive.grid[-1]  # log10 of 1e-3 … 100
    output = tmp_path / "log.svg"
    plot.render([run.path], str(output), log_abs=True)
    assert output.read_text().lstrip().startswith("<?xml")


def test_a_callbacks_npz_files_are_runs_labelled_by_their_step(tmp_path, two_runs):
    # SpectrumCallback writes LOG_DIR/spectrum-stepNNNNNNNN.npz, arrays as spectrum.npz.
    os.makedirs(tmp_path / "logs")
    for step, run in zip((0, 8), two_runs):
        os.replace(os.path.join(run, "spectrum.npz"),
                   tmp_path / "logs" / f"spectrum-step{step:08d}.npz")
    files = sorted(str(p) for p in (tmp_path / "logs").iterdir())
    output = tmp_path / "steps.png"
    result = run_plot(f"--runs={','.join(files)}", f"--output={output}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.load_run(files[0], "a").nodes[0].size == 8
    # Labelled by the file's name without .npz (a directory's: its name).
    assert plot.default_labels(files + ["results/bn/"]) == [
        "spectrum-step00000000", "spectrum-step00000008", "bn"]


def test_padding_past_num_steps_is_ignored(tmp_path):
    nodes = [[5.0, 6.0, 7.0], [5.5, 6.5, 0.0]]  # draw 1 stopped after 2 steps
    weights = [[0.2, 0.3, 0.5], [0.4, 0.6, 0.0]]
    run = plot.load_run(fabricate(tmp_path / "run", nodes, weights, num_steps=[3, 2]), "")
    assert [n.size for n in run.nodes] == [3, 2]
    curves, sigma = plot._linear_curves([run], kernel_width=0.0, band=False, confidence=0.9,
                                        num_resamples=10, num_grid_points=100, seed=0)
    assert curves[0].grid[0] > 4.9  # the padded 0 is not part of the spectrum


@pytest.mark.parametrize("arguments, expected", [
    (["--runs={missing}"], "is not a directory"),
    (["--runs={empty}"], "has no spectrum.npz; pass the --output_dir of a finished"),
    (["--runs={callback}"], "has no spectrum.npz; it holds a SpectrumCallback's 2 npz "
     "file(s): pass one, e.g. "),
    (["--runs={good},{good}", "--labels=a,b,c"], "--labels has 3 label(s)"),
    (["--runs={good}", "--kernel_width=-0.1"], "--kernel_width=-0.1"),
    (["--runs={good}", "--kernel_width=abc"], "--kernel_width=abc"),
    (["--runs={good}", "--confidence=1.0"], "--confidence=1.0"),
    (["--runs={good}", "--seed=-1"], "--seed=-1: pass an integer >= 0"),
    # The band's options without the band had been dropped without a word.
    (["--runs={good}", "--noband", "--confidence=0.5"], "--confidence=0.5 with --noband"),
    (["--runs={good}", "--noband", "--num_resamples=50"], "--num_resamples=50 with --noband"),
    (["--runs={good}", "--noband", "--seed=7"], "--seed=7 with --noband"),
    # Math between $ signs that matplotlib cannot parse failed when the image was saved.
    (["--runs={good}", r"--title=$\frac{{x$"], r"--title='$\\frac{x$': matplotlib cannot "
     "typeset it (ParseSyntaxException"),
    (["--runs={good}", r"--labels=$\sqrt{{a$"], r"--labels='$\\sqrt{a$': matplotlib cannot"),
    (["--runs={good}", "--num_grid_points=99999999999999999999"],
     "--num_grid_points=99999999999999999999: the density's arrays would need"),
    (["--runs={bad}"], "has nodes (2, 3) and weights (2, 2)"),
    (["--runs="], "--runs is empty"),
    # NumPy takes bytes that are no .npz for a pickle, and would advise allow_pickle.
    (["--runs={corrupt}"], "(not an .npz archive: cut short or overwritten?)"),
])
def test_bad_input_is_one_line_and_no_file(tmp_path, arguments, expected):
    paths = {
        "missing": str(tmp_path / "missing"),
        "empty": str(tmp_path / "empty"),
        "good": fabricate(tmp_path / "good", [[1.0, 2.0]], [[0.5, 0.5]]),
        "bad": fabricate(tmp_path / "bad", np.zeros((2, 3)), np.ones((2, 2))),
    }
    os.makedirs(paths["empty"])
    paths["callback"] = str(tmp_path / "logs")  # a SpectrumCallback's log_dir
    for step in (0, 8):
        os.makedirs(tmp_path / "logs", exist_ok=True)
        np.savez(tmp_path / "logs" / f"spectrum-step{step:08d}.npz", nodes=[[1.0]], weights=[[1.0]])
    paths["corrupt"] = str(tmp_path / "corrupt")
    os.makedirs(paths["corrupt"])
    (tmp_path / "corrupt" / "spectrum.npz").write_bytes(bytes(range(256)) * 4)
    output = tmp_path / "plot.png"
    result = run_plot(*[a.format(**paths) for a in arguments], f"--output={output}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hessian-plot: error:"), result.stderr
    assert expected in lines[0]
    assert not output.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_bad_output_name(tmp_path, two_runs):
    with pytest.raises(ValueError, match="unknown image type 'jpeg'"):
        plot.render(two_runs, str(tmp_path / "plot.jpeg"))
    assert not (tmp_path / "plot.jpeg").exists()


def test_an_unwritable_output_directory_is_named(tmp_path, two_runs, monkeypatch):
    # As a user who may not write there (root may, so the refusal is simulated): the
    # error names --output's directory, not the temporary file written first, and the
    # directories made for it are removed.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".write-test-x"))

    monkeypatch.setattr(plot.results.tempfile, "NamedTemporaryFile", refuse)
    output = tmp_path / "new" / "sub" / "plot.png"
    with pytest.raises(ValueError, match=r"^--output's directory=\S+sub: cannot write there "
                                         r"\(Permission denied\)"):
        plot.render(two_runs, str(output))
    assert not (tmp_path / "new").exists()


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A real spectrum job: the default MLP after one epoch, 2 draws of 5 steps."""
    directory = tmp_path_factory.mktemp("real")
    result = subprocess.run(
        [sys.executable, "-m", "hessian_tf.bin.spectrum", "--lanczos_steps=5", "--num_draws=2",
         "--default_model_epochs=1", "--check_determinism=false", f"--output_dir={directory}"],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0, result.stderr[-3000:]
    return directory


def test_real_run_rerendered_without_products(real_run, tmp_path):
    summary = json.loads((real_run / "summary.json").read_text())
    with np.load(real_run / "spectrum.npz") as saved:
        saved_grid, saved_density = saved["grid"], saved["density"]
    run = plot.load_run(str(real_run), "mlp")
    # The saved density is exactly what the saved nodes and weights give back.
    again = linalg.gaussian_density(run.nodes, run.weights, kernel_width=summary["kernel_width"],
                                    num_grid_points=saved_grid.size)
    np.testing.assert_allclose(again.grid, saved_grid, rtol=1e-12)
    np.testing.assert_allclose(again.density, saved_density, rtol=1e-9, atol=1e-12)
    output = tmp_path / "overlay.png"
    result = run_plot(f"--runs={real_run},{real_run}", "--labels=first,second",
                      f"--output={output}", "--kernel_width=0.05")
    assert result.returncode == 0, result.stderr
    assert output.read_bytes()[:8] == PNG and "wrote" in result.stdout
    result = run_plot(f"--runs={real_run}", f"--output={tmp_path / 'log.png'}", "--log_abs")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "log.png").read_bytes()[:8] == PNG
