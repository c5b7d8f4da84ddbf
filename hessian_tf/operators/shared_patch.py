"""Process-wide patches shared by overlapping contexts.

hessian_tf changes some of TensorFlow's and Keras's process-wide state while it traces
products (moments.py: the normalisation statistics; second_order.py: gradient
functions). Contexts may nest and overlap in threads (MirroredStrategy traces replicas
in threads): the first entry applies the patch, the last exit undoes it.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable


class SharedPatch:
    """`with patch():` applies `apply()` at the first entry open in the process and
    `undo()` when the last one exits."""

    def __init__(self, apply: Callable[[], None], undo: Callable[[], None]):
        self._apply, self._undo = apply, undo
        self._lock = threading.Lock()
        self._entries = 0  # contexts open now, in any thread

    @contextlib.contextmanager
    def __call__(self):
        with self._lock:
            if self._entries == 0:
                self._apply()
            self._entries += 1
        try:
            yield
        finally:
            with self._lock:
                self._entries -= 1
                if self._entries == 0:
                    self._undo()
