"""The project's error type (imports nothing, so every layer can raise it)."""


class LowbitError(ValueError):
    """A user-facing problem with a one-line message (the CLI prints it without a traceback)."""
