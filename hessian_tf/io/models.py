"""Loading models: `.keras` files (safe mode) and SavedModel directories."""

from __future__ import annotations

import importlib
import os
import zipfile

import keras
import tensorflow as tf

from hessian_tf.io import results
from hessian_tf.messages import first_line

# Registers hessian_tf>PopulationBatchNormalization, so .keras checkpoints of the
# population-BN experiments load in safe mode.
from hessian_tf.models import population_bn  # noqa: F401
from hessian_tf.operators.model_function import KerasModelFunction, SavedModelFunction


def check_model_path(path: str) -> None:
    """Raises ValueError unless `path` is an existing file or a SavedModel directory
    (cheap: run before the data is loaded)."""
    if not path:
        raise ValueError("--model is empty: pass a .keras file or a SavedModel directory.")
    if not os.path.exists(path):
        raise ValueError(
            f"--model={path}: no such file or directory; pass a .keras file or a "
            "SavedModel directory."
        )
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "saved_model.pb")):
        raise ValueError(
            f"--model={path}: the directory holds no saved_model.pb; pass a "
            "SavedModel directory (e.g. from Keras model.export()) or a .keras file."
        )
    unreadable = results.unreadable(path)
    if unreadable:
        raise ValueError(f"--model={path}: cannot be read ({unreadable}); give this user "
                         "read access to it, or pass a copy that can be read.")
    if path.endswith(".keras") and os.path.isfile(path) and not zipfile.is_zipfile(path):
        # Keras would say "File not found" of a file that is there.
        raise ValueError(
            f"--model={path}: not a .keras file (not a zip archive: empty, cut short or "
            "another format); save the model again with model.save('model.keras')."
        )


# Keras's names of the losses --loss offers, as a compiled model's config holds them
# (a string, a class, or a function's name).
_COMPILED_LOSS_NAMES = {
    "mse": "mean_squared_error", "MSE": "mean_squared_error",
    "mean_squared_error": "mean_squared_error", "MeanSquaredError": "mean_squared_error",
    "sparse_categorical_crossentropy": "sparse_categorical_crossentropy",
    "SparseCategoricalCrossentropy": "sparse_categorical_crossentropy",
    "categorical_crossentropy": "categorical_crossentropy",
    "CategoricalCrossentropy": "categorical_crossentropy",
    "binary_crossentropy": "binary_crossentropy", "BinaryCrossentropy": "binary_crossentropy",
}


def compiled_loss_warning(path: str, loss: str) -> str | None:
    """`loss_difference` of the loss a .keras file was compiled with (its training
    loss, as saved) and `loss` (--loss), as `--model=PATH: ...`; None where they agree,
    or where the file is not a .keras file or holds no compiled loss."""
    import json

    if not (path.endswith(".keras") and os.path.isfile(path)):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            compiled = (json.loads(archive.read("config.json")).get("compile_config")
                        or {}).get("loss")
    except Exception:  # noqa: BLE001 - the model loaded; its compile config is optional
        return None
    differs = loss_difference(compiled, loss, flag="--loss")
    return f"--model={path}: {differs}" if differs else None


def loss_difference(compiled, loss: str, *, flag: str, owner: str = "") -> str | None:
    """What differs between a model's compiled loss (Keras's serialised form: a name, or
    a class or function with its config; a list or dict of one) and `loss` (given as
    `flag`, of `owner`), whose Hessian is taken from the outputs as logits: another
    loss, one that takes probabilities (Keras's default), label smoothing, an ignored
    class, a sum over the batch. None where they agree, or where there is no loss of
    one output."""
    if isinstance(compiled, (list, tuple)) and len(compiled) == 1:
        compiled = compiled[0]
    elif isinstance(compiled, dict) and len(compiled) == 1 and "class_name" not in compiled:
        compiled = next(iter(compiled.values()))  # {output name: loss}
    options = {}
    if isinstance(compiled, dict):
        options = compiled.get("config")
        name = options if compiled.get("class_name") == "function" else compiled.get(
            "class_name")
        if compiled.get("registered_name") not in (None, "function"):
            name = compiled["registered_name"]  # the user's own class ("package>Name")
        options = options if isinstance(options, dict) else {}
    else:
        name = compiled
    if not isinstance(name, str):  # none, or one per output
        return None
    known = _COMPILED_LOSS_NAMES.get(name)
    left_out = ([f"label_smoothing={options['label_smoothing']}"]
                if options.get("label_smoothing") else []) + (
        [f"ignore_class={options['ignore_class']}"]
        if options.get("ignore_class") is not None else []) + (  # class 0 too
        [f"reduction={options['reduction']!r}"]
        if options.get("reduction") not in (None, "sum_over_batch_size", "auto") else [])
    # Keras's names and functions take probabilities; its classes say.
    probabilities = (known is not None and known.endswith("crossentropy")
                     and not options.get("from_logits", False))
    def given(value: str) -> str:  # as it is given: a flag's value, or an argument's
        return f"{flag}={value!r}" if owner else f"{flag}={value}"

    if known == loss and not left_out and not probabilities:
        return None
    settings = left_out + (["from_logits=False"] if probabilities else [])
    text = (f"the model was compiled with loss={name}"
            + (f" ({', '.join(settings)})" if settings else "")
            + ("" if known else f", which {owner}{flag} does not offer")
            + f"; the spectrum is of {owner}{given(loss)}")
    if known == loss and probabilities:
        text += ", which takes the model's outputs as logits, not probabilities"
    if left_out:
        text += f", without {' or '.join(left_out)}"
    if known and known != loss:
        text += f" (pass {given(known)} for the compiled one's)"
    return text


def import_modules(names: str) -> None:
    """Imports each of the comma-separated Python modules `names` (--import_modules),
    e.g. the ones that register a model's custom layers before it is loaded."""
    for name in (part.strip() for part in names.split(",")):
        if not name:
            continue
        try:
            importlib.import_module(name)
        except (Exception, SystemExit) as error:  # an import runs arbitrary code
            raise ValueError(
                f"--import_modules={names}: module {name!r} could not be imported "
                f"({type(error).__name__}: {first_line(error, 300)}); pass modules importable "
                "from PYTHONPATH, e.g. --import_modules=my_package.layers."
            ) from error


def load_model_function(path: str, strategy: tf.distribute.Strategy | None = None,
                        imported_modules: str = "", **keras_options):
    """Returns a KerasModelFunction or SavedModelFunction for the model at `path`.
    `imported_modules`: the --import_modules already imported, named in the error of a
    .keras file that still does not load. `keras_options`: KerasModelFunction's options
    (unroll_steps, say), for a .keras file; a SavedModel's functions are fixed when it
    is written (`export_for_spectrum` takes them there).

    A SavedModel is loaded under `strategy`'s scope: its functions read their own
    variables inside each replica, so the variables must be the strategy's (one copy
    per replica device; a TPU cannot read a variable on the host). A Keras model's
    parameters are passed to the replicas as inputs, so it loads as it is."""
    check_model_path(path)
    if os.path.isdir(path):
        try:
            with (strategy or tf.distribute.get_strategy()).scope():
                loaded = tf.saved_model.load(path)
        except Exception as error:  # TF raises many types for a broken SavedModel
            raise ValueError(
                f"--model={path}: the SavedModel could not be loaded "
                f"({type(error).__name__}: {first_line(error, 300)}); re-export it."
            ) from error
        return SavedModelFunction(loaded, path)
    if not path.endswith(".keras"):
        legacy = path.endswith((".h5", ".hdf5"))
        raise ValueError(
            f"--model={path}: unknown model format; pass a .keras file or a "
            "SavedModel directory" + (
                " (convert an HDF5 file with keras.models.load_model(PATH).save('model.keras'))."
                if legacy else ".")
        )
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # zip, JSON and deserialisation errors alike
        modules = (f"--import_modules={imported_modules} was imported; check that it "
                   "registers every custom layer the file names, with "
                   "keras.saving.register_keras_serializable"
                   if imported_modules.strip(", ") else "")
        if "Lambda" in str(error):
            fix = ("a .keras file is loaded in safe mode, which runs no saved Python code: "
                   "replace the Lambda layer with a custom layer registered by "
                   "keras.saving.register_keras_serializable in a module passed as "
                   "--import_modules=MODULE, or pass a SavedModel from "
                   "hessian_tf.io.export_for_spectrum")
        elif modules:
            fix = modules + ", or pass a SavedModel from hessian_tf.io.export_for_spectrum"
        else:
            fix = ("if it has custom layers, pass the module that registers them as "
                   "--import_modules=MODULE, or a SavedModel from "
                   "hessian_tf.io.export_for_spectrum; else save it again with model.save()")
        raise ValueError(
            f"--model={path}: the .keras file could not be loaded "
            f"({type(error).__name__}: {first_line(error, 300)}); {fix}."
        ) from error
    return KerasModelFunction(model, **keras_options)
