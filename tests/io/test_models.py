"""load_model_function: .keras files, SavedModel directories, and every bad path."""

import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from hessian_tf.io.models import load_model_function
from hessian_tf.operators import KerasModelFunction, SavedModelFunction


def small_bn_model(seed=3):
    """4 inputs → Dense(5) → BN → tanh → Dense(3): 25 + 10 + 18 = 53 trainable
    parameters, with moving statistics far from their initial values."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(5),
        keras.layers.BatchNormalization(),
        keras.layers.Activation("tanh"),
        keras.layers.Dense(3),
    ])
    bn = model.layers[1]
    bn.moving_mean.assign(np.linspace(-0.5, 0.5, 5).astype(np.float32))
    bn.moving_variance.assign(np.linspace(0.5, 2.0, 5).astype(np.float32))
    bn.gamma.assign(np.linspace(0.8, 1.2, 5).astype(np.float32))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("models")
    model = small_bn_model()
    model.save(str(directory / "model.keras"))
    model.export(str(directory / "exported"), verbose=False)
    x = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    return directory, model, x


def test_keras_file_loads_with_the_same_parameters(saved):
    directory, model, x = saved
    function = load_model_function(str(directory / "model.keras"))
    assert isinstance(function, KerasModelFunction)
    assert len(function.variables) == len(model.trainable_variables) == 6
    for loaded, original in zip(function.variables, model.trainable_variables):
        assert isinstance(loaded, tf.Variable)
        np.testing.assert_array_equal(loaded.numpy(), original.numpy())
    # A fresh copy, not the same variables.
    assert function.model is not model
    outputs, regularization = function(function.primals(), function.state(), tf.constant(x), bn_mode="inference")
    np.testing.assert_allclose(outputs.numpy(), model(x, training=False).numpy(), rtol=1e-6)
    assert float(regularization) == 0.0


def test_keras_options_reach_the_function_and_its_copies(saved):
    directory, model, _ = saved
    function = load_model_function(str(directory / "model.keras"), unroll_steps=3,
                                   fold_batch_norm=False)
    assert (function.unroll_steps, function.fold_batch_norm) == (3, False)
    copy = function.with_model(model)
    assert copy.model is model
    assert (copy.unroll_steps, copy.fold_batch_norm, copy.per_channel_group_norm) == (3, False, True)
    with pytest.raises(ValueError, match="--unroll_steps=-1"):
        load_model_function(str(directory / "model.keras"), unroll_steps=-1)


def test_saved_model_directory_loads(saved):
    directory, model, x = saved
    function = load_model_function(str(directory / "exported"))
    assert isinstance(function, SavedModelFunction)
    assert function.path == str(directory / "exported")
    assert function.has_bn_mode("inference") and not function.has_bn_mode("train")
    # The same parameter values (the SavedModel does not promise Keras's order).
    def key(array):
        return (array.shape, array.tobytes())
    loaded = sorted((v.numpy() for v in function.variables), key=key)
    original = sorted((v.numpy() for v in model.trainable_variables), key=key)
    assert len(loaded) == len(original) == 6
    for a, b in zip(loaded, original):
        np.testing.assert_array_equal(a, b)
    outputs, _ = function(function.primals(), function.state(), tf.constant(x), bn_mode="inference")
    np.testing.assert_allclose(outputs.numpy(), model(x, training=False).numpy(), rtol=1e-5)


def test_saved_model_path_with_trailing_slash(saved):
    directory, _, _ = saved
    assert isinstance(load_model_function(str(directory / "exported") + "/"), SavedModelFunction)


def _bad_model_path(directory, case):
    """Makes the path of one bad case; returns it."""
    if case == "missing path":
        return directory / "absent.keras"
    if case == "missing directory":
        return directory / "absent" / "model"
    if case == "directory without saved_model.pb":
        path = directory / "empty_dir"
        path.mkdir()
        (path / "variables").mkdir()
        return path
    if case == "corrupted saved_model.pb":
        path = directory / "broken_saved_model"
        path.mkdir()
        (path / "saved_model.pb").write_bytes(b"\x00garbage\xff" * 10)
        return path
    if case == "SavedModel without serve":
        path = directory / "plain_module"
        module = tf.Module()
        module.weights = tf.Variable([1.0, 2.0])
        tf.saved_model.save(module, str(path))
        return path
    if case == "wrong extension":
        path = directory / "model.h5"
        path.write_bytes(b"\x89HDF\r\n\x1a\n")
        return path
    if case == "no extension":
        path = directory / "model"
        path.write_text("weights")
        return path
    if case == "not a zip":
        path = directory / "garbage.keras"
        path.write_bytes(b"not a zip file")
        return path
    if case == "empty .keras":
        path = directory / "empty.keras"
        path.write_bytes(b"")
        return path
    if case == "truncated .keras":
        whole = (directory / "whole.keras")
        small_bn_model().save(str(whole))
        path = directory / "truncated.keras"
        path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
        return path
    if case == "zip without config":
        path = directory / "empty_zip.keras"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("metadata.json", "{}")
        return path
    if case == "lambda layer (unsafe)":
        path = directory / "lambda.keras"
        keras.Sequential([keras.Input((2,)), keras.layers.Lambda(lambda t: t * 2.0),
                          keras.layers.Dense(1)]).save(str(path))
        return path
    raise AssertionError(case)


@pytest.mark.parametrize("case, expected", [
    ("missing path", "no such file or directory"),
    ("missing directory", "no such file or directory"),
    ("directory without saved_model.pb", "no saved_model.pb"),
    ("corrupted saved_model.pb", "SavedModel could not be loaded"),
    ("SavedModel without serve", "no 'serve' function"),
    ("wrong extension", "convert an HDF5 file with keras.models.load_model"),
    ("no extension", "unknown model format"),
    # Keras would say "File not found" of the first, and the second would be blamed on
    # custom layers: refused before Keras reads them.
    ("not a zip", "not a .keras file (not a zip archive: empty, cut short"),
    ("truncated .keras", "not a .keras file (not a zip archive: empty, cut short"),
    ("empty .keras", "not a .keras file (not a zip archive: empty, cut short"),
    ("zip without config", ".keras file could not be loaded"),
    ("lambda layer (unsafe)", "replace the Lambda layer with a custom layer registered"),
])
def test_bad_model_is_a_value_error_naming_the_flag(tmp_path, case, expected):
    path = _bad_model_path(tmp_path, case)
    with pytest.raises(ValueError) as raised:
        load_model_function(str(path))
    message = str(raised.value)
    assert message.startswith(f"--model={path}"), message
    assert expected in message, message
    assert "\n" not in message


def test_empty_model_path():
    with pytest.raises(ValueError, match="^--model is empty"):
        load_model_function("")


LAYERS_MODULE = """
import keras


@keras.saving.register_keras_serializable(package="hessian_tf_test")
class Scale(keras.layers.Layer):
    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, inputs):
        return inputs * self.scale
"""


def test_custom_layers_load_after_import_modules(tmp_path, monkeypatch):
    import importlib
    import sys

    from hessian_tf.io.models import import_modules

    (tmp_path / "custom_layers_for_test.py").write_text(LAYERS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("custom_layers_for_test")
    path = tmp_path / "custom.keras"
    keras.Sequential([keras.Input((3,)), module.Scale(), keras.layers.Dense(2)]).save(str(path))
    # A fresh process has neither the module nor its registration.
    del sys.modules["custom_layers_for_test"]
    keras.saving.get_custom_objects().pop("hessian_tf_test>Scale")
    with pytest.raises(ValueError, match="--import_modules=MODULE"):
        load_model_function(str(path))
    # A module that registers nothing: the error names it rather than advising the flag.
    with pytest.raises(ValueError, match=r"--import_modules=json was imported; check that it "
                                         r"registers every custom layer"):
        load_model_function(str(path), imported_modules="json")
    import_modules(" custom_layers_for_test, ")
    function = load_model_function(str(path))
    assert len(function.variables) == 3  # the scale, the kernel and the bias
    keras.saving.get_custom_objects().pop("hessian_tf_test>Scale")


def test_a_module_that_cannot_be_imported_is_one_line():
    from hessian_tf.io.models import import_modules

    with pytest.raises(ValueError) as raised:
        import_modules("json,no_such_module_xyz")
    message = str(raised.value)
    assert message.startswith("--import_modules=json,no_such_module_xyz: module "
                              "'no_such_module_xyz' could not be imported (ModuleNotFoundError")
    assert "\n" not in message


def test_import_modules_without_a_model_is_refused():
    from hessian_tf import config as config_lib

    config = config_lib.default_config()
    config.import_modules = "my_layers"
    with pytest.raises(ValueError, match=r"^--import_modules=my_layers goes with --model"):
        config_lib.validate(config)


def test_a_module_that_exits_at_import_is_one_line(tmp_path, monkeypatch):
    from hessian_tf.io.models import import_modules

    (tmp_path / "exits_at_import.py").write_text("import sys\nsys.exit('usage: a script')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"'exits_at_import' could not be imported \(SystemExit"):
        import_modules("exits_at_import")


def test_several_inputs_or_outputs_are_refused_before_any_data_is_read():
    """A functional model of two inputs or two outputs: one line naming --model, its
    shapes and the fix, when the function is built (not a shape error from the data)."""
    first, second = keras.Input((8, 8, 1)), keras.Input((3,))
    merged = keras.layers.Concatenate()([keras.layers.Flatten()(first), second])
    with pytest.raises(ValueError, match=r"^--model: the model takes 2 inputs \(\S+ \(8, 8, 1\), "
                                         r"\S+ \(3,\)\).*slicing layers"):
        KerasModelFunction(keras.Model([first, second], keras.layers.Dense(2)(merged)))
    inputs = keras.Input((4,))
    heads = [keras.layers.Dense(3)(inputs), keras.layers.Dense(1)(inputs)]
    with pytest.raises(ValueError, match=r"^--model: the model has 2 outputs.*"
                                         r"keras\.Model\(model\.inputs, model\.outputs\[0\]\)"):
        KerasModelFunction(keras.Model(inputs, heads))


def test_one_output_in_a_list_or_dict_is_the_output():
    """keras.Model(inputs, [logits]) or {name: logits}: one output, as the tensor's own."""
    from hessian_tf import operators

    keras.utils.set_random_seed(3)
    inputs = keras.Input((4,))
    logits = keras.layers.Dense(3)(keras.layers.Dense(5, activation="tanh")(inputs))
    x = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    y = np.arange(6) % 3
    vector = np.random.default_rng(1).standard_normal(43)
    products = [operators.HessianOperator(KerasModelFunction(keras.Model(inputs, outputs)), x,
                                          y, batch_size=3).matvec(vector)
                for outputs in (logits, [logits], {"logits": logits})]
    np.testing.assert_array_equal(products[1], products[0])
    np.testing.assert_array_equal(products[2], products[0])


def test_a_subclassed_model_of_two_outputs_is_refused_as_a_model_not_as_data():
    """Its outputs are only known once called: the fit check must not report it as
    inputs that do not fit (--dataset), as it did."""
    from hessian_tf import operators

    class TwoHeads(keras.Model):
        def __init__(self):
            super().__init__()
            self.first, self.second = keras.layers.Dense(3), keras.layers.Dense(1)

        def call(self, x):
            return self.first(x), self.second(x)

    model = TwoHeads()
    model(np.zeros((1, 4), np.float32))
    x = np.ones((6, 4), np.float32)
    with pytest.raises(ValueError, match=r"^--model: the model has several outputs"):
        operators.HessianOperator(KerasModelFunction(model), x, np.zeros(6, np.int64),
                                  batch_size=3)


def test_a_file_that_cannot_be_read_is_told_so(tmp_path, monkeypatch):
    # It was "not a .keras file (not a zip archive ...); save the model again" (and the
    # data's "not an .npz file"), of files that are both but unreadable to this user.
    from hessian_tf.io import datasets, models, results

    model = tmp_path / "model.keras"
    keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]).save(str(model))
    import numpy as np

    np.savez(tmp_path / "data.npz", x=np.ones((2, 2)), y=np.zeros(2))

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(results, "open", denied, raising=False)  # the one check of both
    with pytest.raises(ValueError, match=r"--model=\S+model.keras: cannot be read "
                                         r"\(Permission denied\); give this user read"):
        models.check_model_path(str(model))
    with pytest.raises(ValueError, match=r"--dataset=npz:\S+data.npz: cannot be read "
                                         r"\(Permission denied\)"):
        datasets.load_dataset(f"npz:{tmp_path / 'data.npz'}")


@keras.saving.register_keras_serializable(package="test")
def mean_squared_error(y_true, y_pred):  # the user's own, under a built-in's name
    return keras.ops.mean(keras.ops.abs(y_true - y_pred), axis=-1)


@pytest.mark.parametrize("compiled, loss, told", [
    # The training loss as saved, against --loss: told where they differ.
    ("mse", "sparse_categorical_crossentropy",
     "compiled with loss=mse; the spectrum is of --loss=sparse_categorical_crossentropy "
     "(pass --loss=mean_squared_error for the compiled one's)"),
    (keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
     "categorical_crossentropy", "loss=CategoricalCrossentropy (label_smoothing=0.1); the "
     "spectrum is of --loss=categorical_crossentropy, without label_smoothing=0.1"),
    (keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0),
     "sparse_categorical_crossentropy", "(ignore_class=0); the spectrum is of"),
    (keras.losses.Huber(), "mean_squared_error", "loss=Huber, which --loss does not offer"),
    (keras.losses.MeanSquaredError(reduction="sum"), "mean_squared_error",
     "(reduction='sum'); the spectrum is of --loss=mean_squared_error, without"),
    (["mae"], "mean_squared_error", "loss=mae, which --loss does not offer"),  # one output's
    # Keras's names and functions take probabilities; ours, logits.
    ("sparse_categorical_crossentropy", "sparse_categorical_crossentropy",
     "(from_logits=False); the spectrum is of --loss=sparse_categorical_crossentropy, which "
     "takes the model's outputs as logits, not probabilities"),
    (keras.losses.binary_crossentropy, "sparse_categorical_crossentropy",
     "loss=binary_crossentropy (from_logits=False)"),
    # The same loss by any of its names, or no compiled loss: nothing.
    (keras.losses.SparseCategoricalCrossentropy(from_logits=True),
     "sparse_categorical_crossentropy", None),
    ("mean_squared_error", "mean_squared_error", None),
    (keras.losses.MeanSquaredError(), "mean_squared_error", None),
    (["mse"], "mean_squared_error", None),
    (None, "sparse_categorical_crossentropy", None),
    # The user's own, registered under a built-in's name: its package names it.
    (mean_squared_error, "mean_squared_error",
     "loss=test>mean_squared_error, which --loss does not offer"),
])
def test_a_compiled_loss_other_than_the_spectrums_is_told(tmp_path, compiled, loss, told):
    from hessian_tf.io.models import compiled_loss_warning

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    if compiled is not None:
        model.compile(loss=compiled, optimizer="sgd")
    path = str(tmp_path / "model.keras")
    model.save(path)
    warning = compiled_loss_warning(path, loss)
    if told is None:
        assert warning is None
    else:
        assert warning.startswith(f"--model={path}: the model was compiled with loss=")
        assert told in warning
