"""Models, datasets, checkpoints and results on disk.

Submodules are imported where used: `results` needs no TensorFlow, so light tools
(hessian-plot) start fast.
"""


def export_for_spectrum(*args, **kwargs):
    """See hessian_tf.io.export.export_for_spectrum."""
    from hessian_tf.io.export import export_for_spectrum as export

    return export(*args, **kwargs)
