"""method='auto': choose_method times both product methods on the first batches (the
product graph cut short) and keeps the faster, unless the caller's products could not
repay forward mode's set-up; without it (and where the methods are not timed) reverse
over reverse. Forward mode that does not run through a model (Keras's
LSTM kept in its loop, today) falls back to reverse over reverse, or is refused in one
line when asked for."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from hessian_tf import job, operators
from hessian_tf.operators import gauss_newton
from hessian_tf.operators import hessian as hessian_lib
from hessian_tf.operators.streaming import StreamingHessianOperator, array_dataset_fn
from tests.operators.test_hessian import _counting_runs, tiny_data, tiny_model
from tests.test_job_formats import small_config


def lstm_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3, 2))
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.LSTM(4)(inputs)))


def lstm_data():
    rng = np.random.default_rng(1)
    return rng.standard_normal((10, 3, 2)).astype(np.float32), rng.integers(0, 3, 10)


def test_auto_times_both_methods_and_keeps_the_products():
    x, y = tiny_data()
    model_function = operators.KerasModelFunction(tiny_model())
    auto = operators.HessianOperator(model_function, x, y, batch_size=4)
    assert auto.method_seconds is None and auto.method == "reverse_over_reverse"
    vector = np.random.default_rng(0).standard_normal(auto.dim)
    assert auto.choose_method(1) == auto.method
    product = auto.matvec(vector)
    assert auto.automatic_method
    assert set(auto.method_seconds) == {"forward_over_backward", "reverse_over_reverse"}
    assert all(seconds > 0 for seconds in auto.method_seconds.values())
    forward, reverse = (auto.method_seconds[m] for m in hessian_lib.METHODS[1:])
    expected = ("forward_over_backward" if forward <= hessian_lib.AUTO_MARGIN * reverse
                else "reverse_over_reverse")
    assert auto.method == expected
    # The faster method's timed graph (cut short by its argument) is the product graph.
    assert auto.num_traces == 1 and auto._product_function.experimental_get_tracing_count() == 0
    fixed = operators.HessianOperator(model_function, x, y, batch_size=4, method=auto.method)
    np.testing.assert_allclose(product, fixed.matvec(vector), rtol=1e-12, atol=1e-14)
    auto.matvec(vector)
    assert auto.num_traces == 1 and fixed.method_seconds is None
    assert auto._product_function.experimental_get_tracing_count() == 0
    # Chosen once: a later call times nothing again.
    seconds = auto.method_seconds
    assert auto.choose_method(3) == auto.method and auto.method_seconds is seconds


@pytest.mark.parametrize("margin, chosen", [(1e9, "forward_over_backward"),
                                            (0.0, "reverse_over_reverse")])
def test_the_chosen_methods_timed_graph_is_the_one_kept(monkeypatch, margin, chosen):
    # The two methods agree to rounding, so the products cannot tell which graph was
    # kept: the kept trace must be the chosen method's own.
    monkeypatch.setattr(hessian_lib, "AUTO_MARGIN", margin)
    timed = hessian_lib.HessianOperator._time_methods
    traces = {}

    def recording(self, block_size, num_products=None, vectors=None):
        seconds, runs, products = timed(self, block_size, num_products, vectors)
        traces.update(runs)
        return seconds, runs, products

    monkeypatch.setattr(hessian_lib.HessianOperator, "_time_methods", recording)
    x, y = tiny_data()
    auto = operators.HessianOperator(operators.KerasModelFunction(tiny_model()), x, y,
                                     batch_size=4)
    assert auto.choose_method(2) == chosen
    assert set(traces) == set(hessian_lib.METHODS[1:])
    assert auto._product_trace(2) is traces[chosen]
    assert auto._product_trace(1) is not traces[chosen]  # another block size: traced anew
    assert auto.num_traces == 2


def test_without_choose_method_auto_is_reverse_over_reverse():
    x, y = tiny_data()
    operator = operators.HessianOperator(
        operators.KerasModelFunction(tiny_model()), x, y, batch_size=4)
    operator.matvec(np.ones(operator.dim))
    # After a product the graph is traced: choosing now would change nothing.
    assert operator.choose_method(1) == "reverse_over_reverse"
    assert operator.method_seconds is None


@pytest.mark.parametrize("forward, reverse, chosen", [
    (0.80, 1.00, "forward_over_backward"),
    (0.95, 1.00, "forward_over_backward"),  # at the margin
    (0.96, 1.00, "reverse_over_reverse"),
    (1.20, 1.00, "reverse_over_reverse"),
    (None, 1.00, "reverse_over_reverse"),  # forward mode did not run
])
def test_the_choice_follows_the_timings(monkeypatch, forward, reverse, chosen):
    x, y = tiny_data()
    operator = operators.HessianOperator(
        operators.KerasModelFunction(tiny_model()), x, y, batch_size=4)
    timed = []

    def fake(block_size, num_products=None, vectors=None):
        timed.append(block_size)
        return {"forward_over_backward": forward, "reverse_over_reverse": reverse}, {}, {}

    monkeypatch.setattr(operator, "_time_methods", fake)
    assert operator.choose_method(3) == chosen
    operator.matmat(np.ones((3, operator.dim)))
    assert operator.choose_method(1) == chosen
    assert operator.method == chosen
    assert timed == [3]  # once, for the block size of the first products


def test_timing_graph_sums_only_the_first_batches():
    x, y = tiny_data()  # 12 examples: 3 batches of 4
    model_function = operators.KerasModelFunction(tiny_model())
    whole = operators.HessianOperator(model_function, x, y, batch_size=4)
    first_two = operators.HessianOperator(
        model_function, x[:8], y[:8], batch_size=4, method="reverse_over_reverse")
    vector = np.random.default_rng(2).standard_normal((1, whole.dim))
    for method in hessian_lib.METHODS[1:]:
        cut = whole._combined(whole._products_over_batches(
            tf.constant(vector), method=method, max_batches=2)) / 8
        np.testing.assert_allclose(cut, first_two.matvec(vector[0]), rtol=1e-12, atol=1e-14)
    # The product graph proper was not traced (nor the method chosen) by that.
    assert whole.num_traces == 0 and whole.method_seconds is None


def test_no_timing_where_only_one_method_can_run_or_the_process_is_not_alone(tmp_path, monkeypatch):
    x, y = tiny_data()
    model = tiny_model()
    model_function = operators.KerasModelFunction(model)
    cached = operators.HessianOperator(model_function, x, y, batch_size=4, cache_residuals=True)
    streamed = StreamingHessianOperator(
        model_function, array_dataset_fn(x, y, 4), num_examples=len(x), sample=(x, y),
        batch_size=4)
    model.export(str(tmp_path / "exported"), verbose=False)
    saved = operators.HessianOperator(
        operators.SavedModelFunction(tf.saved_model.load(str(tmp_path / "exported"))), x, y,
        batch_size=4)
    alone = operators.HessianOperator(model_function, x, y, batch_size=4)
    assert alone.times_methods
    # Where the strategy spans several workers (their timings could disagree).
    monkeypatch.setattr(tf.distribute.get_strategy().extended, "_in_multi_worker_mode",
                        lambda: True, raising=False)
    several_workers = operators.HessianOperator(model_function, x, y, batch_size=4)
    for operator, why in ((cached, "the residual cache splits one method's graph"),
                          (streamed, "streamed data: only a sample in memory"),
                          (saved, "forward mode does not run through a SavedModel's functions"),
                          (several_workers, "several workers, whose timings could disagree")):
        assert not operator.times_methods
        assert operator.choose_method(1) == "reverse_over_reverse"
        operator.matvec(np.ones(operator.dim))
        assert operator.method == "reverse_over_reverse" and operator.method_seconds is None
        # summary.json's method_note says why.
        assert operator.auto_untimed_note == f"not timed ({why}): reverse over reverse"
    given = operators.HessianOperator(model_function, x, y, batch_size=4,
                                      method="reverse_over_reverse")
    assert given.auto_untimed_note == ""


def test_forward_mode_failing_at_run_time_is_not_chosen(monkeypatch):
    # Builds but fails when run (a kernel missing on the device, say): timed as not
    # running, and the products go by reverse over reverse.
    original = hessian_lib.HessianOperator._products_over_batches

    def failing(self, vectors, method=None, max_batches=None):
        products = original(self, vectors, method=method, max_batches=max_batches)
        if method == "forward_over_backward":
            with tf.control_dependencies(
                    [tf.debugging.Assert(False, ["forward mode fails at run time"])]):
                products = tf.nest.map_structure(tf.identity, products)
        return products

    monkeypatch.setattr(hessian_lib.HessianOperator, "_products_over_batches", failing)
    x, y = tiny_data()
    model_function = operators.KerasModelFunction(tiny_model())
    auto = operators.HessianOperator(model_function, x, y, batch_size=4)
    assert auto.choose_method(1) == "reverse_over_reverse"
    assert auto.method_seconds["forward_over_backward"] is None
    assert auto.method_seconds["reverse_over_reverse"] > 0
    assert "forward mode fails at run time" in auto.forward_mode_failure
    vector = np.random.default_rng(4).standard_normal(auto.dim)
    reverse = operators.HessianOperator(model_function, x, y, batch_size=4,
                                        method="reverse_over_reverse")
    np.testing.assert_allclose(auto.matvec(vector), reverse.matvec(vector),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("error", [AttributeError, RuntimeError])
def test_forward_mode_failing_in_any_type_falls_back_or_is_refused(monkeypatch, error):
    # TensorFlow's forward mode fails in many types (an AttributeError through an
    # Embedding's IndexedSlices gradient, say); reverse over reverse decides.
    original = hessian_lib.HessianOperator._batch_products
    broken = {"forward_over_backward"}

    def failing(self, primals, state, block, x, y, method=None):
        if (method or self.method) in broken:
            raise error("no forward mode here")
        return original(self, primals, state, block, x, y, method=method)

    monkeypatch.setattr(hessian_lib.HessianOperator, "_batch_products", failing)
    x, y = tiny_data()
    model_function = operators.KerasModelFunction(tiny_model())
    auto = operators.HessianOperator(model_function, x, y, batch_size=4)
    assert auto.choose_method(1) == "reverse_over_reverse"
    assert "no forward mode here" in auto.forward_mode_failure
    vector = np.ones(auto.dim)
    assert np.all(np.isfinite(auto.matvec(vector)))
    forward = operators.HessianOperator(model_function, x, y, batch_size=4,
                                        method="forward_over_backward")
    with pytest.raises(ValueError, match="forward mode does not run through this model"):
        forward.matvec(vector)
    broken.add("reverse_over_reverse")  # both fail: the model's own error
    with pytest.raises(error, match="no forward mode here"):
        operators.HessianOperator(model_function, x, y, batch_size=4).choose_method(1)


def test_forward_mode_through_an_lstm_falls_back_or_is_refused():
    x, y = lstm_data()  # two batches of 5: one trace per graph
    # Kept in its while loop (unrolled, forward mode runs: test_recurrent.py).
    model_function = operators.KerasModelFunction(lstm_model(), unroll_steps=0)
    vector = np.random.default_rng(3).standard_normal(model_function_dim(model_function))
    reverse = operators.HessianOperator(
        model_function, x, y, batch_size=5, method="reverse_over_reverse").matvec(vector)

    auto = operators.HessianOperator(model_function, x, y, batch_size=5)
    assert auto.choose_method(1) == "reverse_over_reverse"
    np.testing.assert_allclose(auto.matvec(vector), reverse, rtol=1e-10, atol=1e-12)
    assert auto.method_seconds["forward_over_backward"] is None
    assert auto.method_seconds["reverse_over_reverse"] > 0
    assert auto.forward_mode_failure.startswith("TypeError: ")
    assert "LSTM" in auto.forward_mode_failure

    asked = operators.HessianOperator(
        model_function, x, y, batch_size=5, method="forward_over_backward")
    with pytest.raises(ValueError, match=r"^--method=forward_over_backward: forward mode "
                       r"does not run through this model \(TypeError: .*LSTM.*\); use "
                       r"--method=reverse_over_reverse"):
        asked.matvec(vector)

    # The Gauss-Newton operator's automatic forward mode falls back as well.
    ggn = gauss_newton.make_operator("ggn", model_function, x, y, batch_size=5)
    ggn_reverse = gauss_newton.make_operator(
        "ggn", model_function, x, y, batch_size=5, method="reverse_over_reverse")
    np.testing.assert_allclose(ggn.matvec(vector), ggn_reverse.matvec(vector),
                               rtol=1e-10, atol=1e-12)
    assert ggn.method == "reverse_over_reverse" and "LSTM" in ggn.forward_mode_failure
    assert ggn.num_traces == 1  # the failed trace of forward mode is not counted
    # Streamed data as well.
    streamed = gauss_newton.operator_class("ggn", StreamingHessianOperator)(
        model_function, array_dataset_fn(x, y, 5), num_examples=len(x), sample=(x, y),
        batch_size=5)
    expected = ggn_reverse.matvec(vector)  # float32 products, another loop over the data
    np.testing.assert_allclose(streamed.matvec(vector), expected, rtol=1e-5,
                               atol=1e-6 * np.max(np.abs(expected)))
    assert streamed.method == "reverse_over_reverse"
    # The residual cache's split of a batch's product refuses it the same way (the
    # split of reverse over reverse does not run through the LSTM's loop either).
    asked = operators.HessianOperator(model_function, x, y, batch_size=5,
                                      method="forward_over_backward", cache_residuals=True)
    with pytest.raises(ValueError, match=r"^--method=forward_over_backward: forward mode"):
        asked.matvec(vector)
    # By reverse over reverse the split fails at the LSTM's loop: one line as well.
    cached = operators.HessianOperator(model_function, x, y, batch_size=5, cache_residuals=True)
    with pytest.raises(ValueError, match=r"^--cache_residuals: this model's product cannot be "
                       r"split .*leave the cache off"):
        cached.matvec(vector)


def model_function_dim(model_function):
    return int(sum(np.prod(v.shape) for v in model_function.variables))


@pytest.mark.parametrize("forward, reverse, note", [
    (0.952, 1.00, "forward over backward took 0.952 of reverse over reverse's time, and is "
                  "taken only at 0.95 or less: reverse over reverse kept"),
    (0.95, 1.00, ""),  # taken
    (1.00, 1.00, ""),  # not faster
    (1.20, 1.00, ""),
    (None, 1.00, ""),
])
def test_a_faster_forward_mode_kept_out_by_the_margin_is_told(forward, reverse, note):
    assert hessian_lib.auto_margin_note(
        {"forward_over_backward": forward, "reverse_over_reverse": reverse}) == note
    assert hessian_lib.auto_margin_note(None) == ""


def test_the_binary_chooses_for_its_lockstep_block_and_reports_the_timings(tmp_path, monkeypatch):
    blocks = []
    timed = hessian_lib.HessianOperator._time_methods

    def recording(self, block_size, num_products=None, vectors=None):
        blocks.append(block_size)
        return timed(self, block_size, num_products, vectors)

    monkeypatch.setattr(hessian_lib.HessianOperator, "_time_methods", recording)
    # Time forward mode also for these jobs of a few milliseconds (the next test: not).
    monkeypatch.setattr(hessian_lib, "FORWARD_MODE_MOST_SAVING", float("inf"))
    x, y = lstm_data()  # 3 steps
    lstm_model().save(str(tmp_path / "lstm.keras"))
    tiny_model(dtype="float32").save(str(tmp_path / "tiny.keras"))
    np.savez(tmp_path / "lstm.npz", x=x, y=y)
    tiny_x, tiny_y = tiny_data(np.float32)
    np.savez(tmp_path / "tiny.npz", x=tiny_x, y=tiny_y)
    summary = job.run(small_config(
        tmp_path / "tiny", model=str(tmp_path / "tiny.keras"),
        dataset=f"npz:{tmp_path / 'tiny.npz'}", batch_size=4, num_draws=2, lockstep_draws=2))
    seconds = summary["method_seconds"]
    assert blocks == [2]  # blocks of the lockstep size
    assert summary["config"]["method"] == "auto" and summary["lockstep_draws"] == 2
    assert set(seconds) == {"forward_over_backward", "reverse_over_reverse"}
    assert summary["method"] == ("forward_over_backward" if seconds["forward_over_backward"]
                                 <= hessian_lib.AUTO_MARGIN * seconds["reverse_over_reverse"]
                                 else "reverse_over_reverse")
    assert summary["method_note"] == (hessian_lib.auto_margin_note(seconds) or None)
    # Sequences longer than --unroll_steps: Keras's loop, where forward mode does not run.
    lstm = job.run(small_config(tmp_path / "lstm", model=str(tmp_path / "lstm.keras"),
                                dataset=f"npz:{tmp_path / 'lstm.npz'}", batch_size=4,
                                unroll_steps=2))
    assert lstm["method"] == "reverse_over_reverse" and lstm["config"]["unroll_steps"] == 2
    assert lstm["method_seconds"]["forward_over_backward"] is None
    assert "TypeError" in lstm["method_note"]
    # Unrolled (the default length covers them), forward mode runs and is timed.
    unrolled = job.run(small_config(
        tmp_path / "unrolled", model=str(tmp_path / "lstm.keras"),
        dataset=f"npz:{tmp_path / 'lstm.npz'}", batch_size=4))
    assert unrolled["method_seconds"]["forward_over_backward"] > 0


def test_forward_mode_is_timed_only_where_it_could_repay_its_set_up():
    x, y = tiny_data()  # 3 batches of 4
    model_function = operators.KerasModelFunction(tiny_model())
    short = operators.HessianOperator(model_function, x, y, batch_size=4)
    # One product of a few milliseconds cannot repay a trace: reverse over reverse,
    # timed, its trace kept for the products.
    assert short.choose_method(2, num_products=1) == "reverse_over_reverse"
    assert short.method_seconds["forward_over_backward"] is None
    assert short.method_seconds["reverse_over_reverse"] > 0
    assert re.match(r"not timed: the job's products \(1\) take about \S+ s by reverse over reverse, of "
                    r"which forward over backward could save at most 40%, less than the "
                    r"\S+ s that setting it up and timing it would take \("
                    + re.escape(f"{hessian_lib.FORWARD_MODE_SET_UP_RATIO:g}")
                    + r" times reverse over reverse's set-up, and 3 timed runs\)$",
                    short.forward_mode_untimed)
    # Its milliseconds of timing already exceed 5% of the job's one product: one run.
    assert short.method_runs == {"forward_over_backward": 0, "reverse_over_reverse": 1}
    assert short.forward_mode_failure == "" and short.num_traces == 1
    short.matmat(np.ones((2, short.dim)))
    assert short.num_traces == 1  # the timed trace
    long = operators.HessianOperator(model_function, x, y, batch_size=4)
    long.choose_method(2, num_products=10**9)
    assert long.method_seconds["forward_over_backward"] > 0 and not long.forward_mode_untimed
    assert long.method_runs == {"forward_over_backward": 6, "reverse_over_reverse": 8}


class _Clock:
    """A perf_counter that advances one second per call: a trace takes one second, and
    so does every run (a set-up two)."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 1.0
        return self.now


@pytest.mark.parametrize("num_products, reverse_runs, forward_runs", [
    (10, 1, 0),     # 10 s of products: forward mode would save at most 4 s of its 7 s
    (20, 2, 2),     # 1 s may be timed: 1 estimate, forward mode's run, one round
    (100, 4, 2),    # 5 s: 3 estimates, forward mode's, one round (a second would make 8 s)
    (200, 6, 4),    # 10 s: 3 estimates, forward mode's, three rounds
    (None, 8, 6),   # no count: 3 estimates, forward mode's, AUTO_TIMING_RUNS rounds
])
def test_the_timed_runs_take_a_share_of_the_jobs_products(
        monkeypatch, num_products, reverse_runs, forward_runs):
    x, y = tiny_data()  # 3 batches of 4, all of them timed: a timed run is a product
    monkeypatch.setattr(hessian_lib, "time", _Clock())
    operator = operators.HessianOperator(operators.KerasModelFunction(tiny_model()), x, y,
                                         batch_size=4)
    operator.choose_method(1, num_products=num_products)
    assert operator.method_runs == {"forward_over_backward": forward_runs,
                                    "reverse_over_reverse": reverse_runs}
    assert (operator.method_seconds["forward_over_backward"] is None) == (forward_runs == 0)
    if forward_runs == 0:
        # A set-up of 2 s (a trace and a run) times the ratio, and 3 timed runs of 1 s.
        cost = 2 * hessian_lib.FORWARD_MODE_SET_UP_RATIO + 3
        assert cost == 7.0
        assert f"less than the {cost:g} s that setting it up and timing it" in (
            operator.forward_mode_untimed)


@pytest.mark.parametrize("set_up, timed", [(0.049, True), (0.051, False)])
def test_the_set_up_bound_scales_the_timed_batches_to_the_whole_data(set_up, timed):
    x, y = tiny_data()  # 3 batches of 4
    operator = operators.HessianOperator(operators.KerasModelFunction(tiny_model()), x, y,
                                         batch_size=2)  # 6 batches, 4 of them timed
    assert operator.batches_per_replica == 6
    # 0.1 s for 4 batches: 0.15 s per product, 1.0 s for 20/3 products; at most 0.4 s
    # saved, against forward mode's set-up, 2 times reverse over reverse's, and 3 timed
    # runs of 0.1 s: the bound is a set-up of 0.05 s.
    assert hessian_lib.FORWARD_MODE_SET_UP_RATIO == 2.0
    reason = operator._forward_mode_untimed(20 / 3, set_up, 0.1)
    assert (reason == "") == timed


def test_the_job_and_its_dry_run_tell_choose_method_their_products(tmp_path, monkeypatch):
    calls = []
    choose = hessian_lib.HessianOperator.choose_method

    def recording(self, block_size=1, num_products=None, vectors=None):
        calls.append((block_size, num_products))
        return choose(self, block_size, num_products, vectors)

    monkeypatch.setattr(hessian_lib.HessianOperator, "choose_method", recording)
    tiny_model(dtype="float32").save(str(tmp_path / "tiny.keras"))
    x, y = tiny_data(np.float32)  # 12 examples: 3 batches of 4
    np.savez(tmp_path / "tiny.npz", x=x, y=y)
    options = dict(model=str(tmp_path / "tiny.keras"), dataset=f"npz:{tmp_path / 'tiny.npz'}",
                   batch_size=4, num_draws=2, lockstep_draws=2)  # 5 Lanczos steps
    summary = job.run(small_config(tmp_path / "run", **options))
    # One lockstep group of 2: 5 block products and the determinism check's.
    assert calls == [(2, 6)]
    # Milliseconds of products cannot repay a second trace: forward mode is not timed.
    assert summary["method"] == "reverse_over_reverse"
    assert summary["method_seconds"]["forward_over_backward"] is None
    assert summary["method_note"].startswith("not timed: the job's products (6) take about")
    # The dry run's operator holds one batch: its products stand for the data's 3.
    job.run(small_config(tmp_path / "dry", dry_run=True, **options))
    assert calls[-1] == (2, 18)


def _counting_matmat(monkeypatch):
    """Counts HessianOperator.matmat calls (every product outside the timing)."""
    calls = []
    matmat = hessian_lib.HessianOperator.matmat

    def counting(self, vectors):
        calls.append(np.shape(vectors))
        return matmat(self, vectors)

    monkeypatch.setattr(hessian_lib.HessianOperator, "matmat", counting)
    return calls


@pytest.mark.parametrize("margin", [1e-9, 1e9])  # reverse over reverse, forward over backward
def test_the_timed_runs_of_the_first_block_are_the_determinism_check(monkeypatch, margin):
    monkeypatch.setattr(hessian_lib, "AUTO_MARGIN", margin)
    x, y = tiny_data()  # 3 batches of 4: the timed batches are all the data
    model_function = operators.KerasModelFunction(tiny_model())
    auto = operators.HessianOperator(model_function, x, y, batch_size=4)
    vectors = np.random.default_rng(3).standard_normal((2, auto.dim))
    chosen = auto.choose_method(2, vectors=vectors)
    calls = _counting_matmat(monkeypatch)
    product = auto.check_determinism(vectors)
    assert calls == [] and auto.num_products == 4  # the two timed blocks, counted
    fixed = operators.HessianOperator(model_function, x, y, batch_size=4, method=chosen)
    np.testing.assert_array_equal(product, fixed.matmat(vectors))  # the same graph's sums
    # Used once: a second check multiplies.
    auto.check_determinism(vectors)
    assert len(calls) == 3 and auto.num_products == 8


def test_the_timed_runs_check_only_their_own_vectors_over_all_the_data(monkeypatch):
    x, y = tiny_data()
    model_function = operators.KerasModelFunction(tiny_model())
    other = operators.HessianOperator(model_function, x, y, batch_size=4)
    vectors = np.random.default_rng(3).standard_normal((1, other.dim))
    calls = _counting_matmat(monkeypatch)
    other.choose_method(1, vectors=vectors)
    other.check_determinism(vectors[0] * 2)  # not the timed vector: two products
    assert len(calls) == 2
    # 6 batches, 4 timed: the timed runs are the check but not products; one product.
    more = operators.HessianOperator(model_function, x, y, batch_size=2)
    more.choose_method(1, vectors=vectors)
    runs = _counting_runs(monkeypatch)
    product = more.check_determinism(vectors[0])
    assert len(calls) == 3 and runs["first_batches"] == [] and more.num_products == 1
    fixed = operators.HessianOperator(model_function, x, y, batch_size=2, method=more.method)
    np.testing.assert_array_equal(product, fixed.matvec(vectors[0]))
    # A product ran since the timing: the next is not the first; two products.
    ran = operators.HessianOperator(model_function, x, y, batch_size=4)
    ran.choose_method(1, vectors=vectors)
    ran.matmat(vectors)
    ran.check_determinism(vectors)
    assert len(calls) == 7
    # The model changed since the timing (a callback's model trains): two products.
    changed = operators.HessianOperator(model_function, x, y, batch_size=4)
    changed.choose_method(1, vectors=vectors)
    kernel = model_function.variables[0]
    kernel.assign(kernel * 1.5)
    product = changed.check_determinism(vectors)
    assert len(calls) == 9
    fixed = operators.HessianOperator(model_function, x, y, batch_size=4, method=changed.method)
    np.testing.assert_array_equal(product, fixed.matmat(vectors))
    with pytest.raises(ValueError, match=r"choose_method: vectors have shape \(1, \d+\); pass "
                                         r"the first block, \[2, \d+\]"):
        operators.HessianOperator(model_function, x, y, batch_size=4).choose_method(
            2, vectors=vectors)


@pytest.mark.parametrize("batch_size", [4, 2])  # 3 batches, all timed; 6, 4 of them timed
def test_noise_in_the_timed_runs_fails_the_check(monkeypatch, batch_size):
    from tests.operators.test_hessian import noisy_model
    model = noisy_model()
    x, y = tiny_data(np.float32)
    operator = operators.HessianOperator(operators.KerasModelFunction(model), x, y,
                                         batch_size=batch_size)
    vectors = np.ones((1, operator.dim))
    operator.choose_method(1, vectors=vectors)
    runs = _counting_runs(monkeypatch)
    with pytest.raises(operators.NonDeterministicError, match="dropout"):
        operator.check_determinism(vectors)
    assert runs == {"products": 0, "first_batches": []}


# 3 batches of 4: the timed runs are the check's two products; 6 batches of 2: the timed
# runs (over the first 4) are the check, and the first block's product runs after it.
@pytest.mark.parametrize("batch_size", [4, 2])
@pytest.mark.parametrize("basis", ["float64", "float32"])
def test_the_job_takes_its_first_products_from_the_timing(tmp_path, monkeypatch, basis,
                                                          batch_size):
    tiny_model(dtype="float32").save(str(tmp_path / "tiny.keras"))
    x, y = tiny_data(np.float32)  # 12 examples
    np.savez(tmp_path / "tiny.npz", x=x, y=y)
    options = dict(model=str(tmp_path / "tiny.keras"), dataset=f"npz:{tmp_path / 'tiny.npz'}",
                   batch_size=batch_size, num_draws=2, lockstep_draws=2, basis_dtype=basis)
    calls = _counting_matmat(monkeypatch)
    runs = _counting_runs(monkeypatch)
    auto = job.run(small_config(tmp_path / "auto", **options))
    whole = batch_size == 4
    # 5 steps of blocks of 2, the first block's from the timing where it is whole.
    assert calls == [(2, auto["num_params"])] * (4 if whole else 5)
    assert runs["first_batches"] == []  # the timed runs were the check
    assert auto["num_hvps_this_session"] == (12 if whole else 10)
    # The job's products that forward mode's bound counted: the check's only if whole.
    assert auto["method_note"].startswith(
        f"not timed: the job's products ({6 if whole else 5}) take about")
    fixed = job.run(small_config(tmp_path / "fixed", method=auto["method"], **options))
    if whole:
        assert len(calls) == 4 + 6
    else:  # two runs over the first 2 of the 6 batches, then 5 block products
        assert len(calls) == 5 + 5 and runs["first_batches"] == [2, 2]
    a, b = (np.load(tmp_path / run / "spectrum.npz") for run in ("auto", "fixed"))
    for name in ("alphas", "betas", "nodes", "weights"):
        np.testing.assert_array_equal(a[name], b[name])
