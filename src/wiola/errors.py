"""Error types shared by the toolchain."""


class WiolaError(Exception):
    """An error caused by the user's input; the CLI prints its message on one line and exits 2."""
