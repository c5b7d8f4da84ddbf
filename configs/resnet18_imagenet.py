r"""ResNet-18 on ImageNet (Ghorbani et al. 2019, section 3): with and without BN.

Model: `hessian_tf.models.resnet18` (11,689,512 parameters with BN at width 64,
1000 classes), on the ILSVRC-2012 training split, images resized to 224×224
(aspect ratio not kept) and scaled to [0, 1], random flips. SGD, momentum 0.9,
learning rate 0.1 dropped 10× at steps 150,150, 300,300 and 400,400, decoupled
weight decay 1e-4, batch 256, 450,450 steps (90 epochs of 5,005 steps), seed 0.
Spectra at step 0 and every 5,005 steps (each epoch): m = 90, one draw, over the
first 1,024 training examples in batches of 128; BN in train mode for `bn`.

Variants:
  bn       BN after every convolution (default).
  no_bn    no BN; convolutions get biases, and the last convolution of every
           residual branch starts at zero (SkipInit, De & Smith 2020), since
           a plain residual network without normalisation grows its activations
           with depth (see configs/resnet32_cifar10.py).
  smoke, mock   add to either: `smoke` runs 3 steps of a width-4 network on
           32×32 images with spectra (m = 4) at steps 0 and 2 in seconds; `mock`
           reads TFDS mock data (random images of random sizes).

Data: ImageNet cannot be downloaded by TFDS: place the archives in
DATA_DIR/downloads/manual and run `tfds build imagenet2012 --data_dir=DATA_DIR`,
then pass --config.train.data_dir=DATA_DIR.

Commands:
  hessian-train --config=configs/resnet18_imagenet.py:bn --workdir=results/resnet18_imagenet/bn \
      --config.train.data_dir=DATA_DIR
  hessian-spectrum --config=configs/resnet18_imagenet.py:bn --config.workdir=results/resnet18_imagenet/bn \
      --config.train.data_dir=DATA_DIR [--config.spectrum.dry_run=True] [--strategy=multi_worker]
  (the spectrum streams the whole training split from DATA_DIR: 91 passes over
  1.28M images; --config.spectrum.model=PATH takes a SavedModel from
  hessian_tf.io.export_for_spectrum instead of the .keras checkpoint.)
Expected run time: this needs accelerators. On 2 CPU cores a training step of
batch 256 at 224×224 takes tens of seconds (months for the run); on 8 modern
GPUs the training takes about a day, and each spectrum (91 products over 1,024
examples) minutes.
Smoke (about 30 s on 2 CPU cores, no data needed):
  hessian-train --config=configs/resnet18_imagenet.py:bn,smoke,mock --workdir=/tmp/resnet18_smoke
"""

from hessian_tf.training import config as training_config

VARIANTS = ("bn", "no_bn")
BATCH_NORM = {"bn": "on", "no_bn": "off"}
STEPS_PER_EPOCH = 5005  # 1,281,167 // 256 + 1 rounded as the reference schedules do


def get_config(arg: str = ""):
    variants = training_config.parse_variants(arg, choices=VARIANTS, default="bn")
    config = training_config.base_config()
    config.workdir = f"results/resnet18_imagenet/{variants.model}"
    train = config.train
    train.model = "resnet18"
    train.batch_norm = BATCH_NORM[variants.model]
    train.dataset = "tfds:imagenet2012"
    train.split = "train"
    train.num_classes = 1000
    train.image_size = 224
    train.augment = "flip"
    train.shuffle_buffer = 10000
    train.batch_size = 256
    train.num_steps = 90 * STEPS_PER_EPOCH
    train.steps_per_epoch = STEPS_PER_EPOCH
    train.learning_rate = 0.1
    train.zero_init_residual = variants.model == "no_bn"
    train.weight_decay = 1e-4
    train.lr_drop_steps = (30 * STEPS_PER_EPOCH, 60 * STEPS_PER_EPOCH, 80 * STEPS_PER_EPOCH)
    train.log_every_steps = 100
    train.checkpoint_steps = (0, STEPS_PER_EPOCH, 30 * STEPS_PER_EPOCH, 60 * STEPS_PER_EPOCH)
    callback = train.spectrum_callback
    callback.every_n_steps = STEPS_PER_EPOCH
    callback.num_examples = 1024
    callback.batch_size = 128
    callback.bn_mode = "train" if variants.model == "bn" else "inference"
    training_config.apply_flag_variants(config, variants)
    if not variants.smoke:
        # The final spectrum is the paper's: the Hessian of the mean loss over the
        # whole training split, streamed from data_dir at every product with the
        # usual evaluation preprocessing (shorter side 256, central 224 crop,
        # mean/std). Check its cost first with --config.spectrum.dry_run=True.
        spectrum = config.spectrum
        spectrum.dataset = "tfds:imagenet2012"
        spectrum.split = "train"
        spectrum.data_dir = train.get_ref("data_dir")
        spectrum.stream = True
        spectrum.preprocessing = "imagenet"
    if variants.smoke:
        train.width = 4
        train.image_size = 32
        train.shuffle_buffer = 64
    return config
