"""Where the time of a spectrum goes: Lanczos steps, products, gradients.

On the reference workloads (benchmarks/README.md), for each (workload, BN mode, batch size):
- Lanczos step: seconds per step of `stochastic_lanczos_quadrature` on
  `HessianOperator.matvec` (after a warm-up product), and the share of a step
  spent outside the product (the Lanczos overhead, from the same run);
- product: one `matvec` (the whole dataset) alone, best of --repeats;
- one batch: forward (summed loss), gradient and Hessian-vector product (both
  methods) on the same batch, each a `tf.function` over the operator's own model
  function, best of --repeats; product/gradient is the cost of a product in
  gradients;
- lockstep: 8 draws run together (one block of 8 products per step, one data
  pass) against 8 single-draw runs of the same steps, wall time;
- flops: the floating-point operations of the one-batch graphs (benchmarks/flops.py),
  so that each time ratio has its arithmetic floor beside it: product ÷ gradient, and a
  block of 8 products ÷ 8 single products.
The product and the one-batch timings are taken in interleaved rounds, so that
load from other processes inflates them alike.

Command (about 4-6 minutes on 2 CPU cores; README in this directory):
  .venv/bin/python benchmarks/core.py [--workload mlp-digits|resnet32-cifar|all] [--repeats 5]
      [--intra_op_threads N]  (0, the default: the spectrum binary's automatic choice)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import sys
import time
from typing import Callable, NamedTuple, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import threadpoolctl  # noqa: E402  (installed with scikit-learn)

from hessian_tf import linalg, operators  # noqa: E402
from hessian_tf.distribute import automatic_cpu_threads, configure_cpu_threads  # noqa: E402
from flops import graph_flops  # noqa: E402  (benchmarks/flops.py)
from machine import cpu_name, load_average, measure_rows  # noqa: E402  (benchmarks/machine.py)
from hessian_tf.io.datasets import load_digits  # noqa: E402
from hessian_tf.models.mlp import mlp  # noqa: E402
from hessian_tf.models.resnet import resnet32  # noqa: E402
from hessian_tf.spectrum import stochastic_lanczos_quadrature  # noqa: E402

RESNET_NUM_IMAGES = 512
REFERENCE_LANCZOS_STEPS = 90  # m of the paper and of the reference workloads


LOCKSTEP_DRAWS = 8


class Case(NamedTuple):
    workload: str
    bn_mode: str
    batch_size: int
    lanczos_steps: int
    lockstep_steps: int  # steps of the lockstep comparison runs


class Row(NamedTuple):
    case: Case
    num_params: int
    num_examples: int
    first_product: float  # trace + one product
    step: float  # seconds per Lanczos step (mean over the run)
    product_in_run: float  # seconds per matvec inside that run (mean)
    product: float  # matvec alone, best of repeats
    algebra_at_reference: float  # one lanczos_step at k = 90, product given
    algebra_one_thread: float  # the same with NumPy's BLAS on one thread
    forward: float  # one batch, best of repeats
    gradient: float
    batch_products: dict  # method -> seconds for one batch
    method: str  # the operator's own (method='auto', chosen for one draw)
    lockstep: float  # 8 draws in lockstep ÷ 8 single-draw runs, wall time
    lockstep_method: str  # method='auto' chosen for blocks of 8
    flops_ratio: float  # one batch: flops of the product ÷ flops of the gradient
    lockstep_flops: float  # one batch: flops of a block of 8 products ÷ 8 products
    model_unchanged: bool

    @property
    def overhead(self) -> float:
        return (self.step - self.product_in_run) / self.step

    @property
    def ratio(self) -> float:
        return self.batch_products[self.method] / self.gradient

    @property
    def loop_ratio(self) -> float:
        """matvec / (number of batches · one batch's product): the cost of the
        operator's loop, padding, dynamic shapes, flattening and the host copies."""
        num_batches = self.num_examples / self.case.batch_size
        return self.product / (num_batches * self.batch_products[self.method])


def load_workload(name: str):
    """(model, x, y) of a reference workload."""
    if name == "mlp-digits":
        x, y = load_digits()
        return mlp(), x, y
    if name == "resnet32-cifar":
        rng = np.random.default_rng(0)
        x = rng.uniform(size=(RESNET_NUM_IMAGES, 32, 32, 3)).astype(np.float32)
        y = rng.integers(0, 10, RESNET_NUM_IMAGES).astype(np.int32)
        return resnet32(), x, y
    raise ValueError(f"--workload={name!r} is not known; use one of {sorted(CASES)} or 'all'.")


def cases(lanczos_steps: Optional[int]) -> dict[str, list[Case]]:
    def steps(default):
        return lanczos_steps or default

    return {
        # The MLP has no BN: one mode. Batch 1797 = the whole dataset in one batch.
        "mlp-digits": [
            Case("mlp-digits", "inference", 1797, steps(90), steps(90)),
            Case("mlp-digits", "inference", 128, steps(90), steps(90)),
        ],
        "resnet32-cifar": [
            Case("resnet32-cifar", "inference", 128, steps(10), 2),
            Case("resnet32-cifar", "train", 128, steps(10), 2),
        ],
    }


CASES = cases(None)


def interleaved_timings(
    functions: dict[str, Callable[[], object]], repeats: int
) -> dict[str, list[float]]:
    """Seconds of each call, `repeats` rounds of one call of every function: a
    burst of load from other processes then hits all of them alike, so their
    ratios stay meaningful on a shared machine."""
    seconds = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def products_difference(products: list, what: str, tolerance: float = 1e-4) -> float:
    """The largest difference of `products[1:]` from `products[0]`, relative to its
    largest entry; a RuntimeError naming `what` above `tolerance`."""
    reference, *others = products
    error = max(float(np.abs(other - reference).max()) for other in others
                ) / float(np.abs(reference).max())
    if error > tolerance:
        raise RuntimeError(f"{what}: the products differ by {error:.1e}")
    return error


def agreeing_medians(variants: dict, rounds: int, what: str, *, tracing_contexts=None,
                     tolerance: float = 1e-4):
    """Operators of the same Hessian, `variants` {name: operator}: each one's first
    product of one vector (traced within its context of `tracing_contexts`, if any),
    the largest difference of the others' from the first's, relative to its largest
    entry (a RuntimeError naming `what` above `tolerance`), then the medians of `rounds`
    interleaved timed products. Returns ({name: median seconds}, the difference)."""
    reference = next(iter(variants.values()))
    vector = np.random.default_rng(0).standard_normal(reference.dim)
    products = {}
    for name, operator in variants.items():
        with (tracing_contexts or {}).get(name, contextlib.nullcontext)():
            products[name] = operator.matvec(vector)
    error = products_difference(list(products.values()), what, tolerance)
    seconds = interleaved_timings(
        {name: functools.partial(operator.matvec, vector) for name, operator in variants.items()},
        rounds)
    return {name: float(np.median(values)) for name, values in seconds.items()}, error


@contextlib.contextmanager
def switched_off(name: str):
    """Traces made within: `KerasModelFunction.mode_context` enters a null context where
    it enters `name`, a mending of hessian_tf's imported by model_function (e.g.
    second_order_gradients), for a benchmark's contrast with TensorFlow's or Keras's own."""
    from hessian_tf.operators import model_function

    mending = getattr(model_function, name)
    setattr(model_function, name, contextlib.nullcontext)
    try:
        yield
    finally:
        setattr(model_function, name, mending)


def mending_cells(mending: str, model, x, y, *, batch_size: int, method: str,
                  rounds: int, what: str) -> list[str]:
    """Full-data products of two operators of `model`: one traced with model_function's
    `mending` switched off (TensorFlow's or Keras's own path, `switched_off`), one with it;
    their products checked to agree, then timed in `rounds` interleaved rounds
    (agreeing_medians). Returns the cells: median ms off, median ms on, on ÷ off, and
    the products' largest relative difference."""
    contexts = {"off": functools.partial(switched_off, mending), "on": contextlib.nullcontext}
    variants = {name: operators.HessianOperator(
        operators.KerasModelFunction(model), x, y, batch_size=batch_size, method=method)
        for name in contexts}
    median, error = agreeing_medians(variants, rounds, what, tracing_contexts=contexts)
    return [f"{median['off'] * 1e3:.1f}", f"{median['on'] * 1e3:.1f}",
            f"{median['on'] / median['off']:.2f}", f"{error:.0e}"]


def rounds_main(argv: list[str], *, script: str, description: str, header, cases, measure,
                rounds: int) -> int:
    """The main of a benchmark whose one flag is --rounds (default `rounds`): a row
    `measure(*case, rounds)` for each case (measure_rows). 2 and one line for --rounds < 1."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=rounds)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        print(f"{script}: error: --rounds={args.rounds}: pass at least 1", file=sys.stderr)
        return 2
    measure_rows(header, [(*case, args.rounds) for case in cases], measure)
    return 0


def batch_functions(operator: operators.HessianOperator, x, y):
    """tf.functions of one batch's forward, gradient and product, built from the
    operator's own objective and product, so they time what the operator runs
    per batch (with static shapes, outside its loop)."""
    model_function = operator.model_function
    zero = tf.UnconnectedGradients.ZERO

    # mode_context patches BN while the graph is traced, i.e. at the first call.
    @tf.function
    def forward():
        with model_function.mode_context(operator.bn_mode):
            return operator._batch_objective(model_function.primals(), model_function.state(), x, y)

    @tf.function
    def gradient():
        with model_function.mode_context(operator.bn_mode):
            primals = model_function.primals()
            with tf.GradientTape() as tape:
                tape.watch(primals)
                objective = operator._batch_objective(primals, model_function.state(), x, y)
            return tape.gradient(objective, primals, unconnected_gradients=zero)

    @tf.function
    def product(tangents):
        with model_function.mode_context(operator.bn_mode):
            return operator._batch_product(
                model_function.primals(), model_function.state(), tangents, x, y)

    return forward, gradient, product


def flop_ratios(operator: operators.HessianOperator, x, y, tangents) -> tuple[float, float]:
    """(product ÷ gradient, block of LOCKSTEP_DRAWS products ÷ that many products),
    in floating-point operations of one batch's graphs (traced, not run)."""
    model_function = operator.model_function
    _, gradient, product = batch_functions(operator, x, y)

    @tf.function
    def block(block_tangents):
        with model_function.mode_context(operator.bn_mode):
            return operator._batch_products(
                model_function.primals(), model_function.state(), block_tangents, x, y)

    gradient_flops = graph_flops(gradient.get_concrete_function())["total"]
    product_flops = graph_flops(product.get_concrete_function(tangents))["total"]
    block_flops = graph_flops(block.get_concrete_function([tangents] * LOCKSTEP_DRAWS))["total"]
    return product_flops / gradient_flops, block_flops / (LOCKSTEP_DRAWS * product_flops)


def lockstep_ratio(together: "operators.HessianOperator", apart: "operators.HessianOperator",
                   steps: int, draws: int) -> float:
    """Wall time of `draws` draws of `steps` Lanczos steps run in lockstep by `together`,
    ÷ that of `draws` single-draw runs one after the other by `apart` (both traced
    beforehand). With method='auto' each operator has the method a job of that many
    draws chooses (hessian-spectrum times the methods on blocks of its lockstep size)."""
    together.choose_method(draws)
    together.matmat(np.ones((draws, together.dim)))  # trace the block of `draws`
    apart.matvec(np.ones(apart.dim))

    def run(operator, num_draws, lockstep):
        start = time.perf_counter()
        stochastic_lanczos_quadrature(
            operator.matvec, operator.dim, lanczos_steps=steps, num_draws=num_draws,
            lockstep=lockstep, matmat=operator.matmat,
        )
        return time.perf_counter() - start

    return run(together, draws, draws) / sum(run(apart, 1, 1) for _ in range(draws))


def lanczos_algebra_seconds(dim: int, k: int, repeats: int) -> float:
    """One `lanczos_step` at step k (k + 1 basis vectors), product given: the
    reorthogonalisation, which grows with k. Best of `repeats`."""
    rng = np.random.default_rng(0)
    basis = np.zeros((k + 1, dim))
    basis[:] = rng.standard_normal((k + 1, dim)) / np.sqrt(dim)
    state = linalg.LanczosState(
        basis=basis, alphas=np.ones(k + 1), betas=np.ones(k + 1), num_steps=k, exhausted=False
    )
    product = rng.standard_normal(dim)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        linalg.lanczos_step(state, linalg.current_vector(state) + product)
        best = min(best, time.perf_counter() - start)
    del basis, state
    return best


def measure(case: Case, model: keras.Model, x: np.ndarray, y: np.ndarray, repeats: int) -> Row:
    weights_before = [w.copy() for w in model.get_weights()]
    model_function = operators.KerasModelFunction(model)

    def operator_for(method):
        return operators.HessianOperator(
            model_function, x, y, batch_size=case.batch_size, bn_mode=case.bn_mode, method=method
        )

    operator = operator_for("auto")
    vector = np.random.default_rng(1).standard_normal(operator.dim)

    start = time.perf_counter()
    operator.choose_method(1)  # as hessian-spectrum does for one draw
    operator.matvec(vector)
    first_product = time.perf_counter() - start

    before = operator.product_seconds, operator.num_products
    last = []
    stochastic_lanczos_quadrature(
        operator.matvec, operator.dim, lanczos_steps=case.lanczos_steps, progress=last.append,
        matmat=operator.matmat,
    )
    num_steps = last[-1].step  # fewer than asked only if the Krylov space ran out
    step = last[-1].seconds / num_steps
    product_in_run = (operator.product_seconds - before[0]) / (operator.num_products - before[1])

    size = min(case.batch_size, x.shape[0])
    x_batch, y_batch = tf.constant(x[:size]), tf.constant(y[:size])
    tangents = operators.unflatten(tf.constant(vector), model_function.primals())
    forward, gradient, product_function = batch_functions(operator, x_batch, y_batch)
    other = ({"forward_over_backward", "reverse_over_reverse"} - {operator.method}).pop()
    _, _, other_product_function = batch_functions(operator_for(other), x_batch, y_batch)
    functions = {
        "matvec": lambda: operator.matvec(vector),
        "forward": forward,
        "gradient": gradient,
        operator.method: lambda: product_function(tangents),
        other: lambda: other_product_function(tangents),
    }
    for function in functions.values():
        function()  # trace
    seconds = interleaved_timings(functions, repeats)
    best = {name: min(values) for name, values in seconds.items()}
    batch_products = {
        method: best[method] for method in ("forward_over_backward", "reverse_over_reverse")
    }

    lockstep_operator = operator_for("auto")
    lockstep = lockstep_ratio(lockstep_operator, operator, case.lockstep_steps, LOCKSTEP_DRAWS)
    flops_ratio, lockstep_flops = flop_ratios(operator, x_batch, y_batch, tangents)
    if lockstep_operator.method != operator.method:
        _, lockstep_flops = flop_ratios(lockstep_operator, x_batch, y_batch, tangents)
    algebra = lanczos_algebra_seconds(operator.dim, REFERENCE_LANCZOS_STEPS - 1, repeats=3)
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        algebra_one_thread = lanczos_algebra_seconds(
            operator.dim, REFERENCE_LANCZOS_STEPS - 1, repeats=3
        )
    unchanged = all(
        np.array_equal(a, b) for a, b in zip(weights_before, model.get_weights())
    )
    return Row(
        case=case,
        num_params=operator.dim,
        num_examples=operator.num_examples,
        first_product=first_product,
        step=step,
        product_in_run=product_in_run,
        product=best["matvec"],
        algebra_at_reference=algebra,
        algebra_one_thread=algebra_one_thread,
        forward=best["forward"],
        gradient=best["gradient"],
        batch_products=batch_products,
        method=operator.method,
        lockstep=lockstep,
        lockstep_method=lockstep_operator.method,
        flops_ratio=flops_ratio,
        lockstep_flops=lockstep_flops,
        model_unchanged=unchanged,
    )


def blas_threads() -> str:
    pools = [p for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
    return ", ".join(f"{p['prefix']} {p['num_threads']} threads" for p in pools) or "?"


def environment() -> str:
    cpu = cpu_name()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    threads = tf.config.threading.get_intra_op_parallelism_threads() or "default"
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)")
    return (
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, NumPy {np.__version__}, "
        f"Python {platform.python_version()}; {cpu}, {usable} usable cores "
        f"(os.cpu_count {os.cpu_count()}), TF intra-op threads {threads}, oneDNN {onednn}, "
        f"NumPy BLAS {blas_threads()}; {len(tf.config.list_physical_devices('GPU'))} GPUs"
    )


HEADER = (
    "workload", "BN mode", "batch", "params", "method", "step s", "matvec s", "overhead",
    "algebra@90 s", "1-thread s", "fwd s", "grad s", "HVP s", "HVP/grad", "FoB/grad", "RoR/grad",
    "HVP/grad flops", "matvec/Σbatch", "lockstep 8", "lockstep 8 method", "lockstep 8 flops",
    "first s",
)

SHORT = {"forward_over_backward": "FoB", "reverse_over_reverse": "RoR"}


def cells(row: Row) -> list[str]:
    products = row.batch_products
    return [
        row.case.workload,
        row.case.bn_mode if row.case.workload != "mlp-digits" else "(no BN)",
        str(row.case.batch_size),
        f"{row.num_params:,}",
        SHORT[row.method],
        f"{row.step:.4g}",
        f"{row.product:.4g}",
        f"{100 * row.overhead:.1f}%",
        f"{row.algebra_at_reference:.3g}",
        f"{row.algebra_one_thread:.3g}",
        f"{row.forward:.4g}",
        f"{row.gradient:.4g}",
        f"{products[row.method]:.4g}",
        f"{row.ratio:.2f}",
        f"{products['forward_over_backward'] / row.gradient:.2f}",
        f"{products['reverse_over_reverse'] / row.gradient:.2f}",
        f"{row.flops_ratio:.2f}",
        f"{row.loop_ratio:.2f}",
        f"{row.lockstep:.2f}",
        SHORT[row.lockstep_method],
        f"{row.lockstep_flops:.2f}",
        f"{row.first_product:.3g}",
    ]


def text_table(rows: list[Row]) -> str:
    table = [list(HEADER)] + [cells(row) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    return "\n".join(
        "  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in table
    )


def markdown(rows: list[Row], env: str, repeats: int) -> str:
    lines = [
        f"Environment: {env}. Best of {repeats} unless noted; one run.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---" if i < 2 else "--:" for i in range(len(HEADER))) + "|",
    ]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in rows]
    steps = sorted({(row.case.workload, row.case.lanczos_steps) for row in rows})
    lines += [
        "",
        "Lanczos steps per run: " + ", ".join(f"{w} m={m}" for w, m in steps) + ". "
        "step = seconds per Lanczos step (mean over the run); matvec = one full-dataset "
        "product alone; overhead = share of a step outside the product (same run); "
        "algebra@90 = one reorthogonalised Lanczos step with 90 basis vectors (1-thread: "
        "NumPy's BLAS limited to one thread); "
        "method = the product method that --method=auto chose for one draw (timed on "
        "the first batches); fwd/grad/HVP = one batch (HVP: by that method); FoB/RoR = "
        "forward-over-backward and "
        "reverse-over-reverse products; HVP/grad flops = the same ratio in floating-point "
        "operations of the two one-batch graphs (the arithmetic floor of HVP/grad); "
        "matvec/Σbatch = matvec ÷ (N/batch · one-batch HVP); "
        f"lockstep 8 = {LOCKSTEP_DRAWS} draws in lockstep ÷ {LOCKSTEP_DRAWS} single-draw runs "
        "(wall time, steps: mlp-digits m, resnet32-cifar 2; each with the method auto "
        "chooses for its block size: lockstep 8 method); lockstep 8 flops = one batch's "
        f"block of {LOCKSTEP_DRAWS} products ÷ {LOCKSTEP_DRAWS} products in floating-point "
        "operations (its arithmetic floor); first = trace + first product (and, before it, "
        "the timing of both methods).",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="all", help=f"{' | '.join(CASES)} | all")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many timings")
    parser.add_argument(
        "--lanczos_steps", type=int, default=None,
        help="Lanczos steps per run (default: 90 for mlp-digits, 10 for resnet32-cifar)",
    )
    parser.add_argument(
        "--blas_threads", type=int, default=None,
        help="limit NumPy's BLAS (the Lanczos algebra) to this many threads for the whole run",
    )
    parser.add_argument(
        "--intra_op_threads", type=int, default=0,
        help="TensorFlow threads per op; 0: the spectrum binary's automatic choice "
             "(hessian_tf.distribute.automatic_cpu_threads)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.intra_op_threads < 0:
        parser.error(f"--repeats={args.repeats} --intra_op_threads={args.intra_op_threads}: "
                     "pass repeats >= 1 and threads >= 0.")
    # Before any TensorFlow work, as the binary sets them.
    if args.intra_op_threads:
        configure_cpu_threads(args.intra_op_threads, 0)
    else:
        automatic_cpu_threads("default")
    all_cases = cases(args.lanczos_steps)
    if args.workload != "all" and args.workload not in all_cases:
        parser.error(f"--workload={args.workload!r}: use one of {sorted(all_cases)} or 'all'.")
    names = list(all_cases) if args.workload == "all" else [args.workload]

    with contextlib.ExitStack() as stack:
        if args.blas_threads:
            stack.enter_context(threadpoolctl.threadpool_limits(args.blas_threads, user_api="blas"))
        return run(names, all_cases, args.repeats)


def run(names, all_cases, repeats: int) -> int:
    env = environment()
    print(env, flush=True)
    start_load = load_average()
    print(f"At start: {start_load}", flush=True)
    if os.getloadavg()[0] > 0.5:
        print("WARNING: other processes are using the CPU; the timings will be inflated.")
    started = time.perf_counter()
    rows = []
    for name in names:
        model, x, y = load_workload(name)
        for case in all_cases[name]:
            print(f"... {case.workload} bn_mode={case.bn_mode} batch={case.batch_size} "
                  f"m={case.lanczos_steps}", file=sys.stderr, flush=True)
            rows.append(measure(case, model, x, y, repeats))
            print(text_table(rows[-1:]), flush=True)
        del model
    end_load = load_average()
    print(f"\nAll ({time.perf_counter() - started:.0f} s; at end: {end_load}):")
    print(text_table(rows))
    if not all(row.model_unchanged for row in rows):
        print("ERROR: a model's weights changed while its spectrum was measured.")
        return 1
    print("\nMarkdown:\n")
    print(markdown(rows, f"{env}; at start {start_load}, at end {end_load}", repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
