"""The first line of an error's text (or of the error raised inside a traced function),
for the one-line messages a bad input gets."""

from __future__ import annotations

import re
from typing import Optional

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_GRAPH_EXECUTION = "Graph execution error:"
# What TensorFlow writes between that line and the op's message: where the node was
# defined, its frames, or that they are unavailable.
_FRAME = re.compile(r'^(Detected at node .*|File ".*", line \d+, in .*|<stack traces unavailable>)$')
_RAISED = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception)): ")


def first_line(error: BaseException, limit: Optional[int] = 200, fallback: str = "") -> str:
    """The first line of `str(error)`, stripped and cut to `limit` characters (None: not
    cut); `fallback` when the error has no text. An op that failed inside a
    tf.function ("Graph execution error:", then the frames where the node was
    defined): the first line of the op's own message after those frames."""
    lines = [line.strip() for line in str(error).strip().splitlines()]
    if lines and lines[0] == _GRAPH_EXECUTION:
        message = [line for line in lines[1:] if line and not _FRAME.match(line)]
        lines = message or lines
    if not lines:
        return fallback
    return lines[0] if limit is None else lines[0][:limit]


def traced_error(error: BaseException, limit: int = 200) -> str:
    """One line for an error raised while TensorFlow traced a function: its text starts
    "in user code:" and the frames, and ends with the error raised inside ("TypeError:
    ..." and, from Keras, the message on the next line). That last error (with the
    message's next line); an error raised as it is (traced without AutoGraph) reads
    the same: its type, its first line and the next. Else (no text, or an op that
    failed when run) `first_line`."""
    lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines()]
    raised = [i for i, line in enumerate(lines) if _RAISED.match(line)]
    if raised:
        start = raised[-1]
    else:
        lines = [line for line in lines if line]
        if not lines or lines[0] == _GRAPH_EXECUTION:  # an op failed when run
            return first_line(error, limit)
        lines[0] = f"{type(error).__name__}: {lines[0]}"
        start = 0
    following = next((line for line in lines[start + 1:] if line), "")
    text = lines[start]
    if following and not following.startswith(("Arguments received", "File ")):
        text += " " + following
    return text[:limit]
