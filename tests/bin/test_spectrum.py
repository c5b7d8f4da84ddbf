"""The spectrum binary end to end, and every bad input: one line, non-zero exit."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest



def run_binary(*args, cwd=None):
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [sys.executable, "-m", "hessian_tf.bin.spectrum", *args],
        capture_output=True, text=True, timeout=600, cwd=cwd, env=environment)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A 4-input MLP with 37 parameters (fewer than 90 Lanczos steps) and its data."""
    directory = tmp_path_factory.mktemp("small")
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"),
                              keras.layers.Dense(2)])
    model.layers[0].kernel.assign(model.layers[0].kernel * 3.0)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 4)).astype(np.float32)
    y = rng.integers(0, 2, 50).astype(np.int32)
    model.save(str(directory / "model.keras"))
    np.savez(directory / "data.npz", x=x, y=y)
    return directory, model, x, y


def test_default_job_end_to_end(tmp_path):
    result = run_binary("--lanczos_steps=12", "--num_draws=2", "--default_model_epochs=2",
                        f"--output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("num_params", "num_examples", "lambda_max", "lambda_min", "negative_mass",
                "num_hvps", "seconds", "config"):
        assert key in summary
    assert summary["num_params"] == 16510 and summary["num_examples"] == 1797
    # 2 draws × 12 steps in lockstep; the data's 15 batches are more than 4, so the
    # determinism check compares two runs over the first 4, not a repeated block.
    assert summary["num_hvps"] == 24
    assert summary["lockstep_draws"] == 2 and summary["resumed_lockstep_draws"] is None
    assert summary["seconds_per_step"] > 0
    assert summary["config"]["lanczos_steps"] == 12
    with np.load(tmp_path / "spectrum.npz") as spectrum:
        assert spectrum["alphas"].shape == (2, 12) and spectrum["betas"].shape == (2, 11)
        assert spectrum["nodes"].shape == (2, 12)
        np.testing.assert_allclose(spectrum["weights"].sum(axis=1), 1.0, atol=1e-12)
        assert np.trapezoid(spectrum["density"], spectrum["grid"]) == pytest.approx(1.0)
        assert spectrum["nodes"].max() == pytest.approx(summary["lambda_max"])
    assert (tmp_path / "density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "model.keras").exists()
    # A job of a few seconds is not slowed by checkpoints (--checkpoint_seconds=60).
    assert "Checkpoint " not in result.stderr
    # One progress line per Lanczos step of the two draws together.
    assert result.stderr.count("draws 1-2/2, Lanczos step") == 12
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def exact_hessian(model, x, y):
    """Dense float64 Hessian of the mean cross-entropy, on a float64 copy of the model."""
    import tensorflow as tf
    from hessian_tf.operators.precision import cast_model
    model, x = cast_model(model, "float64"), x.astype(np.float64)
    variables = [v.value for v in model.trainable_variables]
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            logits = tf.cast(model(x), tf.float64)
            loss = -tf.reduce_mean(tf.reduce_sum(
                tf.one_hot(y, 2, dtype=tf.float64) * tf.nn.log_softmax(logits), -1))
        gradient = tf.concat([tf.reshape(g, [-1]) for g in inner.gradient(loss, variables)], 0)
    jacobians = outer.jacobian(gradient, variables)
    return tf.concat([tf.reshape(j, [gradient.shape[0], -1]) for j in jacobians], 1).numpy()


@pytest.mark.parametrize("precision, tolerance", [("model", 1e-5), ("float64", 1e-10)])
def test_more_steps_than_parameters_gives_the_exact_spectrum(
        small_model, tmp_path, precision, tolerance):
    directory, model, x, y = small_model
    result = run_binary(f"--model={directory / 'model.keras'}", f"--dataset=npz:{directory / 'data.npz'}",
                        "--batch_size=16", f"--precision={precision}", f"--output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_params"] == 37 and summary["krylov_exhausted"] == [True]
    assert summary["lanczos_steps_completed"][0] <= 37
    eigenvalues = np.linalg.eigvalsh(exact_hessian(model, x, y))
    scale = float(np.max(np.abs(eigenvalues)))
    assert summary["lambda_max"] == pytest.approx(eigenvalues[-1], rel=tolerance)
    assert summary["lambda_min"] == pytest.approx(eigenvalues[0], abs=tolerance * scale)
    with np.load(tmp_path / "spectrum.npz") as spectrum:
        k = summary["lanczos_steps_completed"][0]
        nodes, weights = spectrum["nodes"][0, :k], spectrum["weights"][0, :k]
    # Every node is an eigenvalue; every eigenvalue with weight is a node.
    for node in nodes[weights > 1e-6]:
        assert np.min(np.abs(eigenvalues - node)) < tolerance * scale


def test_a_mixed_precision_model_in_float32(small_model, tmp_path):
    # A model trained in mixed_float16 computes in float16: --precision=model warns
    # once; --precision=float32 takes the products in a float32 copy, exact to float32.
    directory, model, x, y = small_model
    mixed = keras.Sequential([keras.Input((4,)), keras.layers.Dense(
        5, activation="tanh", dtype="mixed_float16"), keras.layers.Dense(
            2, dtype="mixed_float16")])
    mixed.set_weights(model.get_weights())
    assert [layer.dtype_policy.compute_dtype for layer in mixed.layers] == ["float16"] * 2
    mixed.save(str(tmp_path / "mixed.keras"))
    summaries = {}
    for precision in ("model", "float32"):
        result = run_binary(f"--model={tmp_path / 'mixed.keras'}",
                            f"--dataset=npz:{directory / 'data.npz'}", "--batch_size=16",
                            f"--precision={precision}", f"--output_dir={tmp_path / precision}")
        assert result.returncode == 0, result.stderr[-3000:]
        warned = ("--precision=model: 2 layer(s) of the model compute in float16 or "
                  "bfloat16 (dense") in result.stderr
        assert warned == (precision == "model")
        summaries[precision] = json.loads((tmp_path / precision / "summary.json").read_text())
    eigenvalues = np.linalg.eigvalsh(exact_hessian(model, x, y))  # the same weights
    assert summaries["float32"]["lambda_max"] == pytest.approx(eigenvalues[-1], rel=1e-5)
    assert summaries["model"]["compute_dtypes"] == ["float16"]
    assert summaries["float32"]["compute_dtypes"] == ["float32"]
    assert summaries["model"]["lambda_max"] == pytest.approx(eigenvalues[-1], rel=1e-2)


def test_config_file_and_flag_override(tmp_path):
    config = tmp_path / "small.py"
    config.write_text(
        "from hessian_tf.config import default_config\n"
        "def get_config():\n"
        "    c = default_config()\n"
        "    c.lanczos_steps = 3\n"
        "    c.default_model_epochs = 1\n"
        "    c.num_draws = 2\n"
        "    return c\n")
    out = tmp_path / "out"
    result = run_binary(f"--config={config}", "--num_draws=1", f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["lanczos_steps"] == 3  # from the file
    assert summary["config"]["num_draws"] == 1  # the flag wins


def bad_inputs(directory):
    """(arguments, text the error line must contain)."""
    model = f"--model={directory / 'model.keras'}"
    data = f"--dataset=npz:{directory / 'data.npz'}"
    return {
        "missing model": ([f"--model={directory / 'absent.keras'}", data], "--model="),
        "unreadable model": ([f"--model={directory / 'garbage.keras'}", data],
                             "not a .keras file (not a zip archive"),
        "wrong input shape": ([model, f"--dataset=npz:{directory / 'wide.npz'}"], "do not fit"),
        "labels out of range": ([model, f"--dataset=npz:{directory / 'labels.npz'}"], "labels range"),
        "unknown dataset": ([model, "--dataset=cifar"], "--dataset='cifar'"),
        "npz without y": ([model, f"--dataset=npz:{directory / 'noy.npz'}"], "lacks arrays ['y']"),
        "unknown loss": ([model, data, "--loss=hinge"], "--loss='hinge'"),
        "unknown bn_mode": ([model, data, "--bn_mode=eval"], "--bn_mode='eval'"),
        "zero steps": ([model, data, "--lanczos_steps=0"], "--lanczos_steps=0"),
        "zero draws": ([model, data, "--num_draws=0"], "--num_draws=0"),
        # 37 parameters × 10¹² steps: more than any host holds (left, it failed with
        # only "[Errno 12] Cannot allocate memory").
        "basis beyond memory": ([model, data, "--lanczos_steps=1000000000000"],
                                "--lanczos_steps=37 (more steps than the 37 parameters"),
        # Refused before the default MLP is trained and saved into the output directory.
        "default model's basis beyond memory": (
            ["--lanczos_steps=1000000000000", "--default_model_epochs=1"],
            "--lanczos_steps=16510 (more steps than the 16,510 parameters"),
        "unwritable output": ([model, data, f"--output_dir={directory / 'data.npz' / 'out'}"], "--output_dir="),
        # It had been dropped without a word.
        "default model's epochs with a model": ([model, data, "--default_model_epochs=3"],
                                                "--default_model_epochs=3 (the flag's, or "
                                                "set by --config) with --model="),
        "trace_matvecs without trace": ([model, data, "--trace_matvecs=50"],
                                        "--trace_matvecs=50 without --trace"),
        "preprocessing without stream": ([model, data, "--preprocessing=imagenet"],
                                         "--preprocessing=imagenet without --stream"),
        "output a file": ([model, data, f"--output_dir={directory / 'data.npz'}"],
                          "data.npz: a file, not a directory; pass a directory"),
        # Found at the first rename or save, after the run: results half-renamed.
        "a directory where a result goes": (
            [model, data, f"--output_dir={directory / 'occupied'}"],
            "summary.json is a directory, where the file summary.json goes"),
        "a file where the checkpoints go": (
            [model, data, f"--output_dir={directory / 'checkpoint_file'}"],
            "checkpoints is a file, where the checkpoints' directory goes"),
        "frozen model": ([f"--model={directory / 'frozen.keras'}", data], "no trainable variables"),
        "non-finite loss": ([f"--model={directory / 'nan.keras'}", data], "non-finite"),
        "unknown strategy": ([model, data, "--strategy=horovod"], "--strategy='horovod'"),
        "one-hot labels": ([model, f"--dataset=npz:{directory / 'onehot.npz'}"],
                           "--loss=categorical_crossentropy"),
        "softmax outputs": ([f"--model={directory / 'softmax.keras'}", data], "remove the final softmax"),
        "two inputs": ([f"--model={directory / 'two_inputs.keras'}", data],
                       "--model: the model takes 2 inputs"),
        "two outputs": ([f"--model={directory / 'two_outputs.keras'}", data],
                        "--model: the model has 2 outputs"),
        "negative unroll": ([model, data, "--unroll_steps=-1"], "--unroll_steps=-1"),
        # Data read whole: a split or tfds directory would be ignored.
        "split with npz data": ([model, data, "--split=test"],
                                "--split=test goes with --dataset=tfds:NAME"),
        "data_dir with the digits": (["--data_dir=/data", "--dataset=digits"],
                                     "--data_dir=/data goes with --dataset=tfds:NAME"),
        "cache with stream": ([model, "--dataset=tfds:mnist", "--stream", "--cache_residuals"],
                              "--cache_residuals: not with --stream"),
        "float32 copy with stream": ([model, "--dataset=tfds:mnist", "--stream",
                                      "--precision=float32"],
                                     "--stream with --precision=float32 is not supported"),
        "float32 copy of a SavedModel": ([f"--model={directory / 'saved'}", data,
                                          "--precision=float32"],
                                         "--precision=float32 needs a .keras model"),
    }


@pytest.fixture(scope="module")
def bad_files(small_model):
    directory, model, x, y = small_model
    (directory / "garbage.keras").write_bytes(b"not a zip file")
    np.savez(directory / "wide.npz", x=np.zeros((8, 7), np.float32), y=np.zeros(8, np.int32))
    np.savez(directory / "labels.npz", x=x, y=np.where(y == 1, 5, y))
    np.savez(directory / "noy.npz", x=x)
    np.savez(directory / "onehot.npz", x=x, y=np.eye(2, dtype=np.float32)[y])
    probabilities = keras.Sequential([model, keras.layers.Softmax()])
    probabilities.save(str(directory / "softmax.keras"))
    frozen = keras.models.clone_model(model)
    frozen.trainable = False
    frozen.save(str(directory / "frozen.keras"))
    broken = keras.models.clone_model(model)
    broken.layers[0].kernel.assign(np.full((4, 5), np.nan, np.float32))
    broken.save(str(directory / "nan.keras"))
    first, second = keras.Input((4,)), keras.Input((4,))
    keras.Model([first, second], keras.layers.Add()([first, second])).save(
        str(directory / "two_inputs.keras"))
    keras.Model(first, [model(first), model(first)]).save(str(directory / "two_outputs.keras"))
    from hessian_tf.io import export
    export.export_for_spectrum(model, str(directory / "saved"))
    (directory / "occupied" / "summary.json").mkdir(parents=True)
    (directory / "checkpoint_file").mkdir()
    (directory / "checkpoint_file" / "checkpoints").write_text("")
    return directory


@pytest.mark.parametrize("case", sorted(bad_inputs(__import__("pathlib").Path("."))))
def test_bad_input_one_line_and_nothing_written(bad_files, tmp_path, case):
    arguments, expected = bad_inputs(bad_files)[case]
    if not any(a.startswith("--output_dir") for a in arguments):
        arguments = arguments + [f"--output_dir={tmp_path / 'out'}"]
    result = run_binary(*arguments)
    assert result.returncode != 0
    error_lines = [l for l in result.stderr.splitlines() if "error" in l.lower()]
    assert len(error_lines) == 1, result.stderr[-3000:]
    assert error_lines[0].startswith("hessian-spectrum: error: ")
    assert expected in error_lines[0], error_lines[0]
    assert "Traceback" not in result.stderr
    assert result.returncode == 2
    assert not (tmp_path / "out").exists()  # not even an empty directory
    assert sorted(p.name for p in (bad_files / "occupied").iterdir()) == ["summary.json"]


@pytest.mark.parametrize("error, expected", [
    (lambda: __import__("tensorflow").errors.ResourceExhaustedError(
        None, None, "OOM when allocating tensor with shape[1797,4096] and type float on "
        "/job:localhost/replica:0/task:0/device:GPU:0 by allocator GPU_0_bfc\n"
        "Hint: If you want to see a list of allocated tensors when OOM happens, add "
        "report_tensor_allocations_upon_oom to RunOptions for current allocation info."),
     "out of device memory (OOM when allocating tensor with shape[1797,4096]"),
    # NumPy's, from the data or anything else on the host: every way out.
    (lambda: MemoryError("Unable to allocate 8.1 GiB for an array with shape (1797, 600000)"),
     "out of host memory (Unable to allocate 8.1 GiB"),
    # A Lanczos basis's: its own ways out alone.
    (lambda: __import__("hessian_tf").linalg.BasisMemoryError(
        "a Lanczos basis of 90 × 12,000,000 float64 entries, 8.05 GiB"),
     "out of host memory (a Lanczos basis of 90 × 12,000,000"),
])
def test_out_of_memory_is_told_with_the_ways_out(error, expected):
    # No machine here runs out of device memory on purpose: what TensorFlow (or
    # NumPy) raises is given to the function whose line the binary prints (the
    # lost-worker line, from the same function, is checked end to end in
    # tests/distribute). The binary is not imported: its flags would collide with plot's.
    from hessian_tf.bin import job_error_message

    message = job_error_message(error())
    assert expected in message
    bases = "Lanczos basis" in expected
    assert ("--stream" in message) == (not bases)
    assert ("--batch_size" in message) == (not bases)
    assert ("--basis_dtype=float32" in message) == ("host" in expected)
    assert ("fewer --lanczos_steps" in message) == ("host" in expected)
    assert "Hint" not in message and "\n" not in message


def test_custom_layers_through_import_modules(tmp_path):
    # The module that registers the custom layer is importable, but only
    # --import_modules has the job import it before loading the model.
    from tests.io.test_models import LAYERS_MODULE

    (tmp_path / "spectrum_custom_layers.py").write_text(LAYERS_MODULE)
    script = (
        "import sys, keras, numpy as np; sys.path.insert(0, sys.argv[1]);"
        "import spectrum_custom_layers as m;"
        "keras.Sequential([keras.Input((3,)), m.Scale(), keras.layers.Dense(2)])"
        ".save(sys.argv[1] + '/custom.keras')")
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=300)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((20, 3)).astype(np.float32),
             y=rng.integers(0, 2, 20))
    args = [f"--model={tmp_path / 'custom.keras'}", f"--dataset=npz:{tmp_path / 'data.npz'}",
            "--lanczos_steps=4"]
    # `python -m` puts the working directory, tmp_path, on sys.path.
    without = run_binary(*args, f"--output_dir={tmp_path / 'without'}", cwd=tmp_path)
    assert without.returncode == 2
    errors = [line for line in without.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--import_modules=MODULE" in errors[0], without.stderr[-2000:]
    assert not (tmp_path / "without").exists()
    with_module = run_binary(*args, "--import_modules=spectrum_custom_layers",
                             f"--output_dir={tmp_path / 'with'}", cwd=tmp_path)
    assert with_module.returncode == 0, with_module.stderr[-3000:]
    summary = json.loads((tmp_path / "with" / "summary.json").read_text())
    assert summary["num_params"] == 3 + 3 * 2 + 2


def test_an_experiment_not_trained_yet_is_told_as_such(tmp_path):
    # The config's spectrum reads the model hessian-train writes into its workdir.
    config = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "cnn_digits.py")
    workdir = tmp_path / "not_trained"
    result = run_binary(f"--config={config}:no_bn,smoke", f"--config.workdir={workdir}",
                        f"--output_dir={tmp_path / 'out'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"hessian-spectrum: error: --config.workdir={workdir}: no trained model there "
        f"({workdir}/model.keras does not exist); train it first with hessian-train and this "
        f"--config and --workdir={workdir}, or pass the workdir it was trained in."]
    assert not (tmp_path / "out").exists()


def test_an_experiment_trained_as_another_variant_is_told_as_such(tmp_path):
    # hessian-train wrote the workdir's config.json: a BN model, not the no_bn variant's.
    config = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "cnn_digits.py")
    workdir = tmp_path / "trained_bn"
    workdir.mkdir()
    (workdir / "model.keras").write_bytes(b"")  # present (not read: refused before)
    (workdir / "config.json").write_text(json.dumps(
        {"train": {"model": "cnn", "batch_norm": "on", "width": 0}}))
    result = run_binary(f"--config={config}:no_bn,smoke", f"--config.workdir={workdir}",
                        f"--output_dir={tmp_path / 'out'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"hessian-spectrum: error: --config.workdir={workdir}: its model was trained with "
        "train.batch_norm='on', not 'off' (its config.json); pass the --config variant it "
        "was trained with."]
    assert not (tmp_path / "out").exists()
