"""Streaming products (data read at every product) equal in-memory products;
the ImageNet path runs end to end on mock data with a narrow ResNet-18."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from hessian_tf import config as config_lib
from hessian_tf import job, operators
from hessian_tf.operators import hessian
from hessian_tf.operators.streaming import StreamingHessianOperator, array_dataset_fn, pad_rows


def small_problem(num_examples=23, batch_norm=False):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(4, activation="tanh")]
        + ([keras.layers.BatchNormalization()] if batch_norm else []) + [keras.layers.Dense(3)])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((num_examples, 5)).astype(np.float32)
    y = rng.integers(0, 3, num_examples).astype(np.int32)
    return model, x, y


@pytest.mark.parametrize("num_devices, num_examples, bn_mode, pad_batches", [
    (1, 23, "inference", False), (3, 23, "inference", False), (3, 25, "train", False),
    (3, 25, "train", True)])
def test_streaming_equals_in_memory(num_devices, num_examples, bn_mode, pad_batches):
    # One input pipeline, its batches dealt to the replicas in turn. 23: a partial
    # last batch of 3. 25 in train-mode BN: the last step deals [1, 0, 0], so two
    # replicas get an empty batch, whose BN statistics would be NaN if it ran.
    # pad_batches: zero rows appended to every batch, as under a TPUStrategy.
    model, x, y = small_problem(num_examples, batch_norm=bn_mode == "train")
    reference = operators.HessianOperator(
        operators.KerasModelFunction(model), x, y, batch_size=4, bn_mode=bn_mode)
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:num_devices]
    strategy = tf.distribute.MirroredStrategy(devices) if num_devices > 1 else None
    streaming = StreamingHessianOperator(
        operators.KerasModelFunction(model), array_dataset_fn(x, y, 4), num_examples=num_examples,
        sample=(x[:2], y[:2]), batch_size=4, strategy=strategy, bn_mode=bn_mode)
    assert streaming.num_examples == num_examples and not streaming.pad_batches
    streaming.pad_batches = pad_batches  # before the first trace
    vector = np.random.default_rng(1).standard_normal(reference.dim)
    np.testing.assert_allclose(streaming.matvec(vector), reference.matvec(vector),
                               rtol=1e-6, atol=1e-7)
    loss, gradient = streaming.loss_and_gradient()
    expected_loss, expected_gradient = reference.loss_and_gradient()
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-5, atol=1e-7)
    # The pipeline is read again at every product, with no retracing.
    streaming.matvec(vector)
    assert streaming._product_function.experimental_get_tracing_count() == 1
    # A while loop over an iterator, not Dataset.reduce (over the default strategy's
    # plain dataset), which optimised the product graph again at every call (~0.2 s).
    graph = streaming._product_trace(1).graph.as_graph_def()
    op_types = {node.op for node in graph.node} | {
        node.op for function in graph.library.function for node in function.node_def}
    assert "While" in op_types or "StatelessWhile" in op_types
    assert "ReduceDataset" not in op_types


def test_padded_batches_compile_every_branch_under_xla():
    # What a TPU compiles: the trace is chosen by a count unknown at compile time, so
    # every branch is compiled for the batch's shape; here 3 rows (a step whose batches
    # are all partial or empty) while the static trace slices 4. Without padding XLA
    # refuses that slice. (Leaving out the dynamic trace keeps the count unknown to
    # XLA on the CPU; a TPU compiles that trace with dynamic shapes.)
    x = tf.constant(np.arange(6.0).reshape(3, 2))

    def batch_fn(xb, yb):
        return tf.reshape(tf.reduce_sum(xb), [1])

    def value(pad, count):
        @tf.function(jit_compile=True)
        def run(x, count):
            xs, ys = (pad_rows(t, 4) if pad else t for t in (x, x[:, 0]))
            return hessian.batch_value(batch_fn, xs, ys, count, (), size=1,
                                       static_sizes=(4,), dynamic=False)
        return float(run(x, tf.constant(count))[0])

    with pytest.raises(tf.errors.InvalidArgumentError, match=r"Expected size\[0\] in \[0, 3\]"):
        value(pad=False, count=0)
    assert value(pad=True, count=0) == 0.0  # an empty batch, as TPUs deal at the end
    padded = pad_rows(x, 4).numpy()  # the rows are appended, the batch's own unchanged
    assert padded.shape == (7, 2) and np.array_equal(padded[:3], x.numpy())
    assert not padded[3:].any()


def spectrum_config(tmp_path, **overrides):
    config = config_lib.default_config()
    config.update(dict(lanczos_steps=5, output_dir=str(tmp_path), check_determinism=True))
    config.update(overrides)
    return config


def test_streamed_tfds_job_equals_in_memory(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10)])
    model.save(str(tmp_path / "model.keras"))
    common = dict(model=str(tmp_path / "model.keras"), dataset="tfds:mnist",
                  split="train", batch_size=16)
    with tfds.testing.mock_data(num_examples=50):
        memory = job.run(spectrum_config(tmp_path / "memory", **common))
        streamed = job.run(spectrum_config(tmp_path / "streamed", stream=True, **common))
    assert streamed["num_examples"] == memory["num_examples"] == 50
    assert streamed["lambda_max"] == pytest.approx(memory["lambda_max"], rel=1e-5)
    assert json.loads((tmp_path / "streamed" / "summary.json").read_text())["config"]["stream"]


@pytest.mark.parametrize("operator", ["hessian", "ggn"])
def test_the_dry_run_counts_the_analyses_products_as_the_run_does(tmp_path, operator):
    model, x, y = small_problem()
    model.save(str(tmp_path / "model.keras"))
    np.savez(tmp_path / "data.npz", x=x, y=y)
    options = dict(model=str(tmp_path / "model.keras"), dataset=f"npz:{tmp_path / 'data.npz'}",
                   batch_size=4, lanczos_steps=7, num_draws=2, trace=True, trace_matvecs=12,
                   gradient_overlap=True, num_eigenpairs=2, operator=operator,
                   method="reverse_over_reverse" if operator == "hessian" else "auto")
    cost = job.run(spectrum_config(tmp_path / "dry", dry_run=True, **options))
    summary = job.run(spectrum_config(tmp_path / "run", **options))
    # 2 draws x 7 steps, Hutch++'s 12, the overlap's Lanczos run of 7: (the determinism
    # check runs over the first 2 batches, no product of its own).
    assert cost["hessian_vector_products"] == summary["num_hvps"] == 14 + 12 + 7
    assert cost["data_passes"] == 7 + 12 + 7 + 1
    # This session's products, as the operator counts them: the same (the determinism
    # check's runs over the first 2 batches are no products over the data).
    assert summary["num_hvps_this_session"] == summary["num_hvps"]


def test_dry_run_prints_the_cost_and_writes_nothing(tmp_path, capsys):
    model, x, y = small_problem()
    model.save(str(tmp_path / "model.keras"))
    np.savez(tmp_path / "data.npz", x=x, y=y)
    cost = job.run(spectrum_config(
        tmp_path / "out", model=str(tmp_path / "model.keras"),
        dataset=f"npz:{tmp_path / 'data.npz'}", batch_size=4, lanczos_steps=90, num_draws=2,
        dry_run=True))
    # Two draws in lockstep: 90 blocks of 2 products and the gradient pass; the
    # determinism check runs over the first 2 of the 6 batches, no product of its own.
    assert cost["lockstep_draws"] == 2
    assert cost["hessian_vector_products"] == 180 and cost["data_passes"] == 91
    assert cost["lanczos_basis_bytes"] == 2 * 90 * 39 * 8
    assert cost["estimated_seconds"] > 0
    assert cost["estimated_seconds"] == (cost["estimated_product_seconds"]
                                         + cost["estimated_algebra_seconds"])
    assert cost["estimated_algebra_seconds"] > 0
    printed = capsys.readouterr().out
    assert "of Lanczos algebra on this host" in printed
    assert "180 Hessian-vector products" in printed and "Lanczos bases" in printed
    assert not (tmp_path / "out").exists()  # a dry run leaves nothing behind
    sequential = job.run(spectrum_config(
        tmp_path / "out", model=str(tmp_path / "model.keras"),
        dataset=f"npz:{tmp_path / 'data.npz'}", batch_size=4, lanczos_steps=90, num_draws=2,
        lockstep_draws=1, dry_run=True))
    assert sequential["hessian_vector_products"] == 180 and sequential["data_passes"] == 181
    assert sequential["lanczos_basis_bytes"] == 90 * 39 * 8
    # 3 batches: the check multiplies the first block twice over the data, one block more.
    whole = job.run(spectrum_config(
        tmp_path / "out", model=str(tmp_path / "model.keras"),
        dataset=f"npz:{tmp_path / 'data.npz'}", batch_size=8, lanczos_steps=90, num_draws=2,
        dry_run=True))
    assert whole["hessian_vector_products"] == 182 and whole["data_passes"] == 92


def test_dry_run_prints_what_the_residual_cache_would_hold(tmp_path, capsys, monkeypatch):
    from hessian_tf import spectrum

    model, x, y = small_problem()  # 23 examples: 6 batches of at most 4
    model.save(str(tmp_path / "model.keras"))
    np.savez(tmp_path / "data.npz", x=x, y=y)
    one_batch = operators.HessianOperator(
        operators.KerasModelFunction(model), x[:4], y[:4], batch_size=4, cache_residuals=True)
    one_batch.matvec(np.ones(one_batch.dim))
    assert one_batch.residual_bytes > 0
    options = dict(model=str(tmp_path / "model.keras"), dataset=f"npz:{tmp_path / 'data.npz'}",
                   batch_size=4, cache_residuals=True, dry_run=True)
    cost = job.run(spectrum_config(tmp_path / "out", **options))
    # An upper bound: every batch as large as the first (the real last one has 3).
    whole = operators.HessianOperator(
        operators.KerasModelFunction(model), x, y, batch_size=4, cache_residuals=True)
    whole.matvec(np.ones(whole.dim))
    assert cost["residual_cache_bytes"] == 6 * one_batch.residual_bytes
    assert whole.residual_bytes <= cost["residual_cache_bytes"] < 1.25 * whole.residual_bytes
    printed = capsys.readouterr().out
    assert "--cache_residuals:" in printed and "would be refused" not in printed
    # On a host with too little memory the dry run says the run would be refused.
    monkeypatch.setattr(spectrum, "host_memory_bytes", lambda: 8 * one_batch.residual_bytes)
    job.run(spectrum_config(tmp_path / "out", **options))
    assert "this run would be refused" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_dry_run_says_when_the_lanczos_bases_would_be_refused(tmp_path, capsys):
    model, x, y = small_problem()
    model.save(str(tmp_path / "model.keras"))
    np.savez(tmp_path / "data.npz", x=x, y=y)
    options = dict(model=str(tmp_path / "model.keras"), dataset=f"npz:{tmp_path / 'data.npz'}",
                   batch_size=4, lanczos_steps=10**12)  # more than any host holds
    cost = job.run(spectrum_config(tmp_path / "out", dry_run=True, **options))
    assert cost["lanczos_basis_bytes"] == 10**12 * cost["num_params"] * 8
    assert ("; this run would be refused: --lanczos_steps=1000000000000: the Lanczos basis"
            in capsys.readouterr().out)
    with pytest.raises(ValueError, match=r"^--lanczos_steps=1000000000000: the Lanczos basis"):
        job.run(spectrum_config(tmp_path / "out", **options))
    assert not (tmp_path / "out").exists()


def test_gradient_overlaps_float64_basis_and_ritz_vectors_are_counted(tmp_path, monkeypatch):
    from hessian_tf import spectrum

    model, x, y = small_problem()  # 39 parameters
    model.save(str(tmp_path / "model.keras"))
    np.savez(tmp_path / "data.npz", x=x, y=y)
    dim = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    # Room for the float32 spectrum's basis of 1000 steps, not for the overlap's float64
    # basis of 1000 steps and its 5 Ritz vectors.
    monkeypatch.setattr(spectrum, "host_memory_bytes", lambda: 1000 * dim * 6)
    options = dict(model=str(tmp_path / "model.keras"), dataset=f"npz:{tmp_path / 'data.npz'}",
                   batch_size=4, lanczos_steps=1000, basis_dtype="float32")
    with pytest.raises(ValueError, match=r"^--gradient_overlap with --lanczos_steps=1000: the "
                       r"Lanczos basis \(1,000 steps × 39 float64 entries\) and its 5 Ritz"):
        job.run(spectrum_config(tmp_path / "out", gradient_overlap=True, **options))
    assert not (tmp_path / "out").exists()
    job.run(spectrum_config(tmp_path / "out", **options))  # without it: fits, runs
    assert (tmp_path / "out" / "spectrum.npz").exists()


def test_the_runs_bases_are_freed_before_the_gradient_overlaps_own(tmp_path, monkeypatch):
    """The state a --method=auto run begins from holds its first bases: gone (not only
    unused) when the analyses build --gradient_overlap's basis, which the memory check
    counts alone."""
    import gc
    import weakref

    from hessian_tf import spectrum

    model, x, y = small_problem()
    model.save(str(tmp_path / "model.keras"))
    np.savez(tmp_path / "data.npz", x=x, y=y)
    bases = []
    new_state = spectrum.new_state

    def recorded(*args, **kwargs):
        state = new_state(*args, **kwargs)
        bases.extend(weakref.ref(s.basis) for s in state.lanczos)
        return state

    analyses = job._analyses
    alive = []

    def counted(*args, **kwargs):
        gc.collect()
        alive.append(sum(ref() is not None for ref in bases))
        return analyses(*args, **kwargs)

    monkeypatch.setattr(spectrum, "new_state", recorded)
    monkeypatch.setattr(job, "_analyses", counted)
    job.run(spectrum_config(
        tmp_path / "out", model=str(tmp_path / "model.keras"), batch_size=4,
        dataset=f"npz:{tmp_path / 'data.npz'}", gradient_overlap=True, method="auto"))
    assert bases and alive == [0]


def test_narrow_resnet18_on_mock_imagenet(tmp_path):
    """The ImageNet configuration's path: streamed imagenet2012 with its
    preprocessing, a narrow ResNet-18, BN in train mode."""
    from hessian_tf.models import resnet18
    # Width 16: with oneDNN on (TF 2.21's default), products through ResNet-18 at
    # widths 4 and 8 crash TensorFlow itself (heap corruption); 16 and up run.
    model = resnet18(width=16, num_classes=1000, input_shape=(224, 224, 3))
    model.save(str(tmp_path / "resnet18.keras"))
    with tfds.testing.mock_data(num_examples=6):
        summary = job.run(spectrum_config(
            tmp_path / "out", model=str(tmp_path / "resnet18.keras"),
            dataset="tfds:imagenet2012", split="validation", stream=True,
            preprocessing="imagenet", batch_size=3, lanczos_steps=3, bn_mode="train"))
    assert summary["num_examples"] == 6
    assert np.isfinite(summary["lambda_max"])
    assert (tmp_path / "out" / "spectrum.npz").exists()


def test_dry_run_times_the_jobs_own_operator(tmp_path, monkeypatch):
    from hessian_tf.operators import gauss_newton

    model, x, y = small_problem()
    model.save(str(tmp_path / "model.keras"))
    np.savez(tmp_path / "data.npz", x=x, y=y)
    built = []
    original = gauss_newton.operator_class

    def recording(name, base=operators.HessianOperator):
        cls = original(name, base)
        built.append((name, cls))
        return cls

    monkeypatch.setattr(gauss_newton, "operator_class", recording)
    job.run(spectrum_config(
        tmp_path / "out", model=str(tmp_path / "model.keras"),
        dataset=f"npz:{tmp_path / 'data.npz'}", batch_size=4, operator="ggn", dry_run=True))
    # The job's operator, then the one-batch operator the dry run times: both GGN.
    assert [name for name, _ in built] == ["ggn", "ggn"]
    assert built[1][1] is gauss_newton.GaussNewtonOperator


WORKER = """
import sys
import numpy as np
import tensorflow as tf
import keras
from hessian_tf import operators
from hessian_tf.operators.streaming import StreamingHessianOperator, array_dataset_fn

directory = sys.argv[1]
options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=120)
strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
data = np.load(f"{directory}/data.npz")
x, y, vector = data["x"], data["y"], data["vector"]
with strategy.scope():
    model = keras.saving.load_model(f"{directory}/model.keras")
operator = StreamingHessianOperator(
    operators.KerasModelFunction(model), array_dataset_fn(x, y, 4), num_examples=len(x),
    sample=(x[:2], y[:2]), batch_size=4, strategy=strategy)
products = [operator.matvec(vector) for _ in range(2)]
loss, gradient = operator.loss_and_gradient()
if strategy.cluster_resolver.task_id == 0:
    np.savez(f"{directory}/out.npz", products=np.stack(products), loss=loss, gradient=gradient,
             traces=operator._product_function.experimental_get_tracing_count())
"""


def test_two_workers_stream_their_own_parts_and_equal_in_memory(tmp_path):
    # Two worker processes on loopback, each reading its own part of the data (13 and
    # 12 examples: batches 4, 4, 4, 1 against 4, 4, 4, so one worker's pipeline ends a
    # batch before the other's), summed by one all-reduce per product.
    import os
    import subprocess
    import sys
    import time

    from tests.processes import ROOT, environment, free_ports

    model, x, y = small_problem(25)
    model.save(str(tmp_path / "model.keras"))
    vector = np.random.default_rng(1).standard_normal(
        sum(int(np.prod(v.shape)) for v in model.trainable_variables))
    np.savez(tmp_path / "data.npz", x=x, y=y, vector=vector)
    (tmp_path / "worker.py").write_text(WORKER)

    def run_workers(attempt):
        """Both workers to the end, or until one fails (the other is then killed)."""
        workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
        processes, logs = [], []
        for index in range(2):
            env = environment()
            env["TF_CONFIG"] = json.dumps(
                {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
            env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
            logs.append(open(tmp_path / f"worker{index}-{attempt}.log", "w+"))
            processes.append(subprocess.Popen(
                [sys.executable, str(tmp_path / "worker.py"), str(tmp_path)],
                stdout=logs[-1], stderr=subprocess.STDOUT, text=True, env=env))
        deadline = time.monotonic() + 300
        while (any(p.poll() is None for p in processes) and time.monotonic() < deadline
               and all(p.poll() in (None, 0) for p in processes)):
            time.sleep(0.2)
        for p in processes:
            p.kill()
            p.wait()
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
        return processes, outputs

    # A port found free can still be taken before a worker's server binds it (the
    # test cannot hold it across the bind): one more try with other ports.
    for attempt in range(2):
        processes, outputs = run_workers(attempt)
        if not any("Could not start gRPC server" in output for output in outputs):
            break
    for p, output in zip(processes, outputs):
        assert p.returncode == 0, output[-3000:]
    reference = operators.HessianOperator(operators.KerasModelFunction(model), x, y, batch_size=4)
    with np.load(tmp_path / "out.npz") as out:
        expected = reference.matvec(vector)
        for product in out["products"]:
            np.testing.assert_allclose(product, expected, rtol=1e-6, atol=1e-7)
        loss, gradient = reference.loss_and_gradient()
        assert float(out["loss"]) == pytest.approx(loss, rel=1e-6)
        np.testing.assert_allclose(out["gradient"], gradient, rtol=1e-5, atol=1e-7)
        assert int(out["traces"]) == 1
