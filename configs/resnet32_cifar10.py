r"""ResNet-32 on CIFAR-10 (Ghorbani et al. 2019, sections 3-4): with BN, without,
and with population-statistics BN; the learning rate drops 10× at step 40k.

Model: `hessian_tf.models.resnet32` (466,906 parameters with BN, 465,674 without),
on the CIFAR-10 training split scaled to [0, 1] with random crops (pad 4) and
flips. SGD, momentum 0.9, learning rate 0.1 dropped to 0.01 at step 40,000,
decoupled weight decay 1e-4, batch 128, 60,000 steps (≈154 epochs), seed 0.
Spectra at step 0 and every 5,000 steps: m = 90, one draw, over the first 4,096
training examples (un-augmented; also saved as WORKDIR/spectrum_data.npz) in
batches of 128; BN in train mode (the statistics of each batch of 128: the loss
SGD optimises) for `bn`.

Variants:
  bn              BN after every convolution (default).
  no_bn           no BN; convolutions get biases. Without BN the He-normal
                  residual branches make activations grow with depth (logits of
                  std ≈ 140 at initialisation): in a 40-step check on random
                  images the loss was NaN at every learning rate from 0.1 down
                  to 0.001 (finite at 1e-4). So the last convolution
                  of every residual branch starts at zero (SkipInit, De & Smith
                  2020: every block starts as the identity); with that the loss
                  stayed finite at 0.1 in the same check.
  population_bn   BN whose statistics are those of the first 10,000 training
                  examples (not of each batch), recomputed exactly before step 0
                  and every 500 steps, used in training and inference alike
                  (hessian_tf/models/population_bn.py says precisely what).
  smoke, mock     add to any of them: `smoke` runs 3 steps of a width-4 network
                  with spectra (m = 4) at steps 0 and 2, in seconds on 2 CPU cores;
                  `mock` reads TFDS mock data (random images) instead of CIFAR-10.

Data: `tfds build cifar10` (or --config.train.data_dir=DIR with it prepared).

Commands:
  hessian-train --config=configs/resnet32_cifar10.py:bn --workdir=results/resnet32_cifar10/bn
  hessian-spectrum --config=configs/resnet32_cifar10.py:bn --config.workdir=results/resnet32_cifar10/bn
Expected run time on 2 CPU cores (measured here: 0.52 s per training step of 128;
DESIGN.md: 1.4-1.7 s per product batch of 128): training ≈9 h, plus ≈1.2 h per
spectrum (91 products over 32 batches) × 13 evaluations ≈15 h; population_bn adds
≈2.3 min per statistics update (14 s per 1,000 examples) × 120 updates ≈4.6 h.
On one modern GPU, expect well under a tenth of that.
Smoke (about 30 s on 2 CPU cores, no data needed):
  hessian-train --config=configs/resnet32_cifar10.py:bn,smoke,mock --workdir=/tmp/resnet32_smoke
"""

from hessian_tf.training import config as training_config

VARIANTS = ("bn", "no_bn", "population_bn")
BATCH_NORM = {"bn": "on", "no_bn": "off", "population_bn": "population"}


def get_config(arg: str = ""):
    variants = training_config.parse_variants(arg, choices=VARIANTS, default="bn")
    config = training_config.base_config()
    config.workdir = f"results/resnet32_cifar10/{variants.model}"
    train = config.train
    train.model = "resnet32"
    train.batch_norm = BATCH_NORM[variants.model]
    train.dataset = "tfds:cifar10"
    train.split = "train"
    train.num_classes = 10
    train.augment = "crop_flip"
    train.shuffle_buffer = 50000
    train.batch_size = 128
    train.num_steps = 60000
    train.steps_per_epoch = 390  # 50,000 // 128
    train.learning_rate = 0.1
    train.zero_init_residual = variants.model == "no_bn"
    train.weight_decay = 1e-4
    train.lr_drop_steps = (40000,)
    train.log_every_steps = 100
    train.checkpoint_steps = (0, 390, 5000, 20000, 40000)
    train.population_bn.update_every_steps = 500
    train.population_bn.num_examples = 10000
    train.population_bn.batch_size = 500
    callback = train.spectrum_callback
    callback.every_n_steps = 5000
    callback.num_examples = 4096
    callback.batch_size = 128
    callback.bn_mode = "train" if variants.model == "bn" else "inference"
    training_config.apply_flag_variants(config, variants)
    if variants.smoke:
        train.width = 4
        train.shuffle_buffer = 64
    return config
