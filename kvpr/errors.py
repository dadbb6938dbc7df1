"""One error type for everything a user can fix; the CLI prints its message as one line."""

from __future__ import annotations


class KvprError(Exception):
    """A problem the user can fix. The message names the problem and the fix, on one line."""
