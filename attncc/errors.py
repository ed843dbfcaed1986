"""Errors attncc raises for user mistakes (the CLI prints them as one line and exits 2)."""


class AttnccError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits 2."""
