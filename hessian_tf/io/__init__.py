"""Models, datasets, checkpoints and results on disk."""

from hessian_tf.io.export import export_for_spectrum
