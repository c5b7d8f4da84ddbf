"""The first line of an error's text, for the one-line messages a bad input gets."""

from __future__ import annotations

from typing import Optional


def first_line(error: BaseException, limit: Optional[int] = 200, fallback: str = "") -> str:
    """The first line of `str(error)`, stripped and cut to `limit` characters (None: not
    cut); `fallback` when the error has no text."""
    lines = str(error).strip().splitlines()
    if not lines:
        return fallback
    return lines[0] if limit is None else lines[0][:limit]
