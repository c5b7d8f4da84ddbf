r"""A small CNN on scikit-learn's digits, with and without BN: the paper's BN
comparison at a scale that runs on 2 CPU cores (`make experiment-bn`).

Model: `hessian_tf.models.cnn.small_cnn` (3 convolutions of 16/32/32 filters, BN
after each when on, global average pooling, dense logits; 14,458 parameters with
BN, 14,378 without) on the 1797 8×8 digits, scaled to [0, 1]. SGD, momentum 0.9,
learning rate 0.05 (dropped 10× at step 800), batch 128, 1000 steps (≈71 epochs),
seed 0, deterministic ops. Spectra (m = 90) of the mean loss over all 1797
examples at step 0 and every 200 steps; for `bn` with BN in train mode (the
statistics of each batch of 128: the loss SGD optimises; in inference mode the
moving statistics at step 0 are 0 and 1, i.e. no normalisation at all).

Variants: bn (default), no_bn, population_bn (statistics over all 1797 examples,
recomputed every 10 steps); add `smoke` for a few seconds' run.

Commands:
  hessian-train --config=configs/cnn_digits.py:bn --workdir=results/experiment_bn/bn
  hessian-train --config=configs/cnn_digits.py:no_bn --workdir=results/experiment_bn/no_bn
Expected run time on 2 CPU cores: bn ≈1.7 minutes (the spectra in BN train mode
take 14 s each), no_bn ≈45 s, population_bn ≈1 minute; `make experiment-bn`
(all three and the figure) ≈3.5 minutes.
Spectrum of the final model at m = 90 (seconds):
  hessian-spectrum --config=configs/cnn_digits.py:bn --config.workdir=results/experiment_bn/bn
Smoke (seconds):
  hessian-train --config=configs/cnn_digits.py:bn,smoke --workdir=/tmp/cnn_digits_smoke
"""

from hessian_tf.training import config as training_config

VARIANTS = ("bn", "no_bn", "population_bn")
BATCH_NORM = {"bn": "on", "no_bn": "off", "population_bn": "population"}


def get_config(arg: str = ""):
    variants = training_config.parse_variants(arg, choices=VARIANTS, default="bn")
    config = training_config.base_config()
    config.workdir = f"results/cnn_digits/{variants.model}"
    train = config.train
    train.model = "cnn"
    train.batch_norm = BATCH_NORM[variants.model]
    train.dataset = "digits"
    train.input_shape = (8, 8, 1)
    train.num_classes = 10
    train.batch_size = 128
    train.num_steps = 1000
    train.steps_per_epoch = 14  # 1797 // 128
    train.learning_rate = 0.05
    train.lr_drop_steps = (800,)
    train.shuffle_buffer = 0  # the whole dataset
    train.deterministic = True
    train.log_every_steps = 100
    train.checkpoint_steps = (0, 200, 800)
    train.population_bn.update_every_steps = 10
    train.population_bn.num_examples = 0  # all
    train.population_bn.batch_size = 1797
    callback = train.spectrum_callback
    callback.every_n_steps = 200
    callback.num_examples = 1797
    if variants.model == "bn":
        callback.bn_mode = "train"
        callback.batch_size = 128
    else:
        callback.batch_size = 1797  # one batch: the fastest products
    training_config.apply_flag_variants(config, variants)
    return config
