"""One exception type for every user-facing mistake, so the CLI can print one line and exit."""

from __future__ import annotations

__all__ = ["LcsError"]


class LcsError(ValueError):
    """Bad input (config, data, checkpoint, α): the message says what was wrong and how to fix it.

    Subclasses ValueError so library users can catch it the ordinary way.
    """
