"""One exception type for every user-facing mistake, so the CLI can print one line and exit."""

from __future__ import annotations

__all__ = ["LcsError", "state_dict_error"]


class LcsError(ValueError):
    """Bad input (config, data, checkpoint, α): the message says what was wrong and how to fix it.

    Subclasses ValueError so library users can catch it the ordinary way.
    """


def state_dict_error(err: RuntimeError, limit: int = 3) -> str:
    """``load_state_dict``'s error as one line: its first few problems, not only its heading."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    problems = lines[1:] or lines
    more = f" (+{len(problems) - limit} more)" if len(problems) > limit else ""
    text = "; ".join(problems[:limit]) + more
    return text if len(text) <= 400 else text[:397] + "..."
