"""Writing results whole: each file goes to a temporary name, then is renamed.

A crash never leaves a file that looks complete: `spectrum.npz` is renamed into
place last, after `density.png` and `summary.json`.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Callable

import numpy as np

SPECTRUM_FILE = "spectrum.npz"
SUMMARY_FILE = "summary.json"
DENSITY_FILE = "density.png"


class NotWritableError(ValueError):
    """A directory results cannot be written to; `reason` says why in a few words."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def check_writable(output_dir: str, flag: str = "--output_dir") -> list[str]:
    """Creates `output_dir` and proves a file can be written there, before any work.
    Returns the directories it created, deepest first (for remove_empty_directories).
    Errors name `flag` (NotWritableError where the directory is there to name)."""
    if not output_dir:
        raise ValueError(f"{flag} is empty; pass a directory to write results to.")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise NotWritableError(f"{flag}={output_dir}: a file, not a directory; pass a "
                               "directory to write results to.", "a file, not a directory")
    created = []
    directory = os.path.abspath(output_dir)
    while directory and not os.path.exists(directory):
        created.append(directory)
        directory = os.path.dirname(directory) if os.path.dirname(directory) != directory else ""
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-"):
            pass
    except OSError as error:
        remove_empty_directories(created)
        reason = error.strerror or str(error)
        raise NotWritableError(
            f"{flag}={output_dir}: cannot write there ({reason}); pass a writable directory.",
            reason,
        ) from error
    return created


def remove_empty_directories(directories: list[str]) -> None:
    """Removes each directory (deepest first) that is empty; keeps any that is not."""
    for directory in directories:
        try:
            os.rmdir(directory)
        except OSError:
            return  # not empty (results, checkpoints) or gone: keep it and its parents


def _temporary_path(output_dir: str, name: str) -> str:
    # The suffix keeps the final extension: some writers (Keras) insist on it.
    handle, path = tempfile.mkstemp(dir=output_dir, prefix=".tmp-", suffix=f"-{name}")
    os.close(handle)
    # mkstemp creates 0600; results are ordinary files, readable as the umask allows.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return path


def write_files(output_dir: str, writers: dict[str, Callable[[str], None]]) -> list[str]:
    """Writes every file with its writer to a temporary path, then renames them all
    into place in the order given. On any failure no temporary file remains, and no
    new file is put in place unless a rename failed after others (`occupied` refuses
    the likely cause, a directory of a file's name, before a job runs)."""
    temporary = {}
    try:
        for name, writer in writers.items():
            temporary[name] = _temporary_path(output_dir, name)
            writer(temporary[name])
            with open(temporary[name], "rb") as handle:
                os.fsync(handle.fileno())
    except BaseException:
        for path in temporary.values():
            if os.path.exists(path):
                os.remove(path)
        raise
    final = []
    try:
        for name, path in temporary.items():
            os.replace(path, os.path.join(output_dir, name))
            final.append(os.path.join(output_dir, name))
    except BaseException:  # those not renamed yet are not left behind
        for path in list(temporary.values())[len(final):]:
            if os.path.exists(path):
                os.remove(path)
        raise
    return final


def unreadable(path: str) -> str:
    """"" where the file (or a SavedModel directory's saved_model.pb) can be opened for
    reading; else the OS's reason (Permission denied), which the format checks after it
    would read as "not a zip archive"."""
    target = os.path.join(path, "saved_model.pb") if os.path.isdir(path) else path
    try:
        with open(target, "rb"):
            return ""
    except OSError as error:
        return error.strerror or str(error)


def occupied(output_dir: str, names, flag: str = "--output_dir") -> str:
    """"" where every one of `names` under `output_dir` is a file or absent; else the
    one line that refuses the directory standing in a file's place."""
    for name in names:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            return (f"{flag}={output_dir}: {path} is a directory, where the file {name} "
                    f"goes; remove or rename it, or pass another {flag}.")
    return ""


def npz_writer(arrays: dict[str, np.ndarray]) -> Callable[[str], None]:
    def write(path: str) -> None:
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)

    return write


def strict_json(value):
    """NaN and infinities become null: strict JSON readers (jq, Go, browsers)
    reject the bare NaN that Python writes."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def json_writer(data: dict) -> Callable[[str], None]:
    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(strict_json(data), handle, indent=2, sort_keys=True, allow_nan=False)
            handle.write("\n")

    return write
