"""Peak memory of a spectrum against the budget of the performance issue.

Requirement: peak <= Lanczos basis + model + one batch's activations for the
product, + 10%; a float32 basis option halves the basis.

Every measurement runs in its own child process, so peaks do not mix. In each
child, RSS and peak RSS are read from /proc/self/status (VmRSS, VmHWM) and
getrusage (ru_maxrss); the peak is reset between phases (`5` written to
/proc/self/clear_refs) so that each phase's own peak is known. Per BN mode:

  (a) baseline   import TensorFlow, build the model, load the data, build the
                 HessianOperator: "model + data + TF runtime" (RSS then).
  (b) one batch  the same with the operator on the first batch only, then a few
                 products: peak - RSS before them = one batch's activations for
                 the product, plus the product graph's workspace and trace.
  (c) SLQ f64    (a) on all the data, then stochastic_lanczos_quadrature with m
                 steps and a float64 basis; every step split into phases
                 (prep: stacking the vectors; product: operator.matmat; algebra:
                 lanczos_step), each with its own peak.
  (d) SLQ f32    the same with basis_dtype=float32.
Budget = RSS(a) + basis (m * dim * 8 or 4 bytes, per lockstep draw) + (b);
the requirement is peak / budget <= 1.10, and peak(c) - peak(d) ~ basis / 2.

Once per run, at the real size (m = --algebra_steps, default 90, and the
workload's dimension) and without a model:
  (e) Lanczos alone  the SLQ driver on a diagonal operator, f64 and f32 basis:
                 what the basis and the algebra's temporaries cost at m = 90.
  (f) checkpoint     one SLQCheckpointer.save of a full basis (what
                 `hessian-spectrum` does every --checkpoint_every products), then
                 its restore in the same process once the basis is freed.
With --binary, `hessian-spectrum` itself also runs on the same model and data
(f64, f32, and f64 without checkpoints), its peak from wait4's ru_maxrss.

Command (about 10 minutes on 2 CPU cores, 15 with --binary; MEMORY.md in this directory):
  .venv/bin/python benchmarks/memory.py [--workload resnet32|mlp-digits]
      [--bn_modes inference,train] [--lanczos_steps 20] [--binary]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

MIB = 2.0**20
RESULT_PREFIX = "MEMORY-RESULT "
RESNET_NUM_IMAGES = 512
DEFAULT_STEPS = {"resnet32": 20, "mlp-digits": 90}
DEFAULT_BN_MODES = {"resnet32": "inference,train", "mlp-digits": "inference"}
TOLERANCE = 1.10  # the requirement: peak <= budget + 10%


# ------------------------------------------------------------------ memory readings


def _status(keys) -> dict:
    """Fields of /proc/self/status in bytes."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in keys:
                values[key] = int(rest.split()[0]) * 1024
    return values


def memory_status() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    values = _status(("VmRSS", "VmHWM"))
    return values["VmRSS"], values["VmHWM"]


def resident_kinds() -> dict:
    """RssAnon and RssFile (shared libraries' pages) of this process in bytes."""
    return _status(("RssAnon", "RssFile"))


def maxrss() -> int:
    """getrusage's peak RSS of this process in bytes (Linux reports KiB). It reads
    the same high-water mark as VmHWM, so a reset lowers it too."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class Meter:
    """Peaks of consecutive phases: `begin()` resets the peak, `end()` returns
    (RSS at begin, peak since begin, RSS now). Tracks the whole process's peak
    (VmHWM and ru_maxrss before any reset included)."""

    def __init__(self):
        rss, hwm = memory_status()
        self.process_peak = max(hwm, maxrss())
        self.can_reset = reset_peak()
        self._start = rss

    def begin(self) -> None:
        rss, hwm = memory_status()
        self.process_peak = max(self.process_peak, hwm, maxrss())
        reset_peak()
        self._start = memory_status()[0]

    def end(self) -> dict:
        rss, hwm = memory_status()
        peak = max(hwm, maxrss())
        self.process_peak = max(self.process_peak, peak)
        return {"start": self._start, "peak": peak, "rss": rss}


# ------------------------------------------------------------------ children


def child_main(spec: dict) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    rss_python = memory_status()[0]
    import numpy as np  # noqa: F401  (imported here: the parent stays small)

    kind = spec["kind"]
    if kind == "algebra":
        return child_algebra(spec, rss_python)
    if kind == "checkpoint":
        return child_checkpoint(spec, rss_python)

    import keras
    import tensorflow as tf

    from hessian_tf import operators
    from hessian_tf.distribute import graph_optimization

    # Grappler's set-up as the binary's (--graph_optimization), for the rest of the child.
    graph_optimization(spec["graph_optimization"]).__enter__()
    rss_imports = memory_status()[0]
    model, x, y = load_workload(spec["workload"], spec["num_examples"])
    rss_model_data = memory_status()[0]
    if kind == "prepare":
        model.save(os.path.join(spec["directory"], "model.keras"))
        np.savez(os.path.join(spec["directory"], "data.npz"), x=x, y=y)
        return {"kind": kind, "process_peak": max(memory_status()[1], maxrss())}
    if kind == "one_batch":
        x, y = x[: spec["batch_size"]], y[: spec["batch_size"]]
    operator = operators.HessianOperator(
        operators.KerasModelFunction(model), x, y,
        batch_size=spec["batch_size"], bn_mode=spec["bn_mode"], method=spec["method"],
    )
    rss_ready, hwm_ready = memory_status()
    result = {
        "kind": kind,
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "dim": operator.dim,
        "method": operator.method,
        "model_bytes": int(sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
                               for v in model.weights)),
        "data_bytes": int(x.nbytes + y.nbytes),
        "rss_python": rss_python,
        "rss_imports": rss_imports,
        "rss_model_data": rss_model_data,
        "rss_ready": rss_ready,
        "hwm_ready": max(hwm_ready, maxrss()),
        "resident_kinds": resident_kinds(),
    }
    if kind == "baseline":
        result["process_peak"] = result["hwm_ready"]
        return result
    meter = Meter()
    result["can_reset"] = meter.can_reset
    rng = np.random.default_rng(1)
    k = spec["lockstep"]
    if kind == "one_batch":
        products = []
        for _ in range(spec["batch_products"]):
            vectors = rng.standard_normal((k, operator.dim))
            meter.begin()
            start = time.perf_counter()
            operator.matmat(vectors)
            products.append(dict(meter.end(), seconds=time.perf_counter() - start))
        result["products"] = products
        # One batch's product above the ready process, the trace included.
        result["activations"] = max(p["peak"] for p in products) - rss_ready
        result["process_peak"] = meter.process_peak
        return result
    if kind == "slq":
        result.update(run_slq(spec, operator.matmat, operator.dim, meter, rss_ready))
        return result
    raise ValueError(f"unknown child kind {kind!r}")


def load_workload(name: str, num_examples: int):
    import numpy as np

    if name == "resnet32":
        from hessian_tf.models import resnet32

        model = resnet32()
        rng = np.random.default_rng(0)
        x = rng.uniform(size=(num_examples, 32, 32, 3)).astype(np.float32)
        y = rng.integers(0, 10, num_examples).astype(np.int32)
        return model, x, y
    if name == "mlp-digits":
        from hessian_tf.io.datasets import load_digits
        from hessian_tf.models import mlp

        x, y = load_digits()
        return mlp(), x[:num_examples], y[:num_examples]
    raise ValueError(f"--workload={name!r}: use resnet32 or mlp-digits.")


def run_slq(spec: dict, matmat, dim: int, meter: Meter, rss_ready: int) -> dict:
    """stochastic_lanczos_quadrature with every step split into phases, each
    with its own peak: prep (the driver stacks the vectors), product, algebra
    (lanczos_step); `finish` is after the last step (results, density)."""
    import numpy as np

    from hessian_tf.spectrum import _takes_out, stochastic_lanczos_quadrature

    steps, current = [], {}

    # As the job's driver calls the operator (its own test): into one reused array
    # where it takes out=.
    takes_out = _takes_out(matmat)

    def measured_matmat(vectors, out=None):
        current["prep"] = meter.end()
        meter.begin()
        products = matmat(vectors, out=out) if takes_out else matmat(vectors)
        current["product"] = meter.end()
        meter.begin()
        return products

    def progress(report):
        current["algebra"] = meter.end()
        current["step"] = report.step
        current["seconds"] = report.seconds
        steps.append(dict(current))
        current.clear()
        meter.begin()

    k = spec["lockstep"]
    basis_dtype = {"float64": np.float64, "float32": np.float32}[spec["basis_dtype"]]
    meter.begin()
    spectrum = stochastic_lanczos_quadrature(
        lambda v: matmat(v[np.newaxis])[0], dim, lanczos_steps=spec["lanczos_steps"],
        num_draws=k, lockstep=k, matmat=measured_matmat, progress=progress,
        basis_dtype=basis_dtype,
    )
    finish = meter.end()
    phases = [s[p] for s in steps for p in ("prep", "product", "algebra")] + [finish]
    return {
        "run_peak": max(p["peak"] for p in phases),
        "rss_ready": rss_ready,
        "steps": steps,
        "finish": finish,
        "num_steps": [int(s) for s in spectrum.num_steps],
        "seconds_per_step": float(spectrum.seconds_per_step),
        "process_peak": meter.process_peak,
        "rss_end": memory_status()[0],
    }


def child_algebra(spec: dict, rss_python: int) -> dict:
    """The SLQ driver and Lanczos algebra at the real size, on a diagonal operator
    (distinct eigenvalues, so no early stop): the basis and its temporaries."""
    import numpy as np

    import hessian_tf.spectrum  # noqa: F401  (TensorFlow and all: imported before RSS ready)

    dim = spec["dim"]
    diagonal = np.linspace(-1.0, 10.0, dim)
    rss_ready, hwm_ready = memory_status()
    meter = Meter()
    result = {"kind": "algebra", "dim": dim, "rss_python": rss_python,
              "rss_ready": rss_ready, "hwm_ready": hwm_ready, "can_reset": meter.can_reset}
    result.update(run_slq(spec, lambda vectors: vectors * diagonal, dim, meter, rss_ready))
    return result


def child_checkpoint(spec: dict, rss_python: int) -> dict:
    """One SLQCheckpointer.save of a group of full bases (what the binary does
    every --checkpoint_every products; the last save holds the whole basis)."""
    import numpy as np

    from hessian_tf import linalg
    from hessian_tf.io import checkpoints
    from hessian_tf.spectrum import SLQState

    dim, m, k = spec["dim"], spec["lanczos_steps"], spec["lockstep"]
    dtype = {"float64": np.float64, "float32": np.float32}[spec["basis_dtype"]]
    rng = np.random.default_rng(0)
    group = []
    for _ in range(k):
        basis = np.empty((m, dim), dtype)
        for row in range(m):  # row by row: no float64 temporary of the whole basis
            basis[row] = rng.standard_normal(dim)
        group.append(linalg.LanczosState(basis=basis, alphas=np.ones(m), betas=np.ones(m),
                                         num_steps=m - 1, exhausted=False))
    state = SLQState(draw=0, lanczos=tuple(group), completed=(), num_products=m - 1)
    rss_ready, hwm_ready = memory_status()
    meter = Meter()
    result = {"kind": "checkpoint", "dim": dim, "rss_python": rss_python, "rss_ready": rss_ready,
              "hwm_ready": hwm_ready, "can_reset": meter.can_reset}
    with tempfile.TemporaryDirectory() as directory:
        checkpointer = checkpoints.SLQCheckpointer(directory, fingerprint="memory-benchmark")
        meter.begin()
        try:
            checkpointer.save(state)
            result["save"] = meter.end()
            result["rss_after_save"] = memory_status()[0]
            # Restore into a process without the bases (as a resumed run starts).
            del state, group, basis
            meter.begin()
            restored = checkpointer.restore(lanczos_steps=m, dim=dim, basis_dtype=dtype)
            result["restore"] = meter.end()
            result["restored_rows"] = int(sum(s.basis.shape[0] for s in restored.lanczos))
        except Exception as error:  # the module is being edited: report, do not crash
            result["error"] = f"{type(error).__name__}: {error}"
    result["rss_end"] = memory_status()[0]
    result["process_peak"] = meter.process_peak
    return result


# ------------------------------------------------------------------ parent


def run_child(spec: dict) -> dict:
    start = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
        capture_output=True, text=True,
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if completed.returncode != 0 or not lines:
        sys.stderr.write(completed.stderr[-4000:])
        raise SystemExit(f"child {spec} failed with status {completed.returncode}")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["wall_seconds"] = time.perf_counter() - start
    return result


def run_binary(arguments: list[str]) -> dict:
    """hessian-spectrum in a child; its peak RSS from wait4 (this parent stays
    small, so the value inherited at exec does not matter)."""
    executable = os.path.join(os.path.dirname(sys.executable), "hessian-spectrum")
    command = [executable] if os.path.exists(executable) else [
        sys.executable, "-m", "hessian_tf.bin.spectrum"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    start = time.perf_counter()
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command + arguments, stdout=stdout, stderr=stderr, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        stderr.seek(0)
        tail = stderr.read().decode(errors="replace")[-2000:]
    if process.returncode != 0:
        sys.stderr.write(tail)
        raise SystemExit(f"hessian-spectrum {arguments} exited with {process.returncode}")
    return {"peak": usage.ru_maxrss * 1024, "wall_seconds": time.perf_counter() - start}


def mib(value) -> str:
    return "n/a" if value is None else f"{value / MIB:,.1f}"


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def worst(steps: list, phase: str) -> tuple[int, int]:
    """(largest rise of the phase's peak over its starting RSS, the step)."""
    best = max(steps, key=lambda s: s[phase]["peak"] - s[phase]["start"])
    return best[phase]["peak"] - best[phase]["start"], best["step"]


def slq_findings(label: str, result: dict, basis: int, activations: int) -> list[str]:
    steps = result["steps"]
    if not result.get("can_reset", False):
        return [f"{label}: peak could not be reset between phases; no breakdown."]
    growth = steps[-1]["algebra"]["rss"] - result["rss_ready"]
    product, product_step = worst(steps, "product")
    algebra, algebra_step = worst(steps, "algebra")
    prep, prep_step = worst(steps, "prep")
    finish = result["finish"]["peak"] - result["finish"]["start"]
    peak_step = max(steps, key=lambda s: max(s[p]["peak"] for p in ("prep", "product", "algebra")))
    peak_phase = max(("prep", "product", "algebra"), key=lambda p: peak_step[p]["peak"])
    return [
        f"{label}: peak {mib(result['process_peak'])} MiB = RSS ready {mib(result['rss_ready'])} "
        f"+ {mib(result['process_peak'] - result['rss_ready'])}, reached in the {peak_phase} "
        f"phase of step {peak_step['step']}",
        f"  RSS growth over the run (retained): {mib(growth)} MiB (basis {mib(basis)} MiB)",
        f"  product phase: peak - RSS at its start <= {mib(product)} MiB (step {product_step}); "
        f"one batch (b): {mib(activations)} MiB",
        f"  algebra phase (lanczos_step): <= {mib(algebra)} MiB (step {algebra_step})",
        f"  prep phase (stacking vectors; step 1 includes lanczos_init): <= {mib(prep)} MiB "
        f"(step {prep_step}); after the last step: {mib(finish)} MiB",
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="resnet32", choices=("resnet32", "mlp-digits"))
    parser.add_argument("--bn_modes", default=None,
                        help="comma-separated; default inference,train (resnet32), inference (mlp)")
    parser.add_argument("--lanczos_steps", type=int, default=None,
                        help="m of the SLQ runs (c, d); default 20 (resnet32), 90 (mlp-digits)")
    parser.add_argument("--algebra_steps", type=int, default=90,
                        help="m of the model-free Lanczos and checkpoint runs (e, f)")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--num_examples", type=int, default=None,
                        help="default 512 (resnet32), all 1797 (mlp-digits)")
    parser.add_argument("--lockstep", type=int, default=1,
                        help="draws in lockstep (the basis and the product block grow with it)")
    parser.add_argument("--batch_products", type=int, default=3, help="products in (b)")
    parser.add_argument("--method", default="auto",
                        choices=("auto", "forward_over_backward", "reverse_over_reverse"),
                        help="HessianOperator's product method (auto: the operator's "
                        "default, reverse over reverse, for the binary as well)")
    parser.add_argument("--graph_optimization", default="auto", choices=("auto", "light", "full"),
                        help="Grappler's set-up of the graphs, as hessian-spectrum's flag")
    parser.add_argument("--binary", action="store_true",
                        help="also run hessian-spectrum (f64, f32, f64 without checkpoints)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(RESULT_PREFIX + json.dumps(child_main(json.loads(args.child))), flush=True)
        return 0

    m = args.lanczos_steps or DEFAULT_STEPS[args.workload]
    bn_modes = (args.bn_modes or DEFAULT_BN_MODES[args.workload]).split(",")
    num_examples = args.num_examples or (RESNET_NUM_IMAGES if args.workload == "resnet32" else 1797)
    k = args.lockstep
    common = {"workload": args.workload, "num_examples": num_examples,
              "batch_size": args.batch_size, "lockstep": k, "method": args.method,
              "graph_optimization": args.graph_optimization}
    started = time.perf_counter()
    load_start = load_average()
    print(f"memory benchmark: {args.workload}, N={num_examples}, batch {args.batch_size}, "
          f"m={m}, lockstep {k}, BN modes {bn_modes}, graph_optimization "
          f"{args.graph_optimization}")
    print(f"platform {platform.platform()}, {os.cpu_count()} CPUs "
          f"({len(os.sched_getaffinity(0))} usable), load average at start {load_start}")

    def child(**spec):
        result = run_child(dict(common, **spec))
        shown = {key: value for key, value in spec.items() if key != "directory"}
        print(f"  [{time.perf_counter() - started:6.0f} s] {shown}: peak "
              f"{mib(result['process_peak'])} MiB ({result['wall_seconds']:.0f} s)", flush=True)
        return result

    rows, findings, dim, versions, method = [], [], None, None, None
    for bn_mode in bn_modes:
        a = child(kind="baseline", bn_mode=bn_mode)
        dim, versions, method = a["dim"], a["versions"], a["method"]
        b = child(kind="one_batch", bn_mode=bn_mode, batch_products=args.batch_products)
        slq = {dtype: child(kind="slq", bn_mode=bn_mode, lanczos_steps=m, basis_dtype=dtype)
               for dtype in ("float64", "float32")}
        activations = b["activations"]
        for dtype, result in slq.items():
            basis = k * m * dim * (8 if dtype == "float64" else 4)
            budget = a["rss_ready"] + basis + activations
            rows.append({
                "bn_mode": bn_mode, "basis_dtype": dtype, "baseline": a["rss_ready"],
                "model": a["model_bytes"], "data": a["data_bytes"], "activations": activations,
                "basis": basis, "budget": budget, "peak": result["process_peak"],
                "ratio": result["process_peak"] / budget,
                "own_ready": result["rss_ready"], "seconds_per_step": result["seconds_per_step"],
            })
            findings += slq_findings(f"({bn_mode}, {dtype} basis, m={m})", result, basis,
                                     activations)
        saving = slq["float64"]["process_peak"] - slq["float32"]["process_peak"]
        findings.append(
            f"({bn_mode}) float32 saving: peak(f64) - peak(f32) = {mib(saving)} MiB; "
            f"basis / 2 = {mib(k * m * dim * 4)} MiB")
        findings.append(
            f"({bn_mode}) baseline (a): python {mib(a['rss_python'])}, + imports "
            f"{mib(a['rss_imports'] - a['rss_python'])}, + model and data "
            f"{mib(a['rss_model_data'] - a['rss_imports'])}, + operator "
            f"{mib(a['rss_ready'] - a['rss_model_data'])} = {mib(a['rss_ready'])} MiB "
            f"(peak while building {mib(a['hwm_ready'])}; RssAnon "
            f"{mib(a['resident_kinds'].get('RssAnon'))}, RssFile (shared libraries) "
            f"{mib(a['resident_kinds'].get('RssFile'))}); one-batch products (b): "
            + ", ".join(f"{mib(p['peak'] - p['start'])} (RSS after {mib(p['rss'])})"
                        for p in b["products"]) + " MiB")

    # (e), (f): the basis at the real m, without a model.
    algebra_rows = []
    for dtype in ("float64", "float32"):
        spec = {"lanczos_steps": args.algebra_steps, "basis_dtype": dtype, "dim": dim}
        e = child(kind="algebra", **spec)
        f = child(kind="checkpoint", **spec)
        basis = k * args.algebra_steps * dim * (8 if dtype == "float64" else 4)
        algebra = worst(e["steps"], "algebra") if e.get("can_reset") else (None, None)
        algebra_rows.append({
            "basis_dtype": dtype, "basis": basis,
            "growth": e["steps"][-1]["algebra"]["rss"] - e["rss_ready"],
            "peak_over_ready": e["run_peak"] - e["rss_ready"],
            "algebra": algebra[0], "algebra_step": algebra[1],
            "checkpoint": (f["save"]["peak"] - f["save"]["start"]) if "save" in f else None,
            "restore": (f["restore"]["peak"] - f["restore"]["start"]) if "restore" in f else None,
            "restore_retained": (f["restore"]["rss"] - f["restore"]["start"])
            if "restore" in f else None,
            "checkpoint_error": f.get("error"),
        })

    binary_rows = []
    if args.binary:
        with tempfile.TemporaryDirectory() as directory:
            child(kind="prepare", bn_mode=bn_modes[0], directory=directory)
            for dtype, every in (("float64", 10), ("float32", 10), ("float64", 0)):
                flags = [f"--model={os.path.join(directory, 'model.keras')}",
                         f"--dataset=npz:{os.path.join(directory, 'data.npz')}",
                         f"--output_dir={os.path.join(directory, f'out_{dtype}_{every}')}",
                         f"--lanczos_steps={m}", f"--batch_size={args.batch_size}",
                         f"--bn_mode={bn_modes[0]}", f"--basis_dtype={dtype}",
                         f"--checkpoint_every={every}", f"--num_draws={k}",
                         f"--lockstep_draws={k}",
                         # The operator rows' method (auto there is reverse over reverse:
                         # they call no choose_method), not the binary's timing.
                         f"--method={method or args.method}"]
                result = run_binary(flags)
                print(f"  [{time.perf_counter() - started:6.0f} s] hessian-spectrum {dtype} "
                      f"checkpoint_every={every}: peak {mib(result['peak'])} MiB "
                      f"({result['wall_seconds']:.0f} s)", flush=True)
                binary_rows.append(dict(result, basis_dtype=dtype, checkpoint_every=every))

    load_end = load_average()
    total = time.perf_counter() - started
    print()
    print(f"versions: {versions}; dim {dim:,}; product method {method}; load average at "
          f"start {load_start}, at end {load_end}; {total / 60:.1f} min")
    print("MiB = 2^20 bytes. budget = baseline(a) + basis + one batch(b); requirement: "
          f"peak / budget <= {TOLERANCE:.2f}")
    header = ("| BN mode | basis | baseline (a) | model | data | one batch (b) | basis (m={m}) "
              "| budget | peak | peak / budget |").format(m=m)
    print()
    print(header)
    print("|" + "---|" * 2 + "--:|" * 8)
    for row in rows:
        print(f"| {row['bn_mode']} | {row['basis_dtype']} | {mib(row['baseline'])} | "
              f"{mib(row['model'])} | {mib(row['data'])} | {mib(row['activations'])} | "
              f"{mib(row['basis'])} | {mib(row['budget'])} | {mib(row['peak'])} | "
              f"{row['ratio']:.3f}{'' if row['ratio'] <= TOLERANCE else ' (over)'} |")
    print()
    print(f"Lanczos alone (e) and one checkpoint save (f), m={args.algebra_steps}, dim {dim:,}:")
    print()
    print("| basis | basis MiB | (e) RSS growth | (e) peak - ready | (e) largest lanczos_step "
          "temporary | (f) save: peak - before | (f) restore: peak - before (kept) |")
    print("|---|" + "--:|" * 6)
    for row in algebra_rows:
        if row["checkpoint_error"]:
            checkpoint = restore = f"error: {row['checkpoint_error']}"
        else:
            checkpoint = mib(row["checkpoint"])
            restore = f"{mib(row['restore'])} ({mib(row['restore_retained'])})"
        print(f"| {row['basis_dtype']} | {mib(row['basis'])} | {mib(row['growth'])} | "
              f"{mib(row['peak_over_ready'])} | {mib(row['algebra'])} (step "
              f"{row['algebra_step']}) | {checkpoint} | {restore} |")
    if binary_rows:
        print()
        print(f"hessian-spectrum ({bn_modes[0]}, m={m}): peak RSS from wait4")
        print()
        print("| basis | --checkpoint_every | peak | wall s |")
        print("|---|--:|--:|--:|")
        for row in binary_rows:
            print(f"| {row['basis_dtype']} | {row['checkpoint_every']} | {mib(row['peak'])} | "
                  f"{row['wall_seconds']:.0f} |")
    print()
    print("Where the memory goes:")
    for line in findings:
        print("  " + line)
    for row in rows:
        print(f"  ({row['bn_mode']}, {row['basis_dtype']}) RSS ready in the SLQ child "
              f"{mib(row['own_ready'])} MiB (baseline child {mib(row['baseline'])}); "
              f"{row['seconds_per_step']:.2f} s per step")
    over = [row for row in rows if row["ratio"] > TOLERANCE]
    print()
    print("requirement " + ("NOT met: " + ", ".join(
        f"{r['bn_mode']}/{r['basis_dtype']} {r['ratio']:.3f}" for r in over) if over else "met")
          + f" (peak / budget <= {TOLERANCE:.2f}, m={m})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
