"""The one exception type users see as a clean one-line message."""

__all__ = ["PyrovaeError"]


class PyrovaeError(Exception):
    """Bad input or state the user can fix; the CLI prints it as one line and exits non-zero."""
