"""The Lanczos algebra of one step against the memory traffic it cannot avoid.

One `lanczos_step` at step k (default 90, the paper's m) with a float64 or float32
basis, for models of several sizes, beside its floor: one pass of full
reorthogonalisation reads the k + 1 active basis vectors twice (`Q w`, then
`w -= Qᵀ c`), so the floor is the time of those two matrix-vector products in the
basis's own type (`Q w` and `Qᵀ c` with NumPy's BLAS). NumPy's BLAS runs on one
thread, as in a spectrum job.

The basis rows are random unit vectors and the product a random vector made
orthogonal to them, with the previous coupling β set to 0, so that the step runs
exactly one reorthogonalisation pass removing rounding only, as a Hessian's step
does (a random product with a large β would trigger the second, DGKS pass).

Command (about 1 minute on 2 CPU cores; the largest size needs ~2.3 GB):
  .venv/bin/python benchmarks/algebra.py [--dims 16510,466906,2000000] [--step 90] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import threadpoolctl

from hessian_tf import linalg
from machine import best_of, load_average, positive_integers  # noqa: E402  (benchmarks/machine.py)


def best_seconds(function, repeats: int) -> float:
    function()  # warm up (page faults, BLAS buffers)
    return best_of(function, repeats)


def measure(dim: int, step: int, dtype, repeats: int, rng) -> tuple[float, float]:
    """(seconds of one lanczos_step at `step`, seconds of its two-gemv floor)."""
    # step + 1 rows, all active at `step` (so the step writes no row), and a product
    # whose reorthogonalisation removes rounding only, as a Hessian step's does.
    state, product = linalg.sample_state(step + 1, dim, dtype, rng)
    active = state.basis
    w = product.astype(dtype)
    coefficients = (active @ w).astype(dtype)

    def one_step():
        linalg.lanczos_step(state._replace(num_steps=step), product)

    def floor():
        active @ w
        active.T @ coefficients

    return best_seconds(one_step, repeats), best_seconds(floor, repeats)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="16510,466906,2000000",
                        help="comma-separated numbers of parameters (default: the digits MLP, "
                             "ResNet-32, 2M)")
    parser.add_argument("--step", type=int, default=90, help="the step k timed (default 90)")
    parser.add_argument("--repeats", type=int, default=5, help="best of N (default 5)")
    args = parser.parse_args(argv)
    dims = positive_integers("dims", args.dims, "16510,466906")
    if dims is None:
        return 2
    if args.step < 1 or args.repeats < 1:
        print(f"--dims={args.dims}, --step={args.step}, --repeats={args.repeats}: "
              "each must be at least 1.", file=sys.stderr)
        return 2
    print(f"NumPy {np.__version__}, BLAS on one thread; {load_average()}")
    print(f"{'dim':>9} {'basis':>7} {'step ms':>9} {'floor ms':>9} {'step/floor':>10}")
    rng = np.random.default_rng(0)
    with threadpoolctl.threadpool_limits(1, "blas"):
        for dim in dims:
            for dtype in (np.float64, np.float32):
                step_s, floor_s = measure(dim, args.step, dtype, args.repeats, rng)
                print(f"{dim:>9} {np.dtype(dtype).name:>7} {step_s * 1e3:>9.3f} "
                      f"{floor_s * 1e3:>9.3f} {step_s / floor_s:>10.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
