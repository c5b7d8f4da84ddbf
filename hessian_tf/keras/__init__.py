"""Keras integration: track the Hessian spectrum while `model.fit` trains."""

from hessian_tf.keras.callback import (
    DEFAULT_BULK_FRACTION,
    IMAGE_TAG,
    SCALAR_TAGS,
    SPECTRUM_FILE_FORMAT,
    Schedule,
    SpectrumCallback,
    SpectrumEvaluation,
    bulk_edge,
    materialize,
)
