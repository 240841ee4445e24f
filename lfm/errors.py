"""The one exception a user sees: it names the problem and the fix."""

from __future__ import annotations

from typing import Any

# An echoed value longer than this is cut: a 2 MB string pasted into a YAML field must not
# become a 2 MB error line, and ~100 characters still show which value it was.
ECHO_LIMIT = 100
# A backstop for messages whose echoed values did not go through `shown`: no part of an error
# (problem or fix) is longer than this, whatever it quotes.
PART_LIMIT = 600


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """`text` itself, or its first `limit` characters and how many were left out.

    Example
    -------
    >>> clip("x" * 300, 10)
    'xxxxxxxxxx... (300 characters)'
    """
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def shown(value: Any, limit: int = ECHO_LIMIT) -> str:
    """A user-given value as an error message echoes it: its repr, cut to about `limit` chars.

    Example
    -------
    >>> shown("flip:0.4")
    "'flip:0.4'"
    >>> len(shown("a" * 2_000_000)) < 130
    True
    """
    return clip(repr(value), limit)


class LFMError(Exception):
    """Bad input or an impossible request; the CLI prints it as one line and exits with code 2."""

    def __init__(self, problem: str, fix: str | None = None):
        self.unclipped = problem  # a DataLoader re-raises a worker's error as its traceback
        self.problem = clip(problem, PART_LIMIT)
        self.fix = None if fix is None else clip(fix, PART_LIMIT)
        super().__init__(self.problem if self.fix is None else f"{self.problem}. Fix: {self.fix}")
