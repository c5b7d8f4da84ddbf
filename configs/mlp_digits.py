"""The embedded default job: one-hidden-layer MLP on scikit-learn's digits.

Command (about 10-20 s on 2 CPU cores, m = 90):
  hessian-spectrum --config=configs/mlp_digits.py --output_dir=results/mlp_digits
Smoke variant (m = 10, a few seconds):
  hessian-spectrum --config=configs/mlp_digits.py:smoke --output_dir=/tmp/smoke
"""

from hessian_tf.config import default_config


def get_config(arg: str = ""):
    config = default_config()
    config.output_dir = "results/mlp_digits"
    if arg == "smoke":
        config.lanczos_steps = 10
        config.default_model_epochs = 2
    elif arg:
        raise ValueError(f"--config argument {arg!r} is not known; use '' or 'smoke'.")
    return config
