"""A copy of a Keras model in another float dtype, for products in float64 (or float32)
on any model.

Float32 products carry relative errors of about 1e-7 of ‖H‖, which bound how
well the Ritz values can agree with exact eigenvalues. A float64 copy (same
architecture, same weights, rebuilt from the model's config) removes that floor
at about twice the cost on CPU. A float32 copy of a model trained in mixed precision
(float16 or bfloat16 compute) takes its products to float32's precision; on a CPU, which
emulates half precision, it is also the faster (README, "--precision"). The original
model is not touched.
"""

from __future__ import annotations

from typing import Optional

import keras

from hessian_tf.choices import PRECISIONS
from hessian_tf.operators.subset import base_function

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "mixed_float16", "mixed_bfloat16")
HALF_DTYPES = ("float16", "bfloat16")


def _layer_compute_dtypes(model: keras.Model) -> list[tuple[str, str]]:
    """(name, compute dtype) of each layer of `model` and of the models in it, input
    layers left out."""
    return [(layer.name, str(layer.dtype_policy.compute_dtype))
            for layer in model._flatten_layers(include_self=False)
            if not isinstance(layer, keras.layers.InputLayer)
            and getattr(layer, "dtype_policy", None) is not None]


def half_precision_layers(model: keras.Model) -> list[str]:
    """Names of the layers of `model` (and of the models in it) that compute in float16
    or bfloat16 (mixed-precision policies included)."""
    return [name for name, dtype in _layer_compute_dtypes(model) if dtype in HALF_DTYPES]


def compute_dtypes(model_function) -> Optional[list[str]]:
    """The dtypes the layers of a Keras model function compute in, sorted (under any
    variable subsets); None for a SavedModel's."""
    model = getattr(base_function(model_function), "model", None)
    if not isinstance(model, keras.Model):
        return None
    return sorted({dtype for _, dtype in _layer_compute_dtypes(model)})


def half_precision_warning(model: keras.Model, where: str, fix: str) -> Optional[str]:
    """The one-line warning for a model with layers computing in float16 or bfloat16
    (`where`: the option or the caller; `fix`: what takes the products in float32), or
    None."""
    layers = half_precision_layers(model)
    if not layers:
        return None
    names = ", ".join(layers[:3]) + (", ..." if len(layers) > 3 else "")
    return (f"{where}: {len(layers)} layer(s) of the model compute in float16 or bfloat16 "
            f"({names}), and so do the products through them (float16 keeps about 3 "
            f"significant digits, bfloat16 about 2); {fix}")


def _retyped(config, dtype: str):
    if isinstance(config, dict):
        out = {}
        for key, value in config.items():
            if key == "dtype" and isinstance(value, str) and value in FLOAT_DTYPES:
                out[key] = dtype
            elif (
                key == "dtype"
                and isinstance(value, dict)
                and value.get("class_name") in ("DTypePolicy", "DTypePolicyMap")
            ):
                out[key] = dtype
            else:
                out[key] = _retyped(value, dtype)
        return out
    if isinstance(config, list):
        return [_retyped(item, dtype) for item in config]
    return config


def cast_model(model: keras.Model, dtype: str = "float64") -> keras.Model:
    """A copy of `model` whose layers compute and store in `dtype`, same weights."""
    try:
        config = model.get_config()
        copy = model.__class__.from_config(_retyped(config, dtype))
    except (NotImplementedError, TypeError, ValueError) as error:
        raise ValueError(
            f"--precision={dtype}: the model cannot be rebuilt from its config "
            f"({error}); use --precision=model or save a {dtype} model."
        ) from error
    if not copy.built:
        copy.build(model.inputs[0].shape if model.inputs else None)
    if len(copy.weights) != len(model.weights):
        raise ValueError(
            f"--precision={dtype}: the rebuilt model has {len(copy.weights)} weights but "
            f"the model has {len(model.weights)}; use --precision=model."
        )
    for target, source in zip(copy.weights, model.weights):
        if target.shape != source.shape:
            raise ValueError(
                f"--precision={dtype}: weight {source.path} changed shape when rebuilt; "
                "use --precision=model."
            )
        target.assign(keras.ops.cast(source.value, target.dtype))
    return copy
