"""One batch's gradient and Hessian-vector product, ours and PyHessian's, on your network.

`pyhessian_compare.py` gives seconds per Lanczos step, ours against PyHessian's. This
splits that ratio into its factors, on the first batch of the data:

    ours / PyHessian  ≈  (our product / our gradient) × (our gradient / torch's gradient)
                         ÷ (torch's product / torch's gradient)

so a ratio above ½ can be read as either side's product costing more gradients (second-
order work one framework runs better) or as the two frameworks' gradients differing (the
kernels themselves). Ours: `HessianOperator` on that batch with the given `--method`, with
TensorFlow's threads as the binary chooses them on this host, products under its graph
set-up (`--graph_optimization=auto`), the gradient fully optimised; torch: the
PyTorch twin of `pyhessian_compare.py` (checked against the Keras logits), its gradient by
`autograd.grad` and its product by a second `autograd.grad` through
`create_graph=True`, as PyHessian's `hessian.dataloader_hv_product` computes it for one
batch; torch runs on --threads intra-op threads. Each time is the median of --repeats
calls after one warm-up.

Needs torch (`make benchmark-pyhessian` installs it). Command (about a minute for a small
network on 2 CPU cores):
  .venv/bin/python benchmarks/one_batch.py --model=NET.keras --data=DATA.npz
      [--batch_size 128] [--method reverse_over_reverse] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import load_average, median_seconds  # noqa: E402


def time_ours(model_path: str, x, y, method: str, repeats: int) -> dict:
    import keras

    from hessian_tf import operators
    from hessian_tf.distribute import strategies

    strategies.automatic_cpu_threads("default")
    operator = operators.HessianOperator(
        operators.KerasModelFunction(keras.models.load_model(model_path)), x, y,
        batch_size=len(x), method=method)
    vector = np.random.default_rng(0).standard_normal(operator.dim)
    vector /= np.linalg.norm(vector)
    # The gradient with Grappler's full optimisation (a job runs it once, unoptimised,
    # but repeated here it is the fair denominator); products as the binary sets up.
    gradient = median_seconds(operator.loss_and_gradient, repeats)
    with strategies.graph_optimization("auto"):
        product = median_seconds(lambda: operator.matvec(vector), repeats)
    return {"params": operator.dim, "gradient": gradient, "product": product,
            "threads": strategies.cpu_threads()}


def time_torch(model_path: str, x, y, repeats: int, threads: int) -> dict:
    import keras
    import torch

    import pyhessian_compare as compare

    torch.set_num_threads(threads)
    keras_model = keras.models.load_model(model_path)
    twin, num_params = compare.torch_twin(keras_model)
    twin.eval()
    inputs = torch.from_numpy(compare.to_torch_inputs(x))
    targets = torch.from_numpy(y.astype(np.int64))
    logits = keras_model(x, training=False).numpy()
    with torch.no_grad():
        twin_logits = twin(inputs).numpy()
    mismatch = float(np.max(np.abs(logits - twin_logits)) / np.max(np.abs(logits)))
    if mismatch > 1e-4:
        raise SystemExit(f"one_batch.py: the torch twin's logits differ by {mismatch:.1e} "
                         "of the largest; its times would not be of the same network.")
    params = [p for p in twin.parameters() if p.requires_grad]
    criterion = torch.nn.CrossEntropyLoss()
    tangents = [torch.randn_like(p) for p in params]

    def gradient():
        return torch.autograd.grad(criterion(twin(inputs), targets), params)

    def product():
        grads = torch.autograd.grad(criterion(twin(inputs), targets), params,
                                    create_graph=True)
        return torch.autograd.grad(grads, params, grad_outputs=tangents)

    return {"params": num_params, "gradient": median_seconds(gradient, repeats),
            "product": median_seconds(product, repeats), "mismatch": mismatch}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a .keras file with integer-label logits")
    parser.add_argument("--data", required=True, help="an .npz with x and y")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--method", default="reverse_over_reverse",
                        choices=("reverse_over_reverse", "forward_over_backward"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args(argv)
    for flag, value in (("--batch_size", args.batch_size), ("--repeats", args.repeats),
                        ("--threads", args.threads)):
        if value < 1:
            parser.error(f"{flag}={value}: pass at least 1.")
    for flag, path in (("--model", args.model), ("--data", args.data)):
        if not os.path.isfile(path):
            parser.error(f"{flag}={path}: no such file.")
    data = np.load(args.data)
    if "x" not in data or "y" not in data:
        parser.error(f"--data={args.data}: needs arrays x and y; it has {sorted(data)}.")
    x, y = data["x"][: args.batch_size], data["y"][: args.batch_size]
    print(f"{os.path.basename(args.model)}: one batch of {len(x)}; "
          f"{load_average()}")
    ours = time_ours(args.model, x, y, args.method, args.repeats)
    torch_side = time_torch(args.model, x, y, args.repeats, args.threads)
    print(f"ours ({args.method}; TensorFlow threads {ours['threads']}): gradient "
          f"{ours['gradient']:.4f} s, product {ours['product']:.4f} s, "
          f"product / gradient {ours['product'] / ours['gradient']:.2f}")
    print(f"torch ({args.threads} threads; twin logits within {torch_side['mismatch']:.1e}): "
          f"gradient {torch_side['gradient']:.4f} s, product {torch_side['product']:.4f} s, "
          f"product / gradient {torch_side['product'] / torch_side['gradient']:.2f}")
    print(f"ours / torch: gradient {ours['gradient'] / torch_side['gradient']:.2f}, "
          f"product {ours['product'] / torch_side['product']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
