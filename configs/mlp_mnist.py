r"""The one-hidden-layer MLP on MNIST (the paper's small model, on full MNIST).

Model: `hessian_tf.models.mlp` with 784 inputs (images flattened, scaled to
[0, 1]), 220 tanh units and 10 logits: 174,910 parameters. SGD, momentum 0.9,
learning rate 0.05 dropped 10× at step 3,000, batch 128, 4,680 steps (10 epochs
of 468), seed 0. Spectra at step 0 and every 468 steps (each epoch): m = 90, one
draw, over the first 4,096 training examples in one batch.

Variants: `smoke` (3 steps, spectra with m = 4 at steps 0 and 2, seconds) and
`mock` (TFDS mock data instead of MNIST); no BN variants (the MLP has none).

Data: `tfds build mnist` (or --config.train.data_dir=DIR with it prepared).

Commands:
  hessian-train --config=configs/mlp_mnist.py --workdir=results/mlp_mnist
  hessian-spectrum --config=configs/mlp_mnist.py --config.workdir=results/mlp_mnist
Expected run time on 2 CPU cores: about 5 minutes (training ≈1 min; 11 spectra of
91 products at ≈0.2 s each).
Smoke (about 10 s, no data needed):
  hessian-train --config=configs/mlp_mnist.py:smoke,mock --workdir=/tmp/mlp_mnist_smoke
"""

from hessian_tf.training import config as training_config


def get_config(arg: str = ""):
    variants = training_config.parse_variants(arg, choices=("mlp",), default="mlp")
    config = training_config.base_config()
    config.workdir = "results/mlp_mnist"
    train = config.train
    train.model = "mlp"
    train.batch_norm = "off"
    train.hidden_units = 220
    train.dataset = "tfds:mnist"
    train.split = "train"
    train.num_classes = 10
    train.input_shape = (784,)
    train.shuffle_buffer = 60000
    train.batch_size = 128
    train.num_steps = 4680
    train.steps_per_epoch = 468  # 60,000 // 128
    train.learning_rate = 0.05
    train.lr_drop_steps = (3000,)
    train.log_every_steps = 100
    train.checkpoint_steps = (0, 468)
    callback = train.spectrum_callback
    callback.every_n_steps = 468
    callback.num_examples = 4096
    callback.batch_size = 4096
    training_config.apply_flag_variants(config, variants)
    return config
