"""benchmarks/one_batch.py: our side times the gradient and the product it names (torch's
side needs torch, which CI does not install); bad flags, files and a missing torch get
one line."""

import dataclasses
import importlib.util
import os
import sys

import keras
import numpy as np
import pytest

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
sys.path.insert(0, BENCHMARKS)

import one_batch  # noqa: E402
import pyhessian_compare as compare  # noqa: E402
from hessian_tf import operators  # noqa: E402


@pytest.fixture
def files(tmp_path):
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Dense(3)])
    model.save(tmp_path / "net.keras")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((16, 5)).astype(np.float32),
             y=rng.integers(0, 3, 16))
    return str(tmp_path / "net.keras"), str(tmp_path / "data.npz"), model.count_params()


def test_our_side_times_one_batchs_gradient_and_product(files, monkeypatch):
    model, data, params = files
    calls = {"matvec": 0, "loss_and_gradient": 0}
    for name in calls:
        method = getattr(operators.HessianOperator, name)

        def counted(self, *args, _method=method, _name=name):
            calls[_name] += 1
            return _method(self, *args)

        monkeypatch.setattr(operators.HessianOperator, name, counted)
    workload = compare.workload_from_files(model, data, 8, None)
    batch = dataclasses.replace(workload, x=workload.x[:8], y=workload.y[:8])
    times = one_batch.time_ours(batch, "forward_over_backward", repeats=2)
    assert times["params"] == params and times["method"] == "forward_over_backward"
    assert times["gradient"] > 0 and times["product"] > 0
    # Warm-up + 2 repeats each, then g and Hg for the invariants.
    assert calls == {"matvec": 4, "loss_and_gradient": 4}
    assert set(times["invariants"]) == {"|g|", "g'Hg/|g|^2", "|Hg|/|g|"}
    # auto: both methods' products timed, one taken as the binary's auto takes it.
    times = one_batch.time_ours(batch, "auto", repeats=2)
    assert set(times["products"]) == set(one_batch.METHODS)
    reverse, forward = (times["products"][name] for name in one_batch.METHODS)
    assert times["method"] == ("forward_over_backward" if forward <= 0.95 * reverse
                               else "reverse_over_reverse")
    assert times["product"] == times["products"][times["method"]]
    assert calls == {"matvec": 11, "loss_and_gradient": 8}


def test_invariants_do_not_depend_on_the_parameters_order():
    hessian = np.array([[2.0, 1.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, -1.0]])
    g = np.array([1.0, 2.0, 2.0])
    got = one_batch.invariants(g, hessian @ g)
    assert got["|g|"] == pytest.approx(3.0)
    # Hg = [4, 7, −2], gᵀHg = 4 + 14 − 4.
    assert got["g'Hg/|g|^2"] == pytest.approx(14 / 9)
    assert got["|Hg|/|g|"] == pytest.approx(np.sqrt(16 + 49 + 4) / 3)
    order = [2, 0, 1]  # another framework's layout: the same numbers
    permuted = one_batch.invariants(g[order], (hessian[order][:, order]) @ g[order])
    assert permuted == pytest.approx(got)


@pytest.mark.parametrize("flags", [["--batch_size", "0"], ["--repeats", "0"],
                                   ["--threads", "-1"]])
def test_bad_numbers_get_one_line_and_exit_2(files, flags, capsys):
    model, data, _ = files
    with pytest.raises(SystemExit) as raised:
        one_batch.main(["--model", model, "--data", data] + flags)
    assert raised.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flags[0] in err[0] and "at least 1" in err[0]


def test_bad_files_get_one_line_and_exit_2(files, tmp_path, capsys, monkeypatch):
    # As if torch were installed, so that the files are checked (CI has no torch).
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "torch" else find_spec(name, *a))
    model, data, _ = files
    np.savez(tmp_path / "other.npz", images=np.zeros((2, 5)))
    np.savez(tmp_path / "labels.npz", x=np.zeros((2, 5), np.float32), y=np.array([0, 7]))
    for argv, said in (
        (["--model", str(tmp_path / "none.keras"), "--data", data], "--model="),
        (["--model", model, "--data", str(tmp_path / "none.npz")], "--data="),
        (["--model", model, "--data", str(tmp_path / "other.npz")], "arrays x and y"),
        (["--model", model, "--data", str(tmp_path / "labels.npz")], "labels range over"),
    ):
        assert one_batch.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0], err


def test_without_torch_it_says_how_to_install_it(files, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else find_spec(name, *a))
    model, data, _ = files
    assert one_batch.main(["--model", model, "--data", data]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "make benchmark-pyhessian" in err[0]


def test_a_regression_takes_the_squared_error(tmp_path):
    # A linear model's mean squared error: g = 2/N Σ r_i z_i, H = 2/N Σ z_i z_iᵀ with
    # z_i = [x_i; 1] and r_i the residual; the invariants of our side are these.
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.save(tmp_path / "linear.keras")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 3)).astype(np.float32)
    y = rng.standard_normal(8).astype(np.float32)
    np.savez(tmp_path / "targets.npz", x=x, y=y)
    workload = compare.workload_from_files(str(tmp_path / "linear.keras"),
                                           str(tmp_path / "targets.npz"), 8, None,
                                           "mean_squared_error")
    assert workload.loss == "mean_squared_error" and workload.y.shape == (8, 1)
    z = np.concatenate([x, np.ones((8, 1), np.float32)], axis=1).astype(np.float64)
    kernel, bias = (np.asarray(v, np.float64) for v in model.get_weights())
    residuals = (x @ kernel + bias)[:, 0] - y
    gradient = 2 / 8 * z.T @ residuals
    hessian = 2 / 8 * z.T @ z
    got = one_batch.time_ours(workload, "reverse_over_reverse", repeats=1)["invariants"]
    assert got == pytest.approx(one_batch.invariants(gradient, hessian @ gradient), rel=1e-5)
