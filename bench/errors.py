"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class BenchError(Exception):
    """An error caused by user input (a name, a file, an option); its message is the whole explanation."""
