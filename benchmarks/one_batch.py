"""One batch's gradient and Hessian-vector product, ours and PyHessian's, on your network.

`pyhessian_compare.py` gives seconds per Lanczos step, ours against PyHessian's. This
splits that ratio into its factors, on the first batch of the data:

    ours / PyHessian  ≈  (our product / our gradient) × (our gradient / torch's gradient)
                         ÷ (torch's product / torch's gradient)

so a ratio above ½ can be read as either side's product costing more gradients (second-
order work one framework runs better) or as the two frameworks' gradients differing (the
kernels themselves). Ours: `HessianOperator` on that batch by `--method` (auto, the
default: both methods timed, forward over backward taken where it takes at most 0.95
of the other's time, as the binary's --method=auto takes it; reverse over reverse alone
had read a small U-Net's product as 5.7 of our gradients, where the binary's choice
took 1.5-1.7), with
TensorFlow's threads as the binary chooses them on this host, products under its graph
set-up (`--graph_optimization=auto`), the gradient fully optimised; torch: the
PyTorch twin of `pyhessian_compare.py` (checked against the Keras logits), its gradient by
`autograd.grad` and its product by a second `autograd.grad` through
`create_graph=True`, as PyHessian's `hessian.dataloader_hv_product` computes it for one
batch; torch runs on --threads intra-op threads. Each time is the median of --repeats
calls after one warm-up. Ours include what the binary does with each result (the
per-variable results cast to float64 and joined into one vector, the host's copy of it);
torch's return per-parameter tensors, as PyHessian's products do (its flattening is in
its Lanczos algebra). On networks of many parameters and little arithmetic per parameter
(a wide MLP) that difference is a large part of our gradient.

The two Hessians are also compared on that batch without mapping one parameter vector
onto the other: with g the gradient, ‖g‖, the Rayleigh quotient gᵀHg / ‖g‖² and
‖Hg‖ / ‖g‖ do not depend on how each framework orders and lays out its parameters. They
are printed with their relative differences (the Rayleigh quotient's relative to
‖Hg‖ / ‖g‖, its bound, as it may be near 0), and a difference above 1e-3 is an error
(exit status 1): the twin's logits can agree while its Hessian does not.

Needs torch (`make benchmark-pyhessian` installs it). Command (about a minute for a small
network on 2 CPU cores):
  .venv/bin/python benchmarks/one_batch.py --model=NET.keras --data=DATA.npz
      [--batch_size 128] [--method auto] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import load_average, median_seconds  # noqa: E402


METHODS = ("reverse_over_reverse", "forward_over_backward")
AGREEMENT = 1e-3  # the largest relative difference of the invariants below


def invariants(gradient: np.ndarray, product: np.ndarray) -> dict:
    """Numbers of one Hessian that no ordering or layout of its parameters changes,
    from g and Hg: ‖g‖, gᵀHg / ‖g‖², ‖Hg‖ / ‖g‖."""
    gradient, product = (np.asarray(t, np.float64) for t in (gradient, product))
    norm = float(np.linalg.norm(gradient))
    return {"|g|": norm, "g'Hg/|g|^2": float(gradient @ product) / norm ** 2,
            "|Hg|/|g|": float(np.linalg.norm(product)) / norm}


def time_ours(workload, method: str, repeats: int) -> dict:
    """Our gradient and product of `workload`'s model on its x and y (one batch); `method`
    auto times both methods' products and takes one as the binary's auto does."""
    from hessian_tf import operators
    from hessian_tf.distribute import strategies
    from hessian_tf.operators.hessian import auto_method

    def operator_of(name):  # a method is fixed at an operator's first product
        return operators.HessianOperator(
            operators.KerasModelFunction(workload.keras_model), workload.x, workload.y,
            batch_size=len(workload.x), method=name,
            loss=workload.loss)

    methods = METHODS if method == "auto" else (method,)
    operator = operator_of(methods[0])
    if method == "auto" and not operator.model_function.supports_forward_mode:
        methods = methods[:1]  # as the binary's auto: reverse over reverse alone
    vector = np.random.default_rng(0).standard_normal(operator.dim)
    vector /= np.linalg.norm(vector)
    # The gradient with Grappler's full optimisation (a job runs it once, unoptimised,
    # but repeated here it is the fair denominator); products as the binary sets up.
    gradient = median_seconds(operator.loss_and_gradient, repeats)
    products = {}
    with strategies.graph_optimization("auto"):
        for name in methods:
            operator = operator if name == methods[0] else operator_of(name)
            products[name] = median_seconds(
                lambda operator=operator: operator.matvec(vector), repeats)
    fastest = auto_method(products) if method == "auto" else method
    _, g = operator.loss_and_gradient()
    return {"params": operator.dim, "gradient": gradient, "product": products[fastest],
            "method": fastest, "products": products, "threads": strategies.cpu_threads(),
            "invariants": invariants(g, operator.matvec(g))}


def time_torch(workload, repeats: int, threads: int) -> dict:
    """The twin's gradient and product on `workload` (one batch), after
    `pyhessian_compare.check_twin` (raises its Failure when the twin differs)."""
    import torch

    import pyhessian_compare as compare

    torch.set_num_threads(threads)
    twin, num_params = compare.torch_twin(workload.keras_model)
    ok, message = compare.check_twin(workload, twin, num_params)
    if not ok:
        raise compare.Failure(f"the PyTorch twin differs from the model: {message}")
    inputs = torch.from_numpy(compare.to_torch_inputs(workload.x))
    targets = compare.torch_targets(workload)
    criterion = compare.torch_criterion(workload)
    params = [p for p in twin.parameters() if p.requires_grad]
    tangents = [torch.randn_like(p) for p in params]

    def gradient(create_graph=False):
        return torch.autograd.grad(criterion(twin(inputs), targets), params,
                                   create_graph=create_graph)

    def product(vectors=tangents):
        return torch.autograd.grad(gradient(create_graph=True), params, grad_outputs=vectors)

    grads = gradient()
    hg = product(grads)

    def flat(tensors):
        return np.concatenate([t.detach().double().reshape(-1).numpy() for t in tensors])

    return {"params": num_params, "gradient": median_seconds(gradient, repeats),
            "product": median_seconds(product, repeats), "check": message,
            "invariants": invariants(flat(grads), flat(hg))}


def main(argv=None) -> int:
    import importlib.util

    import pyhessian_compare as compare

    parser = compare.OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="a .keras file of logits (pyhessian_compare.py's twin mirrors it)")
    parser.add_argument("--data", required=True, help="an .npz with x and integer labels y (real targets with "
                        "--loss=mean_squared_error)")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--loss", default="auto", choices=compare.LOSS_CHOICES,
                        help="as pyhessian_compare.py's --loss")
    parser.add_argument("--method", default="auto", choices=("auto", *METHODS),
                        help="auto: both timed, one taken as the binary's auto takes it")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args(argv)
    for flag, value in (("--batch_size", args.batch_size), ("--repeats", args.repeats),
                        ("--threads", args.threads)):
        if value < 1:
            parser.error(f"{flag}={value}: pass at least 1.")
    from hessian_tf.distribute import strategies

    # TensorFlow's threads as the binary sets them, before anything starts TensorFlow
    # (loading the model does; after that its pools stay as they are).
    strategies.automatic_cpu_threads("default")
    try:
        if importlib.util.find_spec("torch") is None:
            raise compare.Failure("PyTorch is not installed: `make benchmark-pyhessian` "
                                  "installs it (with PyHessian) into .venv.")
        workload = compare.workload_from_files(args.model, args.data, args.batch_size, None,
                                               args.loss)
        batch = dataclasses.replace(workload, x=workload.x[: args.batch_size],
                                    y=workload.y[: args.batch_size])
        print(f"{os.path.basename(args.model)}: one batch of {len(batch.x)}; "
              f"{load_average()}", flush=True)
        ours = time_ours(batch, args.method, args.repeats)
        torch_side = time_torch(batch, args.repeats, args.threads)
    except compare.Failure as failure:
        print(f"one_batch.py: error: {failure}", file=sys.stderr)
        return failure.status
    timed = ", ".join(f"{name} {seconds:.4f} s" for name, seconds in ours["products"].items())
    print(f"ours ({ours['method']}{'' if len(ours['products']) == 1 else ' of ' + timed}; "
          f"TensorFlow threads {ours['threads']}): gradient "
          f"{ours['gradient']:.4f} s, product {ours['product']:.4f} s, "
          f"product / gradient {ours['product'] / ours['gradient']:.2f}")
    print(f"torch ({args.threads} threads; {torch_side['check']}): "
          f"gradient {torch_side['gradient']:.4f} s, product {torch_side['product']:.4f} s, "
          f"product / gradient {torch_side['product'] / torch_side['gradient']:.2f}")
    print(f"ours / torch: gradient {ours['gradient'] / torch_side['gradient']:.2f}, "
          f"product {ours['product'] / torch_side['product']:.2f}")
    worst = 0.0
    # The Rayleigh quotient may be near 0 where H is indefinite: relative to ‖Hg‖/‖g‖,
    # its bound.
    bound = max(side["invariants"]["|Hg|/|g|"] for side in (ours, torch_side))
    for name, value in ours["invariants"].items():
        other = torch_side["invariants"][name]
        scale = max(abs(value), abs(other), bound if name == "g'Hg/|g|^2" else 0.0, 1e-30)
        difference = abs(value - other) / scale
        worst = max(worst, difference)
        print(f"{name}: ours {value:.8g}, torch {other:.8g} (relative difference "
              f"{difference:.1e})")
    if worst > AGREEMENT:
        print(f"one_batch.py: error: the two Hessians differ on this batch (relative "
              f"difference {worst:.1e} > {AGREEMENT:g}); the twin's logits agree but its "
              "Hessian does not", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
