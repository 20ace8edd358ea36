"""The one exception type for bad input: the CLI prints its message on one line and exits non-zero."""


class SparsecraftError(Exception):
    """A user-facing error: the message names the input and what would work."""
