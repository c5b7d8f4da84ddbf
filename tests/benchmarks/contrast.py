"""For the tests of benchmarks that contrast a mending of hessian_tf's with TensorFlow's or
Keras's own (benchmarks/core.py's switched_off)."""

from hessian_tf.operators import model_function


class MendingRecorder:
    """Records, at each entry of `KerasModelFunction.mode_context`, whether
    model_function's `name` is `mending` (True) or switched off (False)."""

    def __init__(self, monkeypatch, name: str, mending):
        self.name, self.mending, self.entries = name, mending, []
        original = model_function.KerasModelFunction.mode_context

        def recording(function, bn_mode):
            self.entries.append(getattr(model_function, name) is mending)
            return original(function, bn_mode)

        monkeypatch.setattr(model_function.KerasModelFunction, "mode_context", recording)

    def check_contrast(self):
        """Built (each operator checks its model in the mode context), then traced: the
        first product without the mending, the next with it; the mending restored."""
        first_product = self.entries.index(False)
        assert self.entries[first_product:first_product + 2] == [False, True]
        assert getattr(model_function, self.name) is self.mending


def check_contrast_row(monkeypatch, benchmark, name: str, mending, network: str, method: str,
                       examples: int):
    """One row of a benchmark that contrasts model_function's `name` (`mending`) with
    TensorFlow's or Keras's own path (core.mending_cells): traced without it first, then
    with it; its cells are the header's, a positive ratio and agreeing products."""
    recorder = MendingRecorder(monkeypatch, name, mending)
    row = benchmark.measure(network, method, 1, examples=examples)
    recorder.check_contrast()
    assert row[:2] == [network, method]
    assert len(row) == len(benchmark.HEADER)
    assert float(row[4]) > 0 and float(row[5]) < 1e-4
