"""Grappler's set-up of our graphs (--graph_optimization, SpectrumCallback's
graph_optimization): light (one round, no memory or layout optimiser) for the functions
first run inside, TensorFlow's configuration again outside, and the same products."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
from tensorflow.python.eager import context

from hessian_tf.distribute import graph_optimization
from hessian_tf.distribute.strategies import light_graph_optimization
from tests.processes import environment

OPTIONS = rewriter_config_pb2.RewriterConfig


def call_config(options=None) -> config_pb2.ConfigProto:
    """The ConfigProto of function call `options` (default: this thread's now)."""
    options = options or context.context().function_call_options
    config = config_pb2.ConfigProto()
    config.ParseFromString(options.config_proto_serialized)
    return config


def test_light_inside_and_the_calling_programs_options_outside():
    before = context.context().function_call_options
    with graph_optimization("light") as light:
        assert light
        rewrite = call_config().graph_options.rewrite_options
        assert rewrite.meta_optimizer_iterations == OPTIONS.ONE
        assert rewrite.memory_optimization == OPTIONS.NO_MEM_OPT
        assert rewrite.layout_optimizer == OPTIONS.OFF
        # The rest of the calling program's configuration is kept.
        assert call_config().allow_soft_placement == call_config(before).allow_soft_placement
    assert context.context().function_call_options is before
    with graph_optimization("full") as light:
        assert not light
        assert context.context().function_call_options is before


def test_options_restored_when_the_block_raises():
    before = context.context().function_call_options
    with pytest.raises(RuntimeError, match="inside"):
        with graph_optimization("light"):
            raise RuntimeError("inside")
    assert context.context().function_call_options is before


def test_auto_is_light_without_gpu_or_tpu():
    gpus = tf.config.list_physical_devices("GPU")
    assert light_graph_optimization("auto") == (not gpus)
    assert not light_graph_optimization("auto", tpu=True)
    assert light_graph_optimization("light", tpu=True)
    assert not light_graph_optimization("full")


def test_an_unknown_mode_names_the_flag_and_the_choices():
    with pytest.raises(ValueError, match=r"--graph_optimization='fast': pass one of "
                                         r"\('auto', 'light', 'full'\)"):
        with graph_optimization("fast"):
            pass


GRAPPLER_LOG = """
import sys
import tensorflow as tf
from hessian_tf.distribute import graph_optimization

@tf.function
def f(x):
    for _ in range(20):
        x = tf.nn.relu(tf.matmul(x, x) * 0.5 + 1.0)
    return tf.reduce_sum(x)

with graph_optimization(sys.argv[1]):
    f(tf.ones([4, 4]))
    f(tf.ones([4, 4]))  # set up once
print("outside", flush=True)
f(tf.ones([4, 4]))  # the same trace outside is set up again, by TensorFlow's configuration
"""


def run_with_grappler_log(code: str, mode: str) -> subprocess.CompletedProcess:
    """`code` run with argument `mode` in a fresh process whose stderr holds Grappler's
    own log (VLOG 1 of meta_optimizer): which graphs it optimised, with which optimisers."""
    env = environment()
    env.update(TF_CPP_MIN_LOG_LEVEL="0", TF_CPP_VMODULE="meta_optimizer=1")
    result = subprocess.run([sys.executable, "-c", code, mode], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.mark.parametrize("mode, rounds, memory", [("light", 1, 0), ("full", 2, 1)])
def test_grappler_runs_the_light_configuration_on_functions_first_run_inside(mode, rounds, memory):
    log = run_with_grappler_log(GRAPPLER_LOG, mode).stderr
    items = log.split("Starting optimization for grappler item")[1:]
    # Set up once inside; outside again where the configuration differs.
    assert len(items) == (2 if mode == "light" else 1)
    assert items[0].count("] dependency_optimizer:") == rounds
    assert items[0].count("] memory_optimizer:") == memory
    for outside in items[1:]:
        assert outside.count("] dependency_optimizer:") == 2
        assert outside.count("] memory_optimizer:") == 1


def test_products_alike_under_both():
    from hessian_tf import operators
    from hessian_tf.models import mlp

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    y = rng.integers(0, 3, 64)
    vector = rng.standard_normal(mlp(8, hidden_units=6, num_classes=3).count_params())
    products = []
    for mode in ("light", "full"):
        model = mlp(8, hidden_units=6, num_classes=3)
        with graph_optimization(mode):
            operator = operators.HessianOperator(operators.KerasModelFunction(model), x, y,
                                                 batch_size=16, method="reverse_over_reverse")
            products.append(operator.matvec(vector))
    np.testing.assert_allclose(products[0], products[1], rtol=1e-5,
                               atol=1e-6 * np.max(np.abs(products[1])))
    assert not np.allclose(products[0], 0.0)


def test_the_binary_reports_its_set_up_and_refuses_an_unknown_one(tmp_path):
    spectra = {}
    for mode in ("auto", "full"):
        result = subprocess.run(
            [sys.executable, "-m", "hessian_tf.bin.spectrum", "--lanczos_steps=4",
             "--default_model_epochs=0", "--num_eigenpairs=1", f"--graph_optimization={mode}",
             f"--output_dir={tmp_path / mode}"],
            capture_output=True, text=True, timeout=300, env=environment())
        assert result.returncode == 0, result.stderr[-2000:]
        summary = json.loads((tmp_path / mode / "summary.json").read_text())
        assert summary["graph_optimization"] == (
            "light" if mode == "auto" and not tf.config.list_physical_devices("GPU") else "full")
        spectra[mode] = summary["lambda_max"]
    assert spectra["auto"] == pytest.approx(spectra["full"], rel=1e-6)
    result = subprocess.run(
        [sys.executable, "-m", "hessian_tf.bin.spectrum", "--graph_optimization=fast",
         f"--output_dir={tmp_path / 'bad'}"],
        capture_output=True, text=True, timeout=300, env=environment())
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--graph_optimization='fast': pass one of" in lines[0]
    assert not (tmp_path / "bad").exists()


ONCE_LOG = """
import sys
import numpy as np
import tensorflow as tf
from hessian_tf import operators
from hessian_tf.distribute import graph_optimization
from hessian_tf.models import mlp

x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
y = np.arange(64) % 3
with graph_optimization(sys.argv[1]):
    operator = operators.HessianOperator(operators.KerasModelFunction(
        mlp(8, hidden_units=6, num_classes=3)), x, y, batch_size=16,
        method="reverse_over_reverse")
    operator.matvec(np.ones(operator.dim))
    print("LOSS", operator.loss_and_gradient()[0], flush=True)
"""


@pytest.mark.parametrize("mode", ["light", "full"])
def test_the_gradient_a_job_runs_once_is_not_optimised_in_a_light_set_up(mode):
    result = run_with_grappler_log(ONCE_LOG, mode)
    assert "LOSS" in result.stdout
    optimised = result.stderr
    assert "grappler item: __inference__product_graph" in optimised
    assert ("grappler item: __inference__loss_gradient_graph" in optimised) == (mode == "full")
