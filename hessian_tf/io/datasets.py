"""Datasets as in-memory arrays (x [N, ...], y [N, ...]).

Specs:
- `digits`: scikit-learn's 1797 8×8 digit images, flattened to 64 features in
  [0, 1], labels 0-9. Ships with scikit-learn: no network needed.
- `npz:PATH`: a NumPy .npz file with arrays `x` and `y` (no pickled objects), used as
  given (uint8 `x` beyond 1 is warned of: tfds images would be scaled).
- `tfds:NAME[/CONFIG]`: a TensorFlow Datasets split (`split`, `data_dir`); integer
  images are scaled to [0, 1]. The whole split is read into memory.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from hessian_tf.io import results
from hessian_tf.messages import first_line

DATASET_FORMS = "'digits', 'npz:PATH' or 'tfds:NAME[/CONFIG]'"
_TFDS_READ_BATCH = 4096  # examples per tf.data batch while reading a tfds split


def load_dataset(spec: str, *, split: str = "train", data_dir: str | None = None):
    """Returns (x, y) numpy arrays for a dataset spec."""
    if spec == "digits":
        return load_digits()
    if spec.startswith("npz:"):
        return load_npz(spec[len("npz:") :])
    if spec.startswith("tfds:"):
        return load_tfds(spec[len("tfds:") :], split=split, data_dir=data_dir)
    raise ValueError(f"--dataset={spec!r} is not a known dataset; use {DATASET_FORMS}.")


def load_digits():
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    return x, y


def load_npz(path: str):
    if not os.path.isfile(path):
        raise ValueError(f"--dataset=npz:{path}: no such file; pass an existing .npz file.")
    unreadable = results.unreadable(path)
    if unreadable:
        raise ValueError(
            f"--dataset=npz:{path}: cannot be read ({unreadable}); give this user read "
            "access to it, or pass a copy that can be read.")
    # An .npz is a zip archive. Without this check np.load returns a bare array for
    # a .npy file (which has no `with`: TypeError) and reports any other non-zip
    # file as "pickled data".
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"--dataset=npz:{path}: not an .npz file (not a zip archive); write it with "
            "np.savez(path, x=..., y=...)."
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = {"x", "y"} - set(archive.files)
            if missing and {"config.json", "model.weights.h5"} <= set(archive.files):
                raise ValueError(
                    f"--dataset=npz:{path}: this is a .keras model, not data; pass it as "
                    "--model, and the data as --dataset=npz:DATA.npz."
                )
            if missing:
                raise ValueError(
                    f"--dataset=npz:{path}: the file lacks arrays {sorted(missing)} "
                    f"(it has {sorted(archive.files)}); save it with np.savez(path, x=..., y=...)."
                )
            x, y = archive["x"], archive["y"]
            if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
                # np.load hands back raw bytes for zip members that are not .npy.
                raise ValueError(
                    f"--dataset=npz:{path}: the members 'x' and 'y' are not NumPy "
                    "arrays; write the file with np.savez(path, x=..., y=...)."
                )
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(
            f"--dataset=npz:{path}: not a readable .npz file ({error}); write it with np.savez."
        ) from error
    except ValueError as error:
        if "--dataset" in str(error):
            raise
        raise ValueError(
            f"--dataset=npz:{path}: cannot read the arrays without pickle ({error}); "
            "store plain numeric arrays."
        ) from error
    if x.dtype == np.uint8 and x.size and int(x.max()) > 1:
        # Unlike a tfds split's, an npz's integers are used as given (they may be token
        # ids); 8-bit images are then 0-255, where a model trained on x/255 sees
        # inputs 255 times too large and the spectrum is of another loss.
        from absl import logging

        logging.warning(
            "--dataset=npz:%s: x is uint8 with values up to %d, used as given (not scaled "
            "to [0, 1] as tfds images are); if the model was trained on scaled inputs, "
            "save x scaled the same way.", path, int(x.max()))
    return _checked(x, y, f"npz:{path}")


def load_tfds(name: str, *, split: str, data_dir: str | None):
    import tensorflow_datasets as tfds

    # Not batch_size=-1: tfds then batches by the dataset's total example count, or by
    # sys.maxsize when that is unknown (mock_data, metadata-less builders), which
    # aborts the whole process in padded_batch (std::length_error). Finite batches,
    # concatenated here, read the same examples in the same order.
    try:
        dataset = tfds.load(name, split=split, data_dir=data_dir, as_supervised=True,
                            download=False)
        batches = list(tfds.as_numpy(dataset.batch(_TFDS_READ_BATCH)))
    except Exception as error:  # tfds raises its own types for missing data
        raise tfds_read_error(f"--dataset=tfds:{name} --split={split} --data_dir="
                              f"{data_dir or '(tfds default)'}", error) from error
    if not batches:
        raise ValueError(
            f"--dataset=tfds:{name} --split={split}: the split has no examples."
        )
    x = np.concatenate([batch[0] for batch in batches])
    y = np.concatenate([batch[1] for batch in batches])
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / 255.0
    return _checked(x, y, f"tfds:{name}")


def tfds_read_error(where: str, error: BaseException) -> ValueError:
    """The one-line error for a tfds split that cannot be read."""
    first = first_line(error)
    return ValueError(
        f"{where}: could not be read ({type(error).__name__}: {first}); prepare it with "
        "`tfds build` into --data_dir."
    )


def _checked(x: np.ndarray, y: np.ndarray, spec: str):
    if x.ndim < 1 or y.ndim < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"--dataset={spec}: x has shape {x.shape} and y {y.shape}; they need the "
            "same number of examples along the first axis."
        )
    if x.shape[0] == 0:
        raise ValueError(f"--dataset={spec}: the dataset has no examples.")
    if not np.issubdtype(x.dtype, np.number) or not np.issubdtype(y.dtype, np.number):
        raise ValueError(f"--dataset={spec}: x and y must be numeric arrays.")
    for name, array in (("x", x), ("y", y)):
        if np.iscomplexobj(array):
            raise ValueError(
                f"--dataset={spec}: {name} holds complex numbers ({array.dtype}), which "
                "TensorFlow would cut to their real parts; pass real arrays."
            )
    if not np.all(np.isfinite(x)):
        raise ValueError(f"--dataset={spec}: x holds NaN or infinite values; clean the data.")
    if np.issubdtype(x.dtype, np.floating) and x.dtype != np.float32 and x.dtype != np.float64:
        x = x.astype(np.float32)
    if np.issubdtype(y.dtype, np.integer):
        # Labels beyond int32 would wrap around in the cast, into the model's classes.
        info = np.iinfo(np.int32)
        if y.size and (int(y.min()) < info.min or int(y.max()) > info.max):
            raise ValueError(
                f"--dataset={spec}: labels range over [{int(y.min())}, {int(y.max())}], "
                "beyond 32-bit integers; pass class indices (or targets as floats).")
        y = y.astype(np.int32)
    return x, y
