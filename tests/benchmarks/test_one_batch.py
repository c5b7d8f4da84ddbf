"""benchmarks/one_batch.py: our side times the gradient and the product it names (torch's
side needs torch, which CI does not install), and bad flags get one line."""

import os
import sys

import keras
import numpy as np
import pytest

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
sys.path.insert(0, BENCHMARKS)

import one_batch  # noqa: E402
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
    arrays = np.load(data)
    times = one_batch.time_ours(model, arrays["x"][:8], arrays["y"][:8],
                                "forward_over_backward", repeats=2)
    assert times["params"] == params
    assert times["gradient"] > 0 and times["product"] > 0
    assert calls == {"matvec": 3, "loss_and_gradient": 3}  # warm-up + 2 repeats each


@pytest.mark.parametrize("flags", [["--batch_size", "0"], ["--repeats", "0"],
                                   ["--threads", "-1"]])
def test_bad_numbers_get_one_line_and_exit_2(files, flags, capsys):
    model, data, _ = files
    with pytest.raises(SystemExit) as raised:
        one_batch.main(["--model", model, "--data", data] + flags)
    assert raised.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert flags[0] in err[-1] and "at least 1" in err[-1]


def test_missing_files_and_arrays_are_named(files, tmp_path, capsys):
    model, data, _ = files
    for argv, said in (
        (["--model", str(tmp_path / "none.keras"), "--data", data], "--model="),
        (["--model", model, "--data", str(tmp_path / "none.npz")], "--data="),
    ):
        with pytest.raises(SystemExit):
            one_batch.main(argv)
        assert said in capsys.readouterr().err.strip().splitlines()[-1]
    np.savez(tmp_path / "other.npz", images=np.zeros((2, 5)))
    with pytest.raises(SystemExit):
        one_batch.main(["--model", model, "--data", str(tmp_path / "other.npz")])
    assert "needs arrays x and y" in capsys.readouterr().err
