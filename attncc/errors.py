"""Errors attncc raises for user mistakes (the CLI prints them as one line and exits 2)."""


class AttnccError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits 2."""


class AttnccWarning(UserWarning):
    """What attncc left alone or could not see: near-misses, graphs left unchanged, attention outside the captured
    graphs (each also in ``report().rejected``)."""
